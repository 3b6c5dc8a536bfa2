"""Tasks own what the loop used to assume: a denoising task registered here (its inputs prepared from the
batch, a lower-is-better metric, a distillation loss) trains, evaluates, distills and ranks through the same
``weit_core.train`` functions as classification, on real digits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from weit_core.data import ArrayDataset, DatasetSplits, load_digits
from weit_core.tasks import (
    CLASSIFICATION,
    Task,
    get_data_maker,
    get_task,
    register,
    register_kind,
    task_names,
)
from weit_core.train import distill_epoch, evaluate, fit, iterate_batches, make_optimizer, seed_everything

SIGMA = 0.5


def _noised(x: torch.Tensor, y: torch.Tensor) -> tuple[tuple, torch.Tensor]:
    eps = torch.randn_like(x)
    return (x + SIGMA * eps,), eps  # predict the noise (the DDPM target), one noise level


DENOISE = register(Task(
    "test_denoise", loss=F.mse_loss, score=lambda out, eps: ((out - eps) ** 2).flatten(1).mean(1).sum(),
    metric="mse", mode="min", distill_loss=lambda out, t, tau: F.mse_loss(out, t), prepare=_noised))


def _denoiser() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.GELU(), nn.Conv2d(16, 1, 3, padding=1))


def test_registry_and_direction():
    assert get_task("test_denoise") is DENOISE and {"classification", "test_denoise"} <= set(task_names())
    assert DENOISE.better(0.1, 0.2) and not CLASSIFICATION.better(0.1, 0.2)
    assert DENOISE.best({"a": 0.3, "b": 0.1}) == "b" and CLASSIFICATION.best({"a": 0.3, "b": 0.1}) == "a"
    assert CLASSIFICATION.inputs(torch.ones(2, 1), torch.zeros(2))[0][0].sum() == 2  # default: the batch as is


def test_a_prepared_min_task_trains_and_distills_through_the_one_loop(digits):
    x, y = digits.train.x, digits.train.y
    val = lambda m: evaluate(m, iterate_batches(digits.val.x, digits.val.y, 256, shuffle=False), task=DENOISE)  # noqa: E731
    seed_everything(0)
    teacher = _denoiser()
    before = val(teacher)["mse"]
    history = fit(teacher, lambda ep: iterate_batches(x, y, 64, seed=ep), make_optimizer(teacher, 3e-3),
                  epochs=4, task=DENOISE)
    after = val(teacher)["mse"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4] and "mse" in history[-1]
    assert after < 0.7 * before, (before, after)  # real denoising: x has structure the noise lacks
    # distillation: the student sees the teacher's output on the *same* prepared inputs
    student = _denoiser()
    start = val(student)["mse"]
    distill_epoch(student, iterate_batches(x, y, 64, seed=9), make_optimizer(student, 3e-3), teacher=teacher,
                  task=DENOISE)
    assert val(student)["mse"] < start


def test_fit_stops_when_on_epoch_says_so(digits):
    model = _denoiser()
    seen = []
    fit(model, lambda ep: iterate_batches(digits.train.x[:128], digits.train.y[:128], 64, seed=ep),
        make_optimizer(model, 1e-3), epochs=5, task=DENOISE, on_epoch=lambda ep, st: seen.append(ep) or ep < 2)
    assert seen == [1, 2]


# a kind of tasks with an argument -------------------------------------------------------------------------------

MADE: list[str] = []


def _rows(arg: str):
    """``test_rows:<k>``: digits as sequences of ``k``-pixel rows (a non-image task's data), classified."""
    k = int(arg)

    def load(dataset, limit, seed):
        d = load_digits(seed=seed)
        part = lambda s: ArrayDataset(s.x.reshape(len(s), -1, k), s.y)  # noqa: E731
        return DatasetSplits(f"rows{k}", part(d.train), part(d.val), part(d.test), 10,
                             io={"tokens": 64 // k, "token_dim": k, "num_classes": 10})

    MADE.append(arg)
    return Task("rows", CLASSIFICATION.loss, CLASSIFICATION.score, load_data=load, default_family="mlp")


def _write_rows(arg: str, *, out, episodes: int, seed: int) -> dict:
    return {"arg": arg, "out": out, "episodes": episodes, "seed": seed}


register_kind("test_rows", _rows, _write_rows)
register_kind("test_nodata", _rows)


def test_a_kind_makes_its_task_once_named_by_the_full_string():
    task = get_task("test_rows:8")
    assert task.name == "test_rows:8" and get_task("test_rows:8") is task and MADE.count("8") == 1
    assert get_task("test_rows:4") is not task and task.default_family == "mlp"
    splits = task.load(None, seed=1)
    assert splits.io == {"tokens": 8, "token_dim": 8, "num_classes": 10} and splits.train.x.shape[1:] == (8, 8)
    assert get_task("test_rows:4").load(None).train.x.shape[1:] == (16, 4)
    assert {"classification", "test_rows:<arg>", "test_nodata:<arg>"} <= set(task_names())


def test_the_image_default_loads_through_the_task(digits):
    loaded = CLASSIFICATION.load("digits", limit=50, seed=0)
    assert loaded.io == digits.io and len(loaded.train) == 50 and CLASSIFICATION.default_family == "vit"
    assert CLASSIFICATION.load(None, limit=20).name == "fashion_mnist"  # the image default's own data


def test_kind_errors_name_the_form_and_the_choices():
    with pytest.raises(ValueError, match="test_rows:<arg>"):
        get_task("test_rows")
    with pytest.raises(ValueError, match="unknown task 'nope:1'.*test_rows:<arg>"):
        get_task("nope:1")
    assert get_data_maker("test_rows:8")("8", out="d", episodes=3, seed=1)["episodes"] == 3
    with pytest.raises(ValueError, match="kinds that do: .*test_rows"):
        get_data_maker("test_nodata")
    with pytest.raises(ValueError, match="registered twice"):
        register_kind("test_rows", _rows)
