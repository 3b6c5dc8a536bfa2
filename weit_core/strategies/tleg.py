"""``tleg`` and ``tleg_fit``: the linear-expansion rule of TLEG (Xia et al., "Transformer as Linear Expansion
of Learngene", AAAI 2024).

Every block parameter of a depth-L descendant is ``θ_l = θ_A + c_l θ_B``. The official code
(``TLEG_vit.py``/``modules_with_LE.py``: ``_ilayer = layer_id / num_layers``, ``layer_id`` from 0) uses
``c_l = l / L`` for ``l = 0 .. L-1`` — i.e. ``(l-1)/L`` for 1-based ``l``; ``position="official"`` is that rule,
``position="one_based"`` is ``l/L`` for ``l = 1 .. L``. Expanded per block: both norms, qkv, proj, fc1, fc2,
weights and biases. Patch embedding, class token, position table and final norm are shared (copied as
they are), the classifier head is new.

``tleg`` expands a TLEG-trained learngene (``learngene=`` a dict of ``<block param>.A`` / ``.B`` tensors plus
the shared tensors); weit has no TLEG stage-1 trainer, so ``tleg_fit`` (ours, not the paper's) fits
``θ_A, θ_B`` to a plain ancestry's layers by least squares over ``(c_l, θ_l)`` per element — exact when the
ancestry obeys the rule — and then expands. TLEG varies depth only, so the ancestry width, heads, MLP width
and tokens must equal the target's.
"""

from __future__ import annotations

import torch
from torch import nn

from weit_core.models import ViTSpec, create_vit
from weit_core.strategies import InitResult, register
from weit_core.strategies._common import ancestry_check, check_same_tokens, require_ancestry
from weit_core.train import seed_everything

BLOCK_PARAMS = tuple(f"{m}.{p}" for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
                     for p in ("weight", "bias"))
SHARED_PARAMS = ("cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight",
                 "norm.bias")
POSITIONS = ("official", "one_based")


def coefficients(depth: int, position: str = "official") -> torch.Tensor:
    """``c_l`` for the ``depth`` blocks of a descendant (float64)."""
    if position == "official":
        return torch.arange(depth, dtype=torch.float64) / depth
    if position == "one_based":
        return torch.arange(1, depth + 1, dtype=torch.float64) / depth
    raise ValueError(f"unknown TLEG position {position!r}; choose one of {POSITIONS}")


def expand(learngene: dict[str, torch.Tensor], model: nn.Module, depth: int, position: str = "official") -> nn.Module:
    """Write ``θ_A + c_l θ_B`` into each block of ``model`` and the shared tensors as they are."""
    missing = [k for k in [f"{p}.{s}" for p in BLOCK_PARAMS for s in "AB"] + list(SHARED_PARAMS) if k not in learngene]
    if missing:
        raise ValueError(f"learngene lacks {missing[:4]}{'...' if len(missing) > 4 else ''}; it needs <block param>.A/.B "
                         f"for {BLOCK_PARAMS} and the shared {SHARED_PARAMS}")
    own = model.state_dict()
    new = {k: learngene[k] for k in SHARED_PARAMS}
    for i, c in enumerate(coefficients(depth, position).tolist()):
        for p in BLOCK_PARAMS:
            new[f"blocks.{i}.{p}"] = learngene[f"{p}.A"].double() + c * learngene[f"{p}.B"].double()
    with torch.no_grad():
        for k, v in new.items():
            if own[k].shape != v.shape:
                raise ValueError(f"learngene {k} has shape {tuple(v.shape)}, the target needs {tuple(own[k].shape)}; "
                                 "TLEG changes depth only — use a target of the learngene's width")
            own[k].copy_(v)
    return model


