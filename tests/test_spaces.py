"""Search spaces from a typed schema: a space's sizes are its family's (axes, types, defaults, drop reasons and
specs come from the registry), a task is any registered kind (its data, its io, its direction), every error is
one line naming the key, and the trial keys of the shipped spaces are what they were before the schema (a
resumed sweep finds its finished trials). The CLI sweep below imports this module through ``$WEIT_PLUGINS``."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from weit_core.data import ArrayDataset, DatasetSplits, load_splits
from weit_core.models.family import Family, register_family
from weit_core.space import SpaceError, load_space, parse_space
from weit_core.tasks import Task, register_kind
from weit_core.trials import expand, inspect_tasks, size_points, spec_of

ROOT = Path(__file__).resolve().parent.parent
DIGITS = {"in_chans": 1, "img_size": 8, "num_classes": 10}  # DatasetSplits.io of digits
TASK = "tasks: [{data: digits, patch: 2}]\nstrategies: [scratch]\n"


# a family only these tests use: a float axis with a default, an int axis without, its own drop reason


@dataclass(frozen=True)
class BoxSpec:
    side: int
    ratio: float = 1.5
    in_chans: int = 1
    num_classes: int = 10

    def num_params(self) -> int:
        return round(self.side * self.side * self.ratio) * self.in_chans + self.num_classes

    def flops(self) -> int:
        return 2 * self.num_params()


def _unused(*args, **kwargs):
    raise AssertionError("a space never builds a model")


BOX = register_family(Family(
    name="spaces_test_box", spec_type=BoxSpec, build=_unused, layout=_unused, kinds=_unused, free_names=_unused,
    size_maps=_unused, resize_grids=_unused, resize_free=_unused, size_axes=("side", "ratio"),
    make_spec=lambda size, io: BoxSpec(size["side"], size["ratio"], io["in_chans"], io["num_classes"]),
    check_size=lambda size, block: "odd_side" if size["side"] % 2 else None,
    drop_reasons={"odd_side": "the side is odd"}))


def test_sizes_are_the_familys_axes_typed_and_defaulted_by_its_spec():
    space = parse_space(TASK + "family: spaces_test_box\nsizes: {side: {range: [2, 7, 1]}}\n"
                        "constraints: {max_params: 40}\n")
    assert space.family == "spaces_test_box" and list(space.sizes) == ["side", "ratio"]
    assert size_points(space) == [{"side": s, "ratio": 1.5} for s in range(2, 8)]  # 1.5: BoxSpec's default
    assert all(isinstance(p["ratio"], float) for p in size_points(parse_space(
        TASK + "family: spaces_test_box\nsizes: {side: 2, ratio: [1, 2]}\n")))  # a float axis keeps floats

    exp = expand(space, {"digits": DIGITS})
    # odd sides: the family's own reason, in its words; 6x6x1.5 + 10 = 64 > 40 and 4x4x1.5 + 10 = 34 <= 40
    assert dict(exp.dropped) == {"odd_side": 3, "params_above_max": 1}
    assert "3 the side is odd" in exp.describe_drops()
    assert [(t["side"], t["family"]) for t in exp.trials] == [(2, "spaces_test_box"), (4, "spaces_test_box")]
    assert spec_of(exp.trials[1]) == BoxSpec(4, 1.5)


@pytest.mark.parametrize("text, match", [
    ("family: vitt\nsizes: {depth: 1}", r"^s\.yaml: family: unknown architecture family 'vitt'; available: .*vit"),
    ("family: spaces_test_box\nsizes: {side: 2, width: [8]}",
     r"unknown key 'width' in sizes \(known keys: side, ratio\)$"),
    ("family: spaces_test_box\nsizes: {ratio: 2}",
     r"sizes: missing required key 'side' \(spaces_test_box sizes need side; ratio defaults to 1.5\)$"),
    ("family: spaces_test_box\nsizes: {side: 2, ratio: {range: [1, 3, 1]}}",
     r"sizes\.ratio: expected a number, a list, \{uniform: \[low, high\]\} or \{choice: \[\.\.\.\]\}, got dict"),
    ("family: spaces_test_box\nsizes: {side: 2}\nconstraints: {min_head_dim: 8}",
     r"constraints\.min_head_dim: reads width and heads, which spaces_test_box sizes do not have"),
    ("sizes: {depth: {choice: [1, two]}, width: 16, heads: 2}", r"sizes\.depth\.choice\[1\]: expected an integer"),
    ("sizes: {depth: {randint: [4, 2]}, width: 16, heads: 2}\nsamples: 3", r"sizes\.depth\.randint: low 4 > high 2"),
    ("sizes: {depth: {range: [1, 4]}, width: 16, heads: 2}", r"sizes\.depth\.range: expected 3 values, got list"),
    ("sizes: {depth: true, width: 16, heads: 2}", r"sizes\.depth: expected a number, .* got bool True$"),
    ("sizes: {depth: 1, width: 16, heads: 2, mlp_ratio: 0}", r"sizes\.mlp_ratio: must be > 0, got 0$"),
    ("sizes: {depth: 1, width: 16, heads: 2}\nsamples: 2", r"samples: only meaningful when a size axis is a"),
    ("sizes: {depth: 1, width: 16, heads: 2}\ntraining: {seeds: [1, 1]}", r"training\.seeds: repeated seeds"),
    ("sizes: {depth: 1, width: 16, heads: 2}\ntraining: {test_eval: 1}", r"test_eval: expected true or false"),
    ("sizes: {depth: 1, width: 16, heads: 2}\ntraining: {fit_examples: 0}",
     r"training\.fit_examples: is 0 but fit_steps > 0"),
    ("sizes: {depth: 1, width: 16, heads: 2}\nconstraints: {min_params: 9, max_params: 3}",
     r"constraints: min_params 9 > max_params 3$"),
])
def test_each_problem_is_one_line_naming_the_key(text, match):
    with pytest.raises(SpaceError, match=match) as e:
        parse_space(TASK + text + "\n", source="s.yaml")
    assert "\n" not in str(e.value)


def test_task_overrides_and_the_default_name_are_checked_like_the_rest(tmp_path):
    with pytest.raises(SpaceError, match=r"tasks\[1\]\.name: task name 'digits' used twice"):
        parse_space(TASK.replace("patch: 2}", "patch: 2}, digits") + "sizes: {depth: 1, width: 16, heads: 2}\n")
    with pytest.raises(SpaceError, match=r"tasks\[0\]\.training\.fit_examples: is 0 but fit_steps > 0"):
        parse_space(TASK.replace("patch: 2", "patch: 2, training: {fit_steps: 10}")  # the space's 0 examples
                    + "sizes: {depth: 1, width: 16, heads: 2}\ntraining: {fit_steps: 0, fit_examples: 0}\n")
    bad_name = tmp_path / "my space.yaml"  # the file stem is the default name, and must be a name too
    bad_name.write_text(TASK + "sizes: {depth: 1, width: 16, heads: 2}\n")
    with pytest.raises(SpaceError, match=r"name: expected a name without spaces"):
        load_space(bad_name)
    space = parse_space(TASK.replace("patch: 2", "patch: 2, training: {epochs: 5}")
                        + "sizes: {depth: 1, width: 16, heads: 2}\ntraining: {epochs: 4, batch_size: 32}\n")
    settings = space.tasks[0].training
    assert (settings["epochs"], settings["batch_size"], settings["lr"], settings["weight_decay"]) == (5, 32, 1e-3, 0.05)
    assert isinstance(parse_space(TASK + "sizes: {depth: 1, width: 16, heads: 2}\ntraining: {weight_decay: 0}\n")
                      .tasks[0].training["weight_decay"], float)  # 0 and 0.0 hash differently in a trial key


@pytest.mark.parametrize("space, bank_block, n, digest", [
    ("ci.yaml", 16, 16, "7eea95e6e79b5354"),
    ("fmnist_sizes.yaml", 16, 4104, "49bf1f38bf631f40"),
])
def test_shipped_spaces_keep_their_trial_keys_and_order(space, bank_block, n, digest):
    """The keys (hashes of whole trial configs) and their order, recorded before spaces moved to the schema:
    a ViT trial names no family, and every setting keeps its type."""
    shapes = {"digits": DIGITS, "fashion_mnist": {**DIGITS, "img_size": 28}}
    trials = expand(load_space(ROOT / "tune_spaces" / space), shapes, bank_block=bank_block).trials
    assert len(trials) == n and not any("family" in t for t in trials)
    assert hashlib.sha1(" ".join(t["key"] for t in trials).encode()).hexdigest()[:16] == digest



# a task that is no classification, registered here: ``spaces_test_pool:N`` regresses the 4x4 average-pooled
# pixels of real Fashion-MNIST images (N rows per split), judged by mean squared error (lower is better)


def _pool_task(arg: str) -> Task:
    def load(dataset: str, limit: int | None, seed: int) -> DatasetSplits:
        d = load_splits(dataset or "fashion_mnist", int(arg), seed)
        pooled = lambda s: ArrayDataset(s.x, F.avg_pool2d(s.x, 7).flatten(1))  # noqa: E731  (N x 16 targets)
        return DatasetSplits(f"pool{arg}", pooled(d.train), pooled(d.val), pooled(d.test),
                             io={**d.io, "num_classes": 16})  # the head predicts the 16 pooled values

    def squared_error(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ((out - y) ** 2).mean(1).sum()

    return Task("pool", F.mse_loss, squared_error, metric="mse", mode="min", load_data=load)


def _rmse(model: torch.nn.Module, batches, device) -> dict[str, float]:
    """An evaluation that is no batch sum (the root of the mean over the whole split), as a rollout's is not."""
    total = n = 0
    for x, y in batches:
        total += float(((model(x.to(device)) - y.to(device)) ** 2).mean(1).sum())
        n += len(y)
    return {"rmse": (total / n) ** 0.5}


