"""Stage 1 in one process: make a template bank over a size range, with a teacher (WAVE) or without (WeiT).

The same pieces run inside Ray Train's workers (``pipelines/distill.py``); this in-process form serves the
tests, the benchmarks and anyone without a cluster. The loop is :func:`weit_core.train.fit`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from weit_core.models.elastic import AtSize, ElasticModel, range_model
from weit_core.models.family import Family
from weit_core.templates import TemplateBank
from weit_core.train import (
    evaluate,
    fit,
    iterate_batches,
    make_optimizer,
    seed_everything,
    warmup_cosine,
)


def build_elastic(family: Family, ref_spec: Any, *, n: int = 4, block: int = 16, order: str = "scaler_major",
                  width_rule: str = "nested", depth_rule: str = "nested", seed: int = 0) -> ElasticModel:
    """A fresh auxiliary model: unit-normal templates, LeCun scalers, the family's init for free tensors."""
    seed_everything(seed)
    bank = TemplateBank(family.kinds(ref_spec, n, block), order)
    return ElasticModel(family, ref_spec, bank, width_rule=width_rule, depth_rule=depth_rule)


def make_bank(
    elastic: ElasticModel, x: torch.Tensor, y: torch.Tensor, *, sizes: list[Any] | None = None,
    teacher: nn.Module | None = None, epochs: int = 1, lr: float = 1e-3, weight_decay: float = 0.05,
    warmup_epochs: float = 1.0, batch_size: int = 128, tau: float = 2.0, n_random: int = 1, seed: int = 0,
    device: str = "cpu", max_steps: int | None = None, time_budget_s: float | None = None,
    eval_data: tuple[torch.Tensor, torch.Tensor] | None = None, eval_sizes: list[Any] | None = None,
    on_epoch: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Train ``elastic`` in place: every size of ``sizes`` (sandwich rule) or the reference alone, AdamW
    with a linear warm-up then cosine decay.

    ``time_budget_s``: after the first epoch, as many epochs (at most ``epochs``) as that epoch's wall time
    fits in the budget, the cosine laid over them. Returns one dict per epoch: train loss/metric, and with
    ``eval_data`` the metric of each of ``eval_sizes`` (default: the smallest, the reference and the
    largest of the range)."""
    sizes = sorted(set(sizes or [elastic.ref_spec]), key=lambda s: s.num_params())
    model = range_model(elastic, sizes, n_random, seed)
    model.to(device)
    if teacher is not None:
        teacher = teacher.to(device).eval().requires_grad_(False)
    steps_per_epoch = -(-len(x) // batch_size)
    if max_steps:
        steps_per_epoch = min(steps_per_epoch, max_steps)
    opt = make_optimizer(model, lr, weight_decay)
    sched = warmup_cosine(opt, steps_per_epoch * epochs, round(steps_per_epoch * warmup_epochs))
    watch = eval_sizes or list(dict.fromkeys([sizes[0], elastic.ref_spec, sizes[-1]]))
    history: list[dict] = []
    t0 = time.perf_counter()
    planned = epochs

    def batches(epoch: int):
        return iterate_batches(x, y, batch_size, seed=seed * 1000 + epoch, drop_last=len(x) > batch_size)

    def after(epoch: int, stats: dict) -> bool:
        nonlocal planned
        row = {"epoch": epoch, **{f"train_{k}": v for k, v in stats.items() if k not in ("epoch", "train_s")}}
        if eval_data is not None:
            for s in watch:
                ev = evaluate(AtSize(elastic, s), iterate_batches(*eval_data, 512, shuffle=False), device=device)
                row[f"eval_acc@{s.label}"] = ev["acc"]
        row["wall_s"] = round(time.perf_counter() - t0, 1)
        history.append(row)
        if on_epoch is not None:
            on_epoch(row)
        if time_budget_s is not None and epoch == 1:  # re-plan the cosine over the epochs that fit
            planned = max(1, min(epochs, int(time_budget_s // max(row["wall_s"], 1e-9))))
            sched.lr_lambdas[0].total = steps_per_epoch * planned
        return epoch < planned

    fit(model, batches, opt, epochs=epochs, on_epoch=after, teacher=teacher, tau=tau, device=device,
        max_steps=steps_per_epoch, scheduler=sched)
    return history


def save_elastic(path: Any, elastic: ElasticModel, header: dict | None = None,
                 sizes: list[Any] | None = None) -> Any:
    """Write the bank: templates, reference scalers, reference free tensors (no head) and the rule."""
    from weit_core.io import save_bank

    meta = {**(header or {}), "family": elastic.family.name, "aux_spec": elastic.ref_spec.to_dict(),
            "resize": dict(elastic.rules)}
    if sizes:
        meta["size_range"] = [s.to_dict() for s in sizes]
    return save_bank(path, elastic.bank, elastic.scalers, meta, free=elastic.free_tensors())


def load_elastic(loaded: Any, family: Family) -> ElasticModel:
    """The aux model of a bank that carries free tensors (``weit_core.io.load_bank``'s result)."""
    if loaded.free is None or loaded.aux_scalers is None:
        raise ValueError("this bank carries no free tensors (made before banks did); it cannot rebuild its "
                         "auxiliary model, only its templates and scalers")
    ref = family.spec_from_dict(loaded.header["aux_spec"])
    return ElasticModel(family, ref, loaded.bank, loaded.aux_scalers, loaded.free, **loaded.resize)
