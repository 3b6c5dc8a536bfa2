"""The report reads a sweep back from MLflow only: leaderboard statistics equal a pandas computation over
``mlflow.search_runs``, the winner is the argmax, plots and tables land on the parent run, the champion is
registered once, and ``export`` recovers the *initialized* model. Trials are real (digits), run as plain
functions logging through the sweep's own tracker, so no Ray is needed here."""

from __future__ import annotations

import pandas as pd
import pytest
import torch.nn.functional as F

from pipelines.common import UserError
from pipelines.sweep import EXPERIMENT
from pipelines.tracking import TrialTracker, prepare_mlflow
from pipelines.trial import run_trial
from weit_core.space import parse_space
from weit_core.tasks import Task
from weit_core.trials import expand, trial_key

ERROR_RATE = Task("digits_error", F.cross_entropy, lambda out, y: (out.argmax(-1) != y).sum(), metric="err",
                  mode="min")
"""A task judged lower-is-better: the share of misclassified images."""

DIGITS = {"in_chans": 1, "img_size": 8, "num_classes": 10}
SPACE = """
name: unit
tasks: [{data: digits, patch: 2}]
strategies: [scratch, scratch_fit]
sizes: {depth: 1, width: [16, 32], heads: 2, mlp_ratio: 2}
training: {epochs: 2, lr: 0.003, fit_steps: 10, fit_examples: 128, seeds: [0, 1]}
"""


@pytest.fixture(scope="module")
def sweep_store(tmp_path_factory):
    """A sweep's worth of MLflow runs: a parent tagged as the sweep and one child per trial."""
    import mlflow

    root = tmp_path_factory.mktemp("report")
    uri, exp_id = prepare_mlflow(f"sqlite:///{root / 'mlruns.db'}", EXPERIMENT)
    client = mlflow.MlflowClient(uri)
    parent = client.create_run(exp_id, run_name="sweep-unit", tags={"weit.kind": "sweep", "weit.sweep": "unit"})
    parent_id = parent.info.run_id
    trials = expand(parse_space(SPACE), {"digits": DIGITS}).trials
    for config in trials:
        run_trial(config, tracker=TrialTracker(uri, exp_id, parent_id, "unit"))
    client.set_terminated(parent_id)
    return uri, exp_id, parent_id, trials, root


