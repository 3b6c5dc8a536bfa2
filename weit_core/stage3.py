"""Stages 2 and 3 of one target in one process: a strategy's init, then the one recipe every strategy is
trained with, scored on validation after every epoch.

A sweep trial (``pipelines/trial.py``, on Ray Tune) and the init-quality benchmark run these same
functions, so what a benchmark measures is what a sweep ranks. The loop is :func:`weit_core.train.fit`.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from weit_core.strategies import InitResult, init_model
from weit_core.tasks import CLASSIFICATION, Task
from weit_core.train import (
    SCHEDULES,
    EpochBatches,
    evaluate,
    fit,
    iterate_batches,
    make_optimizer,
    seed_everything,
    warmup_cosine,
)


@dataclass(frozen=True)
class Recipe:
    """Stage 3, the same for every strategy: AdamW, ``epochs`` passes over the training set in batches of
    ``batch_size`` (each pass capped at ``steps_per_epoch`` steps when given), the learning rate following
    ``schedule`` over all of the run's steps: ``cosine`` = linear warm-up over ``warmup`` of them, then
    cosine decay to 1% of ``lr``; ``constant`` = ``lr`` throughout."""

    lr: float
    epochs: int = 1
    batch_size: int = 64
    steps_per_epoch: int | None = None
    weight_decay: float = 0.05
    schedule: str = "cosine"
    warmup: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown stage-3 schedule {self.schedule!r}; use {' or '.join(SCHEDULES)}")

    @classmethod
    def of(cls, config: dict) -> Recipe:
        """The recipe a trial config names (configs of sweeps older than ``schedule`` ran a constant lr)."""
        return cls(**{"schedule": "constant", **{f.name: config[f.name] for f in fields(cls) if f.name in config}})

    def epoch_steps(self, n_train: int) -> int:
        """Optimizer steps per epoch: a full pass, the last batch partial, or ``steps_per_epoch`` if fewer."""
        per_epoch = math.ceil(n_train / self.batch_size)
        return min(per_epoch, self.steps_per_epoch) if self.steps_per_epoch else per_epoch

    def scheduler(self, optimizer: Optimizer, total_steps: int) -> LRScheduler | None:
        if self.schedule == "constant":
            return None
        return warmup_cosine(optimizer, total_steps, round(self.warmup * total_steps))


def init_target(strategy: str, spec: Any, train: Any, *, seed: int, fit_examples: int = 0, bank: Any = None,
                ancestry: tuple[nn.Module, Any] | None = None, **settings: Any) -> InitResult:
    """Stage 2: ``strategy``'s model of size ``spec``. Its labeled subset is ``fit_examples`` rows of
    ``train`` drawn with seed ``1000 + seed``, the same for every strategy at a seed; the ancestry ``(model,
    spec)`` is copied, since a strategy may change what it is given. ``settings`` (fit_steps, fit_lr,
    init_mode, device, a strategy's options) go to the strategy as they are."""
    if fit_examples > 0:
        fit_set = train.subset(fit_examples, seed=1000 + seed)
        settings["fit_data"] = (fit_set.x, fit_set.y)
    if bank is not None:
        settings["bank"] = bank
    if ancestry is not None:
        settings.update(ancestry=copy.deepcopy(ancestry[0]), ancestry_spec=ancestry[1])
    return init_model(strategy, spec, seed=seed, **settings)


def score(model: nn.Module, split: Any, *, task: Task = CLASSIFICATION, device: str = "cpu",
          batch_size: int = 512) -> dict[str, float]:
    """The task's evaluation of ``model`` on a whole split (``x``, ``y``), in order."""
    return evaluate(model, iterate_batches(split.x, split.y, batch_size, shuffle=False), task=task, device=device)


def train_target(
    model: nn.Module, train: Any, val: Any, recipe: Recipe, *, task: Task = CLASSIFICATION, device: str = "cpu",
    test: Any = None, eval_batch_size: int = 512, score_init: bool = True, batches: EpochBatches | None = None,
    steps_per_epoch: int | None = None, on_epoch: Callable[[dict], bool | None] | None = None,
) -> list[dict]:
    """Stage 3 of ``model``, in place, by ``recipe``; ``val`` scored after every epoch and ``test`` after the
    last. One row per epoch: ``val_<metric>``, ``val_loss`` (NaN where the task's own evaluation, a rollout or a
    sampler, has no loss), ``train_loss``, ``train_<metric>``, ``epoch_s`` (``test_<metric>`` on the last); with
    ``score_init`` first a row for epoch 0, the model as given.

    ``on_epoch(row)`` sees each row as it is made (log it, report it); False ends the run there. The
    batches of epoch ``e`` are a fresh shuffle of ``train`` (seed ``1000 * recipe.seed + e``) unless
    ``batches(e)`` gives them, then ``steps_per_epoch`` of them each epoch (the schedule spans them all)."""
    m = task.metric
    rows: list[dict] = []

    def add(row: dict) -> bool | None:
        rows.append(row)
        return None if on_epoch is None else on_epoch(row)

    if score_init:
        ev = score(model, val, task=task, device=device, batch_size=eval_batch_size)
        if add({"epoch": 0, f"val_{m}": ev[m], "val_loss": ev.get("loss", math.nan)}) is False:
            return rows
    seed_everything(recipe.seed)
    optimizer = make_optimizer(model, recipe.lr, recipe.weight_decay)
    per_epoch = steps_per_epoch or recipe.epoch_steps(len(train))
    if batches is None:
        def batches(epoch: int):
            return iterate_batches(train.x, train.y, recipe.batch_size, seed=recipe.seed * 1000 + epoch)

    def after(epoch: int, stats: dict) -> bool | None:
        t0 = time.perf_counter()
        ev = score(model, val, task=task, device=device, batch_size=eval_batch_size)
        row = {"epoch": epoch, f"val_{m}": ev[m], "val_loss": ev.get("loss", math.nan), "train_loss": stats["loss"],
               f"train_{task.batch_metric}": stats[task.batch_metric]}
        if epoch == recipe.epochs and test is not None:
            row[f"test_{m}"] = score(model, test, task=task, device=device, batch_size=eval_batch_size)[m]
        row["epoch_s"] = stats["train_s"] + time.perf_counter() - t0
        return add(row)

    fit(model, batches, optimizer, epochs=recipe.epochs, on_epoch=after, task=task, device=device,
        max_steps=per_epoch, scheduler=recipe.scheduler(optimizer, recipe.epochs * per_epoch))
    return rows


def run_config(config: dict, data: Any, *, bank: Any = None, ancestry: tuple[nn.Module, Any] | None = None,
               device: str = "cpu", on_init: Callable[[Any, InitResult, float], None] | None = None,
               on_epoch: Callable[[dict], bool | None] | None = None) -> tuple[InitResult, list[dict], float]:
    """A trial config (``weit_core.trials``) run on its task's ``data``: its strategy's init with its stage-2
    settings, ``on_init(spec, result, init_s)``, then stage 3 by its recipe on its task. Returns the init
    result (its model trained in place), the rows of :func:`train_target` and the init time in seconds."""
    from weit_core.trials import spec_of, task_of

    spec, task, t0 = spec_of(config), task_of(config), time.perf_counter()
    res = init_target(config["strategy"], spec, data.train, seed=config["seed"], bank=bank, ancestry=ancestry,
                      device=device, task=task, **{k: config[k] for k in ("fit_examples", "init_mode", "fit_steps", "fit_lr",
                                                               "fit_batch_size")})
    init_s = time.perf_counter() - t0
    if on_init is not None:
        on_init(spec, res, init_s)
    res.model.to(device)
    history = train_target(res.model, data.train, data.val, Recipe.of(config), task=task, device=device,
                           test=data.test if config["test_eval"] else None,
                           eval_batch_size=config["eval_batch_size"], on_epoch=on_epoch)
    return res, history, init_s
