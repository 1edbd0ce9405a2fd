"""Supervise one local service as a detached process: PID file, log file, health, clean stop.

A service is described by :class:`ServiceSpec`; the functions here hold no state of their own, so
`flywheel stack up` run twice finds the first run's processes through their PID files.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import psutil


class StackError(RuntimeError):
    """A service cannot be started or stopped; the message says what to do about it."""


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    address: str
    pid: int | None
    running: bool
    healthy: bool
    log: Path

    @property
    def state(self) -> str:
        if self.healthy:
            return "healthy"
        return "starting/unhealthy" if self.running else "stopped"


class ServiceSpec(ABC):
    """One service of the local stack."""

    name: str
    host: str
    port: int

    def __init__(self, state_dir: Path):
        self.state_dir = state_dir

    @property
    def pid_file(self) -> Path:
        return self.state_dir / "run" / f"{self.name}.pid"

    @property
    def log_file(self) -> Path:
        return self.state_dir / "logs" / f"{self.name}.log"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def prepare(self) -> None:
        """Install and initialise what the service needs (idempotent). Raise StackError if impossible."""

    @abstractmethod
    def command(self) -> list[str]: ...

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def ports(self) -> list[int]:
        """Every port the service binds (checked for conflicts before start)."""
        return [self.port]

    @abstractmethod
    def healthy(self) -> bool: ...

    def after_healthy(self) -> None:
        """One-time set-up that needs the running service (idempotent)."""

    stop_timeout_s: float = 30.0


def read_pid(spec: ServiceSpec) -> int | None:
    """The PID of our running instance, or None (stale PID files are removed)."""
    try:
        pid = int(spec.pid_file.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    try:
        proc = psutil.Process(pid)
        if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
            return pid
    except psutil.NoSuchProcess:
        pass
    spec.pid_file.unlink(missing_ok=True)
    return None


def port_owner(host: str, port: int) -> str | None:
    """Describe whoever listens on host:port, or None if the port is free."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        if sock.connect_ex((host, port)) != 0:
            return None
    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                proc = psutil.Process(conn.pid)
                return f"pid {conn.pid} ({' '.join(proc.cmdline())[:120]})"
    except (psutil.AccessDenied, psutil.NoSuchProcess):
        pass
    return "an unknown process"


def status(spec: ServiceSpec) -> ServiceStatus:
    pid = read_pid(spec)
    healthy = spec.healthy() if pid is not None else False
    return ServiceStatus(spec.name, spec.address, pid, pid is not None, healthy, spec.log_file)


def launch(spec: ServiceSpec) -> None:
    """Start the service's process unless ours is already running; do not wait for it."""
    if read_pid(spec) is not None:
        return
    for port in spec.ports():
        owner = port_owner(spec.host, port)
        if owner:
            raise StackError(
                f"{spec.name}: port {spec.host}:{port} is already taken by {owner}. "
                f"Stop it, or choose another port (see `flywheel stack up --help`)."
            )
    spec.prepare()
    spec.log_file.parent.mkdir(parents=True, exist_ok=True)
    spec.pid_file.parent.mkdir(parents=True, exist_ok=True)
    with spec.log_file.open("ab") as log:
        log.write(f"\n=== starting {spec.name} at {time.strftime('%Y-%m-%dT%H:%M:%S')} ===\n".encode())
        log.flush()
        proc = subprocess.Popen(
            spec.command(),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=spec.env(),
            start_new_session=True,  # own process group: `down` stops children too
        )
    spec.pid_file.write_text(str(proc.pid))


def start(spec: ServiceSpec, timeout_s: float) -> ServiceStatus:
    """Start the service unless ours is already running; wait until healthy."""
    launch(spec)
    st = wait_healthy(spec, timeout_s)
    spec.after_healthy()
    return st


def wait_healthy(spec: ServiceSpec, timeout_s: float) -> ServiceStatus:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        st = status(spec)
        if st.healthy:
            return st
        if not st.running:
            raise StackError(
                f"{spec.name} exited during start-up; last log lines:\n{tail(spec.log_file, 25)}"
            )
        time.sleep(0.5)
    raise StackError(
        f"{spec.name} not healthy after {timeout_s:.0f}s; see {spec.log_file}:\n{tail(spec.log_file, 25)}"
    )


def stop(spec: ServiceSpec) -> bool:
    """Stop our instance (SIGTERM to its process group, SIGKILL after the timeout). True if one ran."""
    pid = read_pid(spec)
    if pid is None:
        return False
    _signal_group(pid, signal.SIGTERM)
    try:
        psutil.Process(pid).wait(spec.stop_timeout_s)
    except psutil.TimeoutExpired:
        _signal_group(pid, signal.SIGKILL)
        psutil.Process(pid).wait(10)
    except psutil.NoSuchProcess:
        pass
    _reap_group(pid)
    spec.pid_file.unlink(missing_ok=True)
    return True


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(os.getpgid(pid), sig)


def _reap_group(pgid: int) -> None:
    """Give children of the service (uvicorn workers, airflow components) a grace period, then kill them."""
    grace_until = time.monotonic() + 5
    while True:
        left = [p for p in psutil.process_iter(["pid"]) if _pgid(p.pid) == pgid]
        if not left:
            return
        if time.monotonic() > grace_until:
            for p in left:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.kill()
        time.sleep(0.2)


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except (ProcessLookupError, PermissionError):
        return None


def tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log yet)"
