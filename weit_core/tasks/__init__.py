"""Tasks: what a model is trained and judged on, behind one small interface, in one registry.

A task owns its loss, its metric (name and direction: ``max`` or ``min``), its distillation loss against a
teacher and, where a metric is not a sum over batches (a sampler's FID, a policy's return), its own
evaluation. The loop (``weit_core.train``), the stages, Tune's mode, the report's ranking and the registry's
champion all read these, so nothing else assumes images, labels or "higher is better". A new task kind is
one module of this package that calls :func:`register`.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

MODES = ("max", "min")


@dataclass(frozen=True)
class Task:
    """``loss(outputs, targets)`` is a mean; ``score(outputs, targets)`` a *sum* over the batch, so averages
    over uneven batches and data-parallel shards stay exact; ``distill_loss(outputs, teacher_outputs, tau)``
    is the stage-1 (and optional stage-2) term against a teacher; ``agreement`` counts outputs that agree with
    the teacher's (a sum), when that means something; ``evaluate(model, batches, device)``, when given,
    replaces the batch-sum evaluation (samplers, rollouts) and returns ``{metric: value, ...}``.

    ``prepare(x, y)`` is the task's training step up to the model: a batch of its data becomes the model's
    inputs and the targets of ``loss`` (a denoiser's noised image, timestep and class with the noise as target;
    by default ``((x,), y)``). Student and teacher see the same prepared inputs."""

    name: str
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    metric: str = "acc"
    mode: str = "max"
    distill_loss: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor] | None = None
    agreement: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    evaluate: Callable[..., dict[str, float]] | None = None
    prepare: Callable[[torch.Tensor, torch.Tensor], tuple[tuple, torch.Tensor]] | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"task {self.name!r}: mode must be one of {MODES}, got {self.mode!r}")

    def inputs(self, x: torch.Tensor, y: torch.Tensor) -> tuple[tuple, torch.Tensor]:
        """The model's inputs and the loss's targets for a batch (see ``prepare``)."""
        return ((x,), y) if self.prepare is None else self.prepare(x, y)

    def better(self, a: float, b: float) -> bool:
        """Whether metric value ``a`` beats ``b`` in this task's direction."""
        return a > b if self.mode == "max" else a < b

    def best(self, values: dict[Any, float]) -> Any:
        """The key whose value is best in this task's direction."""
        return (max if self.mode == "max" else min)(values, key=values.__getitem__)


_REGISTRY: dict[str, Task] = {}
_loaded = False


def register(task: Task) -> Task:
    old = _REGISTRY.get(task.name)
    if old is not None and old is not task:
        raise ValueError(f"task {task.name!r} registered twice")
    _REGISTRY[task.name] = task
    return task


def _load_all() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for mod in pkgutil.iter_modules(__path__):
            importlib.import_module(f"{__name__}.{mod.name}")
    from weit_core.plugins import load_plugins

    load_plugins()  # a user's own task modules ($WEIT_PLUGINS)


def get_task(name: str) -> Task:
    _load_all()
    if name not in _REGISTRY:
        raise ValueError(f"unknown task kind {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def task_names() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


from weit_core.tasks.classification import CLASSIFICATION  # noqa: E402  (the default task of the loop)

__all__ = ["CLASSIFICATION", "MODES", "Task", "get_task", "register", "task_names"]
