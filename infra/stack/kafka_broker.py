"""Apache Kafka 4.x, one broker in KRaft combined mode, run from Maven Central jars.

The classpath comes from ``infra/kafka/pom.xml`` (``mvn dependency:copy-dependencies``) into a cache
dir; storage is formatted once, so topics and committed messages survive `stack down`/`up`.

With ``FLYWHEEL_STACK_AUTH=true`` both listeners take SASL (``infra/kafka/server-auth.properties``) and
ACLs decide (``infra/acls.py``). SCRAM users live in the metadata log, so they are written when the storage
is formatted: a data dir formatted without them cannot be switched to auth (use another state dir).

With ``FLYWHEEL_STACK_KAFKA_BROKERS=N`` (``flywheel stack up --kafka-brokers N``), N > 1, the stack runs N
combined broker+controller nodes with a static quorum (``controller.quorum.voters``) and one cluster id.
Node i (1..N) is the service ``kafka`` (i = 1) or ``kafka-<i>``, keeps its data in ``kafka/node-<i>`` and
listens on ``kafka_port + 2(i-1)`` (clients) and ``kafka_controller_port + 2(i-1)`` (controller): the
defaults give 9092/9093, 9094/9095, 9096/9097. Internal and default topics get replication min(3, N) and
min.insync.replicas = replication - 1. Clients bootstrap from every node (:func:`bootstrap_servers`,
printed by `stack up`). The cluster runs without auth (the combination is refused).
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
from infra.stack import credentials

AUTH_CLUSTER = (
    "the authenticated stack runs one Kafka broker: unset FLYWHEEL_STACK_AUTH or use --kafka-brokers 1 "
    "(FLYWHEEL_STACK_KAFKA_BROKERS=1; `flywheel stack down` first if a cluster runs in this state dir)"
)
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


def node_ports(stack: StackSettings, node: int) -> tuple[int, int]:
    """(client port, controller port) of cluster node ``node`` (1-based)."""
    return stack.kafka_port + 2 * (node - 1), stack.kafka_controller_port + 2 * (node - 1)


def bootstrap_servers(stack: StackSettings, nodes: int | None = None) -> str:
    """``FLYWHEEL_KAFKA_BOOTSTRAP_SERVERS`` for the local stack: every node's client listener."""
    n = stack.kafka_brokers if nodes is None else nodes
    return ",".join(f"{stack.host}:{node_ports(stack, i)[0]}" for i in range(1, n + 1))


