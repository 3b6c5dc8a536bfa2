"""``wave``: a bank -> the target's scalers and free tensors by the bank's resize rule -> stage-2 fit (bank
frozen) -> plain weights. ``wave_random_bank``: the same pipeline on an untrained bank of the same shape
(random templates, scalers and free tensors), the control that isolates what stage 1 buys.

A bank that carries its aux model's free tensors (every bank ``weit distill`` writes now) gives the target
*everything* stage 1 learned but the task head: at a size stage 1 trained, the init before stage 2 is that
size of the aux model exactly. An older bank (templates + aux scalers only) still works: its scalers are
resampled the first design's way and the free tensors take timm's init (recorded as such). A bank of another
family (a ViT bank for a policy) serves the same way with ``inherit='scalers'``: the templates and scalers of
the kinds both share, the free tensors fresh (recorded as ``bank_family``, ``cross_family``).

``wave`` draws only on the bank (and, in stage 2, optionally on the ancestry as a *teacher*); it never copies
an ancestry's weights, so a bank serves users who have no ancestry at hand.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from weit_core.io import LoadedBank
from weit_core.models import TemplatedModel, family_of, get_family
from weit_core.models.elastic import resize_parts
from weit_core.resize import RESIZE_DEFAULTS
from weit_core.strategies import InitResult, register
from weit_core.tasks import CLASSIFICATION, Task
from weit_core.templates import Scalers, TemplateBank, resample_scalers, template_block
from weit_core.train import fit_scalers, seed_everything

FIT_TEACHERS = ("none", "ancestry")
INHERIT = ("all", "scalers")


def _unpack(bank: LoadedBank | TemplateBank, aux_scalers: Scalers | None) -> tuple[TemplateBank, Scalers | None,
                                                                                   dict | None, dict]:
    if isinstance(bank, LoadedBank):
        return bank.bank, bank.aux_scalers, bank.free, bank.header
    return bank, aux_scalers, None, {}


def classifier(model: nn.Module) -> nn.Module:
    """The task head a strategy leaves new (timm's ``get_classifier``; ``head`` for a model without it)."""
    get = getattr(model, "get_classifier", None)
    return get() if get is not None else model.head


def _size_key(spec: dict) -> tuple:
    """A size as stage 1 recorded it, the task's class count aside (a bank serves other tasks)."""
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in spec.items() if k != "num_classes"))


def _start(spec: Any, bank: TemplateBank, aux: Scalers | None, free: dict | None, header: dict, *,
           seed: int, init_mode: str, scaler_init: str, inherit: str) -> tuple[TemplatedModel, dict]:
    """The target before stage 2: templated model with resized scalers (+ inherited free tensors)."""
    if scaler_init not in ("resample", "random"):
        raise ValueError(f"unknown scaler_init {scaler_init!r}; use 'resample' or 'random'")
    if inherit not in INHERIT:
        raise ValueError(f"unknown inherit {inherit!r}; choose one of {INHERIT}")
    seed_everything(seed)
    family = family_of(spec)
    layout = family.layout(spec)
    base = family.build(spec, init_mode, head_seed=seed)
    info: dict[str, Any] = {"free_params": "timm_init", "head": "new (HEAD_STREAM + seed)"}
    bank_family = header.get("family", "vit") if header else family.name
    if bank_family != family.name:  # another family's bank: its templates and scalers of the shared kinds only
        missing = sorted(set(layout) - set(bank.kinds))
        if missing:
            raise ValueError(f"the {bank_family!r} bank has no templates of kind(s) {missing} that a "
                             f"{family.name!r} target needs; make a bank for this family")
        if inherit == "all" and free is not None and scaler_init == "resample":
            raise ValueError(f"the bank was made for the {bank_family!r} family, the target is a {family.name!r}: "
                             "its free tensors cannot be inherited; pass inherit='scalers' to take its templates "
                             "and scalers only (free tensors fresh), or make a bank for this family")
        info.update(bank_family=bank_family, cross_family=True)
    if scaler_init == "random":
        scalers = Scalers(layout, bank.kinds)
        info["scalers"] = "random"
    elif aux is None:
        raise ValueError("scaler_init='resample' needs the bank's aux scalers; use scaler_init='random'")
    elif free is not None and inherit == "all":
        ref = family.spec_from_dict(header["aux_spec"])
        rules = dict(header.get("resize") or RESIZE_DEFAULTS)
        with torch.no_grad():
            grids, made = resize_parts(family, ref, spec, dict(aux.grids.items()), free, template_block(bank.kinds),
                                       rules, head=False)
            scalers = Scalers(layout, bank.kinds)
            for k, g in grids.items():
                scalers.grids[k].copy_(g)
            own = dict(base.named_parameters())
            for k, v in made.items():
                own[k].copy_(v)
        trained = {_size_key(s) for s in header.get("size_range") or [header["aux_spec"]]}
        info.update(free_params="bank", scalers="bank_rule", resize=rules, reference=ref.label,
                    in_stage1_range=_size_key(spec.to_dict()) in trained)
    else:
        scalers = resample_scalers(aux, layout)
        info.update(scalers="resampled (first design)",
                    free_params="timm_init" + (" (bank has none)" if free is None else " (inherit=scalers)"))
    return TemplatedModel(base, copy.deepcopy(bank), scalers), info


