"""Apicurio Registry 3.x, the stack's Confluent-compatible schema registry (its ``ccompat`` API).

The app comes from Maven Central like Kafka's jars: ``infra/registry/pom.xml`` unpacks Apicurio's built
Quarkus application (the app's ``all`` tarball) into the cache dir once per pom content. Storage is an H2
*file* under the state dir, so subjects and schema ids survive `stack down`/`up` (the ids are in every
message on the topics). Clients use the Confluent REST API at ``/apis/ccompat/v7``
(``FLYWHEEL_KAFKA_SCHEMA_REGISTRY_URL``). Apicurio 3 is compiled for Java 21: the stack's Kafka runs on 17,
so the registry finds its own runtime (:func:`registry_java`).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path

import httpx

from core.process import ServiceSpec, StackError
from core.settings import StackSettings
from infra.stack.kafka_broker import require_tool

INFRA_REGISTRY = Path(__file__).resolve().parents[1] / "registry"
CCOMPAT_PATH = "/apis/ccompat/v7"
MIN_JAVA = 21
JVM_DIRS = Path("/usr/lib/jvm")


def registry_app(cache_dir: Path) -> Path:
    """Unpack the registry's Quarkus app with Maven into the cache (once per pom content); its directory."""
    pom = INFRA_REGISTRY / "pom.xml"
    digest = hashlib.sha256(pom.read_bytes()).hexdigest()[:12]
    app = cache_dir / f"schema-registry-{digest}" / "quarkus-app"
    marker = app.parent / "complete"
    if marker.exists():
        return app
    mvn = require_tool("mvn", "Install Apache Maven 3.8+ (Debian: apt-get install maven).")
    app.mkdir(parents=True, exist_ok=True)
    cmd = [mvn, "-q", "-B", "-f", str(pom), "dependency:unpack-dependencies", f"-DoutputDirectory={app}"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0 or not (app / "quarkus-run.jar").exists():
        raise StackError(
            f"Maven could not resolve the schema registry:\n{result.stdout[-2000:]}{result.stderr[-2000:]}"
        )
    marker.write_text(digest)
    return app


@cache
def java_major(java: str) -> int:
    """The feature release of a ``java`` executable (17, 21, 25); 0 if it does not run."""
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30).stderr
    except OSError:
        return 0
    found = re.search(r'version "(\d+)', out)
    return int(found.group(1)) if found else 0


def registry_java(stack: StackSettings) -> str:
    """A Java 21+ ``java``: the setting, else ``$JAVA_HOME``, ``PATH``, then the JDKs under /usr/lib/jvm."""
    if stack.registry_java is not None:
        java = str(stack.registry_java)
        if java_major(java) < MIN_JAVA:
            raise StackError(f"FLYWHEEL_STACK_REGISTRY_JAVA={java} is not a Java {MIN_JAVA}+ runtime")
        return java
    candidates = [
        os.environ.get("JAVA_HOME") and str(Path(os.environ["JAVA_HOME"]) / "bin" / "java"),
        shutil.which("java"),
        *sorted((str(p) for p in JVM_DIRS.glob("*/bin/java")), reverse=True),
    ]
    for java in filter(None, candidates):
        if java_major(java) >= MIN_JAVA:
            return java
    raise StackError(
        f"the schema registry (Apicurio Registry 3) needs a Java {MIN_JAVA}+ runtime and none was found "
        "(JAVA_HOME, PATH, /usr/lib/jvm): install one (Debian: apt-get install openjdk-21-jre-headless) "
        "or set FLYWHEEL_STACK_REGISTRY_JAVA to its `java`"
    )


def registry_url(stack: StackSettings) -> str:
    """``FLYWHEEL_KAFKA_SCHEMA_REGISTRY_URL`` for the local stack: its Confluent-compatible API."""
    return f"http://{stack.host}:{stack.registry_port}{CCOMPAT_PATH}"


class SchemaRegistry(ServiceSpec):
    name = "registry"
    stop_timeout_s = 20.0

    def __init__(self, stack: StackSettings):
        super().__init__(stack.root)
        self.stack = stack
        self.host = stack.host
        self.port = stack.registry_port
        self.home = stack.root / "registry"

    def prepare(self) -> None:
        registry_java(self.stack)
        registry_app(self.stack.cache_dir)
        self.home.mkdir(parents=True, exist_ok=True)

    def command(self) -> list[str]:
        config = {
            "quarkus.http.host": self.host,
            "quarkus.http.port": self.port,
            "quarkus.http.access-log.enabled": "false",
            # health and metrics (unused here: health is the API answering) would take 0.0.0.0:9000
            "quarkus.management.host": self.host,
            "quarkus.management.port": 0,
            "apicurio.storage.kind": "sql",
            "apicurio.storage.sql.kind": "h2",
            "apicurio.datasource.url": f"jdbc:h2:file:{self.home / 'registry'}",
            # the defaults keep 20 connections open: a local store with one writer needs a few
            "apicurio.datasource.jdbc.initial-size": 2,
            "apicurio.datasource.jdbc.min-size": 2,
            "apicurio.datasource.jdbc.max-size": 8,
            "apicurio.storage.snapshot.location": self.home / "snapshots",
        }
        return [
            registry_java(self.stack),
            f"-Xmx{self.stack.registry_heap}",
            "-XX:+UseSerialGC",
            "-XX:TieredStopAtLevel=1",  # C1 only: starts in half the time on 2 cores, ample for its load
            "-Djava.awt.headless=true",
            *(f"-D{k}={v}" for k, v in config.items()),
            "-jar",
            str(registry_app(self.stack.cache_dir) / "quarkus-run.jar"),
        ]

    def healthy(self) -> bool:
        """Healthy = the Confluent-compatible API answers ``GET /config``."""
        try:
            return httpx.get(f"{registry_url(self.stack)}/config", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False
