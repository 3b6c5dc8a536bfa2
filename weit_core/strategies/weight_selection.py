"""``weight_selection``: Xu et al., "Initializing Models with Larger Ones" (ICLR 2024), reference code
github.com/OscarXZQ/weight-selection.

A smaller target takes a subset of a larger ancestry's weights: layer selection picks which ancestry blocks
feed the target's blocks, element selection picks which indices of every dimension are kept, the same
indices in every layer (the paper's "consistency"), so the embedding channel ``c`` of the target is the
same ancestry channel in the patch embedding, every norm, every residual write and every read.

Index rules (see docs/baselines.md): ``uniform`` keeps ``i * (n // m)`` when ``m`` divides ``n`` and
``round(linspace(0, n - 1, m))`` otherwise (the reference code's rule; its older release produced an
out-of-range index here); ``consecutive`` keeps ``0 .. m-1``. The fused ``qkv`` matrix is selected per
q/k/v section with the same attention-channel indices, and ``proj``'s input columns use those indices too,
so a value channel still meets its own projection column. ``head_aware=True`` (ours) selects whole heads
(head indices by the rule over the head count, then the same within-head indices for every head) instead of
spreading over the flat attention width. The classifier head is never copied: it stays timm-initialised.

ConvNeXt (the paper's CNN): layer selection within each stage (the first N blocks of a stage, or evenly
spaced), uniform element selection per stage: stage ``i``'s channel indices hold in its depthwise kernels,
norms, layer scales, MLP columns and rows, its downsampling conv's rows and the next stage's downsampling
norm and conv columns; its MLP units have their own indices. Kernels and the stem patch are kept whole.

The families built from the ViT's blocks (ViT, policy, DiT) share one selection, driven by each family's own
resize tables (``BlockRules``: the channel role and run count of every tensor's axes), so a tensor is cut
the way ``wave`` resizes it. Policy transformers (``weit_core.models.policy``) are ViT blocks over a state
context: the state embedding's rows and the position table's channels take the residual indices; the state
width, context and action kind must be the ancestry's.

DiT (``weit_core.models.dit``): the conditioning vector ``c`` (timestep plus class embedding) has the residual
width, so the residual indices also hold on ``c``: the timestep MLP's output rows and every adaLN's input
columns. Each adaLN's rows are six (final layer: two) runs of residual
channels (shift, scale, gate...), selected run by run. The timestep MLP's hidden units take the residual
indices too (its width is the residual width; the family's table resizes it so). The learned position table
is selected like the ViT's; the final projection's pixel rows are kept whole (same patch). The class table
is the DiT's head (``get_classifier``): new, drawn from ``HEAD_STREAM + seed`` as ``wave`` draws it, so
the ancestry's class count need not be the target's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from weit_core.models import CONVNEXT, ConvNeXtSpec, DiTSpec, PolicySpec, ViTSpec, dit, family_of, policy, vit
from weit_core.models.convnext import HEAD as CONVNEXT_HEAD
from weit_core.models.convnext import param_axes
from weit_core.models.policy import FIXED as POLICY_FIXED
from weit_core.models.vit import BlockRules
from weit_core.resize import Axis
from weit_core.strategies import InitResult, register
from weit_core.strategies._common import (
    ancestry_check,
    as_text,
    check_same_tokens,
    layer_indices,
    require_ancestry,
    select_indices,
    token_mismatch,
)
from weit_core.train import seed_everything


def selection_problem(src: ViTSpec, dst: ViTSpec, head_aware: bool = False) -> tuple[str, str] | None:
    """Why weight selection cannot make ``dst`` from ``src``: ``(reason, message)`` (the reason a key of
    ``CANNOT_MAKE``), or None when it can. The one size test behind both :func:`selection_plan` and the
    strategy's registered check."""
    too_big = [f"{k} {getattr(dst, k)} > {getattr(src, k)}" for k in ("depth", "width", "hidden")
               if getattr(dst, k) > getattr(src, k)]
    if too_big:
        return "larger_than_ancestry", (f"weight_selection selects from a larger ancestry, but target "
                                        f"{', '.join(too_big)}; pick a smaller target or grow with net2net")
    if head_aware:
        hd_src, hd_dst = src.width // src.heads, dst.width // dst.heads
        if dst.heads > src.heads or hd_dst > hd_src:
            return "heads_exceed_ancestry", (
                f"head_aware weight selection needs target heads <= {src.heads} and head_dim <= {hd_src}, got "
                f"heads={dst.heads}, head_dim={hd_dst}; pick fewer heads or head_aware=False")
    return None


