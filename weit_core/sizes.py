"""Sizes of a family: the points a space's axes describe, the first reason a size is dropped (what its family
cannot build, or a space's constraints), and what stage 1 trains (the reference size that holds a bank's
parameters and the range around it that the sandwich rule trains). ``weit sweep``, ``weit distill`` and
``benchmarks/make_banks.py`` plan their sizes here."""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from weit_core.models.family import Family, get_family

CONSTRAINT_DROP_REASONS = {  # a space's own reasons to drop a size, beside what its family cannot build
    "width_not_multiple": "width is not a multiple of constraints.width_multiple",
    "head_dim_out_of_range": "width / heads outside [min_head_dim, max_head_dim]",
    "params_below_min": "fewer parameters than constraints.min_params",
    "params_above_max": "more parameters than constraints.max_params",
    "flops_above_max": "more FLOPs than constraints.max_flops",
}


def _family(family: Family | str) -> Family:
    return get_family(family) if isinstance(family, str) else family


def drop_reasons(family: Family | str = "vit") -> dict[str, str]:
    """Every reason a size can be dropped, in words (it counts under the first it fails, in :func:`check_size`)."""
    return {**_family(family).drop_reasons, **CONSTRAINT_DROP_REASONS}


def describe_drops(dropped: dict, family: Family | str = "vit") -> str:
    """``"3 heads do not divide width, 1 ..."``: drop counts in words, most first."""
    reasons = drop_reasons(family)
    return ", ".join(f"{n} {reasons.get(k, k)}" for k, n in sorted(dropped.items(), key=lambda kv: -kv[1]))


@dataclass(frozen=True)
class TaskShape:
    """An image task's ``io`` as a dataclass: kept while callers move to the ``io`` dict (``DatasetSplits.io``)
    that sizes are checked against."""

    in_chans: int
    img_size: int
    num_classes: int


def as_io(io: dict | TaskShape) -> dict:
    """The ``io`` dict of a task (a :class:`TaskShape` converted)."""
    return dataclasses.asdict(io) if isinstance(io, TaskShape) else dict(io)


