"""A loopback MLflow tracking server we start and stop ourselves (tests, a laptop, the cluster head).

Many concurrent writers (Tune trials, Train workers) must log over HTTP to one server rather than open one
sqlite file each (sqlite + parallel first use races; see STACK_NOTES). The server binds to 127.0.0.1 unless
told otherwise; it runs in its own process group so ``stop()`` ends exactly the processes it started.

Brief outages need no code of ours: the MLflow client retries every HTTP call on connection errors
(``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, default 7, exponential ``MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR`` 2 s,
~4 minutes in all); tests/test_faults.py kills and restarts a server under a running sweep.
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
    """A TCP port that is free right now on ``host`` (the OS picks it; tiny race until it is bound)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 90.0, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    """Poll ``url`` until the server answers (200, or an HTTP error such as 401 from a server that wants a
    token: it is up); fail fast, with the log tail, if ``proc`` died meanwhile."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except urllib.error.HTTPError:
            return
        except (urllib.error.URLError, OSError):
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
    """SIGTERM a process group (one we started with ``start_new_session``), SIGKILL it if still alive
    after ``timeout``; returns when none of it is left."""
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


def stop_process_group(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """End the process group of ``proc`` (started with ``start_new_session=True``) and reap its leader."""
    end_group(proc.pid, timeout)
    proc.wait()


@dataclass
class MlflowServer:
    """A running ``mlflow server``; ``uri`` is what workers get as ``MLFLOW_TRACKING_URI``."""

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
        stop_process_group(self.proc)

    def kill(self) -> None:
        """Abrupt death (SIGKILL of the whole group), as a crashed or rebooted head would look."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def restart(self, timeout: float = 90.0) -> MlflowServer:
        """Start a new server on the same host, port, database and artifact store."""
        return start_mlflow_server(self.backend_store_uri, host=self.host, port=self.port,
                                   artifacts=self.artifacts_destination, log=self.log_path, timeout=timeout)

    def __enter__(self) -> MlflowServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_mlflow_server(db: str | Path, *, host: str = LOOPBACK, port: int | None = None,
                        artifacts: str | Path | None = None, workers: int = 2, log: Path | None = None,
                        timeout: float = 90.0) -> MlflowServer:
    """Start ``mlflow server`` on ``host:port`` over a sqlite file (or any SQLAlchemy URI) and wait until
    ``/health`` answers (~9 s here). Artifacts are proxied by the server (``--serve-artifacts``), so workers
    need no shared filesystem. Bind to 127.0.0.1 unless the server must be reached from other machines."""
    db_s = str(db)
    backend = db_s if "://" in db_s else f"sqlite:///{Path(db_s).resolve()}"
    port = port or free_port(host)
    base = Path(backend[len("sqlite:///"):]).parent if backend.startswith("sqlite:///") else Path.cwd()
    artifacts = artifacts if artifacts is not None else base / "mlartifacts"
    artifacts_s = str(artifacts) if "://" in str(artifacts) else str(Path(artifacts).resolve())
    log = log or base / f"mlflow-server-{port}.log"
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port),
           "--backend-store-uri", backend, "--artifacts-destination", artifacts_s, "--workers", str(workers)]
    env = dict(os.environ)
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")  # GenAI job workers: 8 idle processes
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=env)
    server = MlflowServer(host, port, backend, artifacts_s, Path(log), proc)
    try:
        wait_http(f"{server.uri}/health", timeout, proc, Path(log))
    except BaseException:
        server.stop()
        raise
    return server


def main(argv: list[str] | None = None) -> int:
    """``python -m pipelines.mlflow_server start|stop``: the detached server cluster.yaml runs on the head.

    ``start`` returns once ``/health`` answers and leaves the server running in its own session, its pid
    (= process group) in ``--pidfile``; ``stop`` ends that group. Re-running ``start`` restarts it."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m pipelines.mlflow_server", description=main.__doc__)
    ap.add_argument("action", choices=("start", "stop"))
    ap.add_argument("--host", default=LOOPBACK, help="interface to bind (default 127.0.0.1; on a cluster head "
                    "its private address, never a public one)")
    ap.add_argument("--port", type=int, default=5000)
    ap.add_argument("--db", default="mlflow.db", help="sqlite file or SQLAlchemy URI of the backend store")
    ap.add_argument("--artifacts", default=None, help="artifact destination (default: mlartifacts beside --db)")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--pidfile", default="mlflow-server.pid")
    ap.add_argument("--log", default=None)
    a = ap.parse_args(argv)
    pidfile = Path(a.pidfile).expanduser()
    if pidfile.exists():  # stop (also before a restart) the server this pidfile names, if still running
        try:
            pid = int(pidfile.read_text().strip())
            if b"mlflow" in Path(f"/proc/{pid}/cmdline").read_bytes():  # not a reused pid after a reboot
                end_group(pid)
        except (ValueError, OSError):
            pass
        pidfile.unlink()
    if a.action == "stop":
        return 0
    pidfile.parent.mkdir(parents=True, exist_ok=True)
    db = a.db if "://" in a.db else str(Path(a.db).expanduser())
    artifacts = None if a.artifacts is None else (a.artifacts if "://" in a.artifacts else Path(a.artifacts).expanduser())
    server = start_mlflow_server(db, host=a.host, port=a.port, artifacts=artifacts, workers=a.workers,
                                 log=Path(a.log).expanduser() if a.log else None)
    pidfile.write_text(str(server.proc.pid))
    print(f"MLflow tracking server at {server.uri} (pid {server.proc.pid}, log {server.log_path})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