def selection_plan(src: ViTSpec, dst: ViTSpec, layer_selection: str = "first_n", element_selection: str = "uniform",
                   head_aware: bool = False) -> dict[str, torch.Tensor]:
    """The indices weight selection uses: ``layers`` (ancestry block per target block), ``embed`` (residual
    channels), ``attn`` (channels of each q/k/v section and of proj's input), ``hidden`` (MLP units)."""
    problem = selection_problem(src, dst, head_aware)
    if problem:
        raise ValueError(problem[1])
    plan = {
        "layers": layer_indices(src.depth, dst.depth, layer_selection),
        "embed": select_indices(src.width, dst.width, element_selection),
        "hidden": select_indices(src.hidden, dst.hidden, element_selection),
    }
    if head_aware:
        hd_src, hd_dst = src.width // src.heads, dst.width // dst.heads
        heads = select_indices(src.heads, dst.heads, element_selection)
        dims = select_indices(hd_src, hd_dst, element_selection)
        plan["heads"] = heads
        plan["attn"] = (heads[:, None] * hd_src + dims[None, :]).reshape(-1)
    else:
        plan["attn"] = plan["embed"]
    return plan


BLOCK_RULES: dict[type, BlockRules] = {ViTSpec: vit.RULES, PolicySpec: policy.RULES, DiTSpec: dit.RULES}
"""The families built from the ViT's blocks and their resize tables: which channel axes (``embed``, ``attn``,
``hidden``, in runs for fused rows) every tensor sits on, and which tensors are the head."""
HEAD_INFO = {ViTSpec: ("classifier_head", "new (timm init)"), PolicySpec: ("policy_head", "new"),
             DiTSpec: ("class_table", "new (HEAD_STREAM + seed)")}


def selected_axes(spec: Any) -> dict[str, tuple[Axis, ...]]:
    """Every tensor weight selection copies into a ``spec``-sized model (all but the head) and its channel axes,
    read from the family's own tables: the templated matrices by kind, the free tensors by name."""
    rules = BLOCK_RULES[type(spec)]
    axes = {n: rules.grid_axes[kind] for kind, group in family_of(spec).layout(spec).items() for n in group.names}
    axes.update({n: a for n, a in rules.free_axes.items() if n not in rules.head})
    axes.update({f"blocks.{i}.{s}": a for i in range(spec.depth) for s, a in rules.block_free_axes.items()})
    return axes


def take(t: torch.Tensor, axes: tuple[Axis, ...], plan: dict[str, torch.Tensor]) -> torch.Tensor:
    """``t`` with each ``(dim, role, runs)`` axis cut to ``plan[role]`` within every run: q/k/v sections (3
    runs) and the adaLN chunks (6 or 2) each keep the same indices, so they stay aligned at any ratio."""
    for dim, role, runs in axes:
        n = t.shape[dim] // runs
        t = t.index_select(dim, torch.cat([s * n + plan[role] for s in range(runs)]))
    return t


@torch.no_grad()
def select_weights(ancestry: nn.Module, model: nn.Module, spec: Any, plan: dict[str, torch.Tensor]) -> nn.Module:
    """Overwrite every tensor of ``model`` but its head: target block ``j`` from ancestry block
    ``plan["layers"][j]``, each channel axis by :func:`take`."""
    sd = ancestry.state_dict()
    own = model.state_dict()
    for name, axes in selected_axes(spec).items():
        parts = name.split(".")
        if parts[0] == "blocks":
            parts[1] = str(int(plan["layers"][int(parts[1])]))
        own[name].copy_(take(sd[".".join(parts)].detach().cpu(), axes, plan))
    return model


def tokens_mismatch(src: Any, dst: Any) -> str | None:
    """The first input setting ancestry and target must share and do not: a policy's state width, context and
    action kind; a ViT's or DiT's patch, image size and channels."""
    if isinstance(dst, PolicySpec):
        return next((k for k in POLICY_FIXED if getattr(src, k) != getattr(dst, k)), None)
    return token_mismatch(src, dst)


