"""``weit submit``: run a weit command as a Ray job through Ray's JobSubmissionClient, this checkout shipped as
the job's working directory (so the code that runs is the code you have here); the plain Ray equivalent is
``ray job submit --address http://127.0.0.1:8265 --working-dir . -- weit sweep --space tune_spaces/ci.yaml``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import sys
import time
import uuid
from pathlib import Path
from typing import Annotated, TextIO

import typer

from pipelines.common import UserError

SUBMITTABLE = ("ancestry", "distill", "sweep", "quickstart")
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
EXCLUDES = [".git", ".hypothesis"]
"""Never uploaded, beside what ``.gitignore`` names (Ray honours it; it caps the package at 500 MiB)."""
PASS_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
            "MLFLOW_HTTP_REQUEST_TIMEOUT", "WEIT_STORAGE", "WEIT_DATA")  # the job gets these when set here
JOB_DEFAULTS = ('WEIT_STORAGE="${WEIT_STORAGE:-$HOME/weit_runs}" '
                'MLFLOW_TRACKING_URI="${MLFLOW_TRACKING_URI:-sqlite:///$HOME/mlruns.db}"')
"""A job's cwd is a fresh copy of the checkout, so run state (``--resume``) and an embedded MLflow store
default to stable places on the head."""
SUBMIT_CONTEXT = {"allow_extra_args": True, "ignore_unknown_options": True}  # its options pass through


def connect(address: str | None):
    """A JobSubmissionClient for the dashboard's HTTP ``address``, or a one-line UserError."""
    from ray.job_submission import JobSubmissionClient

    for name in ("ray", "ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk"):
        logging.getLogger(name).setLevel(logging.ERROR)  # file-by-file packaging and websocket chatter
    address = address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS
    try:
        return JobSubmissionClient(address)
    except Exception as e:  # ConnectionError, RuntimeError, ValueError depending on what is wrong
        first = (str(e).splitlines() or [""])[0]
        if "Authentication" in type(e).__name__:
            raise UserError(f"the Ray cluster at {address} requires its auth token ({first[:160]}); run with "
                            "RAY_AUTH_MODE=token and the cluster's token in ~/.ray/auth_token or $RAY_AUTH_TOKEN") from e
        raise UserError(f"cannot reach the Ray Jobs API at {address} ({type(e).__name__}: {first[:200]}); start a "
                        "cluster (`ray up cluster.yaml` then `ray dashboard cluster.yaml` for a tunnel) or pass "
                        "--address http://<head>:8265") from e


def submit_job(command: str, args: list[str], *, address: str | None = None, working_dir: str | Path = ".",
               excludes: list[str] | None = None, mlflow_uri: str | None = None, python: str = "python",
               num_gpus: float | None = None) -> str:
    """Submit ``weit <command> <args>`` (``weit`` itself may lead) as a Ray job; returns its id."""
    wd = Path(working_dir).resolve()
    if not (wd / "pipelines" / "cli.py").is_file():
        raise UserError(f"{wd} is not a weit checkout (no pipelines/cli.py); run from the repository root or "
                        f"pass --working-dir")
    if command == "weit" and args:
        command, args = args[0], args[1:]
    if command not in SUBMITTABLE:
        raise UserError(f"cannot submit {command!r}; choose one of {', '.join(SUBMITTABLE)}")
    env = {k: os.environ[k] for k in PASS_ENV if os.environ.get(k)} | ({"MLFLOW_TRACKING_URI": mlflow_uri}
                                                                       if mlflow_uri else {})
    return connect(address).submit_job(
        entrypoint=f"{JOB_DEFAULTS} {shlex.join([python, '-m', 'pipelines.cli', command, *args])}",
        runtime_env={"working_dir": str(wd), "excludes": EXCLUDES + list(excludes or []), "env_vars": env},
        submission_id=f"weit-{command}-{uuid.uuid4().hex[:8]}", entrypoint_num_gpus=num_gpus,
        metadata={"weit_command": command})


def follow_job(job_id: str, *, address: str | None = None, out: TextIO | None | bool = True, poll: float = 1.0,
               timeout: float | None = None):
    """Ray's ``JobDetails`` once the job ends, its log streamed to ``out`` meanwhile (True: ``sys.stdout``)."""
    out, client, shown = sys.stdout if out is True else out, connect(address), 0
    deadline = time.monotonic() + (float("inf") if timeout is None else timeout)

    async def tail() -> None:
        nonlocal shown
        async for chunk in client.tail_job_logs(job_id):
            print(chunk, end="", file=out, flush=True)
            shown += len(chunk)

    if out is not None:
        with contextlib.suppress(Exception):  # stream dropped (proxy, network) or timed out: poll below
            asyncio.run(asyncio.wait_for(tail(), timeout))
    while not (info := client.get_job_info(job_id)).status.is_terminal():
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {info.status} after {timeout:.0f} s")
        time.sleep(poll)
    if out is not None and (rest := client.get_job_logs(job_id)[shown:]):
        print(rest, end="", file=out, flush=True)
    return info


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
        info = follow_job(job_id, address=address)
    except KeyboardInterrupt:
        typer.echo(f"\nstopped following; {job_id} keeps running (stop it: `ray job stop {job_id}`)", err=True)
        raise
    status = str(info.status)  # exit code: the driver's own (2 for bad input in the job), else 1 unless it succeeded
    code = 0 if status == "SUCCEEDED" else int(info.driver_exit_code or 1) if status == "FAILED" else 1
    reason = (info.message or "").splitlines()[0].split(", last available logs")[0] if code else ""
    typer.echo(f"job {job_id} {status}" + (f": {reason}" if reason else ""))
    raise typer.Exit(code)