register_kind("spaces_test_pool", _pool_task)
register_kind("spaces_test_rmse", lambda arg: dataclasses.replace(_pool_task(arg), metric="rmse", evaluate=_rmse))
register_kind("spaces_test_boxed", lambda arg: dataclasses.replace(_pool_task(arg), default_family=BOX.name))
POOL_SPACE = """
name: pool
tasks: [{name: fmnist_pool, task: "spaces_test_pool:512", data: fashion_mnist, patch: 7}]
strategies: [scratch, mimetic]
sizes: {depth: 1, width: [16, 32], heads: 2, mlp_ratio: 2}
training: {epochs: 2, batch_size: 64, lr: 0.003, fit_steps: 0, fit_examples: 0}
"""


def test_a_non_classification_task_validates_and_expands_with_its_own_io(fmnist_dir):
    with pytest.raises(SpaceError, match=r"^s\.yaml: tasks\[0\]\.task: unknown task 'nope:1'; available: .*"
                                         r"spaces_test_pool:<arg>"):
        parse_space(POOL_SPACE.replace("spaces_test_pool:512", "nope:1"), source="s.yaml")
    space = parse_space(POOL_SPACE)
    io = inspect_tasks(space)["fmnist_pool"]
    assert io == {"in_chans": 1, "img_size": 28, "num_classes": 16}  # the task's io, not the 10 classes
    trials = expand(space, {"fmnist_pool": io}).trials
    assert len(trials) == 4 and {t["kind"] for t in trials} == {"spaces_test_pool:512"}
    assert {(spec_of(t).num_classes, spec_of(t).patch) for t in trials} == {(16, 7)}
    # a kind that loads its own data needs no `data`, and its default family is the space's unless it names one
    boxed = parse_space('tasks: [{task: "spaces_test_boxed:64"}]\nstrategies: [scratch]\nsizes: {side: 2}\n')
    assert (boxed.family, boxed.tasks[0].name, boxed.tasks[0].data) == (BOX.name, "spaces_test_boxed_64", None)
    with pytest.raises(SpaceError, match=r"tasks\[0\]: missing required key 'data' \(fashion_mnist or digits"):
        parse_space(TASK.replace("data: digits, ", "") + "sizes: {depth: 1, width: 16, heads: 2}\n")
    # the default kind is named nowhere in a config, so classification keys stay what they were
    assert "kind" not in expand(parse_space(TASK + "sizes: {depth: 1, width: 16, heads: 2}\n"),
                                {"digits": DIGITS}).trials[0]


