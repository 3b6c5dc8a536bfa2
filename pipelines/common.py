"""Shared edges: how Ray is reached, where run state lives, what a user error is. Every pipeline stage uses
these so the embedded defaults (local Ray, local storage) and a cluster differ only by settings. MLflow's half
lives in ``pipelines.tracking``; its names are still answered here until every caller imports them there."""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path
from typing import Any

DEFAULT_STORAGE = "weit_runs"


class UserError(Exception):
    """A problem the user can fix (bad flag, missing data, wrong file): one clear line, exit code 2."""


def storage_path(storage: str | None = None) -> str:
    """Where Ray Train/Tune keep checkpoints and run state: ``--storage`` or ``./weit_runs`` (absolute)."""
    s = storage or os.environ.get("WEIT_STORAGE") or DEFAULT_STORAGE
    return s if "://" in s else str(Path(s).resolve())


def init_ray(address: str | None = None, num_cpus: int | None = None, quiet: bool = True) -> None:
    """Connect to ``--address``/``$RAY_ADDRESS`` or start a local Ray with its dashboard (and Jobs API) on
    loopback. The rest cannot be: ``ray.init`` rewrites a loopback ``_node_ip_address`` to the machine's own
    and its GCS listens on every interface (docs/cluster.md "Network exposure"), so none is passed.

    Without an address this always starts a new Ray (``address="local"``), never attaches to a head that
    ``ray start`` left on this machine, which plain ``ray.init()`` would do: the callers treat "no address" as a
    Ray of their own (local storage, the local-GPU check). ``--address auto`` attaches to that head."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs = dict(logging_level=logging.WARNING if quiet else logging.INFO, log_to_driver=not quiet)
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(address="local", num_cpus=num_cpus, dashboard_host="127.0.0.1",
                 include_dashboard=True, **kwargs)


def git_revision() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


_MOVED_TO_TRACKING = {
    "DEFAULT_DB", "DEFAULT_ARTIFACTS", "tracking_uri", "artifact_location", "EXPERIMENT_KIND_TAG", "TRAINING_RUNS",
    "NOTE_TAG", "EXPERIMENT_NOTES", "experiment_note", "prepare_mlflow", "SHARED_VIEW_TAG", "UI_PORT",
    "comparison_view_key", "comparison_view", "publish_comparison_view", "mlflow_ui_path", "mlflow_ui_url"}


def __getattr__(name: str) -> Any:
    """Names that moved to ``pipelines.tracking``, answered lazily (tracking imports ``UserError`` from here)."""
    if name in _MOVED_TO_TRACKING:
        import pipelines.tracking

        return getattr(pipelines.tracking, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