def _classes(model: nn.Module, spec: Any) -> int | None:
    """The class count ``model`` was built for: its family's reading of its spec where the family has one (a
    DiT's class table is no linear head), else its classifier's outputs."""
    read = family_of(spec).spec_of_model
    if read is not None:
        try:
            return getattr(read(model), "num_classes", None)
        except (AttributeError, KeyError, TypeError, ValueError):
            pass  # not of the target's family: fall back to the head
    return getattr(classifier(model), "out_features", None)


def _teacher(fit_teacher: str, ancestry: nn.Module | None, spec: Any) -> nn.Module | None:
    if fit_teacher not in FIT_TEACHERS:
        raise ValueError(f"unknown fit_teacher {fit_teacher!r}; choose one of {FIT_TEACHERS}")
    if fit_teacher == "none":
        return None
    if ancestry is None:
        raise ValueError("fit_teacher='ancestry' needs an ancestry; pass --ancestry <model.safetensors>")
    classes = _classes(ancestry, spec)
    if classes != spec.num_classes:
        raise ValueError(f"fit_teacher='ancestry': the ancestry predicts {classes} classes, the task has "
                         f"{spec.num_classes}; distillation needs the same labels (use fit_teacher='none')")
    return ancestry


def _wave(
    spec: Any, bank: TemplateBank, aux: Scalers | None, free: dict | None, header: dict,
    fit_data: tuple[torch.Tensor, torch.Tensor] | None, *, fit_steps: int, fit_lr: float, fit_batch_size: int,
    seed: int, init_mode: str, scaler_init: str, inherit: str, head_steps: int | None, teacher: nn.Module | None,
    tau: float, device: str, task: Task = CLASSIFICATION,
) -> InitResult:
    model, info = _start(spec, bank, aux, free, header, seed=seed, init_mode=init_mode, scaler_init=scaler_init,
                         inherit=inherit)
    if head_steps is None:  # inherited features: fit the new head alone (a linear probe); else everything
        head_steps = fit_steps if info["free_params"] == "bank" else 0
    model = model.to(device)
    model.set_stage("fit")
    if teacher is not None:
        teacher = teacher.to(device)
    stats = {"steps": 0, "loss": float("nan")}
    if fit_steps > 0 and fit_data is None:
        raise ValueError("wave needs fit_data (a small labeled subset) when fit_steps > 0")
    # a linear probe needs the model's input to be the batch itself (no task.prepare: noising, contexts, ...)
    probe_only = fit_steps > 0 and head_steps >= fit_steps and teacher is None and task.prepare is None
    if fit_steps > 0 and not probe_only:
        stats = fit_scalers(model, *fit_data, steps=fit_steps, lr=fit_lr, batch_size=fit_batch_size, seed=seed,
                            device=device, teacher=teacher, tau=tau, warm_steps=head_steps, task=task,
                            warm_params=list(classifier(model.base).parameters()))
    plain = model.cpu().materialize_into(family_of(spec).build(spec, init_mode))
    if probe_only:  # the backbone is frozen: its features once, then the head alone on them (same batches)
        stats = probe_head(plain, *fit_data, steps=fit_steps, lr=fit_lr, batch_size=fit_batch_size, seed=seed,
                           device=device, task=task)
    return InitResult(plain, {
        **info, "init_mode": init_mode or "timm_default", "fit_steps": stats["steps"], "fit_lr": fit_lr,
        "fit_examples": 0 if fit_data is None else len(fit_data[0]), "fit_loss": stats["loss"],
        "fit_head_steps": min(head_steps, fit_steps) if fit_steps > 0 else 0,
        "fit_teacher": "ancestry" if teacher is not None else "none", "scaler_init": scaler_init,
        "scaler_count": model.scalers.num_numbers(), "template_count": bank.num_numbers(),
        "kron_order": bank.order, "trainable": "scalers+free",
    })


