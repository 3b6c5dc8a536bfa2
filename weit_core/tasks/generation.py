"""Class-conditional image generation (Fashion-MNIST, or a user's parquet of labelled images), judged by FID.

Rectified flow, not DDPM ε-prediction: an image ``x`` and noise ``ε`` are joined by the straight line
``x_t = (1 - t) x + t ε`` and the model learns its velocity ``v = ε - x`` (MSE, ``t`` uniform in [0, 1]).
Straight paths let a *few-step* Euler sampler (:data:`SAMPLE_STEPS`) make recognisable samples, so a fixed
evaluation stays cheap enough to run after every epoch of a sweep; DDPM needs tens to hundreds of steps for
the same. The target also has about unit scale at every ``t``, so one plain MSE weighs all times alike.

Classifier-free guidance: training replaces a label by "no label" (-1, the DiT's null class) with probability
:data:`LABEL_DROP`; sampling with ``guidance`` w > 1 mixes ``v_uncond + w (v_cond - v_uncond)`` (w = 1:
plain conditional sampling, one forward per step).

``prepare`` draws ``t``, the noise and the label drops on the CPU from a ``torch.Generator`` seeded by one
draw of torch's global stream, which ``weit_core.train.seed_everything`` seeds: the same seed gives the same
inputs on any device. The per-batch ``score`` the loop averages during training is the per-image MSE (the
only thing a batch can say); the metric ``fid`` comes from :func:`evaluate_generation`: :data:`EVAL_SAMPLES`
samples from fixed seeded noise, conditioned on the labels of the evaluation batches, against those batches'
real images (``weit_core.fid``), plus ``class_acc``: the share of samples that an independently trained
classifier (the shipped Fashion-MNIST ancestry ViT, 88.95% test accuracy, never shown a generated image)
assigns to the class they were conditioned on. ``class_acc`` is reported only where the judge recognises the
real evaluation images (accuracy >= :data:`JUDGE_MIN_REAL_ACC` on them): Fashion-MNIST, not another dataset.
The task's ``sample_grid`` (:func:`sample_grid`) is what a sweep shows beside the FID: a class per row, from
the same noise for every model.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from weit_core.tasks import Task, register, register_kind

LABEL_DROP = 0.1
SAMPLE_STEPS = 10
EVAL_SAMPLES = 1000
EVAL_SEED = 20_240_611
JUDGE_PATH = Path(__file__).resolve().parents[2] / "docs" / "data" / "fmnist_ancestry.safetensors"
JUDGE_MIN_REAL_ACC = 0.8
GRID_CLASSES = 10
GRID_PER_CLASS = 8
FASHION_MNIST_IO = (1, 28, 10)
"""``(in_chans, img_size, classes)`` of the data the judge was trained on."""


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def _draw(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator, drop: float) -> tuple[tuple, torch.Tensor]:
    """A rectified-flow training example per image: ``((x_t, t, y'), v)`` with ``y'`` -1 where dropped."""
    n = len(x)
    t = torch.rand(n, generator=gen)
    eps = torch.randn(x.shape, generator=gen)
    dropped = torch.rand(n, generator=gen) < drop
    t, eps, dropped = t.to(x.device), eps.to(x.device, x.dtype), dropped.to(x.device)
    tb = t.view(-1, *([1] * (x.dim() - 1)))
    labels = torch.where(dropped, torch.full_like(y, -1), y)
    return ((1 - tb) * x + tb * eps, t, labels), eps - x


def prepare(x: torch.Tensor, y: torch.Tensor) -> tuple[tuple, torch.Tensor]:
    """The loop's step up to the model: noised images, times and (sometimes dropped) labels; the velocity."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
    return _draw(x, y.long(), gen, LABEL_DROP)


def _per_image_mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((out.float() - target.float()) ** 2).flatten(1).mean(1).sum()


def _distill(out: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    """The teacher's velocity on the same noised inputs (``tau`` has no meaning for a regression)."""
    return F.mse_loss(out, teacher)


@torch.no_grad()
def denoising_loss(model: nn.Module, batches, device: torch.device | str = "cpu", seed: int = EVAL_SEED) -> float:
    """Mean velocity MSE over ``batches`` at fixed seeded times and noise (no label drops): a training loss
    two models can be compared on."""
    device = torch.device(device)
    model.eval().to(device)
    total, n = 0.0, 0
    for i, (x, y) in enumerate(batches):
        args, v = _draw(x.to(device), y.to(device).long(), torch.Generator().manual_seed(seed + i), 0.0)
        with _autocast(device):
            out = model(*args)
        total += float(_per_image_mse(out, v))
        n += len(x)
    return total / max(n, 1)


@torch.no_grad()
def sample(model: nn.Module, labels: torch.Tensor, shape: tuple[int, ...], *, steps: int = SAMPLE_STEPS,
           guidance: float = 1.0, seed: int = EVAL_SEED, device: torch.device | str = "cpu",
           batch_size: int = 500) -> torch.Tensor:
    """Images (in the data's normalization) for ``labels``: Euler steps of the learned velocity from seeded
    noise at t = 1 to t = 0; ``guidance`` w != 1 runs the null class alongside (classifier-free guidance)."""
    if steps < 1:
        raise ValueError(f"the sampler needs at least 1 step, got {steps}")
    device = torch.device(device)
    model.eval().to(device)
    noise = torch.randn((len(labels), *shape), generator=torch.Generator().manual_seed(seed))
    times = torch.linspace(1.0, 0.0, steps + 1)
    out = []
    for i in range(0, len(labels), batch_size):
        x = noise[i:i + batch_size].to(device)
        y = labels[i:i + batch_size].to(device).long()
        for t0, t1 in zip(times[:-1].tolist(), times[1:].tolist(), strict=True):
            t = torch.full((len(x),), t0, device=device)
            with _autocast(device):
                if guidance == 1.0:
                    v = model(x, t, y).float()
                else:
                    v_c, v_u = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, -1)])
                                     ).float().chunk(2)
                    v = v_u + guidance * (v_c - v_u)
            x = x + (t1 - t0) * v
        out.append(x.float().cpu())
    return torch.cat(out) if out else noise


