"""``wave``: bank -> scalers resampled from the auxiliary model -> stage-2 fit (bank frozen) ->
plain weights. ``wave_random_bank``: the same pipeline on an untrained bank of the same shape, the
control that isolates what the trained templates carry."""

from __future__ import annotations

import copy

import torch

from weit_core.models import TemplatedModel, ViTSpec, create_vit, vit_layout
from weit_core.strategies import InitResult, register
from weit_core.templates import Scalers, TemplateBank, resample_scalers
from weit_core.train import fit_scalers, seed_everything


def _wave(
    spec: ViTSpec, bank: TemplateBank, aux_scalers: Scalers | None, fit_data: tuple[torch.Tensor, torch.Tensor] | None,
    *, fit_steps: int, fit_lr: float, fit_batch_size: int, seed: int, init_mode: str, scaler_init: str,
    device: str,
) -> InitResult:
    seed_everything(seed)
    layout = vit_layout(spec)
    if scaler_init == "resample":
        if aux_scalers is None:
            raise ValueError("scaler_init='resample' needs the bank's aux scalers; use scaler_init='random'")
        scalers = resample_scalers(aux_scalers, layout)
    elif scaler_init == "random":
        scalers = Scalers(layout, bank.kinds)
    else:
        raise ValueError(f"unknown scaler_init {scaler_init!r}; use 'resample' or 'random'")
    model = TemplatedModel(create_vit(spec, init_mode, head_seed=seed), copy.deepcopy(bank), scalers).to(device)
    model.set_stage("fit")
    stats = {"steps": 0, "loss": float("nan")}
    if fit_steps > 0:
        if fit_data is None:
            raise ValueError("wave needs fit_data (a small labeled subset) when fit_steps > 0")
        stats = fit_scalers(model, *fit_data, steps=fit_steps, lr=fit_lr, batch_size=fit_batch_size, seed=seed,
                            device=device)
    plain = model.cpu().materialize_into(create_vit(spec, init_mode))
    return InitResult(plain, {
        "init_mode": init_mode or "timm_default", "fit_steps": stats["steps"], "fit_lr": fit_lr,
        "fit_examples": 0 if fit_data is None else len(fit_data[0]), "fit_loss": stats["loss"],
        "scaler_init": scaler_init, "scaler_count": scalers.num_numbers(), "template_count": bank.num_numbers(),
        "kron_order": bank.order, "trainable": "scalers+free", "free_params": "timm_init+fit",
    })


@register("wave")
def wave(
    spec: ViTSpec, *, bank: TemplateBank, aux_scalers: Scalers | None = None,
    fit_data: tuple[torch.Tensor, torch.Tensor] | None = None, fit_steps: int = 100, fit_lr: float = 3e-3,
    fit_batch_size: int = 64, seed: int = 0, init_mode: str = "", scaler_init: str = "resample",
    device: str = "cpu", **_: object,
) -> InitResult:
    return _wave(spec, bank, aux_scalers, fit_data, fit_steps=fit_steps, fit_lr=fit_lr,
                 fit_batch_size=fit_batch_size, seed=seed, init_mode=init_mode, scaler_init=scaler_init,
                 device=device)


@register("wave_random_bank")
def wave_random_bank(
    spec: ViTSpec, *, bank: TemplateBank, aux_scalers: Scalers | None = None,
    fit_data: tuple[torch.Tensor, torch.Tensor] | None = None, fit_steps: int = 100, fit_lr: float = 3e-3,
    fit_batch_size: int = 64, seed: int = 0, init_mode: str = "", device: str = "cpu", **_: object,
) -> InitResult:
    """An untrained bank (fresh templates + fresh aux scalers of the trained bank's shapes), then
    exactly the ``wave`` pipeline."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    random_bank = TemplateBank(bank.kinds, bank.order)
    random_bank.reset_parameters(gen)
    random_aux = None
    if aux_scalers is not None:
        random_aux = Scalers(aux_scalers.layout, bank.kinds)
        random_aux.reset_parameters(gen)
    result = _wave(spec, random_bank, random_aux, fit_data, fit_steps=fit_steps, fit_lr=fit_lr,
                   fit_batch_size=fit_batch_size, seed=seed, init_mode=init_mode,
                   scaler_init="resample" if random_aux is not None else "random", device=device)
    result.info["bank"] = "random"
    return result