@dataclass(frozen=True)
class Axis:
    """A size axis: a grid (``values``) or a sampler (``sampler`` = kind, args, step) drawn with a seed."""

    name: str
    values: tuple = ()
    sampler: tuple[str, tuple, float | None] | None = None
    kind: type = int

    @property
    def is_grid(self) -> bool:
        return self.sampler is None

    def draw(self, rng: np.random.Generator) -> int | float:
        kind, args, step = self.sampler
        if kind == "choice":
            return args[int(rng.integers(len(args)))]
        low, high = args
        if kind == "randint":
            step = int(step or 1)
            return int(low + step * rng.integers((high - low) // step + 1))
        v = float(rng.uniform(low, high))
        return round(round(v / step) * step, 10) if step else v


def points(axes: dict[str, Axis], samples: int | None, seed: int) -> list[dict]:
    """Every combination of the axes: the grid product, or ``samples`` seeded draws of the sampler axes crossed
    with the grid axes; duplicates removed, order kept."""
    grid_axes = [a for a in axes if axes[a].is_grid]
    combos = [dict(zip(grid_axes, c, strict=True)) for c in itertools.product(*(axes[a].values for a in grid_axes))]
    rng = np.random.default_rng(seed)
    draws = [{a: axes[a].draw(rng) for a in axes if not axes[a].is_grid} for _ in range(samples or 0)]
    typed = ({a: axes[a].kind(p[a]) for a in axes} for p in ([{**g, **d} for d in draws for g in combos] or combos))
    return list({tuple(p.values()): p for p in typed}.values())


def check_size(size: dict, io: dict | TaskShape, patch: int | None, cons: Any, block: int | None,
               family: Family | str = "vit") -> str | None:
    """The first reason ``size`` is dropped (a key of :func:`drop_reasons`; None: it is kept) for a task's
    ``io``: what the family cannot build, the width multiple, what the bank's blocks cannot tile, the head
    width, then the budgets (``cons`` has a space's constraints as attributes; ``patch`` None: io's own)."""
    fam, io = _family(family), {**as_io(io), **({} if patch is None else {"patch": patch})}
    can_build = fam.check_size or (lambda size, block: None)
    if reason := can_build({**io, **size}, None):  # a family may test the size against the task's I/O
        return reason
    if isinstance(cons.width_multiple, int) and "width" in size and size["width"] % cons.width_multiple:
        return "width_not_multiple"
    if block and (reason := can_build(size, block)):
        return reason
    if (cons.min_head_dim or cons.max_head_dim) and "heads" in size:
        hd = size["width"] // size["heads"]
        if (cons.min_head_dim and hd < cons.min_head_dim) or (cons.max_head_dim and hd > cons.max_head_dim):
            return "head_dim_out_of_range"
    spec = fam.make_spec(size, io)
    n = spec.num_params()
    if cons.min_params and n < cons.min_params:
        return "params_below_min"
    if cons.max_params and n > cons.max_params:
        return "params_above_max"
    return "flops_above_max" if cons.max_flops and spec.flops() > cons.max_flops else None


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
               depth_rule: str = "nested", source: str = "sizes", dropped: dict | None = None,
               make: Any = None) -> SizeRange:
    """The range of ``points`` (size dicts over the family's axes) around the reference spec ``ref``: each
    size is ``make(point)`` (default: ``ref`` with the point's axes, where they are spec fields), checked to be
    reachable from ``ref`` by the resize rules."""
    sizes: list[Any] = []
    for p in points:
        try:
            spec = make(p) if make is not None else replace(ref, **p)
            family.size_maps(ref, spec, block, width_rule, depth_rule)
        except ValueError as e:
            raise ValueError(f"size {family.size_name(p)} of the range: {e}") from e
        if spec not in sizes:
            sizes.append(spec)
    return SizeRange(ref, sorted(sizes, key=lambda s: s.num_params()), source, dict(dropped or {}))


def parse_size(text: str | None, family: Family | str) -> dict:
    """``"depth=2,width=64"`` -> ``{"depth": 2, "width": 64}`` (numbers typed); keys the family's own."""
    fam, size = _family(family), {}
    for item in filter(None, (text or "").replace(" ", "").split(",")):
        key, eq, value = item.partition("=")
        if not eq or not value:
            raise ValueError(f"--size {text!r}: expected key=value pairs separated by commas, e.g. depth=2,width=64")
        if key not in fam.size_keys:
            raise ValueError(f"--size key {key!r} is not a {fam.name} size key; {fam.name} sizes set "
                             f"{', '.join(fam.size_keys)}")
        try:
            size[key] = int(value) if value.lstrip("-").isdigit() else float(value)
        except ValueError as e:
            raise ValueError(f"--size {key}={value}: expected a number") from e
    return size


def keep_sizes(points: list[dict], io: dict | TaskShape, patch: int | None, cons: Any, block: int | None,
               family: Family | str = "vit") -> tuple[list[dict], dict[str, int]]:
    """The points :func:`check_size` keeps, and how many it drops by reason (in the order first met)."""
    reasons = []
    for p in points:
        try:
            reasons.append(check_size(p, io, patch, cons, block, family))
        except ValueError as e:
            raise ValueError(f"size {p}: {e}") from e
    dropped: dict[str, int] = {}
    for r in filter(None, reasons):
        dropped[r] = dropped.get(r, 0) + 1
    return [p for p, r in zip(points, reasons, strict=True) if not r], dropped


def check_range(*, depths: list[int] | None, widths: list[int] | None, heads: int | None, head_dim: int | None,
                block: int, n_random: int = 1, width_rule: str = "nested", depth_rule: str = "nested") -> None:
    """What is wrong with a stage-1 range's settings (a ValueError naming the setting), before anything runs."""
    from weit_core.resize import RULES

    if width_rule not in RULES or depth_rule not in RULES:
        raise ValueError(f"width rule {width_rule} / depth rule {depth_rule}: choose from {', '.join(RULES)}")
    if n_random < 0:
        raise ValueError(f"n_random must be >= 0, got {n_random}")
    if heads is not None and head_dim is not None:
        raise ValueError("give heads (the same heads for every size) or head_dim (heads = width / head dim), not both")
    if head_dim is not None and head_dim < 1:
        raise ValueError(f"head_dim must be >= 1, got {head_dim}")
    for name, values in (("depths", depths), ("widths", widths)):
        if values is not None and (not values or min(values) < 1):
            raise ValueError(f"{name} {values}: give at least one, each >= 1")
    for w in widths or []:
        if w % block:
            raise ValueError(f"width {w} of the widths is not a multiple of the template block {block}; use multiples "
                             f"of the block {block}")
        if heads is not None and w % heads:
            raise ValueError(f"heads {heads} does not divide width {w} of the widths; give head_dim instead (heads = "
                             f"width / head dim) or widths that {heads} divides")
        if head_dim is not None and w % head_dim:
            raise ValueError(f"head_dim {head_dim} does not divide width {w} of the widths; pick a head dim that "
                             "divides every width")


def plan_range(make_ref: Any, base: dict, given: dict, *, depths: list[int] | None = None,
               widths: list[int] | None = None, head_dim: int | None = None, points: list[dict] | None = None,
               block: int, width_rule: str = "nested", depth_rule: str = "nested", source: str = "sizes",
               dropped: dict | None = None, family: Family | str = "vit") -> SizeRange:
    """A stage-1 plan: the reference (``make_ref(size)``, ``base`` the default size, ``given`` the keys set
    explicitly) and the range around it: depths x widths (a ViT's heads = width / ``head_dim``, else the
    default's head dim; or the given heads), or ``points`` (a space's kept sizes). The reference defaults to
    the range's largest size, so every size is a sub-model of it; explicit keys still set it. No range: the
    reference alone."""
    fam = _family(family)
    if depths is None and widths is None and points is None:
        return SizeRange(make_ref({**base, **given}), [])
    heads = "heads" in fam.size_axes
    if not heads and head_dim is not None:
        raise ValueError(f"{fam.name} sizes have no heads; drop --head-dim")
    if points is not None:
        head_dim = common_head_dim(points) if heads else None
    else:
        widths = widths or [given.get("width", base["width"])]
        depths = depths or [given.get("depth", base["depth"])]
        if heads:
            head_dim = head_dim or base["width"] // base["heads"]
            for w in widths:
                if "heads" not in given and w % head_dim:
                    raise ValueError(f"width {w} is not a multiple of the head dim {head_dim} (the teacher's, else "
                                     "the default's); give head_dim or heads")
            points = grid(depths, widths, head_dim=head_dim, mlp_ratio=given.get("mlp_ratio", base["mlp_ratio"]),
                          heads=given.get("heads"))
        else:
            points = [{"depth": d, "width": w} for d in depths for w in widths]
    width = given.get("width", max(p["width"] for p in points))
    if heads:
        if "heads" not in given and width % head_dim:
            raise ValueError(f"the reference width {width} is not a multiple of the head dim {head_dim}; give heads")
        ref = {**base, **largest(points, head_dim), **given, "width": width}
        ref["heads"] = given.get("heads", width // head_dim)
    else:
        ref = {**base, "depth": max(p["depth"] for p in points), **given, "width": width}
    return size_range(fam, make_ref(ref), points, block=block, width_rule=width_rule, depth_rule=depth_rule,
                      source=source, dropped=dropped, make=None if heads else lambda p: make_ref({**ref, **p}))