def test_a_trial_of_a_task_with_its_own_evaluation_trains_and_scores_by_it(fmnist_dir):
    """A task whose ``evaluate`` replaces the batch sum (and reports no loss) runs a whole trial: the metric is
    its own, ``val_loss`` is NaN (logged nowhere), and stage 3 improves it."""
    from pipelines.trial import run_trial

    space = parse_space(POOL_SPACE.replace("spaces_test_pool:512", "spaces_test_rmse:256").replace("[16, 32]", "16")
                        .replace("[scratch, mimetic]", "[scratch]"))
    (config,) = expand(space, inspect_tasks(space)).trials
    rows = run_trial(config).history
    assert [r["epoch"] for r in rows] == [0, 1, 2] and all(math.isnan(r["val_loss"]) for r in rows)
    assert rows[-1]["val_rmse"] < rows[0]["val_rmse"] and "test_rmse" in rows[-1]


def test_cli_sweep_and_report_rank_a_lower_is_better_task_lowest_first(fmnist_dir, tmp_path):
    """``weit sweep`` as a user runs it, the task coming from this file, then the report: Tune, the leaderboard
    and the champion follow ``mode: min``; the ranking is recomputed here from MLflow."""
    import mlflow

    from pipelines.report import build_report

    (tmp_path / "pool.yaml").write_text(POOL_SPACE)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "WEIT_PLUGINS": Path(__file__).stem, "RAY_AUTH_MODE": "disabled",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-m", "pipelines.cli", "sweep", "--space", str(tmp_path / "pool.yaml"),
                          "--storage", str(tmp_path / "tune"), "--mlflow-uri", uri], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["weit-sweep"], filter_string="tags.`weit.kind` = 'trial'")
    assert len(runs) == 4 and (runs["status"] == "FINISHED").all() and set(runs["tags.weit.mode"]) == {"min"}
    assert runs["metrics.val_mse_e2"].notna().all() and runs["metrics.test_mse"].notna().all()
    assert (runs["metrics.val_mse_e2"] < runs["metrics.val_mse_e0"]).all()  # stage 3 learned the regression
    final = runs.groupby(["tags.weit.strategy", "tags.weit.size"])["metrics.val_mse_e2"].mean()
    report = build_report("pool", out=tmp_path / "report", mlflow_uri=uri, show=False)
    board = pd.read_csv(tmp_path / "report" / "leaderboard.csv")
    assert list(zip(board["strategy"], board["size"], strict=True)) == list(final.sort_values().index)  # lowest first
    w = report.winners["fmnist_pool"]
    assert (w.strategy, w.size, w.metric, w.mode) == (*final.idxmin(), "val_mse", "min")
    champion = mlflow.MlflowClient(uri).get_model_version_by_alias("weit-fmnist_pool", "champion")
    assert champion.tags["mode"] == "min" and champion.run_id == w.run_id
