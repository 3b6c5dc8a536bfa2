"""Where users compare sweeps: the MLflow UI. Every experiment weit makes is a training-runs experiment with a
description; a sweep's trials carry the names, tags and sortable numbers the runs table shows; the parent
run's description states the sweep; the saved comparison view's filter and sort are ones the tracking
server accepts and select exactly the sweep's trials. The slow test runs the shipped ci sweep and looks at it
in headless Chromium through ``scripts/mlflow_ui_check.py``."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.tracking import (
    EXPERIMENT_KIND_TAG,
    EXPERIMENT_NOTES,
    NOTE_TAG,
    SHARED_VIEW_TAG,
    TRAINING_RUNS,
    comparison_view_key,
    mlflow_ui_url,
    prepare_mlflow,
    publish_comparison_view,
)
from weit_core.space import parse_space
from weit_core.trials import expand

ROOT = Path(__file__).resolve().parent.parent
CI_SPACE = ROOT / "tune_spaces" / "ci.yaml"
DIGITS = {"in_chans": 1, "img_size": 8, "num_classes": 10}
SPACE = """
name: ui
tasks: [{data: digits, patch: 2}]
strategies: [scratch, scratch_fit]
sizes: {depth: 1, width: [16, 32], heads: [2, 3], mlp_ratio: 2}
training: {epochs: 1, lr: [0.001, 0.003], fit_steps: 2, fit_examples: 32, seeds: [0]}
"""


def _client(uri: str):
    import mlflow

    return mlflow.MlflowClient(uri)


@pytest.mark.parametrize("experiment", ["weit-sweep", "weit-distill", "weit-ancestry", "my-own"])
def test_every_experiment_weit_makes_opens_as_training_runs_with_a_description(mlflow_uri, experiment):
    uri, exp_id = prepare_mlflow(mlflow_uri, experiment)
    tags = _client(uri).get_experiment(exp_id).tags
    assert tags[EXPERIMENT_KIND_TAG] == TRAINING_RUNS == "custom_model_development"
    assert tags[NOTE_TAG] == EXPERIMENT_NOTES.get(experiment, tags[NOTE_TAG])
    assert ("my-own" in tags[NOTE_TAG]) if experiment == "my-own" else tags[NOTE_TAG].startswith("**weit")


def test_an_existing_experiment_gets_the_tags_it_lacks_and_keeps_a_users_description(mlflow_uri):
    from pipelines.tracking import tracking_uri

    client = _client(tracking_uri(mlflow_uri))
    bare = client.create_experiment("weit-sweep")  # as weit before this change (or a user) made it
    noted = client.create_experiment("weit-distill", tags={NOTE_TAG: "my notes"})
    for name, exp_id in (("weit-sweep", bare), ("weit-distill", noted)):
        assert prepare_mlflow(mlflow_uri, name)[1] == exp_id
    assert client.get_experiment(bare).tags == {EXPERIMENT_KIND_TAG: TRAINING_RUNS,
                                                NOTE_TAG: EXPERIMENT_NOTES["weit-sweep"]}
    assert client.get_experiment(noted).tags == {EXPERIMENT_KIND_TAG: TRAINING_RUNS, NOTE_TAG: "my notes"}


def test_ui_links_and_view_keys():
    assert comparison_view_key("ci") == "weit-ci"
    odd = comparison_view_key("a b/c")
    assert odd.startswith("weit-a_b_c-") and odd != comparison_view_key("a_b/c")
    assert mlflow_ui_url("sqlite:////x/mlruns.db", "3", "ci") == (
        "http://127.0.0.1:5000/#/experiments/3/runs?viewStateShareKey=weit-ci&workflowType=machine_learning")
    assert mlflow_ui_url("http://10.0.0.5:5000/", "3", port=9) == (
        "http://10.0.0.5:5000/#/experiments/3/runs?workflowType=machine_learning")


def test_trials_are_named_tagged_and_sortable_and_the_saved_view_selects_them(mlflow_uri):
    """Real trials (digits, plain functions, no Ray) under a parent: each run's name says task/strategy/size/
    seed/lr, its tags carry them, ``num_params`` is a metric (numeric sort); the published view is the UI's
    saved-view envelope, and its filter and sort, sent to the tracking server as the UI sends them, return
    exactly the sweep's trials (not the parent, not another sweep's) best ``val_acc`` first."""
    from mlflow.entities import ViewType

    from pipelines.tracking import SWEEP_EXPERIMENT as EXPERIMENT
    from pipelines.tracking import TrialTracker
    from pipelines.trial import run_trial

    uri, exp_id = prepare_mlflow(mlflow_uri, EXPERIMENT)
    client = _client(uri)
    trials = expand(parse_space(SPACE), {"digits": DIGITS}).trials[:4]
    parents = {}
    for sweep in ("ui", "other"):
        parents[sweep] = client.create_run(exp_id, run_name=f"sweep-{sweep}",
                                           tags={"weit.kind": "sweep", "weit.sweep": sweep}).info.run_id
        for config in trials[:4 if sweep == "ui" else 1]:
            run_trial(config, tracker=TrialTracker(uri, exp_id, parents[sweep], sweep, save_models=False))
    key = publish_comparison_view(client, exp_id, "ui", "val_acc", "max")
    envelope = json.loads(client.get_experiment(exp_id).tags[SHARED_VIEW_TAG + key])
    assert envelope["name"] == "weit sweep ui: compare trials" and isinstance(envelope["createdAt"], int)
    view = json.loads(envelope["state"])
    order = f"{view['orderByKey']} {'ASC' if view['orderByAsc'] else 'DESC'}"
    runs = client.search_runs([exp_id], view["searchFilter"], ViewType.ACTIVE_ONLY, order_by=[order])
    assert [r.info.run_id for r in runs] == [r.info.run_id for r in sorted(
        runs, key=lambda r: -r.data.metrics["val_acc"])]
    assert len(runs) == 4 and {r.data.tags["mlflow.parentRunId"] for r in runs} == {parents["ui"]}
    for run in runs:
        t = run.data.tags
        assert run.info.run_name == f"digits/{t['weit.strategy']}/{t['weit.size']}/s{t['weit.seed']}/lr{t['weit.lr']}"
        assert run.data.metrics["num_params"] == float(run.data.params["num_params"])
        assert run.data.metrics["val_acc"] == run.data.metrics["val_acc_e1"]  # the latest value: the final epoch
    columns = {c.split(".", 1)[1].strip("`") for c in view["selectedColumns"]}
    assert {"weit.strategy", "weit.size", "weit.seed", "weit.lr", "num_params", "val_acc"} <= columns
    assert "tags.`weit.task`" not in view["selectedColumns"]


def test_parent_description_states_the_sweep():
    from pipelines.tracking import sweep_note

    space = parse_space(SPACE, source="ui.yaml")
    exp = expand(space, {"digits": DIGITS})
    assert len(exp.trials) == 2 * 2 * 2 and exp.n_dropped == 2  # 3 heads divide neither width
    note = sweep_note("ui", space, exp, exp.trials, experiment="weit-sweep", exp_id="7", uri="sqlite:////s.db",
                      parent_id="p1", metric="val_acc")
    assert "| digits | 2 (1x16x2x2, 1x32x2x2) | 2 (scratch, scratch_fit) | 1 (0) | 2 (0.001, 0.003) | 8 |" in note
    assert "running" in note and exp.describe_drops() in note
    assert "`weit report --sweep ui --mlflow-uri sqlite:////s.db`" in note and "reports/ui/leaderboard.md" in note
    assert "(#/experiments/7/runs?viewStateShareKey=weit-ui&workflowType=machine_learning)" in note
    done = sweep_note("ui", space, exp, exp.trials[:5], experiment="custom", exp_id="7", uri="sqlite:////s.db",
                      parent_id="p1", metric="val_acc", counts={"finished": 4, "failed": 1, "tune_errors": 0,
                                              "failure_kinds": ["non_finite_loss"]})
    assert "**Trials:** 5 (the first 5 of 8: `--limit-trials`); 4 finished, 1 failed (1 non_finite_loss;" in done
    assert "`weit report --parent-run p1 --mlflow-uri" in done and "| 5 of the 8 combinations |" in done


# ------------------------------------------------------------------------------------------ a real browser


def _ui_check():
    """``scripts/mlflow_ui_check.py`` as a module (scripts/ is no package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("mlflow_ui_check", ROOT / "scripts" / "mlflow_ui_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def ci_bank(tmp_path, digits_bank):
    from weit_core.io import save_bank

    bank, aux, _ = digits_bank
    return save_bank(tmp_path / "bank.safetensors", bank, aux)


@pytest.mark.slow
def test_ci_sweep_is_compared_in_the_real_mlflow_ui(ray_session, ci_bank, mlflow_uri, tmp_path):
    """The shipped ci sweep, then ``scripts/mlflow_ui_check.py``: an ``mlflow server`` over the sweep's sqlite
    store and headless Chromium on the sweep's comparison link show the runs page (not the GenAI overview)
    with every trial listed flat by name, its strategy beside it, best final val accuracy first."""
    if not any(shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome")):
        pytest.skip("no Chromium: `apt-get install -y chromium`")
    from pipelines.sweep import run_sweep

    t0 = time.monotonic()
    summary = run_sweep(CI_SPACE, bank=str(ci_bank), storage=str(tmp_path / "tune"), mlflow_uri=mlflow_uri,
                        save_models=False, quiet=True)
    sweep_s = time.monotonic() - t0
    assert summary.n_finished == summary.n_trials == 16
    client = _client(mlflow_uri)
    note = client.get_run(summary.parent_run_id).data.tags[NOTE_TAG]
    assert "16 finished, 0 failed." in note and "8 of 12 size combinations" in note

    out = tmp_path / "ui"
    t1 = time.monotonic()
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "mlflow_ui_check.py"), "--mlflow-uri", mlflow_uri,
                           "--sweep", "ci", "--out", str(out)], capture_output=True, text=True, timeout=300)
    ui_s = time.monotonic() - t1
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((out / "mlflow_ui_check.json").read_text())
    assert result["ok"] and result["title"].startswith("Runs")
    assert (out / "mlflow_runs.png").stat().st_size > 20_000  # a rendered page, not a blank one

    # the DOM as the browser rendered it: every trial by name, its strategy in the row, no parent row
    dom = _ui_check().parse_dom((out / "mlflow_runs.html").read_text())
    text = " ".join(dom.text)
    children = client.search_runs([summary.experiment_id], f"tags.`mlflow.parentRunId` = '{summary.parent_run_id}'")
    assert len(children) == 16 and "sweep-ci" not in text and "Overview" not in dom.title
    for run in children:
        assert run.info.run_name in text
        cells = dom.rows[run.info.run_id]
        assert cells["tags.`weit.strategy`"] == run.data.tags["weit.strategy"]
        assert run.info.run_name in cells["attributes.`Run Name`"]
    assert {"scratch", "scratch_fit", "wave", "wave_random_bank"} <= set(text.split(" "))
    print(f"ci sweep {sweep_s:.1f} s; UI check {ui_s:.1f} s (browser {result['browse_s']} s); "
          f"screenshot {out / 'mlflow_runs.png'}")

