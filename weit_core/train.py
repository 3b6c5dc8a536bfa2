"""THE training loop: :func:`fit` (epochs of :func:`distill_epoch`) runs ancestry training, stage 1, stage 3
and the benchmarks for every caller (Ray Train workers, Tune trials, tests); :func:`fit_scalers` is stage 2
and :func:`evaluate` judges. Batches are any iterable of ``(x, y)``
tensors, so the same code reads in-memory tensors and Ray Data shards."""

from __future__ import annotations

import contextlib
import itertools
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from weit_core.tasks import CLASSIFICATION, Task

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


class NonFiniteLossError(FloatingPointError):
    """Raised when a step's loss is NaN/inf, so callers can mark the run failed with the reason."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on GPU (no loss scaling needed); full precision on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def iterate_batches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, *, shuffle: bool = True, seed: int = 0,
    drop_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """In-memory mini-batches; the order depends only on ``seed``."""
    n = len(x)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
    stop = n - n % batch_size if drop_last else n
    for i in range(0, stop, batch_size):
        idx = order[i : i + batch_size]
        yield x[idx], y[idx]


def make_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.05) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; no decay on 1-D tensors (biases, norms) as in timm."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)


class WarmupCosine:
    """LR factor of the one schedule: linear warm-up over ``warm`` steps, then cosine to ``floor`` at
    ``total``. A callable object, so ``LambdaLR.state_dict`` saves it and a run may re-plan ``total`` (stage
    1's time budget) after it started."""

    def __init__(self, total: int, warm: int, floor: float = 0.01) -> None:
        self.total, self.warm, self.floor = max(total, 1), warm, floor

    def __call__(self, step: int) -> float:
        if step < self.warm:
            return (step + 1) / (self.warm + 1)
        t = min(1.0, (step - self.warm) / max(1, self.total - self.warm))
        return self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * t))


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                  floor: float = 0.01) -> LambdaLR:
    """Linear warm-up then cosine decay to ``floor * lr``; resumable by ``state_dict``, re-plannable through
    ``scheduler.lr_lambdas[0]`` (a :class:`WarmupCosine`)."""
    total_steps = max(total_steps, 1)
    warmup_steps = min(max(warmup_steps, 0), total_steps - 1)
    return LambdaLR(optimizer, WarmupCosine(total_steps, warmup_steps, floor))


def _copies(out: torch.Tensor, y: torch.Tensor) -> int:
    """How many stacked outputs per target (1 for an ordinary model)."""
    if len(out) % max(len(y), 1):
        raise ValueError(f"model gave {len(out)} outputs for a batch of {len(y)}")
    return len(out) // max(len(y), 1)


def _tile(t: torch.Tensor, k: int) -> torch.Tensor:
    return t if k == 1 else t.repeat(k, *([1] * (t.dim() - 1)))


def _check_finite(loss: torch.Tensor, step: int) -> None:
    if not torch.isfinite(loss):
        raise NonFiniteLossError(f"loss became {loss.item()} at step {step}; lower the learning rate")


def _step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, grad_clip: float | None) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()


