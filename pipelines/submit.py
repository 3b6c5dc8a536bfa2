"""``weit submit``: run a weit command as a Ray job on any cluster (the one from cluster.yaml, or a local
head) through the Jobs API, with this checkout shipped as the job's working directory.

The job runs ``python -m pipelines.cli <command> <args>`` on the head node with the uploaded code first on
``PYTHONPATH``, so what runs is the code you have here, not whatever is installed there. The equivalent
plain Ray command is::

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- weit sweep --space tune_spaces/ci.yaml
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, TextIO

import typer

from pipelines.common import UserError

SUBMITTABLE = ("distill", "sweep", "quickstart")
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
EXCLUDES = [".venv", ".git", "mlruns", "mlruns.db", "mlartifacts", "weit_runs", "ray_results", "*.egg-info",
            "__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis", ".whl", ".gl"]
"""Never uploaded with the working dir: local environments, local run state and results (Ray caps the
package at 500 MiB; ``.gitignore`` is also honoured by Ray)."""
PASS_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
            "MLFLOW_HTTP_REQUEST_TIMEOUT", "WEIT_STORAGE", "WEIT_DATA")
"""Submitter environment variables forwarded to the job when set (the cluster's own values otherwise)."""
JOB_DEFAULTS = ('WEIT_STORAGE="${WEIT_STORAGE:-$HOME/weit_runs}" '
                'MLFLOW_TRACKING_URI="${MLFLOW_TRACKING_URI:-sqlite:///$HOME/mlruns.db}"')
"""Shell prefix of every job line: a job's cwd is a temporary copy of the checkout (a new one whenever the
code changes), so run state (``--resume`` needs it) and an embedded MLflow store must default to stable
places on the head instead. A cluster from cluster.yaml sets ``MLFLOW_TRACKING_URI`` to its server."""
SUBMIT_CONTEXT = {"allow_extra_args": True, "ignore_unknown_options": True}
"""Click settings for registering ``submit_command``: the submitted command's options pass through."""


@dataclass
class JobOutcome:
    job_id: str
    status: str
    exit_code: int
    message: str = ""


def normalize(command: str, args: list[str]) -> tuple[str, list[str]]:
    """Accept both ``sweep --space ...`` and ``weit sweep --space ...`` (as in ``weit submit -- weit sweep``);
    refuse commands that make no sense as a cluster job."""
    if command == "weit" and args:
        command, args = args[0], list(args[1:])
    if command not in SUBMITTABLE:
        raise UserError(f"cannot submit {command!r}; choose one of {', '.join(SUBMITTABLE)}")
    return command, list(args)


def entrypoint(command: str, args: list[str], python: str = "python") -> str:
    """The shell line the job runs; arguments are quoted so paths with spaces survive."""
    command, args = normalize(command, args)
    return f"{JOB_DEFAULTS} {shlex.join([python, '-m', 'pipelines.cli', command, *args])}"


def job_env(mlflow_uri: str | None = None, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for the job: ``--mlflow-uri`` wins, else the submitter's ``PASS_ENV`` values; anything
    unset is left to the cluster (cluster.yaml exports ``MLFLOW_TRACKING_URI`` on every node)."""
    env = {k: os.environ[k] for k in PASS_ENV if os.environ.get(k)}
    if mlflow_uri:
        env["MLFLOW_TRACKING_URI"] = mlflow_uri
    env.update(extra or {})
    return env


def connect(address: str | None):
    """A JobSubmissionClient for ``address`` (the dashboard's HTTP address), or a one-line UserError."""
    from ray.job_submission import JobSubmissionClient

    address = address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS
    try:
        return JobSubmissionClient(address)
    except Exception as e:  # ConnectionError, RuntimeError, ValueError depending on what is wrong
        if "Authentication" in type(e).__name__:
            raise UserError(
                f"the Ray cluster at {address} requires its auth token ({str(e).splitlines()[0][:160]}); run with "
                f"RAY_AUTH_MODE=token and the cluster's token in ~/.ray/auth_token or $RAY_AUTH_TOKEN"
            ) from e
        raise UserError(
            f"cannot reach the Ray Jobs API at {address} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            f"start a cluster (`ray up cluster.yaml` then `ray dashboard cluster.yaml` for a tunnel) or pass "
            f"--address http://<head>:8265"
        ) from e


def submit_job(command: str, args: list[str], *, address: str | None = None, working_dir: str | Path = ".",
               excludes: list[str] | None = None, mlflow_uri: str | None = None, env: dict[str, str] | None = None,
               python: str = "python", num_gpus: float | None = None, submission_id: str | None = None) -> str:
    """Submit ``weit <command> <args>`` as a Ray job; returns the submission id (no waiting)."""
    wd = Path(working_dir).resolve()
    if not (wd / "pipelines" / "cli.py").is_file():
        raise UserError(f"{wd} is not a weit checkout (no pipelines/cli.py); run from the repository root or "
                        f"pass --working-dir")
    name, args = normalize(command, args)
    line = entrypoint(name, args, python)
    client = connect(address)
    runtime_env = {"working_dir": str(wd), "excludes": EXCLUDES + list(excludes or []),
                   "env_vars": job_env(mlflow_uri, env)}
    with _quiet_ray():
        return client.submit_job(
            entrypoint=line,
            runtime_env=runtime_env,
            submission_id=submission_id or f"weit-{name}-{uuid.uuid4().hex[:8]}",
            entrypoint_num_gpus=num_gpus,
            metadata={"weit_command": name},
        )


@contextlib.contextmanager
def _quiet_ray():
    """Ray's job SDK narrates packaging file by file and every websocket close at INFO; weit says what
    matters in one line instead."""
    names = ("ray", "ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk")
    saved = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        yield
    finally:
        for n, level in saved.items():
            logging.getLogger(n).setLevel(level)


def follow_job(job_id: str, *, address: str | None = None, out: TextIO | None | bool = True, poll: float = 1.0,
               timeout: float | None = None) -> JobOutcome:
    """Stream the job's log to ``out`` (Ray's log-tail websocket) until it ends; the exit code is the
    driver's own (2 for a bad-input error inside the job), 1 for other failures or a stopped job, 0 on
    success. If the stream drops, the rest of the log is fetched once the job is over. ``out=True`` is the
    current ``sys.stdout`` (looked up per call, so redirections and test capture see the log)."""
    if out is True:
        out = sys.stdout
    client = connect(address)
    deadline = None if timeout is None else time.monotonic() + timeout
    shown = 0

    async def tail() -> None:
        nonlocal shown
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()
            shown += len(chunk)

    if out is not None:
        try:
            with _quiet_ray():
                asyncio.run(asyncio.wait_for(tail(), timeout))
        except TimeoutError as e:
            raise TimeoutError(f"job {job_id} still running after {timeout:.0f} s") from e
        except Exception:  # stream dropped (proxy, network): fall back to polling the status
            pass
    while not (info := client.get_job_info(job_id)).status.is_terminal():
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {info.status} after {timeout:.0f} s")
        time.sleep(poll)
    if out is not None:
        rest = client.get_job_logs(job_id)[shown:]
        if rest:
            out.write(rest)
            out.flush()
    status = str(info.status)
    if status == "SUCCEEDED":
        code = 0
    elif status == "FAILED" and info.driver_exit_code:
        code = int(info.driver_exit_code)
    else:
        code = 1
    return JobOutcome(job_id, status, code, info.message or "")


def submit_command(
    command: Annotated[str, typer.Argument(help=f"weit command to run on the cluster: {', '.join(SUBMITTABLE)}")],
    args: Annotated[list[str] | None, typer.Argument(help="arguments of that command, passed through")] = None,
    address: Annotated[str | None, typer.Option(
        help="Ray dashboard address (Jobs API); default $RAY_ADDRESS or http://127.0.0.1:8265")] = None,
    mlflow_uri: Annotated[str | None, typer.Option(
        help="tracking URI for the job as seen FROM THE CLUSTER; default $MLFLOW_TRACKING_URI if set, else "
             "the cluster's own")] = None,
    wait: Annotated[bool, typer.Option(help="follow the job's log; exit with its status")] = False,
    working_dir: Annotated[str, typer.Option(help="directory shipped as the job's working dir")] = ".",
    exclude: Annotated[list[str] | None, typer.Option(help="extra paths/globs not to upload")] = None,
    num_gpus: Annotated[float | None, typer.Option(help="GPUs reserved for the job's driver")] = None,
    python: Annotated[str, typer.Option(help="python executable on the cluster")] = "python",
) -> None:
    """Run a weit command as a Ray job (``ray job submit`` with this checkout as working dir)."""
    job_id = submit_job(command, list(args or []), address=address, working_dir=working_dir, excludes=exclude,
                        mlflow_uri=mlflow_uri, python=python, num_gpus=num_gpus)
    typer.echo(f"submitted {job_id} (working dir {Path(working_dir).resolve()})")
    if not wait:
        typer.echo(f"follow it with: ray job logs --follow --address {address or DEFAULT_ADDRESS} {job_id}")
        return
    try:
        outcome = follow_job(job_id, address=address)
    except KeyboardInterrupt:
        typer.echo(f"\nstopped following; job {job_id} keeps running (stop it with `ray job stop {job_id}`)",
                   err=True)
        raise
    reason = outcome.message.splitlines()[0].split(", last available logs")[0] if outcome.exit_code else ""
    typer.echo(f"job {job_id} {outcome.status}" + (f": {reason}" if reason else ""))
    raise typer.Exit(outcome.exit_code)
