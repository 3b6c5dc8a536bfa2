"""Helpers shared by the ancestry-based baselines (weight_selection, tleg_fit, net2net): the ancestry
check, reading a model's size back into its family's spec, and the documented index rules."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from weit_core.models import VIT, Family, ViTSpec

ELEMENT_SELECTIONS = ("uniform", "consecutive")
LAYER_SELECTIONS = ("first_n", "even")


def infer_vit_spec(model: nn.Module) -> ViTSpec:
    """The ViTSpec of an ordinary timm ``VisionTransformer`` (so callers may pass the ancestry alone)."""
    try:
        return VIT.spec_of_model(model)
    except ValueError as e:
        raise ValueError(f"the ancestry is {e}") from e


def require_ancestry(
    strategy: str, ancestry: nn.Module | None, ancestry_spec: ViTSpec | None, family: Family = VIT,
) -> tuple[nn.Module, ViTSpec]:
    """The ancestry and its spec (read from the model by ``family`` when not given), or a ValueError naming
    the strategy that needs ``--ancestry``."""
    if ancestry is None:
        raise ValueError(f"strategy {strategy!r} needs an ancestry model; pass --ancestry <model.safetensors> "
                         "(train one with `weit ancestry`)")
    if ancestry_spec is not None and not isinstance(ancestry_spec, family.spec_type):
        raise ValueError(f"strategy {strategy!r}: the ancestry is a {type(ancestry_spec).__name__}, the target a "
                         f"{family.name!r} model; pass an ancestry of the target's family")
    spec = ancestry_spec or (infer_vit_spec(ancestry) if family is VIT else family.spec_of_model(ancestry))
    have = {k: tuple(v.shape) for k, v in ancestry.state_dict().items()}
    with torch.device("meta"):  # shapes only: no memory, no draw from the global RNG
        want = {k: tuple(v.shape) for k, v in family.build(spec).state_dict().items()}
    if have != want:
        raise ValueError(f"strategy {strategy!r}: the ancestry's weights do not match ancestry_spec {spec}; "
                         "pass the spec the ancestry was built with")
    return ancestry, spec


def token_mismatch(src: ViTSpec, dst: ViTSpec) -> str | None:
    """The first of patch size, image size, channels on which ancestry and target differ (None: they agree)."""
    return next((key for key in ("patch", "img_size", "in_chans") if getattr(src, key) != getattr(dst, key)), None)


def ancestry_check(size_reason: Callable[[ViTSpec, ViTSpec], str | None]) -> Callable[..., str | None]:
    """A registered ``check(spec, ancestry_spec=None)`` for a strategy that inherits from an ancestry: the
    strategies' own order of tests on specs alone, tokens first (:func:`check_same_tokens`), then
    ``size_reason(ancestry_spec, spec)``, the strategy's size test. No ancestry: None (``can_make`` answers
    that from the strategy's ``needs``)."""

    def check(spec: ViTSpec, ancestry_spec: ViTSpec | None = None) -> str | None:
        if ancestry_spec is None:
            return None
        if token_mismatch(ancestry_spec, spec):
            return "tokens_differ_from_ancestry"
        return size_reason(ancestry_spec, spec)

    return check


def check_same_tokens(strategy: str, src: ViTSpec, dst: ViTSpec) -> None:
    """Patch size, image size and channels must agree: the patch kernel and position table are copied as
    they are (their positions have a meaning; subsampling them would not be selection but resizing)."""
    key = token_mismatch(src, dst)
    if key is not None:
        raise ValueError(f"strategy {strategy!r}: ancestry {key}={getattr(src, key)} but target "
                         f"{key}={getattr(dst, key)}; use a target with the ancestry's {key}")


def select_indices(n: int, m: int, mode: str) -> torch.Tensor:
    """Which ``m`` of ``n`` indices to keep (int64, increasing).

    ``uniform`` is the reference code's rule: ``i * (n // m)`` when ``m`` divides ``n``, otherwise
    ``round(linspace(0, n - 1, m))`` (float64, round half to even) — every dimension spread evenly, the first
    and, for non-integer ratios, the last index kept. ``consecutive`` keeps ``0 .. m-1``.
    """
    if m > n:
        raise ValueError(f"cannot select {m} of {n}: the ancestry must be at least as large as the target")
    if mode == "consecutive":
        return torch.arange(m)
    if mode == "uniform":
        if n % m == 0:
            return torch.arange(m) * (n // m)
        return torch.round(torch.linspace(0, n - 1, m, dtype=torch.float64)).long()
    raise ValueError(f"unknown selection {mode!r}; choose one of {ELEMENT_SELECTIONS}")


def layer_indices(n: int, m: int, mode: str) -> torch.Tensor:
    """Which ancestry blocks feed the ``m`` target blocks: ``first_n`` = ``0 .. m-1`` (the paper's default),
    ``even`` = evenly spaced by the ``uniform`` rule of :func:`select_indices`."""
    if mode == "first_n":
        return select_indices(n, m, "consecutive")
    if mode == "even":
        return select_indices(n, m, "uniform")
    raise ValueError(f"unknown layer_selection {mode!r}; choose one of {LAYER_SELECTIONS}")


def as_text(idx: torch.Tensor) -> str:
    """An index list as a short string, for MLflow params."""
    return ",".join(str(int(i)) for i in idx)
