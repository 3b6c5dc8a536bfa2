"""A loopback MLflow tracking server we start and stop ourselves (tests, a laptop, the cluster head).

Concurrent writers (Tune trials, Train workers) log over HTTP to one server rather than each open the sqlite
file (sqlite + parallel first use races; see STACK_NOTES). It runs in its own process group so ``stop()``
ends exactly what it started; the MLflow client itself retries through brief outages.
"""

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
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=env)
    server = MlflowServer(host, port, backend, artifacts, log, proc)
    try:
        wait_http(f"{server.uri}/health", timeout, proc, log)
    except BaseException:
        server.stop()
        raise
    return server


def main(argv: list[str] | None = None) -> int:
    """``python -m pipelines.mlflow_server start|stop``: the detached server cluster.yaml runs on the head;
    its pid (= process group) goes to ``--pidfile``, and ``start`` restarts a server still running."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m pipelines.mlflow_server", description=main.__doc__)
    ap.add_argument("action", choices=("start", "stop"))
    ap.add_argument("--host", default=LOOPBACK, help="interface to bind (on a cluster head its private address)")
    ap.add_argument("--port", type=int, default=5000)
    ap.add_argument("--db", default="mlflow.db", help="sqlite file or SQLAlchemy URI of the backend store")
    ap.add_argument("--artifacts", default=None, help="artifact destination (default: mlartifacts beside --db)")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--pidfile", default="mlflow-server.pid")
    ap.add_argument("--log", default=None)
    a = ap.parse_args(argv)
    pidfile = Path(a.pidfile).expanduser()
    if pidfile.exists():
        try:
            pid = int(pidfile.read_text().strip())
            if b"mlflow" in Path(f"/proc/{pid}/cmdline").read_bytes():  # not a pid reused after a reboot
                end_group(pid)
        except (ValueError, OSError):
            pass
        pidfile.unlink()
    if a.action == "stop":
        return 0
    pidfile.parent.mkdir(parents=True, exist_ok=True)
    expand = lambda p: p if p is None or "://" in p else str(Path(p).expanduser())  # noqa: E731
    server = start_mlflow_server(expand(a.db), host=a.host, port=a.port, artifacts=expand(a.artifacts),
                                 workers=a.workers, log=a.log and Path(expand(a.log)))
    pidfile.write_text(str(server.proc.pid))
    print(f"MLflow tracking server at {server.uri} (pid {server.proc.pid}, log {server.log_path})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
