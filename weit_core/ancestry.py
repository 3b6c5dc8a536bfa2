"""An ancestry in one process: an ordinary model of any family trained on a task by the one loop
(:func:`weit_core.train.fit`), scored on val and test after every epoch. ``weit ancestry`` runs this on one
machine, or the same recipe on Ray Train with ``--workers``."""

from __future__ import annotations

import time
from collections.abc import Callable

from torch import nn

from weit_core.data import DatasetSplits
from weit_core.tasks import Task
from weit_core.train import evaluate, fit, iterate_batches, make_optimizer, warmup_cosine

EVAL_BATCH = 512


def train_plain(model: nn.Module, splits: DatasetSplits, task: Task, *, epochs: int, lr: float,
                weight_decay: float, warmup_epochs: float, batch_size: int, seed: int,
                on_epoch: Callable[[dict], None] | None = None) -> dict:
    """AdamW, linear warm-up then cosine; after each epoch ``on_epoch`` gets loss, train/val/test metric, lr
    and the epoch's seconds. Returns the last epoch's row. Build ``model`` after seeding for a reproducible
    start; batches are shuffled by (seed, epoch)."""
    x, y, metric = splits.train.x, splits.train.y, task.metric
    optimizer = make_optimizer(model, lr, weight_decay)
    steps = -(-len(x) // batch_size)
    scheduler = warmup_cosine(optimizer, steps * epochs, round(steps * warmup_epochs))
    row: dict = {}

    def after(epoch: int, st: dict) -> None:
        t0 = time.perf_counter()
        val, test = (evaluate(model, iterate_batches(split.x, split.y, EVAL_BATCH, shuffle=False), task=task)
                     for split in (splits.val, splits.test))
        row.update({"epoch": epoch, "loss": st["loss"], f"train_{task.batch_metric}": st[task.batch_metric],
                    f"val_{metric}": val[metric], f"test_{metric}": test[metric], "lr": optimizer.param_groups[0]["lr"],
                    "epoch_s": st["train_s"] + time.perf_counter() - t0})
        if on_epoch is not None:
            on_epoch(dict(row))

    fit(model, lambda epoch: iterate_batches(x, y, batch_size, seed=seed * 100_003 + epoch), optimizer,
        epochs=epochs, on_epoch=after, task=task, scheduler=scheduler)
    return row
