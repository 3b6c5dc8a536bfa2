"""Search spaces and the Tune sweep on real digits: validation errors name the key, constraints drop and
count before anything runs, the shipped ci.yaml sweep logs one MLflow child per valid trial, a NaN trial is
FAILED with its reason while the sweep goes on, and a sweep whose driver is SIGKILLed resumes with every
trial logged exactly once."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from weit_core.space import SpaceError, load_space, parse_space
from weit_core.trials import expand, inspect_tasks, size_points, trial_key

ROOT = Path(__file__).resolve().parent.parent
CI_SPACE = ROOT / "tune_spaces" / "ci.yaml"
DIGITS = {"in_chans": 1, "img_size": 8, "num_classes": 10}  # DatasetSplits.io of digits

MINIMAL = """
tasks: [{data: digits, patch: 2}]
strategies: [scratch]
sizes: {depth: [1], width: [16], heads: [2]}
"""


# ------------------------------------------------------------------------------------------ validation


@pytest.mark.parametrize("text, match", [
    (MINIMAL + "strategy: [wave]\n", r"unknown key 'strategy' in the top level; did you mean 'strategies'"),
    (MINIMAL.replace("heads: [2]", "heads: [2], hidden: [3]"), r"unknown key 'hidden' in sizes"),
    (MINIMAL.replace("width: [16]", "width: []"), r"sizes\.width: empty grid"),
    (MINIMAL.replace("width: [16]", "width: [sixteen]"), r"sizes\.width\[0\]: expected an integer, got str"),
    (MINIMAL.replace("depth: [1]", "depth: {range: [4, 2, 1]}"), r"sizes\.depth\.range: empty grid"),
    (MINIMAL.replace("[scratch]", "[scratch, wav]"), r"strategies\[1\]: unknown strategy 'wav' \(did you mean 'wave'"),
    (MINIMAL + "training: {epochs: two}\n", r"training\.epochs: expected an integer, got str"),
    (MINIMAL + "training: {seeds: []}\n", r"training\.seeds: empty list"),
    (MINIMAL + "training: {init_mode: xavier}\n", r"training\.init_mode: expected one of '', 'jax' or 'moco'"),
    (MINIMAL + "constraints: {max_param: 10}\n", r"unknown key 'max_param' in constraints; did you mean 'max_params'"),
    (MINIMAL.replace("patch: 2", "patch: 2, epochs: 3"), r"unknown key 'epochs' in tasks\[0\]"),
    (MINIMAL.replace("data: digits", "data: no/such.parquet"), r"tasks\[0\]\.data: 'no/such.parquet' is not a built-in"),
    (MINIMAL.replace("data: digits, patch: 2", "data: digits, val_fraction: 0.2"), r"applies to parquet data only"),
    (MINIMAL.replace("depth: [1]", "depth: {randint: [1, 4]}"), r"samples: a size axis is a sampler"),
    (MINIMAL.replace("strategies: [scratch]\n", ""), r"missing required key 'strategies'"),
    ("tasks: [digits\n", r"not valid YAML"),
    (MINIMAL + "training: {lr: []}\n", r"training\.lr: empty list"),
    (MINIMAL + "training: {lr: [0.001, 0.003, 0.001]}\n", r"training\.lr: repeated learning rates"),
    (MINIMAL + "training: {lr: [0.001, 0]}\n", r"training\.lr: must be > 0, got 0"),
    (MINIMAL.replace("patch: 2", "patch: 2, training: {lr: [fast]}"), r"tasks\[0\]\.training\.lr: expected a number"),
    (MINIMAL + "training: {schedule: linear}\n", r"training\.schedule: expected one of 'cosine' or 'constant'"),
    (MINIMAL + "training: {warmup: 1.5}\n", r"training\.warmup: must be < 1, got 1\.5"),
])
def test_malformed_space_is_one_clear_error_naming_the_key(text, match):
    with pytest.raises(SpaceError, match=match):
        parse_space(text, source="bad.yaml")


def test_missing_space_file_names_the_shipped_ones(tmp_path):
    with pytest.raises(SpaceError, match=r"nope.yaml not found.*ci.yaml"):
        load_space(tmp_path / "nope.yaml")


def test_patch_that_does_not_tile_the_images_fails_before_any_trial():
    space = parse_space(MINIMAL.replace("patch: 2", "patch: 3"), source="p.yaml")
    with pytest.raises(SpaceError, match=r"patch 3 does not divide the image size 8; use one of \[1, 2, 4, 8\]"):
        inspect_tasks(space)


# ------------------------------------------------------------------------------------------ constraints


def test_constraints_drop_invalid_sizes_and_count_each_reason():
    """Every combination is either a trial or counted once under the first rule it breaks; the counts are
    recomputed here by brute force from the rules as the schema states them."""
    from weit_core.models import ViTSpec

    depths, widths, heads, ratios = [1, 2, 3], [16, 24, 32, 48, 64], [1, 2, 3, 4], [2, 4]
    max_params, block, min_head_dim = 60_000, 16, 8
    space = parse_space(f"""
