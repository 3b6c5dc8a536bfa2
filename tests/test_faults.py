"""Faults: many concurrent writers, an MLflow server that goes away for a while, killed workers and drivers.

Related tests kept with their pieces (not duplicated here): a killed sweep driver resumed by
``Tuner.restore`` logs each trial exactly once — tests/test_sweep.py; a Ray Train worker killed mid-
distillation resumes from its checkpoint — tests/test_distill.py (here: the same through a submitted job).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

N_TRIALS = 200
STEPS = 5


@pytest.mark.slow  # 64-83 s of trials on 2 shared cores, ~100-140 s in all
def test_200_concurrent_trials_lose_and_duplicate_nothing(ray_session, mlflow_server, tmp_path):
    """200 Tune trials, 8 at a time, each logging a child run to one loopback MLflow server: exactly 200
    runs arrive, one per trial, each with its param and full metric history."""
    from mlflow import MlflowClient
    from ray import tune

    def log_child_run(config: dict) -> None:
        """A trivial trial doing only what a real one does at its edges: open an MLflow child run over
        HTTP, log a param and a metric history, close it. (Nested so Ray pickles it by value: workers
        cannot import test modules.)"""
        from mlflow import MlflowClient as Client
        from mlflow.entities import Metric, Param

        i = config["i"]
        c = Client(config["uri"])
        run = c.create_run(config["exp"], run_name=f"trial-{i:03d}",
                           tags={"mlflow.parentRunId": config["parent"], "trial": str(i)})
        now = int(time.time() * 1000)
        c.log_batch(run.info.run_id, params=[Param("i", str(i))],
                    metrics=[Metric("loss", 1.0 / (s + 1) + i, now + s, s) for s in range(STEPS)])
        c.set_terminated(run.info.run_id)
        tune.report({"i": i})

    client = MlflowClient(mlflow_server.uri)
    exp = client.create_experiment("concurrency")
    parent = client.create_run(exp, run_name="parent").info.run_id
    t0 = time.monotonic()
    tuner = tune.Tuner(
        tune.with_resources(log_child_run, {"cpu": 0.25}),
        param_space={"i": tune.grid_search(list(range(N_TRIALS))), "uri": mlflow_server.uri, "exp": exp,
                     "parent": parent},
        tune_config=tune.TuneConfig(max_concurrent_trials=8, reuse_actors=True),
        run_config=tune.RunConfig(storage_path=str(tmp_path / "tune"), name="concurrency", verbose=0),
    )
    results = tuner.fit()
    elapsed = time.monotonic() - t0
    client.set_terminated(parent)
    assert results.num_errors == 0
    runs = client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent}'", max_results=1000)
    trials = sorted(int(r.data.tags["trial"]) for r in runs)
    assert trials == list(range(N_TRIALS)), f"{len(runs)} runs for {N_TRIALS} trials"  # none lost or doubled
    for r in runs:
        i = int(r.data.tags["trial"])
        assert r.info.status == "FINISHED" and r.data.params == {"i": str(i)}
        history = client.get_metric_history(r.info.run_id, "loss")
        assert sorted(m.step for m in history) == list(range(STEPS))
        assert r.data.metrics["loss"] == pytest.approx(1.0 / STEPS + i)
    print(f"{N_TRIALS} trials logged through the server in {elapsed:.1f} s")


ROOT = Path(__file__).resolve().parents[1]
CI_SPACE = ROOT / "tune_spaces" / "ci.yaml"


def _wait_for(predicate, timeout: float, what: str, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError(f"gave up waiting for {what} after {timeout:.0f} s")


@pytest.mark.slow  # ~2-3 min here: a 6-trial sweep in its own process and two MLflow server starts
def test_sweep_survives_mlflow_server_outage_and_every_run_arrives(digits_bank, mlflow_server, tmp_path):
    """Kill the MLflow server (SIGKILL, the whole process group) once a trial has finished, keep it down,
    restart it on the same port and database: the sweep (a separate `weit sweep` process) finishes with
    exit 0 and every trial is FINISHED exactly once in MLflow. MLflow's client retries connection errors
    (MLFLOW_HTTP_REQUEST_MAX_RETRIES=7, backoff factor 2 by default), so no retry code of ours is needed."""
    from mlflow import MlflowClient

    from weit_core.io import save_bank

    bank, aux, _ = digits_bank
    bank_path = save_bank(tmp_path / "bank.safetensors", bank, aux, {"mode": "wave"})
    n = 6
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    for k in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "pipelines.cli", "sweep", "--space", str(CI_SPACE), "--bank", str(bank_path),
           "--storage", str(tmp_path / "tune"), "--mlflow-uri", mlflow_server.uri, "--limit-trials", str(n),
           "--max-concurrent", "1", "--name", "outage"]
    log_path = tmp_path / "sweep.log"
    server = mlflow_server
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    client = MlflowClient(server.uri)

    def finished() -> list:
        exp = client.get_experiment_by_name("weit-sweep")
        return exp and client.search_runs(
            [exp.experiment_id], "tags.`weit.kind` = 'trial' and attributes.status = 'FINISHED'")

    try:
        done_before = len(_wait_for(finished, 300, "a first finished trial"))
        assert proc.poll() is None, log_path.read_text()
        killed_at = time.monotonic()
        os.killpg(server.proc.pid, signal.SIGKILL)  # abrupt death, as a crashed head would look
        server.proc.wait()
        time.sleep(5)  # down for at least this long, plus the restart below (~9 s idle, more when loaded)
        server = server.restart()
        down_s = time.monotonic() - killed_at
        assert proc.poll() is None, f"the sweep died while MLflow was down:\n{log_path.read_text()}"
        rc = proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        server.stop()  # the restarted one (the fixture stops the first)
        server = server.restart()  # read back what arrived
    try:
        assert rc == 0, log_path.read_text()
        client = MlflowClient(server.uri)
        exp = client.get_experiment_by_name("weit-sweep")
        parent = client.search_runs([exp.experiment_id], "tags.`weit.sweep` = 'outage' and tags.`weit.kind` = 'sweep'")
        assert len(parent) == 1 and parent[0].info.status == "FINISHED"
        runs = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent[0].info.run_id}'")
        keys = [r.data.tags["weit.trial_key"] for r in runs]
        assert len(keys) == n and len(set(keys)) == n  # none lost, none doubled
        assert all(r.info.status == "FINISHED" and "val_acc" in r.data.metrics for r in runs)
        assert done_before < n  # trials really had to log across the outage
        print(f"MLflow down {down_s:.1f} s with {done_before}/{n} trials done; all {n} arrived")
    finally:
        server.stop()


def _train_worker_pids(session: int) -> list[int]:
    from mlflow_machinery import live_pids

    pids = []
    for pid in live_pids(sid=session):
        try:
            if b"RayTrainWorker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.append(pid)
        except OSError:
            continue
    return pids


@pytest.mark.slow  # ~2-4 min here: a private Ray head, a submitted 4-epoch 2-worker distillation, a restart
def test_train_worker_killed_in_a_submitted_distill_job_resumes(digits_ancestry, mlflow_server, tmp_path,
                                                                monkeypatch):
    """SIGKILL one Ray Train worker of a distillation running as a Ray job (from outside, as an OOM killer
    or a lost node would): the job still SUCCEEDS, the worker group restarted from the last checkpoint
    (two attempts in the bank header), and each epoch is logged to MLflow exactly once."""
    from conftest import DIGITS_ANCESTRY
    from mlflow import MlflowClient
    from ray_machinery import start_local_head

    from pipelines.submit import connect, follow_job, submit_job
    from weit_core.io import load_bank, save_model

    # the URI must come from the head's nodes: an earlier test's mlflow.set_tracking_uri leaves it in this
    # process's environment, and `weit submit` forwards what it finds there
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    model, acc = digits_ancestry
    teacher = save_model(tmp_path / "ancestry.safetensors", model, DIGITS_ANCESTRY, {"val_acc": acc})
    out, epochs = tmp_path / "bank.safetensors", 4
    head = start_local_head(num_cpus=2, env={"MLFLOW_TRACKING_URI": mlflow_server.uri})
    try:
        job = submit_job("distill", ["--teacher", str(teacher), "--dataset", "digits", "--epochs", str(epochs),
                                     "--lr", "1e-2", "--batch-size", "32", "--workers", "2", "--cpus-per-worker", "0.5",
                                     "--out", str(out), "--storage", str(tmp_path / "runs"), "--max-failures", "1"],
                         address=head.dashboard_url, working_dir=ROOT)
        jobs = connect(head.dashboard_url)
        _wait_for(lambda: f"distill epoch 1/{epochs}" in jobs.get_job_logs(job), 400, "epoch 1 in the job log")
        victims = _wait_for(lambda: _train_worker_pids(head.proc.pid), 30, "a Ray Train worker process")
        os.kill(victims[-1], signal.SIGKILL)
        info = follow_job(job, address=head.dashboard_url, out=None, timeout=600)
        logs = jobs.get_job_logs(job)
    finally:
        head.stop()
    assert str(info.status) == "SUCCEEDED", logs[-3000:]
    header = load_bank(out).header
    starts = header["attempt_starts"]
    assert len(starts) == 2 and starts[0] == 1 and 2 <= starts[1] <= epochs, starts  # resumed, not restarted
    assert header["epochs"] == epochs
    client = MlflowClient(mlflow_server.uri)
    run = client.get_run(header["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "test_acc"))
    assert steps == list(range(1, epochs + 1))  # every epoch exactly once, across the restart
    print(f"worker killed after epoch 1; attempts started at epochs {starts}")
