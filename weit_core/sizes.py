"""What stage 1 trains: the reference size that holds a bank's parameters and the range of sizes around it
that the sandwich rule trains, for any family. ``weit distill`` (from flags or a space) and
``benchmarks/make_banks.py`` plan their ranges here."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from weit_core.models.family import Family


@dataclass
class SizeRange:
    """The reference (aux) size and the sizes the sandwich rule trains (empty: the reference alone)."""

    ref: Any
    sizes: list[Any]
    """Smallest (fewest parameters) first."""
    source: str = "reference"
    dropped: dict = field(default_factory=dict)
    """Sizes of a space that cannot be trained, counted by drop reason."""

    @property
    def sandwich(self) -> bool:
        return bool(self.sizes) and self.sizes != [self.ref]

    @property
    def watch(self) -> list[Any]:
        """The sizes evaluated every epoch: smallest, reference, largest (the reference alone without a range)."""
        if not self.sandwich:
            return [self.ref]
        picked: dict[str, Any] = {}
        for s in (self.sizes[0], self.ref, self.sizes[-1]):  # one per label, the reference's own if shared
            if s.label not in picked or s == self.ref:
                picked[s.label] = s
        return list(picked.values())

    def draws_per_step(self, n_random: int) -> int:
        """Sizes each training step runs (``Sandwich.draw``): the largest, the smallest, ``n_random`` more."""
        if not self.sandwich:
            return 1
        return min(len(self.sizes), 2 + max(0, n_random))


def grid(depths: list[int], widths: list[int], *, head_dim: int, mlp_ratio: float = 4.0,
         heads: int | None = None) -> list[dict]:
    """Every depth x width, with ``heads`` = width / ``head_dim`` (or the same ``heads`` for every size)."""
    return [{"depth": d, "width": w, "heads": heads or max(1, w // max(head_dim, 1)), "mlp_ratio": mlp_ratio}
            for d in depths for w in widths]


def common_head_dim(points: list[dict]) -> int:
    """The head dim of most sizes at the largest width (ties: the larger, i.e. fewer heads)."""
    widest = max(p["width"] for p in points)
    dims = [p["width"] // p["heads"] for p in points if p["width"] == widest]
    return max(set(dims), key=lambda d: (dims.count(d), d))


def largest(points: list[dict], head_dim: int) -> dict:
    """The default reference of a range: its largest depth, width and MLP ratio, heads = width / head dim,
    so that every size of the range is a sub-model of it."""
    width = max(p["width"] for p in points)
    return {"depth": max(p["depth"] for p in points), "width": width, "heads": width // head_dim,
            "mlp_ratio": max(p["mlp_ratio"] for p in points)}


def size_range(family: Family, ref: Any, points: list[dict], *, block: int, width_rule: str = "nested",
               depth_rule: str = "nested", source: str = "sizes", dropped: dict | None = None) -> SizeRange:
    """The range of ``points`` (size dicts over the family's axes) around the reference spec ``ref``: each
    size is ``ref`` with the point's axes, checked to be reachable from ``ref`` by the resize rules."""
    sizes: list[Any] = []
    for p in points:
        try:
            spec = replace(ref, **p)
            family.size_maps(ref, spec, block, width_rule, depth_rule)
        except ValueError as e:
            raise ValueError(f"size {family.size_name(p)} of the range: {e}") from e
        if spec not in sizes:
            sizes.append(spec)
    return SizeRange(ref, sorted(sizes, key=lambda s: s.num_params()), source, dict(dropped or {}))

