"""Weight templates and weight scalers (WAVE / WeiT).

A layer of kind ``k`` whose weight is ``m x n (x kh x kw)`` is a grid of template blocks::

    W_l = sum_t kron(S[l, t], T[t])      W_l[p*a + i, q*b + j] = sum_t S[l, t, p, q] * T[t, i, j]

``T`` (the bank) is shared by every size; ``S`` (the scalers) is per layer and tiny. Every layer of a kind
is produced by one ``einsum`` + ``reshape``; there is no Python loop over blocks or layers.
Kernel dimensions (convolutions, the ViT patch projection) ride along: templates ``a x b x kh x kw``
over the channel grid, scalers still ``(m/a) x (n/b)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

KRON_ORDERS = ("scaler_major", "template_major")
"""``scaler_major`` = kron(S, T) (default: each block of the grid is one template mix);
``template_major`` = kron(T, S) (the papers' ``T (x) S``): same span, rows/columns permuted."""


@dataclass(frozen=True)
class KindSpec:
    """How one kind of weight is templated: ``n`` templates of shape ``a x b (x kernel)``."""

    n: int
    a: int
    b: int
    kernel: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.n < 1 or self.a < 1 or self.b < 1:
            raise ValueError(f"template kind needs n, a, b >= 1, got n={self.n}, a={self.a}, b={self.b}")
        object.__setattr__(self, "kernel", tuple(int(k) for k in self.kernel))

    @property
    def template_shape(self) -> tuple[int, ...]:
        return (self.n, self.a, self.b, *self.kernel)

    def to_dict(self) -> dict:
        return {"n": self.n, "a": self.a, "b": self.b, "kernel": list(self.kernel)}

    @classmethod
    def from_dict(cls, d: Mapping) -> KindSpec:
        return cls(int(d["n"]), int(d["a"]), int(d["b"]), tuple(d.get("kernel", ())))


@dataclass(frozen=True)
class LayerGroup:
    """All target layers of one kind: their parameter names (in depth order) and weight shape."""

    names: tuple[str, ...]
    shape: tuple[int, ...]  # (m, n, *kernel): PyTorch out x in (x kernel)

    @property
    def depth(self) -> int:
        return len(self.names)


Layout = dict[str, LayerGroup]
"""key -> LayerGroup: which weights of a model are templated, derived from its size spec. A key is a bank
kind (``qkv``) or ``kind@group`` (``fc1@1``: stage 1's fc1 layers), for layers of one kind whose shapes differ
(every stage width of a CNN): each group has its own scaler grids, all draw on the one kind's templates."""


def bank_kind(key: str) -> str:
    """The bank kind a layout key draws its templates from: ``fc1@1`` -> ``fc1``, ``qkv`` -> ``qkv``."""
    return key.partition("@")[0]


def template_block(kinds: Mapping[str, KindSpec]) -> int:
    """The channel block a bank tiles widths with: its largest template side."""
    return max(max(s.a, s.b) for s in kinds.values())


def grid_shape(kind: str, group: LayerGroup, spec: KindSpec) -> tuple[int, int]:
    """Scaler grid ``(m/a, n/b)`` for a layer group; a clear error when the blocks do not tile it."""
    m, n, *kernel = group.shape
    layer = group.names[0] if group.names else "<none>"
    if tuple(kernel) != spec.kernel:
        raise ValueError(
            f"kind {kind!r}: layer {layer} has kernel {tuple(kernel)} but the bank's templates have kernel "
            f"{spec.kernel}; build the bank for this patch/kernel size"
        )
    if m % spec.a or n % spec.b:
        raise ValueError(
            f"kind {kind!r}: layer {layer} weight is {m}x{n} (out x in), not a multiple of the template block "
            f"{spec.a}x{spec.b}; choose sizes that are multiples of the block (width % {spec.a} == 0) or a "
            f"bank with a smaller block"
        )
    return m // spec.a, n // spec.b


def _check_kinds(kinds: Mapping[str, KindSpec], layout: Layout, what: str) -> None:
    missing = sorted({bank_kind(k) for k in layout} - set(kinds))
    if missing:
        raise ValueError(
            f"{what} has no templates for kind(s) {missing} needed by the target (it has {sorted(kinds)}); "
            f"use a bank built for this architecture"
        )


class TemplateBank(nn.Module):
    """The shared, size-agnostic templates: one ``(n, a, b, *kernel)`` parameter per kind."""

    def __init__(self, kinds: Mapping[str, KindSpec], order: str = "scaler_major") -> None:
        super().__init__()
        if order not in KRON_ORDERS:
            raise ValueError(f"unknown Kronecker order {order!r}; choose one of {KRON_ORDERS}")
        self.kinds = dict(kinds)
        self.order = order
        self.templates = nn.ParameterDict(
            {k: nn.Parameter(torch.empty(s.template_shape)) for k, s in self.kinds.items()}
        )
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Unit-variance orthogonal-ish templates: scale lives in the scalers, shape in the templates."""
        with torch.no_grad():
            for t in self.templates.values():
                t.normal_(0.0, 1.0, generator=generator)

    def config(self) -> dict:
        return {"order": self.order, "kinds": {k: s.to_dict() for k, s in self.kinds.items()}}

    def num_numbers(self) -> int:
        return sum(t.numel() for t in self.templates.values())


class Scalers(nn.Module):
    """Per-layer, per-template scaler grids for one target size: ``(depth, n, m/a, n/b)`` per kind."""

    def __init__(self, layout: Layout, kinds: Mapping[str, KindSpec]) -> None:
        super().__init__()
        _check_kinds(kinds, layout, "the bank")
        self.layout = dict(layout)
        self.kinds = {k: kinds[bank_kind(k)] for k in layout}
        self.grids = nn.ParameterDict()
        for kind, group in self.layout.items():
            p, q = grid_shape(kind, group, self.kinds[kind])
            self.grids[kind] = nn.Parameter(torch.empty(group.depth, self.kinds[kind].n, p, q))
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Variance-preserving start: with unit templates, ``Var(W) = n_templates * Var(S)`` is set to
        ``1/fan_in`` (fan_in = in features x kernel), i.e. LeCun-normal weights."""
        with torch.no_grad():
            for kind, g in self.grids.items():
                group, spec = self.layout[kind], self.kinds[kind]
                fan_in = group.shape[1] * math.prod(spec.kernel)
                g.normal_(0.0, 1.0 / math.sqrt(fan_in * spec.n), generator=generator)

    def num_numbers(self) -> int:
        return sum(g.numel() for g in self.grids.values())


def materialize_kind(template: torch.Tensor, grid: torch.Tensor, order: str = "scaler_major") -> torch.Tensor:
    """All layers of one kind at once: ``(L, n, P, Q)`` scalers x ``(n, a, b, *k)`` templates
    -> ``(L, P*a, Q*b, *k)`` weights.

    ``scaler_major`` is one broadcast matmul that writes straight into the weight's memory layout
    ``(L, P, a, Q, b*k)``: ``out[l,p,i,q,:] = sum_t S[l,t,p,q] T[t,i,:]``, so the final reshape is free
    (an einsum + permute costs an extra full copy of the weights: ~3x slower on CPU).
    """
    L, n, P, Q = grid.shape
    _, a, b, *k = template.shape
    if order == "scaler_major":
        s = grid.permute(0, 2, 3, 1).unsqueeze(2)  # L, P, 1, Q, n
        t = template.reshape(n, a, -1).transpose(0, 1)  # a, n, b*k
        return torch.matmul(s, t).reshape(L, P * a, Q * b, *k)
    return torch.einsum("ltpq,tij...->lipjq...", grid, template).reshape(L, a * P, b * Q, *k)


def materialize(bank: TemplateBank, scalers: Scalers) -> dict[str, torch.Tensor]:
    """Every templated weight of a target, ``{parameter name: tensor}``; differentiable in both inputs."""
    for kind in scalers.layout:
        have = bank.kinds.get(bank_kind(kind))
        if have is not None and have != scalers.kinds[kind]:
            raise ValueError(
                f"kind {kind!r}: the scalers were built for templates {scalers.kinds[kind]} but the bank has "
                f"{have}; rebuild the scalers from this bank"
            )
    return materialize_grids(bank, dict(scalers.grids.items()), scalers.layout)


def materialize_grids(bank: TemplateBank, grids: Mapping[str, torch.Tensor], layout: Layout) -> dict[str, torch.Tensor]:
    """:func:`materialize` from plain ``(L, n, P, Q)`` grids (e.g. resized for another size, still in the
    autograd graph of the reference scalers they came from)."""
    _check_kinds(bank.kinds, layout, "the bank")
    out: dict[str, torch.Tensor] = {}
    for kind, group in layout.items():
        g, spec = grids[kind], bank.kinds[bank_kind(kind)]
        want = (group.depth, spec.n, *grid_shape(kind, group, spec))
        if tuple(g.shape) != want:
            raise ValueError(f"kind {kind!r}: scaler grids are {tuple(g.shape)}, the layout needs {want}")
        w = materialize_kind(bank.templates[bank_kind(kind)], g, bank.order)
        out.update(zip(group.names, w.unbind(0), strict=True))
    return out


def _resample_depth(grid: torch.Tensor, depth: int) -> torch.Tensor:
    """Linear interpolation in layer index: target layer l sits at l*(L_s-1)/(L_t-1) in the source."""
    src = grid.shape[0]
    if src == depth:
        return grid.clone()
    if src == 1 or depth == 1:
        pos = torch.zeros(depth) if src == 1 else torch.tensor([(src - 1) / 2])
    else:
        pos = torch.linspace(0, src - 1, depth)
    lo = pos.floor().long().clamp(max=src - 1)
    hi = (lo + 1).clamp(max=src - 1)
    w = (pos - lo).to(grid.dtype).view(-1, *([1] * (grid.dim() - 1)))
    return grid[lo] * (1 - w) + grid[hi] * w


def _resample_width(z: torch.Tensor, p: int, q: int) -> torch.Tensor:
    """Bilinear resampling of each ``(P, Q)`` grid to ``(p, q)`` (corners kept)."""
    L, n, P, Q = z.shape
    if (P, Q) == (p, q):
        return z.clone()
    out = F.interpolate(z.reshape(L * n, 1, P, Q), size=(p, q), mode="bilinear", align_corners=True)
    return out.reshape(L, n, p, q)


def _standardize(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split each (layer, template) grid into its mean, std and unit-variance pattern."""
    if g.shape[2] * g.shape[3] < 2:
        return torch.zeros_like(g), g.mean((2, 3), keepdim=True), torch.ones_like(g[..., :1, :1])
    mean, std = g.mean((2, 3), keepdim=True), g.std((2, 3), keepdim=True).clamp_min(1e-12)
    return (g - mean) / std, mean, std


def resample_scalers(aux: Scalers, target_layout: Layout) -> Scalers:
    """Scalers for a new size from the auxiliary model's.

    Each (layer, template) grid is split into mean, std and a unit-variance pattern. Depth: all three are
    linearly interpolated in layer index (target layer ``l`` sits at ``l (L_s-1)/(L_t-1)``). Width: the
    pattern is resampled bilinearly to the new ``(m/a, n/b)`` and re-standardized, so interpolation (which
    smooths) and depth mixing (which averages) never shrink the weights: every target grid keeps the
    mean and variance of the source layers it came from.
    """
    target = Scalers(target_layout, {bank_kind(k): s for k, s in aux.kinds.items()})
    with torch.no_grad():
        for kind, g in target.grids.items():
            z, mean, std = _standardize(aux.grids[kind].detach())
            depth, p, q = g.shape[0], g.shape[2], g.shape[3]
            z, mean, std = (_resample_depth(t, depth) for t in (z, mean, std))
            z = _resample_width(z, p, q)
            if p * q > 1 and z.shape[2] * z.shape[3] > 1 and z.abs().sum() > 0:
                z, _, _ = _standardize(z)
            g.copy_(z * std + mean)
    return target
