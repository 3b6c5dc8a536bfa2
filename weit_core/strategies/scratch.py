"""``scratch``: the family's own init (timm's, mode named explicitly). ``scratch_fit``: the compute-matched
control — scratch plus exactly the stage-2 step budget on the same subset, every parameter trainable. Both
apply to every family: they ask the registry for the builder."""

from __future__ import annotations

from typing import Any

import torch

from weit_core.models import family_of
from weit_core.strategies import InitResult, register
from weit_core.tasks import CLASSIFICATION, Task
from weit_core.train import fit_scalers, seed_everything


@register("scratch")
def scratch(spec: Any, *, seed: int = 0, init_mode: str = "", **_: object) -> InitResult:
    seed_everything(seed)
    model = family_of(spec).build(spec, init_mode, head_seed=seed)
    return InitResult(model, {"init_mode": init_mode or "timm_default", "fit_steps": 0})


@register("scratch_fit", needs=("fit_data",))
def scratch_fit(
    spec: Any, *, fit_data: tuple[torch.Tensor, torch.Tensor], fit_steps: int = 100, fit_lr: float = 3e-3,
    fit_batch_size: int = 64, seed: int = 0, init_mode: str = "", device: str = "cpu", task: Task = CLASSIFICATION,
    **_: object,
) -> InitResult:
    seed_everything(seed)
    model = family_of(spec).build(spec, init_mode, head_seed=seed).to(device)
    stats = fit_scalers(model, *fit_data, steps=fit_steps, lr=fit_lr, batch_size=fit_batch_size, seed=seed,
                        device=device, task=task)
    return InitResult(model.cpu(), {
        "init_mode": init_mode or "timm_default", "fit_steps": stats["steps"], "fit_lr": fit_lr,
        "fit_examples": len(fit_data[0]), "fit_loss": stats["loss"], "trainable": "all",
    })
