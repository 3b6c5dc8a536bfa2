"""One registry of initialization strategies: ``init_model(name, spec, **sources)``.

Each strategy lives in its own module of this package and registers itself with ``@register``, declaring
what it cannot run without (``needs``) and which sizes it can make (``check``); every module here is
imported on first use, so adding a strategy is adding one file. A strategy also declares the architecture
families it applies to (``families``; None: every registered family, reached through the registry alone). A
sweep reads the declarations (:func:`strategy_info`, :func:`can_make`) to refuse a missing source and to drop
the sizes a strategy cannot make before any trial starts.
"""

from __future__ import annotations

import importlib
import pkgutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from torch import nn

from weit_core.models import ViTSpec, family_of


@dataclass
class InitResult:
    """A plain model (ordinary timm state_dict) and the settings that made it, for the run record."""

    model: nn.Module
    info: dict = field(default_factory=dict)


Strategy = Callable[..., InitResult]

SOURCES = ("bank", "ancestry", "fit_data", "learngene")
"""What a strategy may need besides the target size: a template bank, an ancestry model (with its spec), a
small labeled subset for stage 2, a TLEG-trained learngene (which no sweep can pass)."""

CANNOT_MAKE: dict[str, str] = {
    "needs_ancestry": "the strategy inherits from an ancestry and none was given",
    "tokens_differ_from_ancestry": "patch, image size or channels differ from the ancestry's (its patch kernel and "
                                   "position table are copied as they are)",
    "larger_than_ancestry": "weight selection only shrinks an ancestry (target deeper, wider or with a wider MLP)",
    "heads_exceed_ancestry": "head-aware weight selection needs at most the ancestry's heads and head width",
    "smaller_than_ancestry": "net2net only grows an ancestry (target shallower, narrower, with fewer heads, a "
                             "narrower head or MLP)",
    "width_differs_from_ancestry": "TLEG expands depth only (width, heads and MLP must equal the ancestry's)",
    "family_not_supported": "the strategy does not apply to this architecture family",
    "ancestry_family_differs": "the ancestry is of another architecture family than the target",
    "stages_differ_from_ancestry": "ConvNeXt weight selection keeps the ancestry's stages, stem and kernel (their "
                                   "count or sizes differ)",
}
"""Why a strategy cannot make a size: the keys :func:`can_make` returns (and a sweep counts as
``dropped.<key>``), each with the sentence a person reads."""


@dataclass(frozen=True)
class StrategyInfo:
    """A registered strategy and what it declares: the sources it cannot run without (a subset of
    :data:`SOURCES`), ``check(spec, ancestry_spec=None)``, the reason (a key of :data:`CANNOT_MAKE`) it
    cannot make ``spec``, or None when it can (None: it can make every size), and the architecture families
    it applies to (None: every family)."""

    name: str
    fn: Strategy
    needs: frozenset[str]
    check: Callable[..., str | None] | None
    families: frozenset[str] | None = None

    def supports(self, family: str) -> bool:
        return self.families is None or family in self.families


_REGISTRY: dict[str, StrategyInfo] = {}
_loaded = False


def register(name: str, *, needs: Iterable[str] = (), check: Callable[..., str | None] | None = None,
             families: Iterable[str] | None = None) -> Callable[[Strategy], Strategy]:
    """``@register("name", needs=("ancestry",), check=fn, families=("vit",))``: add a strategy to the registry
    with what it needs, the sizes it can make and the families it applies to (plain ``@register("name")``:
    nothing needed, every size of every family)."""
    needs = frozenset(needs)
    fams = None if families is None else frozenset(families)
    unknown = sorted(needs - set(SOURCES))
    if unknown:
        raise ValueError(f"strategy {name!r}: unknown needs {unknown}; a strategy may need {', '.join(SOURCES)}")

    def deco(fn: Strategy) -> Strategy:
        old = _REGISTRY.get(name)
        if old is not None and old.fn is not fn:
            raise ValueError(f"strategy {name!r} registered twice")
        _REGISTRY[name] = StrategyInfo(name, fn, needs, check, fams)
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


def strategy_info(name: str) -> StrategyInfo:
    """What ``name`` is registered with (its function, needs and check)."""
    _load_all()
    if name not in _REGISTRY:
        raise ValueError(f"unknown init strategy {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def get_strategy(name: str) -> Strategy:
    return strategy_info(name).fn


def can_make(name: str, spec: ViTSpec, *, ancestry_spec: ViTSpec | None = None) -> str | None:
    """None when strategy ``name`` can make a model of size ``spec`` (from an ancestry of size
    ``ancestry_spec`` when it needs one); otherwise the reason, a key of :data:`CANNOT_MAKE`. Sources other
    than the ancestry (bank, fit data) are not looked at: they do not depend on the size."""
    info = strategy_info(name)
    if not info.supports(family_of(spec).name):
        return "family_not_supported"
    if "ancestry" in info.needs and ancestry_spec is None:
        return "needs_ancestry"
    if "ancestry" in info.needs and type(ancestry_spec) is not type(spec):
        return "ancestry_family_differs"
    if info.check is None:
        return None
    reason = info.check(spec, ancestry_spec=ancestry_spec)
    if reason is not None and reason not in CANNOT_MAKE:
        raise ValueError(f"strategy {name!r}: check returned {reason!r}, not a key of CANNOT_MAKE "
                         f"({', '.join(CANNOT_MAKE)})")
    return reason


def init_model(name: str, spec: ViTSpec, **sources) -> InitResult:
    """Build a target of size ``spec`` with strategy ``name``; ``sources`` are what it draws on (bank,
    aux_scalers, ancestry, fit_data, seed, ...). Records the strategy, its settings and the wall time."""
    info = strategy_info(name)
    family = family_of(spec).name
    if not info.supports(family):
        raise ValueError(f"strategy {name!r} applies to the {', '.join(sorted(info.families))} famil"
                         f"{'y' if len(info.families) == 1 else 'ies'}, not {family!r}")
    fn = info.fn
    t0 = time.perf_counter()
    result = fn(spec, **sources)
    result.info = {"strategy": name, **result.info, "init_seconds": round(time.perf_counter() - t0, 4)}
    return result


__all__ = ["CANNOT_MAKE", "SOURCES", "InitResult", "StrategyInfo", "available", "can_make", "get_strategy",
           "init_model", "register", "strategy_info"]
