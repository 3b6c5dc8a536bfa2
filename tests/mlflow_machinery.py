"""MLflow machinery for tests (and scripts/mlflow_ui_check.py), kept out of the product: a private loopback
``mlflow server`` in its own process group, so ``stop()`` ends exactly what it started, plus the small process
and port helpers the Ray machinery shares. cluster.yaml starts the head's server with MLflow's own CLI."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 90.0, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    """Poll ``url`` until it answers (an HTTP error such as 401 also means it is up); fail fast, with the log
    tail, if ``proc`` died meanwhile."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return
        except OSError:
            pass
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
            raise RuntimeError(f"process for {url} exited with code {proc.returncode} before answering:\n{tail}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")
        time.sleep(0.3)


def spawn(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    """``cmd`` in a session of its own (so its process group is exactly what it starts), output appended to
    ``log``."""
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=env)


def started(server, url: str, timeout: float, log: Path):
    """``server`` (anything with ``proc`` and ``stop()``) once ``url`` answers; stopped if it never does."""
    try:
        wait_http(url, timeout, server.proc, log)
    except BaseException:
        server.stop()
        raise
    return server


def live_pids(*, pgid: int | None = None, sid: int | None = None) -> list[int]:
    """Live (non-zombie) processes in process group ``pgid`` or session ``sid``, from /proc/<pid>/stat."""
    pids = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == os.getpid():
            continue
        try:
            state, _ppid, pgrp, session = (p / "stat").read_text().rsplit(")", 1)[1].split()[:4]
        except (OSError, ValueError):
            continue
        if state != "Z" and (int(pgrp) == pgid or int(session) == sid):
            pids.append(int(p.name))
    return pids


def end_group(pgid: int, timeout: float = 15.0) -> None:
    """SIGTERM a process group we started, SIGKILL what is left after ``timeout``."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while live_pids(pgid=pgid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not live_pids(pgid=pgid):
            return


@dataclass
class MlflowServer:
    host: str
    port: int
    backend_store_uri: str
    artifacts_destination: str
    log_path: Path
    proc: subprocess.Popen = field(repr=False)

    @property
    def uri(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        end_group(self.proc.pid)
        self.proc.wait()

    def restart(self, timeout: float = 90.0) -> MlflowServer:
        """A new server on the same host, port, database and artifact store."""
        return start_mlflow_server(self.backend_store_uri, host=self.host, port=self.port,
                                   artifacts=self.artifacts_destination, log=self.log_path, timeout=timeout)


def start_mlflow_server(db: str | Path, *, host: str = LOOPBACK, port: int | None = None,
                        artifacts: str | Path | None = None, workers: int = 2, log: Path | None = None,
                        timeout: float = 90.0) -> MlflowServer:
    """``mlflow server`` over a sqlite file (or any SQLAlchemy URI), once ``/health`` answers. It proxies
    artifacts, so workers need no shared filesystem."""
    backend = str(db) if "://" in str(db) else f"sqlite:///{Path(db).resolve()}"
    port = port or free_port(host)
    base = Path(backend[len("sqlite:///"):]).parent if backend.startswith("sqlite:///") else Path.cwd()
    artifacts = str(artifacts or base / "mlartifacts")
    artifacts = artifacts if "://" in artifacts else str(Path(artifacts).resolve())
    log = Path(log or base / f"mlflow-server-{port}.log")
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port),
           "--backend-store-uri", backend, "--artifacts-destination", artifacts, "--workers", str(workers)]
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}  # else 8 idle GenAI job workers
    server = MlflowServer(host, port, backend, artifacts, log, spawn(cmd, log, env))
    return started(server, f"{server.uri}/health", timeout, log)