def fit_learngene(ancestry: nn.Module, depth: int, position: str = "official") -> tuple[dict[str, torch.Tensor], float]:
    """Least-squares ``θ_A, θ_B`` per element over the ancestry's ``depth`` blocks, and the relative residual
    ``‖θ_l − (θ_A + c_l θ_B)‖ / ‖θ_l‖`` over all block parameters (0 when the ancestry is exactly linear)."""
    sd = {k: v.detach().double().cpu() for k, v in ancestry.state_dict().items()}
    c = coefficients(depth, position)
    cc = c - c.mean()
    den = float((cc**2).sum())
    gene = {k: sd[k].float() for k in SHARED_PARAMS}
    res = tot = 0.0
    for p in BLOCK_PARAMS:
        w = torch.stack([sd[f"blocks.{i}.{p}"] for i in range(depth)])
        shape = (depth,) + (1,) * (w.ndim - 1)
        b = (cc.view(shape) * (w - w.mean(0))).sum(0) / den if den > 0 else torch.zeros_like(w[0])
        a = w.mean(0) - c.mean() * b
        res += float(((a + c.view(shape) * b - w) ** 2).sum())
        tot += float((w**2).sum())
        gene[f"{p}.A"], gene[f"{p}.B"] = a, b
    return gene, (res / tot) ** 0.5 if tot > 0 else 0.0


def _info(position: str, spec: ViTSpec) -> dict:
    return {"position": position, "coefficients": ",".join(f"{c:.4g}" for c in coefficients(spec.depth, position)),
            "expanded": "norm1,qkv,proj,norm2,fc1,fc2 (weights+biases)",
            "shared": "patch_embed,cls_token,pos_embed,norm", "classifier_head": "new (timm init)"}


def _width_diff(src: ViTSpec, dst: ViTSpec) -> list[str]:
    """What besides depth differs between ancestry and target (TLEG changes depth only)."""
    return [f"{k} {getattr(src, k)} vs {getattr(dst, k)}" for k in ("width", "heads", "hidden")
            if getattr(src, k) != getattr(dst, k)]


@register("tleg", needs=("learngene",), families=("vit",))
def tleg(
    spec: ViTSpec, *, learngene: dict[str, torch.Tensor] | None = None, seed: int = 0, init_mode: str = "",
    position: str = "official", **_: object,
) -> InitResult:
    """The paper's descendant initialisation from a TLEG-trained learngene."""
    if learngene is None:
        raise ValueError("strategy 'tleg' needs a TLEG-trained learngene (learngene=); to fit one to a plain "
                         "ancestry use strategy 'tleg_fit' with --ancestry")
    seed_everything(seed)
    model = expand(learngene, create_vit(spec, init_mode, head_seed=seed), spec.depth, position)
    return InitResult(model, {"source": "learngene", **_info(position, spec),
                              "init_mode": init_mode or "timm_default"})


@register("tleg_fit", needs=("ancestry",), families=("vit",),
          check=ancestry_check(lambda src, dst: "width_differs_from_ancestry" if _width_diff(src, dst) else None))
def tleg_fit(
    spec: ViTSpec, *, ancestry: nn.Module | None = None, ancestry_spec: ViTSpec | None = None, seed: int = 0,
    init_mode: str = "", position: str = "official", **_: object,
) -> InitResult:
    """TLEG expansion of a learngene fitted (least squares, ours) to a plain ancestry of the target's width."""
    ancestry, src = require_ancestry("tleg_fit", ancestry, ancestry_spec)
    check_same_tokens("tleg_fit", src, spec)
    diff = _width_diff(src, spec)
    if diff:
        raise ValueError(f"tleg_fit expands depth only and needs ancestry width/heads/MLP == target's; ancestry vs "
                         f"target: {', '.join(diff)}; use weight_selection (smaller) or net2net (larger) to change width")
    gene, residual = fit_learngene(ancestry, src.depth, position)
    seed_everything(seed)
    model = expand(gene, create_vit(spec, init_mode, head_seed=seed), spec.depth, position)
    return InitResult(model, {"source": "ancestry", "learngene": "least_squares_fit (ours)",
                              "fit_relative_residual": round(residual, 6), "ancestry_depth": src.depth,
                              **_info(position, spec), "init_mode": init_mode or "timm_default"})
