"""One registry of initialization strategies: ``init_model(name, spec, **sources)``.

Each strategy lives in its own module of this package and registers itself with ``@register``; every
module here is imported on first use, so adding a strategy is adding one file.
"""

from __future__ import annotations

import importlib
import pkgutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from weit_core.models import ViTSpec


@dataclass
class InitResult:
    """A plain model (ordinary timm state_dict) and the settings that made it, for the run record."""

    model: nn.Module
    info: dict = field(default_factory=dict)


Strategy = Callable[..., InitResult]
_REGISTRY: dict[str, Strategy] = {}
_loaded = False


def register(name: str) -> Callable[[Strategy], Strategy]:
    def deco(fn: Strategy) -> Strategy:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"strategy {name!r} registered twice")
        _REGISTRY[name] = fn
        return fn

    return deco


def _load_all() -> None:
    global _loaded
    if not _loaded:
        for mod in pkgutil.iter_modules(__path__):
            importlib.import_module(f"{__name__}.{mod.name}")
        _loaded = True


def available() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def get_strategy(name: str) -> Strategy:
    _load_all()
    if name not in _REGISTRY:
        raise ValueError(f"unknown init strategy {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def init_model(name: str, spec: ViTSpec, **sources) -> InitResult:
    """Build a target of size ``spec`` with strategy ``name``; ``sources`` are what it draws on (bank,
    aux_scalers, ancestry, fit_data, seed, ...). Records the strategy, its settings and the wall time."""
    fn = get_strategy(name)
    t0 = time.perf_counter()
    result = fn(spec, **sources)
    result.info = {"strategy": name, **result.info, "init_seconds": round(time.perf_counter() - t0, 4)}
    return result


__all__ = ["InitResult", "available", "get_strategy", "init_model", "register"]