def _search(uri: str, exp_id: str, parent_id: str) -> pd.DataFrame:
    import mlflow

    mlflow.set_tracking_uri(uri)
    return mlflow.search_runs(experiment_ids=[exp_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")


def test_leaderboard_and_winner_equal_a_pandas_computation_over_mlflow(sweep_store, tmp_path):
    from pipelines.report import build_report

    uri, exp_id, parent_id, trials, _ = sweep_store
    report = build_report("unit", out=tmp_path / "out", mlflow_uri=uri, register=False, show=False)
    df = _search(uri, exp_id, parent_id)
    assert len(df) == len(trials) and len(report.runs) == len(trials)
    keys = ["tags.weit.strategy", "tags.weit.size"]
    g = df.groupby(keys)
    board = report.leaderboard.set_index(["strategy", "size"])
    assert len(board) == g.ngroups == 4
    for e in (0, 1, 2):
        mean, std = g[f"metrics.val_acc_e{e}"].mean(), g[f"metrics.val_acc_e{e}"].std()
        for idx in mean.index:
            assert board.loc[idx, f"e{e}_mean"] == pytest.approx(mean[idx])
            assert board.loc[idx, f"e{e}_std"] == pytest.approx(std[idx])
            assert board.loc[idx, f"e{e}_n"] == 2
    final = g["metrics.val_acc_e2"].mean()
    w = report.winners["digits"]
    assert (w.strategy, w.size) == final.idxmax() and w.mean == pytest.approx(final.max())
    assert (w.metric, w.mode) == ("val_acc", "max")
    # its champion run is the better of its two seeds
    mine = df[(df["tags.weit.strategy"] == w.strategy) & (df["tags.weit.size"] == w.size)]
    assert w.run_id == mine.loc[mine["metrics.val_acc_e2"].idxmax(), "run_id"]
    per_strategy = df.groupby(["tags.weit.strategy", "tags.weit.size"])["metrics.val_acc_e2"].mean().groupby(
        level=0).mean()
    assert w.best_strategy == per_strategy.idxmax()


def test_report_files_land_on_the_parent_run(sweep_store, tmp_path):
    import mlflow

    from pipelines.report import build_report

    uri, _, parent_id, _, _ = sweep_store
    out = tmp_path / "out"
    report = build_report(parent_run_id=parent_id, out=out, mlflow_uri=uri, register=False, show=False)
    csv = pd.read_csv(out / "leaderboard.csv")
    assert len(csv) == len(report.leaderboard) and {"e2_mean", "e2_std", "num_params", "metric", "mode"} <= set(csv.columns)
    md = (out / "leaderboard.md").read_text()
    assert "±" in md and "scratch_fit" in md and "Winner:" in md
    for png in ("acc_vs_params_digits.png", "convergence_digits.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    logged = {f.path for f in mlflow.MlflowClient(uri).list_artifacts(parent_id, "report")}
    assert {f"report/{p.name}" for p in report.files} <= logged


def test_champion_registered_once_and_export_recovers_the_initialized_model(sweep_store, tmp_path, digits):
    import mlflow

    from pipelines.report import build_report, export_run
    from weit_core.io import load_model
    from weit_core.train import evaluate, iterate_batches

    uri, exp_id, parent_id, _, _ = sweep_store
    client = mlflow.MlflowClient(uri)
    first = build_report("unit", out=tmp_path / "a", mlflow_uri=uri, show=False).winners["digits"]
    mv = client.get_model_version_by_alias("weit-digits", "champion")
    assert mv.run_id == first.run_id and first.registered == f"weit-digits/{mv.version}"
    assert mv.tags["strategy"] == first.strategy and mv.tags["lr"] == f"{first.lr:g}"
    assert float(mv.tags["val_acc_mean"]) == pytest.approx(first.mean, abs=1e-6)  # the tag has 6 decimals
    build_report("unit", out=tmp_path / "b", mlflow_uri=uri, show=False)  # unchanged champion: no new version
    assert len(client.search_model_versions("name = 'weit-digits'")) == 1

    path, header = export_run("models:/weit-digits@champion", tmp_path / "champ.safetensors", mlflow_uri=uri)
    model, _ = load_model(path)
    acc = evaluate(model, iterate_batches(digits.val.x, digits.val.y, 512, shuffle=False))["acc"]
    row = _search(uri, exp_id, parent_id).set_index("run_id").loc[first.run_id]
    assert acc == pytest.approx(row["metrics.val_acc_e0"], abs=1e-6)  # the init, before any stage-3 epoch
    assert header["info"]["trial_key"] == row["tags.weit.trial_key"]


def test_report_and_export_errors_are_one_clear_line(sweep_store, tmp_path):
    from pipelines.report import build_report, export_run

    uri, _, parent_id, _, _ = sweep_store
    with pytest.raises(UserError, match="no sweep named 'nope'"):
        build_report("nope", mlflow_uri=uri, show=False)
    with pytest.raises(UserError, match="has no model/model.safetensors"):
        export_run(parent_id, tmp_path / "x.safetensors", mlflow_uri=uri)
    with pytest.raises(UserError, match="no MLflow run 'deadbeef'"):
        export_run("deadbeef", tmp_path / "x.safetensors", mlflow_uri=uri)
    with pytest.raises(UserError, match="cannot resolve 'models:/weit-nope@champion'"):
        export_run("models:/weit-nope@champion", tmp_path / "x.safetensors", mlflow_uri=uri)


def test_a_trial_that_failed_before_logging_params_is_counted_not_a_crash(tmp_path):
    """A trial can fail before it logs its params (here weight_selection run without its ancestry, outside a
    sweep, which would refuse it up front): the report reads its size and lr from the run's tags and counts it
    as failed next to the finished trial of the same size."""
    import mlflow

    from pipelines.common import UserError
    from pipelines.report import build_report

    uri, exp_id = prepare_mlflow(f"sqlite:///{tmp_path / 'mlruns.db'}", EXPERIMENT)
    client = mlflow.MlflowClient(uri)
    parent_id = client.create_run(exp_id, tags={"weit.kind": "sweep", "weit.sweep": "early"}).info.run_id
    space = SPACE.replace("[scratch, scratch_fit]", "[scratch]").replace("width: [16, 32]", "width: 16").replace(
        "seeds: [0, 1]", "seeds: [0]")
    (ok,) = expand(parse_space(space), {"digits": DIGITS}).trials
    early = {**ok, "strategy": "weight_selection"}  # a sweep drops it (no ancestry); run_trial alone does not
    early["key"] = trial_key(early)
    run_trial(ok, tracker=TrialTracker(uri, exp_id, parent_id, "early"))
    with pytest.raises(UserError, match="'weight_selection' needs ancestry"):
        run_trial(early, tracker=TrialTracker(uri, exp_id, parent_id, "early"))
    report = build_report("early", out=tmp_path / "out", mlflow_uri=uri, register=False, show=False)
    assert report.n_failed == 1 and list(report.leaderboard["strategy"]) == ["scratch"]
    failed = report.runs[report.runs["status"] == "FAILED"].iloc[0]
    assert (failed["strategy"], failed["size"], failed["lr"]) == ("weight_selection", "1x16x2x2", 0.003)


def test_a_min_task_ranks_and_crowns_lowest_first(tmp_path):
    """A task whose metric is better lower (a test-registered error rate, ``mode: min``) decides the whole
    chain: each trial is tagged with ``val_err`` and ``min``, the board, the lr choice, the strategy ranking
    and the champion seed go lowest first, recomputed here with pandas from real runs on digits."""
    import mlflow

    from pipelines.report import build_report
    from weit_core.tasks import register

    register(ERROR_RATE)
    uri, exp_id = prepare_mlflow(f"sqlite:///{tmp_path / 'mlruns.db'}", EXPERIMENT)
    parent = mlflow.MlflowClient(uri).create_run(exp_id, tags={"weit.kind": "sweep", "weit.sweep": "err"})
    space = SPACE.replace("lr: 0.003", "lr: [0.001, 0.003]").replace("epochs: 2", "epochs: 1")
    for config in expand(parse_space(space), {"digits": DIGITS}).trials:
        config = {**config, "kind": "digits_error"}
        run_trial({**config, "key": trial_key(config)}, tracker=TrialTracker(uri, exp_id, parent.info.run_id, "err"))
    report = build_report("err", out=tmp_path / "out", mlflow_uri=uri, register=False, show=False)

    df = _search(uri, exp_id, parent.info.run_id)
    assert set(df["tags.weit.metric"]) == {"val_err"} and set(df["tags.weit.mode"]) == {"min"}
    assert "metrics.val_acc_e1" not in df and (df["metrics.val_err_e1"] < df["metrics.val_err_e0"]).mean() > 0.5
    means = df.assign(lr=df["params.lr"].astype(float)).groupby(
        ["tags.weit.strategy", "tags.weit.size", "lr"])["metrics.val_err_e1"].mean()
    best_lr = means.groupby(level=[0, 1]).min()  # each group at its lowest-error lr
    board = report.leaderboard
    assert list(board["score"]) == sorted(best_lr) and board["score"].iloc[0] < board["score"].iloc[-1]
    for _, row in board.iterrows():
        mine = means.loc[(row["strategy"], row["size"])]
        assert row["lr"] == mine.idxmin() and row["score"] == pytest.approx(mine.min())
    w = report.winners["digits"]
    assert (w.strategy, w.size) == best_lr.idxmin() and w.mean == pytest.approx(best_lr.min())
    assert (w.metric, w.mode) == ("val_err", "min")
    seeds = df[(df["tags.weit.strategy"] == w.strategy) & (df["tags.weit.size"] == w.size)
               & (df["params.lr"].astype(float) == w.lr)]
    assert w.run_id == seeds.loc[seeds["metrics.val_err_e1"].idxmin(), "run_id"]  # the lowest seed
    assert list(report.strategy_ranking["mean_over_sizes"]) == sorted(best_lr.groupby(level=0).mean())
    assert w.best_strategy == best_lr.groupby(level=0).mean().idxmin()
