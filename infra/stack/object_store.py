"""A real S3-compatible object store for the lake: SeaweedFS, one ``weed server`` process.

The binary is built from the Go module proxy (``go build`` of :data:`WEED_MODULE` at :data:`WEED_VERSION`)
into the cache dir once; there is no release download to trust. One process runs the weed master, a
volume server, the filer and the S3 gateway, all on loopback, with data under ``<state_dir>/s3``. The S3
gateway takes one identity (access key ``flywheel``, a random secret made once, 0600) and the stack's
bucket (:data:`BUCKET`) is created on start.

Ports follow ``FLYWHEEL_STACK_S3_PORT`` (P): S3 on P, master/volume/filer on P+1..P+3, their gRPC (and
the gateway's) on P+1000..P+1003. Point the lake at it with the exports of `flywheel stack s3-env`:
``FLYWHEEL_LAKE_ROOT=s3://flywheel/lake`` plus the endpoint and keys (:func:`lake_env`).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from core.process import ServiceSpec, StackError
from core.settings import StackSettings
from infra.stack.kafka_broker import require_tool

WEED_MODULE = "github.com/seaweedfs/seaweedfs"
WEED_VERSION = "v0.0.0-20261109003541-7506e5f91cd6"
BUCKET = "flywheel"
ACCESS_KEY = "flywheel"
GRPC_OFFSET = 1000


def weed_path(cache_dir: Path) -> Path:
    return cache_dir / f"seaweedfs-{WEED_VERSION}" / "weed"


def weed_binary(cache_dir: Path) -> Path:
    """Build ``weed`` from the Go module proxy into the cache (once per version). Returns its path.

    ``go install module@version`` refuses a module whose go.mod has replace directives (SeaweedFS has),
    so the module's source is downloaded and built as the main module in a scratch dir.
    """
    binary = weed_path(cache_dir)
    if binary.exists():
        return binary
    go = require_tool("go", "Install Go 1.24+ (https://go.dev/dl/), which builds the SeaweedFS S3 server.")
    download = subprocess.run(
        [go, "mod", "download", "-json", f"{WEED_MODULE}@{WEED_VERSION}"], capture_output=True, text=True
    )
    if download.returncode != 0:
        raise StackError(f"go could not download {WEED_MODULE}@{WEED_VERSION}:\n{download.stdout[-2000:]}")
    source = Path(json.loads(download.stdout)["Dir"])
    binary.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=binary.parent) as scratch:
        tree = Path(scratch) / "src"
        shutil.copytree(source, tree)  # the module cache is read-only; the build writes go.sum
        tmp = Path(scratch) / "weed"
        build = subprocess.run(
            [go, "build", "-trimpath", "-ldflags", "-s -w", "-o", str(tmp), "./weed"],
            cwd=tree,
            capture_output=True,
            text=True,
        )
        if build.returncode != 0:
            raise StackError(f"go build of weed failed:\n{build.stderr[-3000:]}")
        tmp.replace(binary)  # atomic: a half-built binary is never found
    return binary


def s3_ports(stack: StackSettings) -> dict[str, int]:
    """``weed server`` port flag -> port: S3 on P, master/volume/filer next to it, gRPC 1000 above each."""
    p = stack.s3_port
    http = {"s3.port": p, "master.port": p + 1, "volume.port": p + 2, "filer.port": p + 3}
    return http | {f"{flag}.grpc": port + GRPC_OFFSET for flag, port in http.items()}


def secret_key(stack: StackSettings) -> str:
    """The S3 identity's secret, made once per state dir (0600)."""
    path = stack.root / "s3" / "secret"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(24))
    return path.read_text().strip()


def lake_env(stack: StackSettings) -> dict[str, str]:
    """``FLYWHEEL_LAKE_*`` that put the lake on this stack's object store."""
    return {
        "FLYWHEEL_LAKE_ROOT": f"s3://{BUCKET}/lake",
        "FLYWHEEL_LAKE_S3_ENDPOINT": f"http://{stack.host}:{stack.s3_port}",
        "FLYWHEEL_LAKE_S3_ACCESS_KEY_ID": ACCESS_KEY,
        "FLYWHEEL_LAKE_S3_SECRET_ACCESS_KEY": secret_key(stack),
    }