tasks: [{{data: digits, patch: 2}}]
strategies: [scratch, scratch_fit]
sizes: {{depth: {depths}, width: {widths}, heads: {heads}, mlp_ratio: {ratios}}}
constraints: {{width_multiple: block, max_params: {max_params}, min_head_dim: {min_head_dim}}}
training: {{seeds: [0, 1]}}
""", source="c.yaml")
    exp = expand(space, {"digits": DIGITS}, bank_block=block)

    expected: dict[str, int] = {}
    valid = []
    for d, w, h, r in itertools.product(depths, widths, heads, ratios):
        if w % h:
            reason = "heads_not_dividing_width"
        elif w % block or int(w * r) % block:
            reason = "not_multiple_of_block"
        elif w // h < min_head_dim:
            reason = "head_dim_out_of_range"
        elif ViTSpec(d, w, h, r, patch=2, img_size=8).num_params() > max_params:
            reason = "params_above_max"
        else:
            valid.append((d, w, h, r))
            continue
        expected[reason] = expected.get(reason, 0) + 1
    assert dict(exp.dropped) == expected
    assert all(expected.get(k) for k in ("heads_not_dividing_width", "not_multiple_of_block",
                                         "head_dim_out_of_range", "params_above_max"))  # each rule exercised
    assert exp.sizes_total == len(depths) * len(widths) * len(heads) * len(ratios)
    assert exp.n_dropped + len(valid) == exp.sizes_total
    assert len(exp.trials) == len(valid) * 2 * 2  # x strategies x seeds
    assert {(t["depth"], t["width"], t["heads"], t["mlp_ratio"]) for t in exp.trials} == set(valid)
    assert len({t["key"] for t in exp.trials}) == len(exp.trials)
    assert all(t["key"] == trial_key(t) for t in exp.trials)
    for reason in expected:  # the summary names every reason in words
        assert str(expected[reason]) in exp.describe_drops()

    # an explicit width multiple is its own reason; without a bank in play there is no block to tile
    space2 = parse_space(MINIMAL.replace("width: [16]", "width: [16, 24, 40]") + "constraints: {width_multiple: 8}\n")
    assert not expand(space2, {"digits": DIGITS}).dropped
    space3 = parse_space(MINIMAL.replace("width: [16]", "width: [16, 20, 24]") + "constraints: {width_multiple: 8}\n")
    assert dict(expand(space3, {"digits": DIGITS}).dropped) == {"width_not_multiple": 1}


def test_lr_grid_makes_its_own_trials_and_a_scalar_lr_stays_as_it_was():
    """Each value of ``training.lr`` is its own trials, like seeds (strategy x size x seed x lr), each with its
    own key; a scalar lr, or a one-value list, is the sweep it was, and a value shared with a grid keeps its key
    (adding lrs to a sweep does not orphan its finished trials)."""
    from weit_core.trials import summarize_space

    two = MINIMAL.replace("[scratch]", "[scratch, mimetic]")
    scalar = expand(parse_space(two + "training: {lr: 0.002, seeds: [0, 1]}\n"), {"digits": DIGITS})
    listed = expand(parse_space(two + "training: {lr: [0.002], seeds: [0, 1]}\n"), {"digits": DIGITS})
    assert [t["key"] for t in scalar.trials] == [t["key"] for t in listed.trials] and len(scalar.trials) == 4
    assert all(t["lr"] == 0.002 for t in scalar.trials)
    lrs = [0.001, 0.002, 0.004]
    space = parse_space(two + f"training: {{lr: {lrs}, seeds: [0, 1]}}\n")
    grid = expand(space, {"digits": DIGITS})
    assert sorted((t["strategy"], t["seed"], t["lr"]) for t in grid.trials) == sorted(
        itertools.product(["scratch", "mimetic"], [0, 1], lrs))
    assert len({t["key"] for t in grid.trials}) == len(grid.trials) == 12
    assert {t["key"] for t in grid.trials if t["lr"] == 0.002} == {t["key"] for t in scalar.trials}
    assert "x 2 seeds x 3 learning rates" in summarize_space(space, grid)
    # a task's own grid overrides the space's
    task_grid = parse_space(MINIMAL.replace("patch: 2", "patch: 2, training: {lr: [0.01, 0.02]}")
                            + "training: {lr: 0.003}\n")
    assert [t["lr"] for t in expand(task_grid, {"digits": DIGITS}).trials] == [0.01, 0.02]


def test_pairs_a_strategy_cannot_make_are_dropped_and_counted_before_any_trial():
    """Against an ancestry of depth 2, width 32, 2 heads, MLP 128: weight selection makes only what is no
    larger, net2net only what is no smaller, tleg_fit only width 32; every other (strategy, size) is counted
    under its reason and is no trial. The rules are restated here, not read from the registry."""
    from weit_core.models import ViTSpec

    anc = ViTSpec(depth=2, width=32, heads=2, patch=2, img_size=8)
    space = parse_space("""