@register("wave", needs=("bank",))
def wave(
    spec: Any, *, bank: LoadedBank | TemplateBank, aux_scalers: Scalers | None = None,
    fit_data: tuple[torch.Tensor, torch.Tensor] | None = None, fit_steps: int = 100, fit_lr: float = 3e-3,
    fit_batch_size: int = 64, seed: int = 0, init_mode: str = "", scaler_init: str = "resample",
    inherit: str = "all", head_steps: int | None = None, fit_teacher: str = "none", ancestry: nn.Module | None = None,
    tau: float = 2.0, device: str = "cpu", task: Task = CLASSIFICATION, **_: object,
) -> InitResult:
    templates, aux, free, header = _unpack(bank, aux_scalers)
    return _wave(spec, templates, aux, free, header, fit_data, fit_steps=fit_steps, fit_lr=fit_lr,
                 fit_batch_size=fit_batch_size, seed=seed, init_mode=init_mode, scaler_init=scaler_init,
                 inherit=inherit, head_steps=head_steps, teacher=_teacher(fit_teacher, ancestry, spec), tau=tau,
                 device=device, task=task)


@torch.no_grad()
def _features(model: nn.Module, x: torch.Tensor, device: str, batch: int = 512) -> torch.Tensor:
    model.eval().to(device)
    out = [model.forward_head(model.forward_features(x[i:i + batch].to(device)), pre_logits=True).float().cpu()
           for i in range(0, len(x), batch)]
    return torch.cat(out)


def probe_head(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, steps: int, lr: float, batch_size: int,
               seed: int, device: str, task: Task = CLASSIFICATION) -> dict:
    """Stage 2 as a linear probe: the model's pooled features of the subset, computed once, and ``steps``
    optimizer steps of the head on them, batch for batch what fitting the head inside the whole model does."""
    feats = _features(model, x, device)
    stats = fit_scalers(classifier(model).to(device), feats, y, steps=steps, lr=lr, batch_size=batch_size, seed=seed,
                        device=device, task=task)
    model.cpu()
    return stats


def random_like(bank: LoadedBank | TemplateBank, aux_scalers: Scalers | None, seed: int
                ) -> tuple[TemplateBank, Scalers | None, dict | None, dict]:
    """An untrained bank of the same shape: fresh templates, fresh aux scalers, fresh (timm-init) free
    tensors of the reference size, the same header (reference size, rule, range)."""
    templates, aux, free, header = _unpack(bank, aux_scalers)
    gen = torch.Generator().manual_seed(10_000 + seed)
    fresh = TemplateBank(templates.kinds, templates.order)
    fresh.reset_parameters(gen)
    fresh_aux = None
    if aux is not None:
        fresh_aux = Scalers(aux.layout, templates.kinds)
        fresh_aux.reset_parameters(gen)
    fresh_free = None
    if free is not None:
        state = torch.random.get_rng_state()
        torch.manual_seed(10_000 + seed)
        family = get_family(header.get("family", "vit"))
        ref = family.build(family.spec_from_dict(header["aux_spec"]))
        torch.random.set_rng_state(state)
        fresh_free = {k: v.detach() for k, v in ref.named_parameters() if k in free}
    return fresh, fresh_aux, fresh_free, header


@register("wave_random_bank", needs=("bank",))
def wave_random_bank(
    spec: Any, *, bank: LoadedBank | TemplateBank, aux_scalers: Scalers | None = None,
    fit_data: tuple[torch.Tensor, torch.Tensor] | None = None, fit_steps: int = 100, fit_lr: float = 3e-3,
    fit_batch_size: int = 64, seed: int = 0, init_mode: str = "", inherit: str = "all", head_steps: int | None = None,
    fit_teacher: str = "none", ancestry: nn.Module | None = None, tau: float = 2.0, device: str = "cpu",
    task: Task = CLASSIFICATION, **_: object,
) -> InitResult:
    """Exactly the ``wave`` pipeline on :func:`random_like` of the bank."""
    templates, aux, free, header = random_like(bank, aux_scalers, seed)
    result = _wave(spec, templates, aux, free, header, fit_data, fit_steps=fit_steps, fit_lr=fit_lr,
                   fit_batch_size=fit_batch_size, seed=seed, init_mode=init_mode,
                   scaler_init="resample" if aux is not None else "random", inherit=inherit, head_steps=head_steps,
                   teacher=_teacher(fit_teacher, ancestry, spec), tau=tau, device=device, task=task)
    result.info["bank"] = "random"
    return result