class ObjectStore(ServiceSpec):
    name = "s3"
    stop_timeout_s = 5.0  # weed keeps retrying its peers after SIGTERM; what it stored is on disk already

    def __init__(self, stack: StackSettings):
        super().__init__(stack.root)
        self.stack = stack
        self.host = stack.host
        self.port = stack.s3_port
        self.home = stack.root / "s3"
        self.identities = self.home / "identities.json"

    def ports(self) -> list[int]:
        return list(s3_ports(self.stack).values())

    def prepare(self) -> None:
        weed_binary(self.stack.cache_dir)
        (self.home / "data").mkdir(parents=True, exist_ok=True)
        identity = {
            "name": ACCESS_KEY,
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": secret_key(self.stack)}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        self.identities.touch(mode=0o600)
        self.identities.write_text(json.dumps({"identities": [identity]}))

    def command(self) -> list[str]:
        flags: dict[str, object] = {
            "ip": self.host,
            "ip.bind": self.host,
            "dir": self.home / "data",
            "filer": "true",
            "s3": "true",
            "s3.config": self.identities,
            "s3.port.iceberg": 0,
            "s3.port.lance": 0,
            "s3.iam": "false",
            "master.telemetry": "false",  # nothing leaves the machine
            "master.electionTimeout": "1s",  # a master of one elects itself: 16 s with the default 10 s
            "master.volumeSizeLimitMB": 64,  # small volumes: a test lake does not reserve gigabytes
            "volume.max": 32,
        }
        flags |= s3_ports(self.stack)
        return [str(weed_path(self.stack.cache_dir)), "server", *(f"-{k}={v}" for k, v in flags.items())]

    def env(self) -> dict[str, str]:
        # File ids from a clock (snowflake), not from a counter the master rebuilds from heartbeats after a
        # restart: with the counter, a restarted server served another object's bytes for a new Parquet
        # file (rows of an older table in a new one; seen in the SIGKILL exactly-once test on S3).
        return os.environ | {"WEED_MASTER_SEQUENCER_TYPE": "snowflake"}

    def healthy(self) -> bool:
        """Healthy = the S3 gateway's ``/healthz`` answers 200 (it answers once the filer is up)."""
        try:
            return httpx.get(f"http://{self.address}/healthz", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    def after_healthy(self) -> None:
        """Write into the stack's bucket (the gateway creates it on an admin's first put; idempotent):
        ``/healthz`` answers before the volume server has registered with the master, and a put then
        hangs, so the stack is ready once one lands."""
        import pyarrow as pa
        import pyarrow.parquet as pq
        from deltalake.fs import DeltaStorageHandler
        from pyarrow import fs

        env = lake_env(self.stack)
        options = {
            "aws_endpoint_url": env["FLYWHEEL_LAKE_S3_ENDPOINT"],
            "aws_access_key_id": ACCESS_KEY,
            "aws_secret_access_key": env["FLYWHEEL_LAKE_S3_SECRET_ACCESS_KEY"],
            "aws_region": "us-east-1",
            "allow_http": "true",
            "timeout": "2s",
            "max_retries": "0",
        }
        deadline = time.monotonic() + self.stack.start_timeout_s
        while True:
            try:
                bucket = fs.PyFileSystem(DeltaStorageHandler(f"s3://{BUCKET}", options))
                with bucket.open_output_stream(".ready.parquet") as probe:  # the ingest's own write path
                    pq.write_table(pa.table({"ready": [True]}), probe)
                return
            except OSError as e:
                if time.monotonic() > deadline:
                    raise StackError(f"s3: cannot write to bucket {BUCKET!r}: {e}") from e
                time.sleep(0.5)