tasks: [{data: digits, patch: 2}]
strategies: [scratch, weight_selection, net2net, tleg_fit]
sizes: {depth: [1, 2, 3], width: [16, 32, 48], heads: [2], mlp_ratio: [4]}
training: {seeds: [0, 1], lr: [0.001, 0.003]}
""")
    exp = expand(space, {"digits": DIGITS}, ancestry_spec=anc)
    rules = {"scratch": (lambda d, w: True, None),
             "weight_selection": (lambda d, w: d <= 2 and w <= 32, "larger_than_ancestry"),
             "net2net": (lambda d, w: d >= 2 and w >= 32, "smaller_than_ancestry"),
             "tleg_fit": (lambda d, w: w == 32, "width_differs_from_ancestry")}
    expected, kept = {}, set()
    for d, w in itertools.product([1, 2, 3], [16, 32, 48]):
        for strategy, (ok, reason) in rules.items():
            if ok(d, w):
                kept.add((strategy, d, w))
            else:
                expected[reason] = expected.get(reason, 0) + 1
    assert dict(exp.pairs_dropped) == expected == {"larger_than_ancestry": 5, "smaller_than_ancestry": 5,
                                                   "width_differs_from_ancestry": 6}
    assert not exp.dropped  # every size is valid: only pairs are dropped
    assert {(t["strategy"], t["depth"], t["width"]) for t in exp.trials} == kept
    assert len(exp.trials) == len(kept) * 2 * 2  # x seeds x lrs
    assert "dropped 16 (strategy, size) pairs" in exp.describe_drops()
    assert "weight selection only shrinks an ancestry" in exp.describe_drops()
    # the ancestry's tokens must be the task's: another patch and no ancestry strategy can make anything
    other = ViTSpec(depth=2, width=32, heads=2, patch=4, img_size=8)
    assert expand(space, {"digits": DIGITS}, ancestry_spec=other).pairs_dropped == {"tokens_differ_from_ancestry": 27}
    # no ancestry, nothing to judge the ancestry strategies by (a sweep refuses them without --ancestry first)
    assert not expand(space, {"digits": DIGITS}).pairs_dropped


@pytest.mark.parametrize("strategies, training, match", [
    ("[scratch, weight_selection]", "", r"strategies \['weight_selection'\] need an ancestry model; pass --ancestry"),
    ("[net2net, tleg_fit]", "", r"strategies \['net2net', 'tleg_fit'\] need an ancestry model"),
    ("[scratch, wave]", "", r"strategies \['wave'\] need a template bank; pass --bank"),
    ("[tleg]", "", r"strategies \['tleg'\] need a TLEG-trained learngene, which a sweep cannot pass"),
    ("[scratch_fit]", "training: {fit_steps: 0, fit_examples: 0}\n",
     r"strategies \['scratch_fit'\] need a labeled subset for stage 2, but task\(s\) \['digits'\] have "
     r"training\.fit_examples: 0"),
])
def test_a_missing_source_is_one_line_before_anything_runs(tmp_path, strategies, training, match):
    """What a strategy declares it needs (``register(needs=...)``) and the sweep was not given fails at once:
    no Ray, no MLflow store, no trial."""
    from pipelines.common import UserError
    from pipelines.sweep import run_sweep

    (tmp_path / "s.yaml").write_text(MINIMAL.replace("[scratch]", strategies) + training)
    db = tmp_path / "mlruns.db"
    with pytest.raises(UserError, match=match):
        run_sweep(tmp_path / "s.yaml", mlflow_uri=f"sqlite:///{db}", storage=str(tmp_path / "tune"), quiet=True)
    assert not db.exists() and not (tmp_path / "tune").exists()


@pytest.mark.parametrize("schedule, steps_per_epoch, warmup", [("cosine", None, 0.1), ("cosine", 5, 0.2),
                                                               ("constant", 5, 0.1)])
def test_stage3_lr_follows_warmup_then_cosine_over_the_trials_steps(monkeypatch, schedule, steps_per_epoch,
                                                                     warmup):
    """The LR the optimizer used at every stage-3 step of a real trial (digits): linear warm-up over
    ``warmup`` of the trial's steps (epochs x steps per epoch, capped by ``steps_per_epoch``), then cosine
    decay to 1% of ``lr``; ``schedule: constant`` is the old fixed ``lr`` at every step."""
    import math

    import torch

    from pipelines.trial import run_trial
    from weit_core.trials import load_task_data

    cap = "null" if steps_per_epoch is None else steps_per_epoch
    space = parse_space(MINIMAL + f"training: {{epochs: 3, batch_size: 128, lr: 0.004, schedule: {schedule}, "
                                  f"warmup: {warmup}, steps_per_epoch: {cap}}}\n")
    (config,) = expand(space, {"digits": DIGITS}).trials
    used: list[float] = []
    step = torch.optim.AdamW.step

    def record(self, *a, **kw):
        used.append(self.param_groups[0]["lr"])
        return step(self, *a, **kw)

    monkeypatch.setattr(torch.optim.AdamW, "step", record)
    run_trial(config)  # scratch: no stage-2 step, so every recorded step is stage 3
    per_epoch = math.ceil(len(load_task_data(config).train) / 128)
    total = 3 * min(per_epoch, steps_per_epoch or per_epoch)
    assert len(used) == total
    lr = 0.004
    if schedule == "constant":
        assert used == [lr] * total
        return
    w = round(warmup * total)
    assert w >= 2
    for i, got in enumerate(used):
        if i < w:  # linear from lr / (w + 1) up to lr
            want = lr * (1 / (w + 1) + i / w * (1 - 1 / (w + 1)))
        else:  # cosine from lr down to lr / 100
            want = lr / 100 + (lr - lr / 100) * (1 + math.cos(math.pi * (i - w) / (total - w))) / 2
        assert got == pytest.approx(want, rel=1e-6), (i, got, want)
    assert used[w] == pytest.approx(lr) and used[-1] < 0.05 * lr


def test_samplers_are_drawn_in_the_driver_seeded_and_constrained():
    text = MINIMAL.replace("depth: [1]", "depth: {randint: [1, 6]}").replace(
        "width: [16]", "width: {choice: [16, 32, 48]}") + "samples: 12\nsample_seed: 3\n"
    a, b = parse_space(text), parse_space(text)
    pa, pb = size_points(a), size_points(b)
    assert pa == pb and 1 <= len(pa) <= 12  # same seed, same draws; duplicates removed
    assert all(1 <= p["depth"] <= 6 and p["width"] in (16, 32, 48) for p in pa)
    other = size_points(parse_space(text.replace("sample_seed: 3", "sample_seed: 4")))
    assert other != pa


def test_shipped_spaces_parse_and_fmnist_has_hundreds_of_valid_sizes():
    ci = load_space(CI_SPACE)
    assert ci.name == "ci" and {t.data for t in ci.tasks} == {"digits"}
    fm = load_space(ROOT / "tune_spaces" / "fmnist_sizes.yaml")
    exp = expand(fm, {"fashion_mnist": {**DIGITS, "img_size": 28}}, bank_block=16)
    sizes = {(t["depth"], t["width"], t["heads"]) for t in exp.trials}
    assert len(sizes) >= 200, len(sizes)
    assert len(exp.trials) >= 200 * len(fm.strategies)
    assert exp.n_dropped > 0


def test_tune_makes_every_trial_of_a_space_once_in_order():
    """The sweep hands Tune its trial list as a grid of JSON strings (a grid of dicts costs Tune O(n^2)
    deep copies); what Tune generates must still be exactly the trial list, each once, in order."""
    from ray.tune.search.variant_generator import generate_variants

    from pipelines.trial import trial_config, trial_param_space

    fm = load_space(ROOT / "tune_spaces" / "fmnist_sizes.yaml")
    trials = expand(fm, {"fashion_mnist": {**DIGITS, "img_size": 28}}, bank_block=16).trials[:300]
    made = [trial_config(config) for _, config in generate_variants(trial_param_space(trials))]
    assert made == trials
    assert trial_config({"trial": trials[0]}) == trials[0]  # a sweep started before the JSON grid, restored


def test_tune_and_the_progress_line_follow_the_tasks_metric_and_direction():
    """Tune's metric and mode (and ASHA's) are the task's ``val_<metric>`` and direction; a lower-is-better
    task's best trial is its lowest; tasks judged differently cannot share one ASHA."""
    from types import SimpleNamespace

    import torch.nn.functional as F

    import pipelines.sweep as sweep
    from pipelines.common import UserError
    from weit_core.tasks import Task, get_task, register, task_names

    if "digits_loss" not in task_names():
        register(Task("digits_loss", F.cross_entropy, lambda out, y: F.cross_entropy(out, y, reduction="sum"),
                      metric="xent", mode="min"))
    assert get_task("digits_loss").mode == "min"
    trials = expand(load_space(CI_SPACE), {"digits": DIGITS}, bank_block=16).trials[:3]
    low = [{**t, "kind": "digits_loss"} for t in trials]
    assert sweep._objective(trials, asha=True) == ("val_acc", "max")
    assert sweep._objective(low, asha=True) == ("val_xent", "min")
    assert sweep._objective(trials + low, asha=False) == (None, None)
    with pytest.raises(UserError, match="--asha stops trials on one metric"):
        sweep._objective(trials + low, asha=True)
    grid = sweep.trial_param_space(low)["trial"]["grid_search"]
    fake = [SimpleNamespace(trial_id=f"t{i}", config={"trial": grid[i]}, status="TERMINATED",
                            last_result={"val_xent": x}) for i, x in enumerate([0.7, 0.3, 0.9])]
    line = sweep._progress_callback_cls()(total=3)._line(fake)
    assert "val_xent=0.3000" in line and f"best digits: {low[1]['strategy']} " in line


