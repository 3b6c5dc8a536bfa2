"""Shared edges: how Ray is reached, where run state lives, what a user error is (MLflow's half is
``pipelines.tracking``), so the embedded defaults and a cluster differ only by settings."""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path


class UserError(Exception):
    """A problem the user can fix (bad flag, missing data, wrong file): one clear line, exit code 2."""


def storage_path(storage: str | None = None) -> str:
    """Where Ray Train/Tune keep run state: ``--storage``, ``$WEIT_STORAGE`` or ``./weit_runs`` (absolute)."""
    s = storage or os.environ.get("WEIT_STORAGE") or "weit_runs"
    return s if "://" in s else str(Path(s).resolve())


def init_ray(address: str | None = None, num_cpus: int | None = None, quiet: bool = True) -> None:
    """Connect to ``--address``/``$RAY_ADDRESS``, else start a Ray of our own (``address="local"``: never the
    head ``ray start`` left here, which callers would mistake for local) with its dashboard on loopback; its
    GCS listens on every interface regardless (docs/cluster.md "Network exposure")."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs = dict(logging_level=logging.WARNING if quiet else logging.INFO, log_to_driver=not quiet)
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(address="local", num_cpus=num_cpus, dashboard_host="127.0.0.1", include_dashboard=True, **kwargs)


def git_revision() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
