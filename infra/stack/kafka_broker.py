"""Apache Kafka 4.x, one broker in KRaft combined mode, run from Maven Central jars.

The classpath comes from ``infra/kafka/pom.xml`` (``mvn dependency:copy-dependencies``) into a cache
dir; storage is formatted once, so topics and committed messages survive `stack down`/`up`.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import subprocess
from pathlib import Path
from string import Template

from core.process import ServiceSpec, StackError
from core.settings import KafkaSettings, StackSettings

INFRA_KAFKA = Path(__file__).resolve().parents[1] / "kafka"
_quiet = logging.getLogger("infra.stack.kafka.health")
_quiet.addHandler(logging.NullHandler())
_quiet.propagate = False


def require_tool(tool: str, hint: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise StackError(f"`{tool}` was not found on PATH. {hint}")
    return path


def kafka_libs(cache_dir: Path) -> Path:
    """Resolve the broker's jars with Maven into the cache (once per pom content). Returns the libs dir."""
    pom = INFRA_KAFKA / "pom.xml"
    digest = hashlib.sha256(pom.read_bytes()).hexdigest()[:12]
    libs = cache_dir / f"kafka-{digest}" / "libs"
    marker = libs.parent / "complete"
    if marker.exists():
        return libs
    mvn = require_tool("mvn", "Install Apache Maven 3.8+ (Debian: apt-get install maven).")
    require_tool("java", "Install a Java 17+ runtime (Debian: apt-get install openjdk-17-jre-headless).")
    libs.mkdir(parents=True, exist_ok=True)
    cmd = [
        mvn,
        "-q",
        "-B",
        "-f",
        str(pom),
        "dependency:copy-dependencies",
        f"-DoutputDirectory={libs}",
        "-DincludeScope=runtime",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise StackError(
            f"Maven could not resolve the Kafka jars:\n{result.stdout[-2000:]}{result.stderr[-2000:]}"
        )
    marker.write_text(digest)
    return libs


class KafkaBroker(ServiceSpec):
    name = "kafka"

    def __init__(self, stack: StackSettings):
        super().__init__(stack.root)
        self.stack = stack
        self.host = stack.host
        self.port = stack.kafka_port
        self.home = stack.root / "kafka"
        self.data_dir = self.home / "data"
        self.properties = self.home / "server.properties"

    def ports(self) -> list[int]:
        return [self.port, self.stack.kafka_controller_port]

    def _classpath(self) -> str:
        return f"{kafka_libs(self.stack.cache_dir)}/*"

    def prepare(self) -> None:
        java = require_tool(
            "java", "Install a Java 17+ runtime (Debian: apt-get install openjdk-17-jre-headless)."
        )
        classpath = self._classpath()
        self.home.mkdir(parents=True, exist_ok=True)
        template = Template((INFRA_KAFKA / "server.properties").read_text())
        self.properties.write_text(
            template.substitute(
                host=self.host,
                port=self.port,
                controller_port=self.stack.kafka_controller_port,
                data_dir=self.data_dir,
            )
        )
        if (self.data_dir / "meta.properties").exists():
            return  # formatted once; the data dir survives restarts
        cluster_id_file = self.home / "cluster.id"
        if not cluster_id_file.exists():
            out = subprocess.run(
                [java, "-cp", classpath, "kafka.tools.StorageTool", "random-uuid"],
                capture_output=True,
                text=True,
                check=True,
            )
            cluster_id_file.write_text(out.stdout.strip().splitlines()[-1])
        fmt = subprocess.run(
            [
                java,
                f"-Dlog4j2.configurationFile={INFRA_KAFKA / 'log4j2.properties'}",
                "-cp",
                classpath,
                "kafka.tools.StorageTool",
                "format",
                "--standalone",
                "--ignore-formatted",
                "-t",
                cluster_id_file.read_text().strip(),
                "-c",
                str(self.properties),
            ],
            capture_output=True,
            text=True,
        )
        if fmt.returncode != 0:
            raise StackError(f"formatting Kafka storage failed:\n{fmt.stdout[-2000:]}{fmt.stderr[-2000:]}")

    def command(self) -> list[str]:
        return [
            require_tool("java", "Install a Java 17+ runtime."),
            f"-Xmx{self.stack.kafka_heap}",
            "-Xms256m",
            "-XX:+UseG1GC",
            "-Djava.awt.headless=true",
            f"-Dkafka.logs.dir={self.home / 'logs'}",
            f"-Dlog4j2.configurationFile={INFRA_KAFKA / 'log4j2.properties'}",
            "-cp",
            self._classpath(),
            "kafka.Kafka",
            str(self.properties),
        ]

    def healthy(self) -> bool:
        """Healthy = the broker answers a metadata request on the client listener."""
        return broker_answers(f"{self.host}:{self.port}")


def broker_answers(bootstrap: str, timeout_s: float = 2.0, settings: KafkaSettings | None = None) -> bool:
    from confluent_kafka.admin import AdminClient

    conf = settings.client_config() if settings is not None else {}
    conf.update(
        {"bootstrap.servers": bootstrap, "logger": _quiet, "socket.connection.setup.timeout.ms": 1000}
    )
    try:
        metadata = AdminClient(conf).list_topics(timeout=timeout_s)
    except Exception:  # KafkaException on timeout: not healthy (yet)
        return False
    return bool(metadata.brokers)