def test_progress_line_names_the_best_finished_trial_per_task_decoding_each_config_once(monkeypatch):
    """The progress callback scans every trial at each completion; each JSON config is decoded once."""
    from types import SimpleNamespace

    import pipelines.sweep as sweep

    ci = load_space(CI_SPACE)
    trials = expand(ci, {"digits": DIGITS}, bank_block=16).trials[:4]
    space = sweep.trial_param_space(trials)["trial"]["grid_search"]
    fake = [SimpleNamespace(trial_id=f"t{i}", config={"trial": space[i]}, status="TERMINATED",
                            last_result={"val_acc": acc}) for i, acc in enumerate([0.5, 0.9, 0.7, None])]
    fake[2].status, fake[3].status = "RUNNING", "ERROR"  # 2 is the trial completing now
    decoded = []
    monkeypatch.setattr(sweep, "trial_config", lambda c: decoded.append(1) or json.loads(c["trial"]))
    progress = sweep._progress_callback_cls()(total=len(fake))
    for _ in range(3):
        line = progress._line(fake, fake[2], "TERMINATED")
    best = trials[1]
    assert line.startswith(f"{sweep.PREFIX} 4/4 trials done (1 failed)")
    assert f"best {best['task']}: {best['strategy']} {best['depth']}x{best['width']}x{best['heads']}x2 " in line
    assert "val_acc=0.9000" in line
    assert len(decoded) == 3  # the three finished trials with a result, once each over three scans