class KafkaBroker(ServiceSpec):
    name = "kafka"

    def __init__(self, stack: StackSettings, node: int = 1, nodes: int | None = None):
        super().__init__(stack.root)
        self.stack = stack
        self.node = node
        self.nodes = max(stack.kafka_brokers if nodes is None else nodes, node)
        self.cluster = self.nodes > 1
        self.host = stack.host
        self.port, self.controller_port = node_ports(stack, node)
        self.kafka_root = stack.root / "kafka"
        if self.cluster:
            self.name = "kafka" if node == 1 else f"kafka-{node}"
            self.home = self.kafka_root / f"node-{node}"
        else:
            self.home = self.kafka_root
        self.data_dir = self.home / "data"
        self.properties = self.home / "server.properties"
        self.scram_marker = self.home / "scram-users"  # written once the storage holds the SCRAM users

    def ports(self) -> list[int]:
        return [self.port, self.controller_port]

    def _cluster_overlay(self) -> str:
        """What a node of an N-node cluster sets over the single-node template."""
        voters = ",".join(f"{i}@{self.host}:{node_ports(self.stack, i)[1]}" for i in range(1, self.nodes + 1))
        factor = min(3, self.nodes)
        insync = max(1, factor - 1)
        return (
            f"# Node {self.node} of a {self.nodes}-node local cluster (static KRaft quorum).\n"
            f"node.id={self.node}\n"
            f"controller.quorum.voters={voters}\n"
            f"offsets.topic.replication.factor={factor}\n"
            f"transaction.state.log.replication.factor={factor}\n"
            f"transaction.state.log.min.isr={insync}\n"
            f"share.coordinator.state.topic.replication.factor={factor}\n"
            f"share.coordinator.state.topic.min.isr={insync}\n"
            f"default.replication.factor={factor}\n"
            f"min.insync.replicas={insync}\n"
        )

    def _classpath(self) -> str:
        return f"{kafka_libs(self.stack.cache_dir)}/*"

    def _render_properties(self) -> None:
        values = {
            "host": self.host,
            "port": self.port,
            "controller_port": self.controller_port,
            "data_dir": self.data_dir,
        }
        text = Template((INFRA_KAFKA / "server.properties").read_text()).substitute(values)
        if self.cluster:  # static voters replace the single node's bootstrap
            text = overlay_properties(text, self._cluster_overlay())
            text = "".join(
                line
                for line in text.splitlines(keepends=True)
                if not line.startswith("controller.quorum.bootstrap.servers=")
            )
        if self.stack.auth:
            secrets = credentials.credentials(self.stack)
            names = {
                "admin_user": "admin",
                "broker_user": credentials.BROKER_PRINCIPAL,
                "controller_user": credentials.CONTROLLER_PRINCIPAL,
            }
            overlay = Template((INFRA_KAFKA / "server-auth.properties").read_text()).substitute(
                values,
                **names,
                broker_password=secrets[credentials.BROKER_PRINCIPAL].get_secret_value(),
                controller_password=secrets[credentials.CONTROLLER_PRINCIPAL].get_secret_value(),
            )
            text = overlay_properties(text, overlay)
            self.properties.touch(mode=0o600)
            self.properties.chmod(0o600)  # the JAAS lines hold the broker's passwords
        self.properties.write_text(text)

    def _scram_args(self) -> list[str]:
        """``--add-scram`` for every SCRAM principal: the users exist from the broker's first start."""
        secrets = credentials.credentials(self.stack)
        names = [*credentials.KAFKA_PRINCIPALS, credentials.BROKER_PRINCIPAL]
        return [
            arg
            for name in names
            for arg in (
                "--add-scram",
                f"{credentials.SASL_MECHANISM}=[name={name},password={secrets[name].get_secret_value()}]",
            )
        ]

    def prepare(self) -> None:
        if self.cluster and self.stack.auth:
            raise StackError(AUTH_CLUSTER)
        formatted = (self.data_dir / "meta.properties").exists()
        if formatted and self.stack.auth and not self.scram_marker.exists():
            raise StackError(
                f"the Kafka storage in {self.data_dir} was formatted without SCRAM users, which are "
                "written only when storage is formatted: run the authenticated stack in another "
                "FLYWHEEL_STACK_STATE_DIR (or delete that data dir to start over)"
            )
        java = require_tool(
            "java", "Install a Java 17+ runtime (Debian: apt-get install openjdk-17-jre-headless)."
        )
        classpath = self._classpath()
        self.home.mkdir(parents=True, exist_ok=True)
        self._render_properties()
        if formatted:
            return  # formatted once; the data dir survives restarts
        cluster_id_file = self.kafka_root / "cluster.id"  # one id for every node of a cluster
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
                *([] if self.cluster else ["--standalone"]),  # a cluster's voters are in its properties
                "--ignore-formatted",
                "-t",
                cluster_id_file.read_text().strip(),
                "-c",
                str(self.properties),
                *(self._scram_args() if self.stack.auth else []),
            ],
            capture_output=True,
            text=True,
        )
        if fmt.returncode != 0:
            raise StackError(f"formatting Kafka storage failed:\n{fmt.stdout[-2000:]}{fmt.stderr[-2000:]}")
        if self.stack.auth:
            self.scram_marker.write_text(
                " ".join([*credentials.KAFKA_PRINCIPALS, credentials.BROKER_PRINCIPAL])
            )

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

    def client_settings(self) -> KafkaSettings | None:
        """What the stack's own tools connect with: ``admin`` when auth is on, else nothing special."""
        return credentials.kafka_settings(self.stack, "admin") if self.stack.auth else None

    def healthy(self) -> bool:
        """Healthy = the broker answers a metadata request on the client listener."""
        return broker_answers(f"{self.host}:{self.port}", settings=self.client_settings())


def overlay_properties(base: str, overlay: str) -> str:
    """``base`` without the keys ``overlay`` sets, then ``overlay``."""
    keys = {
        line.split("=", 1)[0].strip()
        for line in overlay.splitlines()
        if "=" in line and not line.startswith("#")
    }
    kept = [
        line
        for line in base.splitlines()
        if line.startswith("#") or line.split("=", 1)[0].strip() not in keys
    ]
    return "\n".join(kept).rstrip("\n") + "\n\n" + overlay


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