def train_epoch(
    model: nn.Module, batches: Batches, optimizer: torch.optim.Optimizer, *, task: Task = CLASSIFICATION,
    device: torch.device | str = "cpu", max_steps: int | None = None, grad_clip: float | None = 1.0,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> dict[str, float]:
    """One pass (or ``max_steps``) of supervised training; returns mean loss and metric over the pass."""
    return distill_epoch(model, batches, optimizer, teacher=None, task=task, device=device,
                         max_steps=max_steps, grad_clip=grad_clip, scheduler=scheduler)


def distill_epoch(
    model: nn.Module, batches: Batches, optimizer: torch.optim.Optimizer, *, teacher: nn.Module | None = None,
    tau: float = 2.0, task: Task = CLASSIFICATION, device: torch.device | str = "cpu",
    max_steps: int | None = None, grad_clip: float | None = 1.0,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> dict[str, float]:
    """WAVE distillation (task loss + the task's distillation loss against the teacher, for classification
    ``KL(teacher || student) * tau^2``) when a teacher is given; WeiT constraint-based pre-training (task loss
    only) when ``teacher`` is None."""
    device = torch.device(device)
    model.train()
    if teacher is not None:
        teacher.eval()
    # running sums stay on the device: a .item() per step would stall a GPU on every step
    tot = torch.zeros(3, dtype=torch.float64, device=device)  # loss * b, score, teacher agreement
    finite = torch.ones((), dtype=torch.bool, device=device)
    n = steps = 0
    # islice, not a check inside the loop: a shared batch stream must not lose a batch at the cut
    for x, y in itertools.islice(batches, max_steps):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        args, y = task.inputs(x, y)
        with _autocast(device):
            out = model(*args)
            k = _copies(out, y)
            if k > 1:  # a model that runs several sizes per batch (stage 1's sandwich) stacks their outputs
                y = _tile(y, k)
            loss = task.loss(out.float(), y)
            agree = torch.zeros((), device=device)
            if teacher is not None:
                if task.distill_loss is None:
                    raise ValueError(f"task {task.name!r} has no distillation loss; train without a teacher")
                with torch.no_grad():
                    t_out = _tile(teacher(*args).float(), k)
                loss = loss + task.distill_loss(out.float(), t_out, tau)
                if task.agreement is not None:
                    agree = task.agreement(out, t_out)
        if device.type == "cpu":
            _check_finite(loss, steps)
        else:
            finite &= torch.isfinite(loss)
        _step(loss, optimizer, grad_clip)
        if scheduler is not None:
            scheduler.step()
        b = len(y)
        tot += torch.stack([loss.detach().double() * b, task.score(out.detach().float(), y).double(),
                            agree.double()])
        n += b
        steps += 1
    if not bool(finite):
        raise NonFiniteLossError(f"loss became non-finite within {steps} steps; lower the learning rate")
    tot_loss, tot_score, tot_agree = tot.tolist()
    stats = {"loss": tot_loss / max(n, 1), task.batch_metric: tot_score / max(n, 1), "steps": steps, "examples": n}
    if teacher is not None:
        stats["agreement"] = tot_agree / max(n, 1)
    return stats


EpochBatches = Callable[[int], Batches]


def fit(
    model: nn.Module, batches: EpochBatches, optimizer: torch.optim.Optimizer, *, epochs: int,
    start_epoch: int = 1, on_epoch: Callable[[int, dict], bool | None] | None = None,
    teacher: nn.Module | None = None, tau: float = 2.0, task: Task = CLASSIFICATION,
    device: torch.device | str = "cpu", max_steps: int | None = None, grad_clip: float | None = 1.0,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> list[dict]:
    """THE epoch loop, for ancestry training, stage 1 (in-process and in Ray Train workers), stage 3 trials
    and the benchmarks: epochs ``start_epoch..epochs`` of :func:`distill_epoch` over ``batches(epoch)``.

    ``on_epoch(epoch, stats)`` runs after each epoch (evaluate, report, checkpoint); returning False ends
    the run there (a time budget, early stopping). Returns each epoch's training stats."""
    history = []
    for epoch in range(start_epoch, epochs + 1):
        t0 = time.perf_counter()
        stats = distill_epoch(model, batches(epoch), optimizer, teacher=teacher, tau=tau, task=task,
                              device=device, max_steps=max_steps, grad_clip=grad_clip, scheduler=scheduler)
        stats = {"epoch": epoch, **stats, "train_s": time.perf_counter() - t0}
        history.append(stats)
        if on_epoch is not None and on_epoch(epoch, stats) is False:
            break
    return history


def cycle_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless shuffled batches over a (small) set, a new order each pass; no partial batches unless the set
    is smaller than one batch."""
    epoch = 0
    while True:
        n = 0
        for b in iterate_batches(x, y, batch_size, seed=seed + epoch, drop_last=len(x) > batch_size):
            n += 1
            yield b
        if n == 0:
            raise ValueError(f"a set of {len(x)} examples gives no batch of {batch_size}")
        epoch += 1


def fit_scalers(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, steps: int, lr: float = 1e-3,
    batch_size: int = 64, seed: int = 0, task: Task = CLASSIFICATION, device: torch.device | str = "cpu",
    weight_decay: float = 0.0, teacher: nn.Module | None = None, tau: float = 2.0, warm_steps: int = 0,
    warm_params: Iterable[nn.Parameter] | None = None,
) -> dict[str, float]:
    """Stage 2: exactly ``steps`` optimizer steps on the small subset ``(x, y)``, cycling over it, for
    whatever in ``model`` requires grad (scalers + free params; the bank is frozen by the caller), with the
    teacher's soft targets added when one is given.

    The first ``warm_steps`` train only ``warm_params`` (a new head on inherited features): a random head's
    first gradients would otherwise reshape what was inherited before the head means anything (LP-FT)."""
    if steps <= 0:
        return {"loss": math.nan, task.batch_metric: math.nan, "steps": 0}
    stream = cycle_batches(x, y, batch_size, seed)
    warm = list(warm_params or [])
    n_warm = min(warm_steps, steps) if warm else 0
    done, last = 0, {}
    for n, only in ((n_warm, warm), (steps - n_warm, None)):
        if n <= 0:
            continue
        grads = {p: p.requires_grad for p in model.parameters()}
        if only:
            keep = {id(p) for p in only}
            for p in model.parameters():
                p.requires_grad_(grads[p] and id(p) in keep)
        try:
            optimizer = make_optimizer(model, lr, weight_decay)
            last = distill_epoch(model, stream, optimizer, teacher=teacher, tau=tau, task=task, device=device,
                                 max_steps=n)
        finally:
            for p, g in grads.items():
                p.requires_grad_(g)
        done += last["steps"]
    return {"loss": last["loss"], task.batch_metric: last[task.batch_metric], "steps": done}


SCHEDULES = ("cosine", "constant")
"""Stage 3's LR schedules: warm-up then cosine (:func:`warmup_cosine`), or the first design's fixed LR."""


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: Batches, *, task: Task = CLASSIFICATION, device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Mean loss and metric over all batches (sums, so uneven batches weigh correctly), or the task's own
    evaluation where it has one (a sampler, a rollout)."""
    device = torch.device(device)
    model.eval()
    if task.evaluate is not None:
        return task.evaluate(model, batches, device)
    tot = torch.zeros(2, dtype=torch.float64, device=device)
    n = 0
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        args, y = task.inputs(x, y)
        with _autocast(device):
            out = model(*args).float()
        b = len(y)
        tot += torch.stack([task.loss(out, y).double() * b, task.score(out, y).double()])
        n += b
    tot_loss, tot_score = tot.tolist()
    return {"loss": tot_loss / max(n, 1), task.metric: tot_score / max(n, 1), "examples": n}