# ------------------------------------------------------------------------------------------ trials


def _user_parquet_space(tmp_path: Path, digits) -> tuple[dict, object]:
    """The user's own data: digits written as parquet files next to a space file that names them."""
    from weit_core.parquet import export_parquet

    files = export_parquet(digits, tmp_path / "mydata")
    (tmp_path / "space.yaml").write_text("""
tasks: [{name: mine, data: mydata, patch: 4}]
strategies: [scratch_fit]
sizes: {depth: 1, width: 32, heads: 2, mlp_ratio: 2}
training: {epochs: 2, fit_steps: 10, fit_examples: 128, lr: 0.003}
""")
    return files, load_space(tmp_path / "space.yaml")


def test_user_parquet_task_runs_as_a_plain_function(tmp_path, digits):
    """A task given as the user's own parquet (relative to the space file) runs through ``run_trial``
    without Ray or MLflow, and learns."""
    from pipelines.trial import run_trial

    _, space = _user_parquet_space(tmp_path, digits)
    shapes = inspect_tasks(space)
    assert shapes["mine"] == DIGITS
    (config,) = expand(space, shapes).trials
    assert config["data"] == str((tmp_path / "mydata").resolve())
    seen = []
    result = run_trial(config, report=seen.append)
    assert [r["epoch"] for r in seen] == [1, 2]
    final_only: list[dict] = []  # the sweep without ASHA: one Tune report per trial, the last epoch's
    again = run_trial(config, report=final_only.append, report_each_epoch=False)
    assert final_only == [seen[-1]] and len(again.history) == 3  # same seed, same numbers; all epochs kept
    assert result.info["fit_steps"] == 10
    assert result.history[-1]["val_acc"] > result.history[0]["val_acc"]  # epoch 2 beats the fresh init
    assert result.history[-1]["val_acc"] > 0.3  # chance is 0.1


def test_workers_train_on_the_drivers_data_without_the_files(ray_session, tmp_path, digits):
    """The driver's splits travel through the object store: a fresh worker process trains a parquet task
    whose files are gone (a node without the user's data); without the shared copy the same trial fails."""
    import ray

    from pipelines.trial import SweepContext, run_trial, share_task_data, take_shared_data

    files, space = _user_parquet_space(tmp_path, digits)
    (config,) = expand(space, inspect_tasks(space)).trials
    shared = SweepContext(None, None, None, "t", data_refs=share_task_data([config]))
    for path in files.values():
        path.unlink()

    @ray.remote(num_cpus=1, max_calls=1)  # a fresh worker process per call: nothing cached from before
    def trial(ctx: SweepContext, cfg: dict) -> float:
        take_shared_data(ctx, cfg)
        return run_trial(cfg, threads=1).history[-1]["val_acc"]

    with pytest.raises(ray.exceptions.RayTaskError, match="mydata"):
        ray.get(trial.remote(SweepContext(None, None, None, "t"), config))
    assert ray.get(trial.remote(shared, config)) > 0.3  # learned from the shared rows (chance is 0.1)


# ------------------------------------------------------------------------------------------ Tune + MLflow


@pytest.fixture
def bank_file(tmp_path, digits_bank):
    from weit_core.io import save_bank

    bank, aux, _ = digits_bank
    return save_bank(tmp_path / "bank.safetensors", bank, aux)


