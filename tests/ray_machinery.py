"""Ray machinery for tests, kept out of the product: a private loopback Ray head, and a worker fault to
inject through ``DistillConfig.wrap_batches`` (``pipelines.runner.WrapBatches``).

Ray workers cannot import test modules, so :func:`ship_by_value` makes cloudpickle send this module's code
with a hook instead of a reference to it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from mlflow_machinery import LOOPBACK, free_port, live_pids, spawn, started


def ship_by_value() -> None:
    """Pickle this module's functions and classes by value, so Ray workers can run them."""
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@dataclass
class CrashAfter:
    """A ``wrap_batches`` hook: the last rank SIGKILLs itself ``steps`` batches into ``epoch``, once per job
    (``marker`` records that it did, so the restarted worker group trains on).

    It waits two health-check intervals first: Ray Train V2's controller collects ``report()``s by polling
    the workers (``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, 2 s), so a worker lost within one poll of a report
    can take that epoch's checkpoint with it (the restart then redoes one more epoch; never wrong, but not
    the case this hook is meant to show)."""

    epoch: int
    marker: Path
    steps: int = 2

    def __call__(self, batches: Iterator, *, epoch: int, rank: int, world: int) -> Iterator:
        if epoch != self.epoch or rank != world - 1:
            yield from batches
            return
        for i, b in enumerate(batches):
            if i == self.steps and not self.marker.exists():
                time.sleep(2 * float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", 2.0)) + 1)
                self.marker.parent.mkdir(parents=True, exist_ok=True)
                self.marker.write_text(f"killed pid {os.getpid()}\n")
                os.kill(os.getpid(), signal.SIGKILL)
            yield b


@dataclass
class LocalHead:
    """A loopback Ray head we started (``ray start --head --block`` in its own session, its own temp dir)."""

    address: str  # GCS address, for ray.init / RAY_ADDRESS
    dashboard_url: str  # Jobs API address
    temp_dir: Path
    proc: subprocess.Popen = field(repr=False)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop this head only: SIGTERM its ``--block`` process (it shuts down its own GCS, raylet and
        dashboard), then SIGKILL what is left of *our* session (workers get their own process groups) and any
        process naming our private temp dir. Never ``ray stop``: that stops every Ray on the machine."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid in set(live_pids(sid=self.proc.pid)) | set(_pids_mentioning(str(self.temp_dir))):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def __enter__(self) -> LocalHead:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _pids_mentioning(needle: str) -> list[int]:
    pids = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == os.getpid():
            continue
        try:
            if needle.encode() in (p / "cmdline").read_bytes():
                pids.append(int(p.name))
        except OSError:
            continue
    return pids


def start_local_head(num_cpus: int = 2, *, temp_dir: str | Path | None = None, env: dict[str, str] | None = None,
                     timeout: float = 120.0) -> LocalHead:
    """A private single-node Ray cluster on 127.0.0.1 with its own free ports and temp dir, so it neither
    collides with nor can be stopped by another Ray on this machine. ``env`` reaches every job and worker
    (e.g. ``MLFLOW_TRACKING_URI``), as cluster.yaml does on real nodes."""
    tmp = Path(temp_dir or tempfile.mkdtemp(prefix="weit-ray-", dir="/tmp"))  # short: unix socket paths
    ports = {k: free_port() for k in ("port", "dashboard-port", "ray-client-server-port", "node-manager-port",
                                       "object-manager-port", "dashboard-agent-listen-port",
                                       "dashboard-agent-grpc-port", "metrics-export-port",
                                       "runtime-env-agent-port")}
    ray_bin = Path(sys.executable).with_name("ray")
    cmd = [str(ray_bin), "start", "--head", "--block", "--node-ip-address", LOOPBACK, "--dashboard-host", LOOPBACK,
           "--include-dashboard", "true", "--num-cpus", str(num_cpus), "--temp-dir", str(tmp),
           "--disable-usage-stats", *[a for k, v in ports.items() for a in (f"--{k}", str(v))]]
    full_env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"),
                "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # a private test head: no 30 s drain on stop
                "PATH": f"{ray_bin.parent}{os.pathsep}{os.environ.get('PATH', '')}", **(env or {})}
    full_env.pop("RAY_ADDRESS", None)
    log = tmp / "ray-start.log"
    tmp.mkdir(parents=True, exist_ok=True)
    head = LocalHead(f"{LOOPBACK}:{ports['port']}", f"http://{LOOPBACK}:{ports['dashboard-port']}", tmp,
                     spawn(cmd, log, full_env))
    return started(head, f"{head.dashboard_url}/api/version", timeout, log)