def _select_blocks(spec: Any, ancestry: nn.Module | None, ancestry_spec: Any, *, seed: int, init_mode: str,
                   layer_selection: str, element_selection: str, head_aware: bool, name: str) -> InitResult:
    family = family_of(spec)
    ancestry, src = require_ancestry(name, ancestry, ancestry_spec, family=family)
    key = tokens_mismatch(src, spec)
    if key is not None:
        raise ValueError(f"strategy {name!r}: ancestry {key}={getattr(src, key)} but target {key}="
                         f"{getattr(spec, key)}; use a target with the ancestry's {key}")
    plan = selection_plan(src, spec, layer_selection, element_selection, head_aware)
    seed_everything(seed)
    model = select_weights(ancestry, family.build(spec, init_mode, head_seed=seed), spec, plan)
    rule = ("i*(n//m) if m divides n else round(linspace(0,n-1,m))" if element_selection == "uniform"
            else "0..m-1")
    head_key, head_value = HEAD_INFO[type(spec)]
    return InitResult(model, {
        "source": "ancestry", "layer_selection": layer_selection, "element_selection": element_selection,
        "head_aware": head_aware, "index_rule": rule, "ancestry_layers": as_text(plan["layers"]),
        "ancestry_depth": src.depth, "ancestry_width": src.width, "ancestry_heads": src.heads,
        "ancestry_hidden": src.hidden, "qkv_sections": "q,k,v selected with the same indices",
        head_key: head_value, "init_mode": init_mode or ("timm_default" if isinstance(spec, ViTSpec) else "default"),
    })


# ------------------------------------------------------------------------------------------ ConvNeXt


def convnext_problem(src: ConvNeXtSpec, dst: ConvNeXtSpec) -> tuple[str, str] | None:
    """Why weight selection cannot make ConvNeXt ``dst`` from ``src`` (``(reason, message)``), or None."""
    differ = [f"{k} {getattr(dst, k)} != {getattr(src, k)}" for k in ("stages", "kernel")
              if getattr(src, k) != getattr(dst, k)]
    if differ:
        return "stages_differ_from_ancestry", (f"weight_selection keeps the ancestry's stages and kernel, but "
                                               f"target {', '.join(differ)}")
    too_big = [f"stage {i} {what} {b} > {a}" for what in ("depths", "dims")
               for i, (a, b) in enumerate(zip(getattr(src, what), getattr(dst, what), strict=True)) if b > a]
    if too_big:
        return "larger_than_ancestry", (f"weight_selection selects from a larger ancestry, but target "
                                        f"{', '.join(too_big)}; pick a smaller target")
    return None


def convnext_plan(src: ConvNeXtSpec, dst: ConvNeXtSpec, layer_selection: str = "first_n",
                  element_selection: str = "uniform") -> list[dict[str, torch.Tensor]]:
    """Per stage: ``layers`` (ancestry block per target block), ``embed`` (its channels), ``hidden`` (its MLP
    units), ``prev`` (the channels it reads: the stage before's, the stem's for stage 0)."""
    problem = convnext_problem(src, dst)
    if problem:
        raise ValueError(problem[1])
    plan = [{"layers": layer_indices(src.depths[i], dst.depths[i], layer_selection),
             "embed": select_indices(src.dims[i], dst.dims[i], element_selection),
             "hidden": select_indices(src.hiddens[i], dst.hiddens[i], element_selection)}
            for i in range(src.stages)]
    for i, stage in enumerate(plan):
        stage["prev"] = plan[max(i - 1, 0)]["embed"]
    return plan


@torch.no_grad()
def select_convnext(ancestry: nn.Module, model: nn.Module, spec: ConvNeXtSpec, plan: list[dict]) -> nn.Module:
    """Every parameter of ``model`` but the classifier from its ancestry counterpart: block ``j`` of stage
    ``i`` from ancestry block ``layers[j]``, each channel axis indexed by its role's indices."""
    sd = {k: v.detach().cpu() for k, v in ancestry.state_dict().items()}
    own = model.state_dict()
    for name, (stage, axes) in param_axes(spec).items():
        if name in CONVNEXT_HEAD:
            continue
        parts = name.split(".")
        if parts[0] == "stages" and parts[2] == "blocks":
            parts[3] = str(int(plan[stage]["layers"][int(parts[3])]))
        t = sd[".".join(parts)]
        for dim, role, _ in axes:
            t = t.index_select(dim, plan[stage][role])
        own[name].copy_(t)
    return model


