"""How one size's scalers and free tensors become another size's: a linear map per axis.

Every axis that changes with size (layers; blocks of residual, attention or hidden channels) gets one
``(dst, src)`` matrix, and every tensor on that axis goes through the same matrix: a scaler grid's rows or
columns block by block, a free tensor (norm gain, bias, position table, class token) channel by channel as
``kron(map, I_block)``. So the residual channel ``c`` of a target is made the same way in its LayerNorms,
in the columns of every matrix that reads the stream and in the rows of every matrix that writes it.

Rules for an axis of ``src`` -> ``dst`` entries (a setting, recorded with the bank):

* ``nested`` (default): a smaller size keeps the first ``dst`` entries. Stage 1 trains every size of a
  range this way (the slimmable / once-for-all convention), so each smaller size is an exact sub-model.
* ``spread``: a smaller size keeps ``round(linspace(0, src-1, dst))`` (first and last kept).
* ``interp``: linear interpolation in index, ends aligned (the first design's rule).

Growing past the reference (``dst > src``) is defined by interpolation under every rule; such sizes were
never trained in stage 1 and are extrapolated. Whenever a map mixes entries, scaler grids keep the mean and
standard deviation of the source layers they came from (mixing would shrink them); selections are exact.
Everything here is differentiable, so stage 1 trains through exactly the rule stage 2 starts from.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

RULES = ("nested", "spread", "interp")
RESIZE_DEFAULTS = {"width_rule": "nested", "depth_rule": "nested"}
"""The rule a bank uses when its header names none."""

Axis = tuple[int, str, int]
"""``(dim, role, sections)``: tensor dimension ``dim`` holds ``sections`` consecutive runs of the ``role``
axis (``qkv`` rows are three runs of the attention channels: q, k, v)."""


def axis_map(src: int, dst: int, rule: str = "nested") -> torch.Tensor:
    """The ``(dst, src)`` float matrix of one axis."""
    if rule not in RULES:
        raise ValueError(f"unknown resize rule {rule!r}; choose one of {RULES}")
    if src < 1 or dst < 1:
        raise ValueError(f"axis sizes must be >= 1, got {src} -> {dst}")
    if dst <= src and rule == "nested":
        return torch.eye(src)[:dst]
    if dst <= src and rule == "spread":
        idx = torch.round(torch.linspace(0, src - 1, dst, dtype=torch.float64)).long()
        return torch.eye(src)[idx]
    pos = torch.linspace(0, src - 1, dst, dtype=torch.float64) if dst > 1 else torch.zeros(1, dtype=torch.float64)
    lo = pos.floor().long().clamp(max=src - 1)
    hi = (lo + 1).clamp(max=src - 1)
    w = (pos - lo).float()
    m = torch.zeros(dst, src)
    m[torch.arange(dst), lo] += 1 - w
    m[torch.arange(dst), hi] += w
    return m


def is_selection(m: torch.Tensor) -> bool:
    """True when every row copies exactly one source entry (nothing is mixed)."""
    return bool(((m == 0) | (m == 1)).all() and (m.sum(1) == 1).all())


@dataclass(frozen=True)
class SizeMaps:
    """The maps from a reference size to a target: ``depth`` over layers, ``roles`` over channel blocks of
    ``block`` channels (e.g. ``embed``, ``attn``, ``hidden``)."""

    depth: torch.Tensor
    roles: Mapping[str, torch.Tensor]
    block: int

    @property
    def mixes(self) -> bool:
        return not (is_selection(self.depth) and all(is_selection(m) for m in self.roles.values()))


def apply_axis(t: torch.Tensor, dim: int, m: torch.Tensor, sections: int = 1, unit: int = 1) -> torch.Tensor:
    """Apply ``m`` (dst x src) along ``dim`` of ``t``, whose length is ``sections * src * unit``."""
    dim = dim % t.dim()
    n = t.shape[dim]
    src = m.shape[1]
    if n != sections * src * unit:
        raise ValueError(f"axis of length {n} is not {sections} x {src} blocks x {unit}")
    moved = t.movedim(dim, -1)
    lead = moved.shape[:-1]
    x = moved.reshape(*lead, sections, src, unit)
    y = torch.einsum("...sbu,db->...sdu", x, m.to(device=t.device, dtype=t.dtype))
    return y.reshape(*lead, sections * m.shape[0] * unit).movedim(-1, dim)


def _restore_stats(out: torch.Tensor, src: torch.Tensor, depth: torch.Tensor | None) -> torch.Tensor:
    """Give each target ``(layer, template)`` grid the mean/std of the source grids it came from."""
    dims = (-2, -1)
    if src.shape[-2] * src.shape[-1] < 2 or out.shape[-2] * out.shape[-1] < 2:
        return out
    s_mean, s_std = src.mean(dims, keepdim=True), src.std(dims, keepdim=True)
    if depth is not None:
        s_mean, s_std = apply_axis(s_mean, 0, depth), apply_axis(s_std, 0, depth)
    o_mean, o_std = out.mean(dims, keepdim=True), out.std(dims, keepdim=True)
    return (out - o_mean) / o_std.clamp_min(1e-12) * s_std + s_mean


def resize_grid(grid: torch.Tensor, axes: tuple[Axis, ...], maps: SizeMaps, per_block: bool,
                unit: int = 1) -> torch.Tensor:
    """A kind's ``(L, n, P, Q)`` scaler grids for the target: depth map over ``L`` (per-block kinds), role
    maps over the grid's block rows/columns (``axes`` dims are 0 = rows, 1 = columns of the weight).
    ``unit``: grid entries per channel block (templates of ``block / unit`` rows, e.g. one row per channel)."""
    out = apply_axis(grid, 0, maps.depth) if per_block else grid
    mixed = per_block and not is_selection(maps.depth)
    for dim, role, sections in axes:
        out = apply_axis(out, 2 + dim, maps.roles[role], sections, unit)
        mixed = mixed or not is_selection(maps.roles[role])
    if mixed:
        out = _restore_stats(out, grid, maps.depth if per_block else None)
    return out


def resize_tensor(t: torch.Tensor, axes: tuple[Axis, ...], maps: SizeMaps) -> torch.Tensor:
    """A free tensor for the target: each role axis through ``kron(map, I_block)``."""
    for dim, role, sections in axes:
        t = apply_axis(t, dim, maps.roles[role], sections, unit=maps.block)
    return t


def resize_stack(ts: list[torch.Tensor], axes: tuple[Axis, ...], maps: SizeMaps) -> list[torch.Tensor]:
    """One per-block free tensor over all layers: depth map over the stack, then the role axes."""
    stacked = apply_axis(torch.stack(ts), 0, maps.depth)
    shifted = tuple((d + 1 if d >= 0 else d, r, s) for d, r, s in axes)
    return list(resize_tensor(stacked, shifted, maps).unbind(0))
