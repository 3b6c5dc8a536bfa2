"""Tasks: what a model is trained and judged on, behind one small interface, in one registry.

A task owns its loss, its metric (name and direction: ``max`` or ``min``), its distillation loss against a
teacher and, where a metric is not a sum over batches (a sampler's FID, a policy's return), its own
evaluation, and how its data is loaded. The loop (``weit_core.train``), the stages, Tune's mode, the report's
ranking and the registry's champion all read these, so nothing else assumes images, labels or "higher is
better". A new task is one module of this package that calls :func:`register`; a kind of tasks with an
argument (``control:CartPole-v1``: one task per environment) calls :func:`register_kind`.
"""

from __future__ import annotations

import dataclasses
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
    by default ``((x,), y)``). Student and teacher see the same prepared inputs.

    ``sample_grid(model, batches, device)``, when given, is a picture of what the model makes on the evaluation
    batches (a [0, 1] image tensor ``(C, H, W)``), logged by a sweep at each evaluation: a sampler's FID says
    how far its samples are from the data, the picture says what is wrong with them.

    ``load_data(dataset, limit, seed)`` gives the task's :class:`~weit_core.data.DatasetSplits` (None: the
    image datasets, ``weit_core.data.load_splits``); ``default_family`` is the architecture a command builds
    when the user names none."""

    name: str
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    metric: str = "acc"
    mode: str = "max"
    distill_loss: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor] | None = None
    agreement: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    evaluate: Callable[..., dict[str, float]] | None = None
    prepare: Callable[[torch.Tensor, torch.Tensor], tuple[tuple, torch.Tensor]] | None = None
    load_data: Callable[[str | None, int | None, int], Any] | None = None
    default_family: str = "vit"
    score_name: str | None = None
    """What the per-batch ``score`` is called where it is not the metric (a task with its own ``evaluate``: a
    policy's action agreement, a denoiser's MSE); the loop reports it as ``train_<score_name>``."""
    sample_grid: Callable[..., torch.Tensor] | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"task {self.name!r}: mode must be one of {MODES}, got {self.mode!r}")

    @property
    def batch_metric(self) -> str:
        """The name of the loop's per-batch score: the metric itself unless ``score_name`` says otherwise."""
        return self.score_name or self.metric

    def inputs(self, x: torch.Tensor, y: torch.Tensor) -> tuple[tuple, torch.Tensor]:
        """The model's inputs and the loss's targets for a batch (see ``prepare``)."""
        return ((x,), y) if self.prepare is None else self.prepare(x, y)

    def load(self, dataset: str | None, limit: int | None = None, seed: int = 0) -> Any:
        """The task's data (a ``DatasetSplits``), at most ``limit`` rows per split, split by ``seed``; ``dataset``
        None: the task's default (Fashion-MNIST for the image default)."""
        if self.load_data is not None:
            return self.load_data(dataset, limit, seed)
        from weit_core.data import load_splits

        return load_splits(dataset or "fashion_mnist", limit, seed)

    def better(self, a: float, b: float) -> bool:
        """Whether metric value ``a`` beats ``b`` in this task's direction."""
        return a > b if self.mode == "max" else a < b

    def best(self, values: dict[Any, float]) -> Any:
        """The key whose value is best in this task's direction."""
        return (max if self.mode == "max" else min)(values, key=values.__getitem__)


_REGISTRY: dict[str, Task] = {}
_KINDS: dict[str, tuple[Callable[[str], Task], Callable[..., Any] | None]] = {}
_MADE: dict[str, Task] = {}  # ``kind:arg`` -> the task its kind made, made once
_loaded = False


def register(task: Task) -> Task:
    old = _REGISTRY.get(task.name)
    if old is not None and old is not task:
        raise ValueError(f"task {task.name!r} registered twice")
    _REGISTRY[task.name] = task
    return task


def register_kind(kind: str, make: Callable[[str], Task], make_data: Callable[..., Any] | None = None) -> None:
    """A kind of tasks with an argument: ``get_task(f"{kind}:{arg}")`` is ``make(arg)`` (made once, named by
    the full string); ``make_data(arg, out=, episodes=, seed=)``, when given, writes the kind's data
    (``weit data kind:arg``)."""
    if ":" in kind:
        raise ValueError(f"task kind {kind!r}: a kind's name cannot hold ':'")
    old = _KINDS.get(kind)
    if old is not None and old != (make, make_data):
        raise ValueError(f"task kind {kind!r} registered twice")
    _KINDS[kind] = (make, make_data)


def _load_all() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for mod in pkgutil.iter_modules(__path__):
            importlib.import_module(f"{__name__}.{mod.name}")
    from weit_core.plugins import load_plugins

    load_plugins()  # a user's own task modules ($WEIT_PLUGINS)


def get_task(name: str) -> Task:
    """A registered task by name, or ``kind:arg`` of a registered kind."""
    _load_all()
    if name in _REGISTRY:
        return _REGISTRY[name]
    kind, colon, arg = name.partition(":")
    if kind in _KINDS and not (colon and arg):
        raise ValueError(f"task kind {kind!r} needs an argument: use the form {kind}:<arg>")
    if kind not in _KINDS:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(task_names())}")
    if name not in _MADE:
        task = _KINDS[kind][0](arg)
        _MADE[name] = task if task.name == name else dataclasses.replace(task, name=name)
    return _MADE[name]


def get_data_maker(kind: str) -> Callable[..., Any]:
    """The data maker of a task kind (``kind`` or ``kind:arg``): ``make_data(arg, out=, episodes=, seed=)``."""
    _load_all()
    kind = kind.partition(":")[0]
    if (made := _KINDS.get(kind)) is None or made[1] is None:
        have = sorted(k for k, (_, data) in _KINDS.items() if data is not None)
        raise ValueError(f"no task kind {kind!r} makes data; kinds that do: {', '.join(have) or 'none registered'}")
    return made[1]


def task_names() -> list[str]:
    """Plain tasks, then the ``kind:<arg>`` form of each kind."""
    _load_all()
    return sorted(_REGISTRY) + [f"{k}:<arg>" for k in sorted(_KINDS)]


from weit_core.tasks.classification import CLASSIFICATION  # noqa: E402  (the default task of the loop)

__all__ = ["CLASSIFICATION", "MODES", "Task", "get_data_maker", "get_task", "register", "register_kind",
           "task_names"]