def _children(uri: str, parent_id: str):
    import mlflow

    mlflow.set_tracking_uri(uri)
    run = mlflow.MlflowClient(uri).get_run(parent_id)
    return mlflow.search_runs(experiment_ids=[run.info.experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'", max_results=10_000)


def test_ci_sweep_logs_every_valid_trial_once_and_report_picks_the_argmax(ray_session, bank_file, mlflow_uri,
                                                                          tmp_path):
    from pipelines.report import build_report, export_run
    from pipelines.sweep import run_sweep
    from weit_core.io import load_model
    from weit_core.train import evaluate, iterate_batches

    space = load_space(CI_SPACE)
    expected = expand(space, inspect_tasks(space), bank_block=16)
    t0 = time.monotonic()
    summary = run_sweep(CI_SPACE, bank=str(bank_file), storage=str(tmp_path / "tune"), mlflow_uri=mlflow_uri,
                        quiet=True)
    wall = time.monotonic() - t0
    assert summary.n_trials == len(expected.trials) and summary.n_dropped == expected.n_dropped
    assert summary.n_finished == len(expected.trials) and summary.n_failed == 0

    df = _children(mlflow_uri, summary.parent_run_id)
    assert len(df) == len(expected.trials)
    assert set(df["tags.weit.trial_key"]) == {t["key"] for t in expected.trials}
    assert (df["status"] == "FINISHED").all()
    for col in ("params.num_params", "params.flops", "params.scaler_count", "params.init_s", "params.info.strategy",
                "metrics.val_acc_e0", "metrics.val_acc_e1", "metrics.val_acc_e2", "metrics.train_loss_e2"):
        assert df[col].notna().all(), col
    wave = df[df["tags.weit.strategy"] == "wave"]
    assert (wave["params.info.scaler_count"].astype(int) == wave["params.scaler_count"].astype(int)).all()

    # the report's winner is the argmax of the seed-mean final accuracy, recomputed here with pandas
    report = build_report("ci", out=tmp_path / "report", mlflow_uri=mlflow_uri, show=False)
    means = df.groupby(["tags.weit.strategy", "tags.weit.size"])["metrics.val_acc_e2"].mean()
    best_strategy, best_size = means.idxmax()
    w = report.winners["digits"]
    assert (w.strategy, w.size) == (best_strategy, best_size)
    assert w.mean == pytest.approx(means.max()) and (w.metric, w.mode) == ("val_acc", "max")

    # the champion is one registry lookup away and exports as a loadable *initialized* model
    import mlflow

    mv = mlflow.MlflowClient(mlflow_uri).get_model_version_by_alias("weit-digits", "champion")
    assert mv.run_id == w.run_id and mv.tags["strategy"] == w.strategy
    out, header = export_run("models:/weit-digits@champion", tmp_path / "champ.safetensors", mlflow_uri=mlflow_uri)
    model, _ = load_model(out)
    from weit_core.data import load_digits

    d = load_digits(seed=0)
    acc = evaluate(model, iterate_batches(d.val.x, d.val.y, 512, shuffle=False))["acc"]
    logged = df.set_index("run_id").loc[w.run_id, "metrics.val_acc_e0"]
    assert acc == pytest.approx(logged, abs=1e-6)  # accuracy before stage 3: the init, not the trained model
    print(f"ci sweep: {summary.n_trials} trials in {wall:.1f}s wall")


def test_lr_grid_sweep_ranks_each_init_at_its_best_lr_and_never_starts_what_it_cannot_make(
        ray_session, mlflow_uri, tmp_path, digits_ancestry):
    """A sweep on digits with an lr grid and weight selection around the digits ancestry (depth 2, width 32):
    the sizes deeper than the ancestry are dropped before any trial (no FAILED run; the parent run's count is
    the number of such pairs), every other (strategy, size, seed) runs at each lr, and the report gives each
    (strategy, size) the lr whose seed-mean final val accuracy is best, recomputed here from MLflow."""
    import mlflow

    from pipelines.report import build_report
    from pipelines.sweep import run_sweep
    from weit_core.io import save_model
    from weit_core.strategies._common import infer_vit_spec

    model = digits_ancestry[0]
    anc = save_model(tmp_path / "ancestry.safetensors", model, infer_vit_spec(model))
    lrs = [0.001, 0.004]
    (tmp_path / "lrs.yaml").write_text(f"""
name: lrs
tasks: [{{data: digits, patch: 2, limit: 512}}]
strategies: [scratch, weight_selection]
sizes: {{depth: [1, 3], width: [16, 32], heads: [2], mlp_ratio: [2]}}
training: {{epochs: 2, batch_size: 64, lr: {lrs}, seeds: [0, 1], fit_steps: 0, fit_examples: 0}}
""")
    summary = run_sweep(tmp_path / "lrs.yaml", ancestry=str(anc), storage=str(tmp_path / "tune"),
                        mlflow_uri=mlflow_uri, quiet=True)
    too_big = 2  # weight_selection at depth 3, widths 16 and 32
    assert summary.pairs_dropped == {"larger_than_ancestry": too_big} and summary.n_dropped == 0
    assert summary.n_trials == (4 + 4 - too_big) * 2 * 2 == summary.n_finished and summary.n_failed == 0
    client = mlflow.MlflowClient(mlflow_uri)
    parent = client.get_run(summary.parent_run_id)
    assert parent.data.params["dropped.larger_than_ancestry"] == str(too_big)
    assert parent.data.params["dropped.smaller_than_ancestry"] == "0"
    dropped = json.loads(Path(client.download_artifacts(summary.parent_run_id, "space/dropped.json",
                                                        str(tmp_path))).read_text())
    assert dropped["pairs_dropped"] == {"larger_than_ancestry": too_big}

    df = _children(mlflow_uri, summary.parent_run_id)
    assert len(df) == summary.n_trials and (df["status"] == "FINISHED").all()  # nothing started to fail
    assert not ((df["tags.weit.strategy"] == "weight_selection") & (df["params.depth"] == "3")).any()
    assert sorted(df["tags.weit.lr"].unique()) == ["0.001", "0.004"] and df["tags.weit.trial_key"].is_unique
    assert all(name.endswith(f"/lr{lr}") for name, lr in zip(df["tags.mlflow.runName"], df["tags.weit.lr"],
                                                               strict=True))
    assert set(df["params.schedule"]) == {"cosine"} and set(df["params.warmup"]) == {"0.1"}

    report = build_report("lrs", out=tmp_path / "report", mlflow_uri=mlflow_uri, register=False, show=False)
    df["lr"] = df["params.lr"].astype(float)
    means = df.groupby(["tags.weit.strategy", "tags.weit.size", "lr"])["metrics.val_acc_e2"].mean()
    board = report.leaderboard
    assert len(board) == 6 and (board["n_lrs"] == 2).all()
    for _, row in board.iterrows():
        mine = means.loc[(row["strategy"], row["size"])]
        best = mine[mine == mine.max()].index.min()  # ties: the smaller lr
        assert row["lr"] == best and row["score"] == pytest.approx(mine.max()), (row["strategy"], mine)
        tests = df[(df["tags.weit.strategy"] == row["strategy"]) & (df["tags.weit.size"] == row["size"])
                   & (df["lr"] == best)]["metrics.test_acc"]
        assert row["test_mean"] == pytest.approx(tests.mean())  # test is the chosen lr's
    w = report.winners["digits"]
    top = board.iloc[0]
    assert (w.strategy, w.size, w.lr, w.n_lrs) == (top["strategy"], top["size"], top["lr"], 2)
    champion = df.set_index("run_id").loc[w.run_id]
    assert float(champion["params.lr"]) == w.lr and champion["tags.weit.strategy"] == w.strategy
    md = (tmp_path / "report" / "leaderboard.md").read_text()
    assert "| lr | lrs |" in md and f"at lr {w.lr:g}" in md


def test_nan_trial_is_failed_with_its_reason_and_the_sweep_goes_on(ray_session, mlflow_uri, tmp_path):
    from pipelines.report import build_report
    from pipelines.sweep import run_sweep

    (tmp_path / "nan.yaml").write_text("""
name: nan
tasks:
  - {name: ok, data: digits, patch: 2}
  - {name: diverges, data: digits, patch: 2, training: {lr: 1.0e+30}}
strategies: [scratch]
sizes: {depth: 1, width: 16, heads: 2, mlp_ratio: 2}
training: {epochs: 1, fit_steps: 0, fit_examples: 0}
""")
    summary = run_sweep(tmp_path / "nan.yaml", storage=str(tmp_path / "tune"), mlflow_uri=mlflow_uri, quiet=True)
    assert (summary.n_trials, summary.n_finished, summary.n_failed) == (2, 1, 1)
    df = _children(mlflow_uri, summary.parent_run_id).set_index("tags.weit.task")
    assert df.loc["ok", "status"] == "FINISHED"
    assert df.loc["diverges", "status"] == "FAILED"
    assert df.loc["diverges", "tags.weit.failure_kind"] == "non_finite_loss"
    assert "NonFiniteLossError: loss became nan" in df.loc["diverges", "tags.weit.failure"]
    report = build_report(parent_run_id=summary.parent_run_id, out=tmp_path / "r", mlflow_uri=mlflow_uri,
                          register=False, show=False)
    assert set(report.winners) == {"ok"} and report.n_failed == 1


def test_killed_driver_resumes_and_every_trial_finishes_exactly_once(ray_session, bank_file, mlflow_uri, tmp_path):
    """SIGKILL the sweep driver (its own local Ray dies with it) once >= 2 trials are FINISHED in MLflow;
    ``--resume`` then completes the sweep: one FINISHED child per trial key, none duplicated."""
    import mlflow

    from pipelines.sweep import EXPERIMENT, run_sweep
    from pipelines.tracking import prepare_mlflow

    space = load_space(CI_SPACE)
    n_valid = len(expand(space, inspect_tasks(space), bank_block=16).trials)
    storage = str(tmp_path / "tune")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "pipelines.cli", "sweep", "--space", str(CI_SPACE), "--bank", str(bank_file),
           "--storage", storage, "--mlflow-uri", mlflow_uri, "--max-concurrent", "1"]
    log = (tmp_path / "driver.log").open("w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    _, exp_id = prepare_mlflow(mlflow_uri, EXPERIMENT)  # the store exists before two processes use it
    client = mlflow.MlflowClient(mlflow_uri)
    finished_before = 0
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(1.0)
            runs = client.search_runs([exp_id], "tags.`weit.kind` = 'trial' and attributes.status = 'FINISHED'",
                                      max_results=1000)
            finished_before = len(runs)
            if finished_before >= 2:
                break
        assert proc.poll() is None, f"driver ended before it could be killed:\n{(tmp_path / 'driver.log').read_text()}"
        assert finished_before >= 2, (tmp_path / "driver.log").read_text()
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # the driver; its local Ray shares its fate
        proc.wait()
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # and anything of its session that outlived it
        except ProcessLookupError:
            pass
        log.close()
    time.sleep(1.0)
    partial = client.search_runs([exp_id], "tags.`weit.kind` = 'trial'", max_results=1000)
    assert len({r.data.tags["weit.trial_key"] for r in partial}) < n_valid  # it really was interrupted

    summary = run_sweep(CI_SPACE, bank=str(bank_file), storage=storage, mlflow_uri=mlflow_uri, resume=True,
                        quiet=True)
    assert summary.resumed and summary.n_trials == n_valid
    df = _children(mlflow_uri, summary.parent_run_id)
    assert len(df) == n_valid, df[["tags.weit.trial_key", "status"]]
    assert df["tags.weit.trial_key"].is_unique
    assert (df["status"] == "FINISHED").all()
    with pytest.raises(Exception, match="already exists.*--resume"):
        run_sweep(CI_SPACE, bank=str(bank_file), storage=storage, mlflow_uri=mlflow_uri, quiet=True)


def test_restarted_trial_replays_a_finished_run_and_replaces_a_killed_one(mlflow_uri):
    """What a restored trial sees in MLflow: a FINISHED run is replayed to Tune without retraining; a run
    left RUNNING by a killed attempt is replaced, so each trial key has exactly one active run."""
    import mlflow

    from pipelines.sweep import EXPERIMENT
    from pipelines.tracking import TrialTracker, prepare_mlflow
    from pipelines.trial import run_trial

    uri, exp_id = prepare_mlflow(mlflow_uri, EXPERIMENT)
    client = mlflow.MlflowClient(uri)
    parent = client.create_run(exp_id, tags={"weit.kind": "sweep", "weit.sweep": "t"}).info.run_id
    space = parse_space(MINIMAL + "training: {epochs: 2, fit_steps: 0, fit_examples: 0}\n")
    (config,) = expand(space, {"digits": DIGITS}).trials

    def active() -> list:  # search_runs lists active runs only by default
        return client.search_runs([exp_id], f"tags.`mlflow.parentRunId` = '{parent}' and "
                                            f"tags.`weit.trial_key` = '{config['key']}'")

    stale = client.create_run(exp_id, tags={"mlflow.parentRunId": parent, "weit.trial_key": config["key"]})
    first_reports: list[dict] = []
    first = run_trial(config, tracker=TrialTracker(uri, exp_id, parent, "t"), report=first_reports.append)
    runs = active()
    assert [r.info.run_id for r in runs] != [stale.info.run_id] and len(runs) == 1
    assert runs[0].info.status == "FINISHED" and not first.replayed

    again: list[dict] = []
    second = run_trial(config, tracker=TrialTracker(uri, exp_id, parent, "t"), report=again.append)
    assert second.replayed and len(active()) == 1
    assert [r["val_acc"] for r in again] == pytest.approx([r["val_acc"] for r in first_reports])
    last_only: list[dict] = []
    run_trial(config, tracker=TrialTracker(uri, exp_id, parent, "t"), report=last_only.append,
              report_each_epoch=False)
    assert [r["epoch"] for r in last_only] == [2]
    assert last_only[0]["val_acc"] == pytest.approx(first_reports[-1]["val_acc"])


@pytest.mark.slow
def test_asha_stops_weak_trials_and_mlflow_records_them_as_stopped(ray_session, mlflow_uri, tmp_path):
    """With --asha, trials ASHA stops after epoch 1 end FINISHED in MLflow with ``weit.stopped_early`` and
    only the epochs they ran; the report ranks only groups that reached the final budget."""
    from pipelines.report import build_report
    from pipelines.sweep import run_sweep

    (tmp_path / "asha.yaml").write_text("""
name: asha
tasks: [{data: digits, patch: 2}]
strategies: [scratch, scratch_fit]
sizes: {depth: 1, width: [16, 32], heads: 2, mlp_ratio: 2}
training: {epochs: 3, fit_steps: 10, fit_examples: 128, seeds: [0, 1]}
""")
    summary = run_sweep(tmp_path / "asha.yaml", storage=str(tmp_path / "tune"), mlflow_uri=mlflow_uri, asha=True,
                        max_concurrent=2, quiet=True)
    df = _children(mlflow_uri, summary.parent_run_id)
    assert len(df) == summary.n_trials and (df["status"] == "FINISHED").all()
    done = df["tags.weit.epochs_done"].astype(int)
    stopped = df[done < 3]
    assert len(stopped) >= 1, "ASHA stopped nothing"
    assert (stopped["tags.weit.stopped_early"] == "true").all()
    assert stopped["metrics.val_acc_e3"].isna().all() and stopped["metrics.val_acc_e1"].notna().all()
    report = build_report("asha", out=tmp_path / "r", mlflow_uri=mlflow_uri, register=False, show=False)
    # a group is ranked at the final budget by the runs that reached it, and only if one did
    full = df[done == 3]
    reached = full.groupby(["tags.weit.strategy", "tags.weit.size"])["metrics.val_acc_e3"].mean()
    board = report.leaderboard.set_index(["strategy", "size"])
    ranked = board["score"].dropna()
    assert sorted(ranked.index) == sorted(reached.index) and len(board) == 4
    for group, score in ranked.items():
        assert score == pytest.approx(reached[group]) and board.loc[group, "e3_n"] == (
            (full["tags.weit.strategy"] == group[0]) & (full["tags.weit.size"] == group[1])).sum()
    assert list(report.leaderboard["score"].dropna()) == sorted(reached, reverse=True)  # and ranked first
    w = report.winners["digits"]
    assert (w.strategy, w.size) == reached.idxmax() and w.mean == pytest.approx(reached.max())
    assert w.run_id in set(full["run_id"])  # the champion seed reached the final budget
