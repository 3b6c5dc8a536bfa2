"""An architecture family: the one place that knows a family's shapes.

A family builds an ordinary model from a size spec, says which sizes it can build (and why not), which
weights are templated (layout, bank kinds), and how a reference size's scalers and free tensors become
another size's (the resize rule stage 1 trains through and stage 2 starts from). Strategies, stage 1, the
spaces and the pipelines ask the family, never the model. Families live in one registry, as timm registers
models: a family module ends with ``register_family(...)``; a user's own module joins through
``$WEIT_PLUGINS`` (``weit_core.plugins``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import nn

from weit_core.templates import KindSpec, Layout


class Spec:
    """Base of a family's size spec (a frozen dataclass): ``to_dict``, and ``from_dict`` naming unknown keys."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Any:
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown {cls.__name__} key(s) {sorted(unknown)}; known: {sorted(names)}")
        return cls(**d)


@dataclass(frozen=True)
class Family:
    name: str
    spec_type: type
    """A frozen dataclass (a :class:`Spec`): ``to_dict``/``from_dict``, ``num_params()``, ``flops()``."""
    build: Callable[..., nn.Module]
    """``build(spec, init_mode="", head_seed=None)``: an ordinary model."""
    layout: Callable[[Any], Layout]
    kinds: Callable[..., dict[str, KindSpec]]
    """``kinds(spec, n, block)``: the bank kinds this family's templated weights need."""
    free_names: Callable[..., list[str]]
    """``free_names(spec, head=False)``: the non-templated parameters a bank carries."""
    size_maps: Callable[..., Any]
    """``size_maps(src, dst, block, width_rule, depth_rule)``: a :class:`SizeMaps` (or the family's own
    structure of them, e.g. one per ConvNeXt stage), handed unchanged to ``resize_grids``/``resize_free``."""
    resize_grids: Callable[[dict[str, torch.Tensor], Any], dict[str, torch.Tensor]]
    resize_free: Callable[..., dict[str, torch.Tensor]]
    """``resize_free(free, src, maps, head=False)``."""
    size_axes: tuple[str, ...] = ()
    """The keys of a size (a space's ``sizes`` block): e.g. depth, width, heads, mlp_ratio."""
    make_spec: Callable[[dict, dict], Any] | None = None
    """``make_spec(size, io)``: the spec of a size for a task's I/O (``in_chans``, ``img_size``,
    ``num_classes``, ``patch``, ...); a ValueError names what does not fit."""
    check_size: Callable[[dict, int | None], str | None] | None = None
    """``check_size(size, block)``: the first reason (a key of ``drop_reasons``) this family cannot build the
    size, or tile it with a bank of template block ``block``; None when it can."""
    drop_reasons: dict[str, str] = field(default_factory=dict)
    spec_of_model: Callable[[nn.Module], Any] | None = None
    """The spec of an ordinary model of this family (an ancestry passed without its spec)."""
    default_size: dict = field(default_factory=dict)
    """The size ``weit ancestry`` and ``weit distill`` build when none is named: the size axes plus the
    ``io`` keys ``make_spec`` also reads (a ViT's patch); its keys are what a size may set."""
    size_of: Callable[[Any], dict] | None = None
    """The size (keys of ``default_size``) of a spec, e.g. a teacher's; default: the spec's attributes."""

    @property
    def size_keys(self) -> tuple[str, ...]:
        """What a size may set: the axes, then the other keys of ``default_size``."""
        return tuple(dict.fromkeys([*self.size_axes, *self.default_size]))

    def size_from_spec(self, spec: Any) -> dict:
        if self.size_of is not None:
            return self.size_of(spec)
        return {k: getattr(spec, k) for k in self.size_keys if hasattr(spec, k)}

    def spec_for(self, size: dict, io: dict) -> Any:
        """The spec of ``size`` for a task's ``io`` (size keys override io's: a patch is both); a ValueError
        names what does not fit."""
        if unknown := sorted(set(size) - set(self.size_keys)):
            raise ValueError(f"unknown {self.name} size key(s) {unknown}; {self.name} sizes set "
                             f"{', '.join(self.size_keys)}")
        if self.make_spec is None:
            raise ValueError(f"family {self.name!r} cannot make a spec from a size (no make_spec)")
        if isinstance(io.get("img_size"), list):
            raise ValueError(f"images are {io['img_size'][0]}x{io['img_size'][1]}; {self.name} needs square images")
        size = {**self.default_size, **size}
        try:
            return self.make_spec(size, {**io, **size})
        except KeyError as e:
            raise ValueError(f"{self.name} needs {e} in the data's io (has {sorted(io)}); is this data for "
                             f"another kind of task?") from e

    def spec_from_dict(self, d: dict) -> Any:
        return self.spec_type.from_dict(d)

    def size_name(self, spec_or_size: Any) -> str:
        """``2x64x2``-style: the size axes' values joined (floats without trailing zeros)."""
        get = spec_or_size.get if isinstance(spec_or_size, dict) else lambda k: getattr(spec_or_size, k)
        return "x".join(f"{get(k):g}" for k in self.size_axes)


_FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    old = _FAMILIES.get(family.name)
    if old is not None and old is not family:
        raise ValueError(f"architecture family {family.name!r} registered twice")
    _FAMILIES[family.name] = family
    return family


def _load() -> None:
    """Register the built-in families (importing the package) and the user's (``$WEIT_PLUGINS``)."""
    from weit_core import models  # noqa: F401
    from weit_core.plugins import load_plugins

    load_plugins()


def get_family(name: str) -> Family:
    _load()
    if name not in _FAMILIES:
        raise ValueError(f"unknown architecture family {name!r}; available: {', '.join(sorted(_FAMILIES))}")
    return _FAMILIES[name]


def family_names() -> list[str]:
    _load()
    return sorted(_FAMILIES)


def family_of(spec: Any) -> Family:
    """The registered family whose spec type ``spec`` is."""
    _load()
    for fam in _FAMILIES.values():
        if isinstance(spec, fam.spec_type):
            return fam
    raise ValueError(f"no registered architecture family builds a {type(spec).__name__}")
