"""Stage 1's auxiliary model as a function of size, and the sandwich that trains a whole size range.

:class:`ElasticModel` holds everything a bank carries: the shared templates, the reference size's scalers
and its free tensors (norms, biases, position table, class token; the aux head too, which never leaves
stage 1). Any size's weights are *computed* from them by the family's resize rule, differentiably, so a loss
on any size trains the same parameters, and stage 2 starts exactly where stage 1 left that size.

:class:`Sandwich` is what stage 1 trains when given a range (WeiT's structured constraints, the sandwich
rule of slimmable / once-for-all networks): every training forward runs the largest size, the smallest and
``n_random`` sizes drawn from the range, stacked along the batch (the loop tiles the targets to match).
"""

from __future__ import annotations

import random
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from weit_core.models.family import Family
from weit_core.templates import Scalers, TemplateBank, materialize_grids, template_block


def _key(name: str) -> str:
    return name.replace(".", "__")


def resize_parts(family: Family, ref_spec: Any, spec: Any, grids: dict[str, torch.Tensor],
                 free: dict[str, torch.Tensor], block: int, rules: dict, head: bool = True
                 ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A size's ``(scaler grids, free tensors)`` from the reference's by the family's rule: what stage 1
    trains each size through and what stage 2 starts from (the reference itself without computing maps)."""
    if spec == ref_spec:
        return dict(grids), {k: v for k, v in free.items() if head or not k.startswith("head.")}
    maps = family.size_maps(ref_spec, spec, block, **rules)
    return family.resize_grids(dict(grids), maps), family.resize_free(free, ref_spec, maps, head=head)


def range_model(elastic: ElasticModel, sizes: list[Any], n_random: int = 1, seed: int = 0) -> nn.Module:
    """What stage 1 trains for ``sizes``: the aux model itself when the range is its reference alone (or
    empty), else a :class:`Sandwich` over the range."""
    if not sizes or list(sizes) == [elastic.ref_spec]:
        return elastic
    return Sandwich(elastic, sizes, n_random, seed)


class ElasticModel(nn.Module):
    """Templates + reference scalers + reference free tensors; ``forward(*inputs, spec=)`` runs any size."""

    def __init__(self, family: Family, ref_spec: Any, bank: TemplateBank, scalers: Scalers | None = None,
                 free: dict[str, torch.Tensor] | None = None, *, width_rule: str = "nested",
                 depth_rule: str = "nested", init_mode: str = "") -> None:
        super().__init__()
        self.family, self.ref_spec = family, ref_spec
        self.rules = {"width_rule": width_rule, "depth_rule": depth_rule}
        layout = family.layout(ref_spec)
        self.bank = bank
        self.scalers = scalers if scalers is not None else Scalers(layout, bank.kinds)
        names = family.free_names(ref_spec, head=True)
        if free is None or any(n not in free for n in names):
            # the reference model's own init for everything not given: all free tensors of a new aux model,
            # or just the head of one loaded from a bank (banks never carry a head)
            base = dict(family.build(ref_spec, init_mode).named_parameters())
            free = {**base, **(free or {})}
            missing = [n for n in family.free_names(ref_spec) if n not in free]
            if missing:
                raise ValueError(f"free tensors missing for the reference size: {missing[:4]}")
        self.free = nn.ParameterDict({_key(n): nn.Parameter(free[n].detach().clone()) for n in names})
        self.block = template_block(bank.kinds)
        self._shells: dict[Any, nn.Module] = {}

    def free_tensors(self) -> dict[str, torch.Tensor]:
        return {k.replace("__", "."): v for k, v in self.free.items()}

    def parts_for(self, spec: Any, head: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """``(scaler grids, free tensors)`` of size ``spec``, in the graph of the reference parameters."""
        return resize_parts(self.family, self.ref_spec, spec, dict(self.scalers.grids.items()), self.free_tensors(),
                            self.block, self.rules, head=head)

    def state_for(self, spec: Any, head: bool = True) -> dict[str, torch.Tensor]:
        """The full parameter dict of an ordinary model of size ``spec`` (differentiable)."""
        grids, free = self.parts_for(spec, head)
        return {**free, **materialize_grids(self.bank, grids, self.family.layout(spec))}

    def _shell(self, spec: Any, device: torch.device) -> nn.Module:
        """A parameter-less module of size ``spec`` to run with ``functional_call`` (built once per size)."""
        key = (spec, str(device))
        if key not in self._shells:
            with torch.device("meta"):
                shell = self.family.build(spec)
            self._shells[key] = shell.to_empty(device=device).eval()
        return self._shells[key]

    def forward(self, *inputs: torch.Tensor, spec: Any = None) -> torch.Tensor:
        """The model of size ``spec`` (default: the reference) on ``inputs`` (a task's prepared inputs: an
        image, or a denoiser's noised image, time and class)."""
        spec = self.ref_spec if spec is None else spec
        shell = self._shell(spec, inputs[0].device)
        shell.train(self.training)
        return functional_call(shell, self.state_for(spec), inputs, strict=False)


class Sandwich(nn.Module):
    """Train an :class:`ElasticModel` over ``sizes``: largest + smallest + ``n_random`` drawn per step."""

    def __init__(self, elastic: ElasticModel, sizes: list[Any], n_random: int = 1, seed: int = 0,
                 size_of: Any = None) -> None:
        super().__init__()
        if not sizes:
            raise ValueError("a size range needs at least one size")
        self.elastic = elastic
        measure = size_of or (lambda s: s.num_params())
        self.sizes = sorted(set(sizes), key=measure)
        self.n_random = n_random
        self._rng = random.Random(seed)

    def reseed(self, seed: int) -> None:
        """Restart the size draws (a resumed epoch must draw the sizes the lost one drew)."""
        self._rng.seed(seed)

    def draw(self) -> list[Any]:
        ends = [self.sizes[-1]] + ([self.sizes[0]] if len(self.sizes) > 1 else [])
        middle = self.sizes[1:-1]
        return ends + self._rng.sample(middle, min(self.n_random, len(middle)))

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self.elastic(*inputs)
        return torch.cat([self.elastic(*inputs, spec=s) for s in self.draw()])


class AtSize(nn.Module):
    """One size of an :class:`ElasticModel` as an ordinary module (evaluation, distillation targets)."""

    def __init__(self, elastic: ElasticModel, spec: Any) -> None:
        super().__init__()
        self.elastic, self.spec = elastic, spec

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.elastic(*inputs, spec=self.spec)