def _select_convnext(spec: ConvNeXtSpec, ancestry: nn.Module | None, ancestry_spec: ConvNeXtSpec | None, *,
                     seed: int, init_mode: str, layer_selection: str, element_selection: str,
                     name: str) -> InitResult:
    ancestry, src = require_ancestry(name, ancestry, ancestry_spec, CONVNEXT)
    check_same_tokens(name, src, spec)
    plan = convnext_plan(src, spec, layer_selection, element_selection)
    seed_everything(seed)
    model = select_convnext(ancestry, CONVNEXT.build(spec, init_mode, head_seed=seed), spec, plan)
    return InitResult(model, {
        "source": "ancestry", "layer_selection": f"{layer_selection} per stage", "element_selection": element_selection,
        "ancestry_layers": ";".join(as_text(s["layers"]) for s in plan), "ancestry": src.label,
        "classifier_head": "new (timm init)", "init_mode": init_mode or "timm_default",
    })


# ------------------------------------------------------------------------------------------ every family


def _weight_selection(
    spec: Any, ancestry: nn.Module | None, ancestry_spec: Any, *, seed: int, init_mode: str, layer_selection: str,
    element_selection: str, head_aware: bool, name: str,
) -> InitResult:
    if isinstance(spec, ConvNeXtSpec):
        if head_aware:
            raise ValueError(f"strategy {name!r}: head_aware selection is for ViTs (a ConvNeXt has no heads)")
        return _select_convnext(spec, ancestry, ancestry_spec, seed=seed, init_mode=init_mode,
                                layer_selection=layer_selection, element_selection=element_selection, name=name)
    return _select_blocks(spec, ancestry, ancestry_spec, seed=seed, init_mode=init_mode, name=name,
                          layer_selection=layer_selection, element_selection=element_selection, head_aware=head_aware)


def _check(head_aware: bool):
    """The registered check on specs: inputs (:func:`tokens_mismatch`), then :func:`selection_problem`
    (:func:`convnext_problem`, after :func:`ancestry_check`'s patch and image test)."""
    convnext_check = ancestry_check(lambda src, dst: (convnext_problem(src, dst) or (None,))[0])

    def check(spec, ancestry_spec=None):
        if ancestry_spec is None or isinstance(spec, ConvNeXtSpec):
            return convnext_check(spec, ancestry_spec)
        if tokens_mismatch(ancestry_spec, spec):
            return "tokens_differ_from_ancestry"
        return (selection_problem(ancestry_spec, spec, head_aware) or (None,))[0]

    return check


FAMILIES = ("vit", "convnext", "policy", "dit")


@register("weight_selection", needs=("ancestry",), check=_check(head_aware=False), families=FAMILIES)
def weight_selection(
    spec: ViTSpec, *, ancestry: nn.Module | None = None, ancestry_spec: ViTSpec | None = None, seed: int = 0,
    init_mode: str = "", layer_selection: str = "first_n", element_selection: str = "uniform", head_aware: bool = False,
    **_: object,
) -> InitResult:
    """Paper defaults: first-N layers, uniform element selection; the options are keyword arguments."""
    return _weight_selection(spec, ancestry, ancestry_spec, seed=seed, init_mode=init_mode,
                             layer_selection=layer_selection, element_selection=element_selection,
                             head_aware=head_aware, name="weight_selection")


def _variant(name: str, **fixed: object) -> None:
    """A named variant with some options fixed, so a sweep can list it by name alone."""

    def fn(spec: ViTSpec, **kw: object) -> InitResult:
        clash = {k: kw[k] for k in fixed if k in kw and kw[k] != fixed[k]}
        if clash:
            raise ValueError(f"strategy {name!r} fixes {fixed}; got {clash} (use 'weight_selection' with options)")
        opts = {"layer_selection": "first_n", "element_selection": "uniform", "head_aware": False}
        opts.update({k: kw[k] for k in opts if k in kw}, **fixed)
        return _weight_selection(spec, kw.get("ancestry"), kw.get("ancestry_spec"), seed=int(kw.get("seed", 0)),
                                 init_mode=str(kw.get("init_mode", "")), name=name, **opts)

    fn.__doc__ = f"weight_selection with {fixed}."
    head_aware = bool(fixed.get("head_aware", False))
    register(name, needs=("ancestry",), check=_check(head_aware), families=("vit",) if head_aware else FAMILIES)(fn)


_variant("weight_selection_even", layer_selection="even")
_variant("weight_selection_consecutive", element_selection="consecutive")
_variant("weight_selection_head_aware", head_aware=True)