@functools.lru_cache(maxsize=1)
def _judge() -> nn.Module | None:
    if not JUDGE_PATH.is_file():
        warnings.warn(f"class_acc omitted: the judge classifier {JUDGE_PATH} is missing", stacklevel=3)
        return None
    from weit_core.io import load_model

    return load_model(JUDGE_PATH)[0].eval().requires_grad_(False)


@torch.no_grad()
def _judge_acc(judge: nn.Module, images01: torch.Tensor, labels: torch.Tensor, device: torch.device) -> float:
    from weit_core.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD

    judge = judge.to(device)
    correct = 0
    for i in range(0, len(images01), 500):
        x = ((images01[i:i + 500] - FASHION_MNIST_MEAN) / FASHION_MNIST_STD).to(device)
        correct += int((judge(x).argmax(-1).cpu() == labels[i:i + 500]).sum())
    return correct / max(len(labels), 1)


_REAL_JUDGE: dict[str, float] = {}


def _collect(batches, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys, have = [], [], 0
    for x, y in batches:
        xs.append(x.cpu())
        ys.append(y.cpu().long())
        have += len(x)
        if have >= n:
            break
    if not xs:
        raise ValueError("generation evaluation needs evaluation batches (their labels condition the samples)")
    return torch.cat(xs)[:n], torch.cat(ys)[:n]


def _unit_range(real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(lo, span)`` of the real images: ``(x - lo) / span`` is in [0, 1] (the inverse of a [0, 1]
    image's normalization, exact for Fashion-MNIST)."""
    lo = real.amin(dim=(0, 2, 3), keepdim=True)
    return lo, (real.amax(dim=(0, 2, 3), keepdim=True) - lo).clamp_min(1e-8)


def evaluate_generation(model: nn.Module, batches, device: torch.device | str = "cpu", *,
                        samples: int = EVAL_SAMPLES, steps: int = SAMPLE_STEPS, guidance: float = 1.0,
                        seed: int = EVAL_SEED) -> dict[str, float]:
    """FID of ``samples`` generated images against the first ``samples`` real images of ``batches`` (each
    sample conditioned on one real image's label), the denoising loss on those real images, and
    ``class_acc`` on Fashion-MNIST. Pixels go to [0, 1] by the real images' per-channel range
    (:func:`_unit_range`), samples clipped to it."""
    from weit_core import fid

    device = torch.device(device)
    real, labels = _collect(batches, samples)
    lo, span = _unit_range(real)
    real01 = (real - lo) / span
    key = fid.fingerprint(real)
    fake01 = ((sample(model, labels, tuple(real.shape[1:]), steps=steps, guidance=guidance, seed=seed,
                      device=device) - lo) / span).clamp(0, 1)
    out = {"fid": fid.frechet_distance_to_features(*fid.real_statistics(real01, device, key=key),
                                                   fid.features(fake01, device)),
           "loss": denoising_loss(model, [(real, labels)], device, seed), "samples": len(real), "steps": steps,
           "guidance": guidance}
    c, side, classes = FASHION_MNIST_IO
    judge = _judge() if tuple(real.shape[1:]) == (c, side, side) and int(labels.max()) < classes else None
    if judge is not None:
        if key not in _REAL_JUDGE:
            _REAL_JUDGE[key] = _judge_acc(judge, real01, labels, device)
        if _REAL_JUDGE[key] >= JUDGE_MIN_REAL_ACC:
            out.update(class_acc=_judge_acc(judge, fake01, labels, device), real_class_acc=_REAL_JUDGE[key])
    return out


@torch.no_grad()
def sample_grid(model: nn.Module, batches, device: torch.device | str = "cpu", *, samples: int = EVAL_SAMPLES,
                steps: int = SAMPLE_STEPS, guidance: float = 1.0, seed: int = EVAL_SEED,
                per_class: int = GRID_PER_CLASS) -> torch.Tensor:
    """What the model makes, to look at beside its FID: a row per class its evaluation conditions on (the
    labels of the first ``samples`` real images, sorted, at most :data:`GRID_CLASSES`), ``per_class`` samples
    each by the evaluation's sampler, as one [0, 1] image ``(3, H, W)``. The noise is seeded, so two models'
    grids differ only by the models, cell for cell; pixels are mapped as :func:`evaluate_generation` maps
    them. The model's train/eval mode is left as it was."""
    from torchvision.utils import make_grid

    real, labels = _collect(batches, samples)
    lo, span = _unit_range(real)
    classes = labels.unique(sorted=True)[:GRID_CLASSES]
    training = model.training
    try:
        x = sample(model, classes.repeat_interleave(per_class), tuple(real.shape[1:]), steps=steps,
                   guidance=guidance, seed=seed, device=device)
    finally:
        model.train(training)
    return make_grid(((x - lo) / span).clamp(0, 1), nrow=per_class, pad_value=1.0)


def make_generation_task(name: str = "generation", *, samples: int = EVAL_SAMPLES, steps: int = SAMPLE_STEPS,
                         guidance: float = 1.0) -> Task:
    """The generation task with its evaluation's sample count, sampler steps and guidance scale (its sample
    grid uses the same)."""
    sampler = {"samples": samples, "steps": steps, "guidance": guidance}

    def evaluate(model: nn.Module, batches, device: torch.device | str) -> dict[str, float]:
        return evaluate_generation(model, batches, device, **sampler)

    def grid(model: nn.Module, batches, device: torch.device | str) -> torch.Tensor:
        return sample_grid(model, batches, device, **sampler)

    return Task(name, loss=F.mse_loss, score=_per_image_mse, metric="fid", mode="min", score_name="mse",
                distill_loss=_distill, evaluate=evaluate, prepare=prepare, default_family="dit", sample_grid=grid)


def task_of_argument(arg: str) -> Task:
    """``generation:<samples>`` or ``generation:<samples>x<steps>``: the task with a cheaper (CI) or costlier
    fixed evaluation; plain ``generation`` is ``generation:1000x10``."""
    try:
        parts = [int(p) for p in arg.lower().split("x")]
    except ValueError:
        parts = []
    if not 1 <= len(parts) <= 2 or parts[0] < 2 or (len(parts) == 2 and parts[1] < 1):
        raise ValueError(f"generation:{arg}: use generation:<samples> or generation:<samples>x<steps> "
                         f"(samples >= 2, steps >= 1), e.g. generation:{EVAL_SAMPLES}x{SAMPLE_STEPS}")
    return make_generation_task(f"generation:{arg}", samples=parts[0], steps=parts[1] if len(parts) == 2 else SAMPLE_STEPS)


GENERATION = register(make_generation_task())
register_kind("generation", task_of_argument)
