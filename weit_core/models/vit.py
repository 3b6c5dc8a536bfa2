"""ViT targets: a size spec -> an ordinary timm ``VisionTransformer``, its templated layout and bank kinds."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer

from weit_core.models.family import Family, Spec, register_family
from weit_core.resize import Axis, SizeMaps, axis_map, resize_grid, resize_stack, resize_tensor
from weit_core.templates import KindSpec, LayerGroup, Layout

TIMM_MODEL = "vit_tiny_patch16_224"
"""The timm name whose defaults every spec overrides, so ``timm.create_model(TIMM_MODEL, **kw)`` rebuilds it."""

INIT_MODES = ("", "jax", "moco")
"""timm's ``weight_init`` modes: '' (trunc-normal, timm default), 'jax', 'moco'."""

VIT_KINDS = ("patch", "qkv", "proj", "fc1", "fc2")


@dataclass(frozen=True)
class ViTSpec(Spec):
    depth: int
    width: int
    heads: int
    mlp_ratio: float = 4.0
    patch: int = 4
    img_size: int = 28
    in_chans: int = 1
    num_classes: int = 10

    def __post_init__(self) -> None:
        if self.depth < 1 or self.width < 1 or self.heads < 1:
            raise ValueError(f"depth, width and heads must be >= 1, got {self}")
        if self.width % self.heads:
            raise ValueError(
                f"heads={self.heads} does not divide width={self.width}; pick heads from "
                f"{[h for h in range(1, self.width + 1) if self.width % h == 0 and h <= 32]}"
            )
        if self.img_size % self.patch:
            raise ValueError(f"patch={self.patch} does not divide img_size={self.img_size}")
        if abs(self.width * self.mlp_ratio - round(self.width * self.mlp_ratio)) > 1e-9:
            raise ValueError(f"width*mlp_ratio = {self.width * self.mlp_ratio} is not an integer")

    @property
    def hidden(self) -> int:
        return round(self.width * self.mlp_ratio)

    @property
    def label(self) -> str:
        """``depth x width x heads`` (``2x64x2``): how runs, logs and metric names call a size."""
        return f"{self.depth}x{self.width}x{self.heads}"

    @property
    def tokens(self) -> int:
        return (self.img_size // self.patch) ** 2 + 1

    def timm_kwargs(self) -> dict:
        """Keyword arguments for ``timm.create_model(TIMM_MODEL, **kw)``."""
        return dict(
            img_size=self.img_size, patch_size=self.patch, in_chans=self.in_chans, num_classes=self.num_classes,
            embed_dim=self.width, depth=self.depth, num_heads=self.heads, mlp_ratio=self.mlp_ratio,
        )

    def num_params(self) -> int:
        d, h, c = self.width, self.hidden, self.in_chans
        per_block = 3 * d * d + 3 * d + d * d + d + h * d + h + d * h + d + 4 * d
        return (d * c * self.patch**2 + d + self.tokens * d + d + self.depth * per_block + 2 * d
                + self.num_classes * (d + 1))

    def flops(self) -> int:
        """Forward multiply-adds x2 for one input (matmuls + attention scores; norms/softmax ignored)."""
        t, d, h = self.tokens, self.width, self.hidden
        patch = (t - 1) * d * self.in_chans * self.patch**2
        block = t * (3 * d * d + d * d + 2 * d * h) + 2 * t * t * d
        return 2 * (patch + self.depth * block + d * self.num_classes)


HEAD_STREAM = 0x68656164_0000
"""Offset of the generator every *new* task head is drawn from (``HEAD_STREAM + seed``). Models trained
from ``seed_everything(seed)`` + timm's init draw their first head from the global stream; a target of the
same spec and seed would redraw exactly that head, which the trained features still fit."""


def create_vit(spec: ViTSpec, init_mode: str = "", head_seed: int | None = None) -> VisionTransformer:
    """An ordinary timm ViT with timm's init mode named explicitly (seed the RNG before calling).

    ``head_seed``: draw the classifier head from its own stream (:func:`new_head`), as every init strategy
    does for the head it leaves new; None keeps timm's head (an ancestry trained from scratch)."""
    if init_mode not in INIT_MODES:
        raise ValueError(f"unknown timm init mode {init_mode!r}; choose one of {INIT_MODES}")
    model = VisionTransformer(weight_init=init_mode, **spec.timm_kwargs())
    if head_seed is not None:
        new_head(model, head_seed, init_mode)
    return model


@torch.no_grad()
def new_head(model: VisionTransformer, seed: int, init_mode: str = "") -> None:
    """Re-draw the classifier head as timm initialises it (trunc-normal std 0.02, zero bias; zeros for
    'jax') from the generator ``HEAD_STREAM + seed``, which no model's own init stream can coincide with."""
    head = model.head
    if not isinstance(head, torch.nn.Linear):
        return
    head.bias.zero_()
    if init_mode == "jax":
        head.weight.zero_()
        return
    gen = torch.Generator().manual_seed(HEAD_STREAM + int(seed))
    torch.nn.init.trunc_normal_(head.weight, std=0.02, generator=gen)


def vit_layout(spec: ViTSpec) -> Layout:
    """Which weights are templated: the patch projection and each block's qkv, proj, fc1, fc2."""
    d, h, L = spec.width, spec.hidden, range(spec.depth)
    return {
        "patch": LayerGroup(("patch_embed.proj.weight",), (d, spec.in_chans, spec.patch, spec.patch)),
        "qkv": LayerGroup(tuple(f"blocks.{i}.attn.qkv.weight" for i in L), (3 * d, d)),
        "proj": LayerGroup(tuple(f"blocks.{i}.attn.proj.weight" for i in L), (d, d)),
        "fc1": LayerGroup(tuple(f"blocks.{i}.mlp.fc1.weight" for i in L), (h, d)),
        "fc2": LayerGroup(tuple(f"blocks.{i}.mlp.fc2.weight" for i in L), (d, h)),
    }


def vit_kinds(spec: ViTSpec, n: int = 4, block: int = 16) -> dict[str, KindSpec]:
    """Bank kinds for ViTs with this patch/channels: ``n`` templates of ``block x block`` per matrix kind;
    the patch kind is ``block x gcd(in_chans, block) x patch x patch`` (templates over the channel grid)."""
    kinds = {k: KindSpec(n, block, block) for k in ("qkv", "proj", "fc1", "fc2")}
    kinds["patch"] = KindSpec(n, block, math.gcd(spec.in_chans, block), (spec.patch, spec.patch))
    return kinds


def count_templated(spec: ViTSpec) -> int:
    return sum(g.depth * math.prod(g.shape) for g in vit_layout(spec).values())


@torch.no_grad()
def copy_free_parameters(src: torch.nn.Module, dst: torch.nn.Module, skip: set[str]) -> None:
    """Copy every same-shaped parameter of ``src`` into ``dst`` except the names in ``skip``."""
    dst_params = dict(dst.named_parameters())
    for name, p in src.named_parameters():
        if name not in skip and name in dst_params and dst_params[name].shape == p.shape:
            dst_params[name].copy_(p)


# ------------------------------------------------------------------------------------- sizes from sizes

E = ((0, "embed", 1),)
GRID_AXES: dict[str, tuple[Axis, ...]] = {
    "patch": E, "qkv": ((0, "attn", 3), (1, "embed", 1)), "proj": ((0, "embed", 1), (1, "attn", 1)),
    "fc1": ((0, "hidden", 1), (1, "embed", 1)), "fc2": ((0, "embed", 1), (1, "hidden", 1)),
}
"""Which channel axis each templated kind's rows (0) and columns (1) run over; qkv rows are q, k, v runs."""
PER_BLOCK_KINDS = frozenset({"qkv", "proj", "fc1", "fc2"})
FREE_AXES: dict[str, tuple[Axis, ...]] = {
    "cls_token": ((2, "embed", 1),), "pos_embed": ((2, "embed", 1),), "patch_embed.proj.bias": E,
    "norm.weight": E, "norm.bias": E, "head.weight": ((1, "embed", 1),), "head.bias": (),
}
BLOCK_FREE_AXES: dict[str, tuple[Axis, ...]] = {
    "norm1.weight": E, "norm1.bias": E, "attn.qkv.bias": ((0, "attn", 3),), "attn.proj.bias": E,
    "norm2.weight": E, "norm2.bias": E, "mlp.fc1.bias": ((0, "hidden", 1),), "mlp.fc2.bias": E,
}
"""The free (non-templated) tensors of a timm ViT and the channel axes they sit on; per-block ones also
follow the depth map. The head is made for other sizes only inside stage 1 (each size's aux head)."""
HEAD = ("head.weight", "head.bias")


@dataclass(frozen=True)
class BlockRules:
    """The resize rules of a family built from the ViT's blocks (ViT, policy, DiT): free tensors by name and
    the channel axes they sit on, scaler grids by kind, and what a bank's reference and a target must share."""

    label: str
    free_axes: dict[str, tuple[Axis, ...]]
    block_free_axes: dict[str, tuple[Axis, ...]]
    head: tuple[str, ...]
    fixed: tuple[str, ...]
    grid_axes: dict[str, tuple[Axis, ...]]
    per_block_kinds: frozenset[str]
    fix: str = "make a bank for this {key}"

    def free_names(self, spec: Any, head: bool = False) -> list[str]:
        names = [n for n in self.free_axes if head or n not in self.head]
        return names + [f"blocks.{i}.{s}" for i in range(spec.depth) for s in self.block_free_axes]

    def size_maps(self, src: Any, dst: Any, block: int, width_rule: str = "nested",
                  depth_rule: str = "nested") -> SizeMaps:
        """The maps from reference size ``src`` to ``dst`` over layers and ``block``-channel blocks."""
        for key in self.fixed:
            if getattr(src, key) != getattr(dst, key):
                raise ValueError(f"the bank's reference {self.label} has {key}={getattr(src, key)}, the target "
                                 f"{key}={getattr(dst, key)}; {self.fix.format(key=key)}")
        for what, n in (("width", dst.width), ("MLP hidden", dst.hidden), ("reference width", src.width),
                        ("reference MLP hidden", src.hidden)):
            if n % block:
                raise ValueError(f"{what} {n} is not a multiple of the template block {block}; choose sizes that "
                                 f"are multiples of {block} or a bank with a smaller block")
        embed = axis_map(src.width // block, dst.width // block, width_rule)
        return SizeMaps(depth=axis_map(src.depth, dst.depth, depth_rule),
                        roles={"embed": embed, "attn": embed,
                               "hidden": axis_map(src.hidden // block, dst.hidden // block, width_rule)},
                        block=block)

    def resize_grids(self, grids: dict[str, torch.Tensor], maps: SizeMaps) -> dict[str, torch.Tensor]:
        return {k: resize_grid(g, self.grid_axes[k], maps, k in self.per_block_kinds) for k, g in grids.items()}

    def resize_free(self, free: dict[str, torch.Tensor], src: Any, maps: SizeMaps,
                    head: bool = False) -> dict[str, torch.Tensor]:
        """The free tensors of the target from the reference's (``free`` holds :meth:`free_names` of ``src``)."""
        out = {n: resize_tensor(free[n], self.free_axes[n], maps) for n in self.free_axes
               if head or n not in self.head}
        for suffix, axes in self.block_free_axes.items():
            made = resize_stack([free[f"blocks.{i}.{suffix}"] for i in range(src.depth)], axes, maps)
            out.update({f"blocks.{i}.{suffix}": t for i, t in enumerate(made)})
        return out


RULES = BlockRules("ViT", FREE_AXES, BLOCK_FREE_AXES, HEAD, ("patch", "img_size", "in_chans"), GRID_AXES,
                   PER_BLOCK_KINDS)


# ------------------------------------------------------------------------------------- sizes a space names

SIZE_AXES = ("depth", "width", "heads", "mlp_ratio")
DROP_REASONS = {
    "heads_not_dividing_width": "heads do not divide width",
    "mlp_hidden_not_integer": "width x mlp_ratio is not an integer",
    "not_multiple_of_block": "width or MLP hidden size is not a multiple of the bank's template block",
}


def check_size(size: dict, block: int | None = None) -> str | None:
    """Why a ViT of this size cannot be built (or tiled by ``block``-sized templates); None when it can."""
    w, h, r = size["width"], size["heads"], size.get("mlp_ratio", 4.0)
    if w % h:
        return "heads_not_dividing_width"
    hidden = w * r
    if abs(hidden - round(hidden)) > 1e-9:
        return "mlp_hidden_not_integer"
    if block and (w % block or round(hidden) % block):
        return "not_multiple_of_block"
    return None


def make_spec(size: dict, io: dict) -> ViTSpec:
    """A size (depth, width, heads, mlp_ratio) for a task's images: ``io`` gives in_chans, img_size,
    num_classes and the patch."""
    return ViTSpec(depth=size["depth"], width=size["width"], heads=size["heads"],
                   mlp_ratio=size.get("mlp_ratio", 4.0), patch=io.get("patch", 4), img_size=io["img_size"],
                   in_chans=io["in_chans"], num_classes=io["num_classes"])


def spec_of_model(model: torch.nn.Module) -> ViTSpec:
    """The ViTSpec of an ordinary timm ``VisionTransformer``."""
    try:
        pe, blk = model.patch_embed, model.blocks[0]
        return ViTSpec(
            depth=len(model.blocks), width=model.embed_dim, heads=blk.attn.num_heads,
            mlp_ratio=blk.mlp.fc1.out_features / model.embed_dim, patch=pe.patch_size[0], img_size=pe.img_size[0],
            in_chans=pe.proj.in_channels, num_classes=getattr(model.head, "out_features", 0),
        )
    except (AttributeError, IndexError, TypeError) as e:
        raise ValueError(f"not a timm VisionTransformer ({type(model).__name__}: {e}); load it with "
                         "weit_core.io.load_model or pass its spec") from e


VIT = register_family(Family(
    name="vit", spec_type=ViTSpec, build=create_vit, layout=vit_layout, kinds=vit_kinds, free_names=RULES.free_names,
    size_maps=RULES.size_maps, resize_grids=RULES.resize_grids, resize_free=RULES.resize_free, size_axes=SIZE_AXES,
    make_spec=make_spec, check_size=check_size, drop_reasons=DROP_REASONS, spec_of_model=spec_of_model,
    default_size={"depth": 6, "width": 96, "heads": 3, "mlp_ratio": 4.0, "patch": 4}))  # >= 88% on Fashion-MNIST
