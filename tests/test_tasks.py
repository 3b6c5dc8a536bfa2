"""Tasks own what the loop used to assume: a denoising task registered here (its inputs prepared from the
batch, a lower-is-better metric, a distillation loss) trains, evaluates, distills and ranks through the same
``weit_core.train`` functions as classification, on real digits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from weit_core.tasks import CLASSIFICATION, Task, get_task, register, task_names
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
