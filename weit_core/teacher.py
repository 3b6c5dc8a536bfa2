"""The ancestry a bank is distilled from: a weit model file, or a timm model name with the user's own
safetensors checkpoint. Loaded and checked once in the driver; Ray workers rebuild it from
:attr:`Teacher.source` plus its weights (shipped through the object store, so no worker needs the file)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from weit_core.io import WeitFileError, load_model, load_timm_checkpoint, read_header
from weit_core.models import TIMM_MODEL, get_family
from weit_core.tasks import CLASSIFICATION, Task


class TeacherError(ValueError):
    """A teacher that cannot be loaded or does not fit the data; the message says how to fix it."""


@dataclass
class Teacher:
    model: nn.Module
    source: dict
    """How to build the model again without its file: ``{"timm_name", "kwargs"}`` or ``{"family", "spec"}``."""
    info: dict
    """What a bank's header records about where it came from."""
    spec: Any = None
    """The family spec of a weit model file (None for a plain timm checkpoint)."""

    def shipment(self) -> dict:
        """What :func:`rebuild_teacher` needs: ``source`` and the weights as CPU tensors."""
        return {**self.source, "state": {k: v.detach().cpu() for k, v in self.model.state_dict().items()}}


def no_teacher(teacher: str | None) -> bool:
    """None, ``""`` and ``"none"`` mean WeiT pre-training (no teacher)."""
    return teacher is None or str(teacher).strip().lower() in ("", "none")


def load_teacher(teacher: str, checkpoint: str | None = None, kwargs: dict | None = None) -> Teacher:
    """A weit model file (``weit ancestry``), or a timm model name + the user's safetensors checkpoint."""
    kwargs = dict(kwargs or {})
    path = Path(teacher)
    if path.suffix == ".safetensors" or path.is_file():
        return _weit_model(path)
    if not timm.is_model(teacher):
        close = timm.list_models(f"*{teacher}*")[:5]
        raise TeacherError(f"--teacher {teacher!r} is neither a file nor a timm model name"
                           + (f" (did you mean {', '.join(close)}?)" if close else ""))
    if not checkpoint:
        raise TeacherError(f"--teacher {teacher} needs --teacher-checkpoint (a safetensors state_dict); "
                           f"no pretrained weights are downloaded")
    try:
        model = timm.create_model(teacher, pretrained=False, **kwargs)
    except TypeError as e:
        raise TeacherError(f"timm.create_model({teacher!r}, **{kwargs}) failed ({e}); fix --teacher-kwargs") from e
    try:
        load_timm_checkpoint(model, checkpoint)
    except WeitFileError as e:
        raise TeacherError(str(e)) from e
    info = {"kind": "timm", "timm_model": teacher, "kwargs": kwargs, "checkpoint": str(Path(checkpoint).resolve())}
    return Teacher(model.eval(), {"timm_name": teacher, "kwargs": kwargs}, info)


def _weit_model(path: Path) -> Teacher:
    if not path.is_file():
        raise TeacherError(f"teacher file {path} not found; train one with `weit ancestry --out {path}`")
    try:
        header = read_header(path)
    except WeitFileError as e:
        if "without a weit header" in str(e):
            raise TeacherError(f"{path} is a plain safetensors checkpoint; pass its timm model name as "
                               f"--teacher and the file as --teacher-checkpoint") from e
        raise TeacherError(str(e)) from e
    if header.get("format") != "weit-model":
        raise TeacherError(f"{path} is a {header.get('format')!r} file, not a model; pass an ancestry model")
    try:
        model, header = load_model(path)
    except WeitFileError as e:
        raise TeacherError(str(e)) from e
    family = get_family(header.get("family", "vit"))
    spec = family.spec_from_dict(header["spec"])
    info = {"kind": "weit-model", "path": str(path.resolve()), "timm_model": header.get("timm_model"),
            "spec": spec.to_dict(), "ancestry": header.get("info", {})}
    if family.name == "vit":
        source = {"timm_name": header.get("timm_model", TIMM_MODEL), "kwargs": spec.timm_kwargs()}
    else:
        source = {"family": family.name, "spec": spec.to_dict()}
    return Teacher(model, source, info, spec)


def check_teacher(teacher: Teacher, input_shape: tuple[int, ...], num_classes: int, task: Task = CLASSIFICATION
                  ) -> None:
    """One forward on a dummy batch of the data's shape, prepared by the task as training prepares it (a
    denoiser gets its noised image, time and class): the teacher must read it and, for a task that feeds the
    batch as it is, output one logit per class (where the data has classes)."""
    x, y = torch.zeros(2, *input_shape), torch.zeros(2, dtype=torch.long)
    try:
        with torch.no_grad():
            args, target = task.inputs(x, y)
            out = teacher.model(*args)
    except Exception as e:  # shape mismatches surface as RuntimeError/ValueError/AssertionError in timm
        raise TeacherError(f"teacher cannot read inputs of shape {input_shape} ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:160]}); build it for this data (--teacher-kwargs)") from e
    if task.prepare is not None:
        if out.shape != target.shape:
            raise TeacherError(f"teacher outputs {tuple(out.shape[1:])} per example but task {task.name!r} "
                               f"trains towards {tuple(target.shape[1:])}")
    elif num_classes and tuple(out.shape) != (2, num_classes):
        raise TeacherError(f"teacher outputs {tuple(out.shape[1:])} per example but the data has {num_classes} "
                           f"classes")


def rebuild_teacher(shipped: dict, device: torch.device | str = "cpu") -> nn.Module:
    """The frozen teacher from :meth:`Teacher.shipment`, on ``device``."""
    if "family" in shipped:
        family = get_family(shipped["family"])
        model = family.build(family.spec_from_dict(shipped["spec"]))
    else:
        model = timm.create_model(shipped["timm_name"], pretrained=False, **shipped["kwargs"])
    model.load_state_dict(shipped["state"], strict=True)
    return model.to(device).eval().requires_grad_(False)
