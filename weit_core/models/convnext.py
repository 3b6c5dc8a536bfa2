"""ConvNeXt targets: a size spec -> an ordinary timm ``ConvNeXt`` with 1-4 stages and a small-image stem,
its templated layout and bank kinds, and how a reference size's scalers and free tensors become another's.

timm's ``ConvNeXt`` always builds four stages; a spec with fewer is built with the missing stages at depth 0
(each still a downsampling layer) and ``stages`` cut to the spec's, so the model is timm's class, its
parameter names and its init. The final norm is ``norm_pre`` (``head_norm_first``: norm, pool, fc), so the
head is the classifier alone and the bank carries the trained norm as any other free tensor.

Stage widths differ, so every per-stage weight group is keyed ``kind@stage`` (``fc1@1``) and draws on the
one ``kind`` of the bank: templates are ``block``-sided and tile any width that is a multiple of ``block``.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

import torch
from timm.models.convnext import ConvNeXt

from weit_core.models.family import Family, Spec, register_family
from weit_core.models.vit import HEAD_STREAM
from weit_core.resize import Axis, SizeMaps, axis_map, resize_grid, resize_stack, resize_tensor
from weit_core.templates import KindSpec, LayerGroup, Layout

INIT_MODES = ("",)
"""timm's ConvNeXt has one init (trunc-normal 0.02 weights, zero biases, layer scale 1e-6)."""
PATCHES = (1, 2, 4)
"""Stem patch sizes: with timm's stride rule (stage 0 downsamples after a patch-2 stem, later stages always)
no stage of up to four is dilated."""
MLP_RATIO = 4


def _strides(patch: int, stages: int) -> list[int]:
    """Each stage's stride, timm's rule: stage 0 downsamples only after a patch-2 stem."""
    return [2 if i > 0 or patch == 2 else 1 for i in range(stages)]


def _resolutions(img_size: int, patch: int, stages: int) -> list[int]:
    """Feature-map side after each stage (2x2 stride-2 downsampling convs, no padding)."""
    side, out = img_size // patch, []
    for s in _strides(patch, stages):
        side //= s
        out.append(side)
    return out


@dataclass(frozen=True)
class ConvNeXtSpec(Spec):
    """Blocks and channels per stage (1-4 stages; MLPs 4x wide, timm's fixed ratio), the depthwise kernel, the
    stem's patch and the task's images and classes."""

    depths: tuple[int, ...]
    dims: tuple[int, ...]
    kernel: int = 7
    patch: int = 2
    img_size: int = 28
    in_chans: int = 1
    num_classes: int = 10

    def __post_init__(self) -> None:
        object.__setattr__(self, "depths", tuple(int(d) for d in self.depths))
        object.__setattr__(self, "dims", tuple(int(d) for d in self.dims))
        if not 1 <= len(self.depths) <= 4 or len(self.dims) != len(self.depths):
            raise ValueError(f"ConvNeXt needs 1-4 stages with one depth and one width each, got depths "
                             f"{self.depths} and dims {self.dims}")
        if min(self.depths) < 1 or min(self.dims) < 1:
            raise ValueError(f"every stage needs depth and width >= 1, got {self.depths} x {self.dims}")
        if self.patch not in PATCHES:
            raise ValueError(f"stem patch {self.patch} not supported; choose one of {PATCHES}")
        if min(self.resolutions()) < 1:
            raise ValueError(f"a {self.img_size}x{self.img_size} image has no pixel left after the patch-"
                             f"{self.patch} stem and {self.stages} stages ({self.resolutions()}); use fewer stages")

    @property
    def stages(self) -> int:
        return len(self.depths)

    @property
    def hiddens(self) -> tuple[int, ...]:
        """MLP hidden units per stage: timm's ConvNeXt fixes the ratio at 4."""
        return tuple(MLP_RATIO * c for c in self.dims)

    @property
    def label(self) -> str:
        """``depths x dims`` (``2-2x32-64``): how runs, logs and metric names call a size."""
        return f"{'-'.join(map(str, self.depths))}x{'-'.join(map(str, self.dims))}"

    def has_downsample(self, i: int) -> bool:
        return _strides(self.patch, self.stages)[i] > 1

    def resolutions(self) -> list[int]:
        return _resolutions(self.img_size, self.patch, self.stages)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(depths=list(self.depths), dims=list(self.dims))
        return d

    def num_params(self) -> int:
        p, k, n = self.patch, self.kernel, self.stages
        total = self.in_chans * self.dims[0] * p * p + 3 * self.dims[0]
        for i, (d, c, h) in enumerate(zip(self.depths, self.dims, self.hiddens, strict=True)):
            prev = self.dims[max(i - 1, 0)]
            if self.has_downsample(i):
                total += 2 * prev + 4 * prev * c + c
            total += d * (c * k * k + c + 2 * c + 2 * h * c + h + c + c)
        return total + 2 * self.dims[n - 1] + self.num_classes * (self.dims[n - 1] + 1)

    def flops(self) -> int:
        """Forward multiply-adds x2 for one input (convolutions and MLPs; norms, GELU, pooling ignored)."""
        side = self.img_size // self.patch
        macs = side * side * self.dims[0] * self.in_chans * self.patch**2
        for i, (d, c, h, r) in enumerate(zip(self.depths, self.dims, self.hiddens, self.resolutions(), strict=True)):
            if self.has_downsample(i):
                macs += r * r * c * self.dims[max(i - 1, 0)] * 4
            macs += d * r * r * (c * self.kernel**2 + 2 * c * h)
        return 2 * (macs + self.dims[-1] * self.num_classes)


# ------------------------------------------------------------------------------------------- the model


def create_convnext(spec: ConvNeXtSpec, init_mode: str = "", head_seed: int | None = None) -> ConvNeXt:
    """An ordinary timm ConvNeXt (seed the RNG before calling). ``head_seed``: draw the classifier from its
    own stream ``HEAD_STREAM + seed`` (trunc-normal 0.02, zero bias, as timm inits it), as the ViT does."""
    if init_mode not in INIT_MODES:
        raise ValueError(f"unknown ConvNeXt init mode {init_mode!r}; choose one of {INIT_MODES}")
    pad = 4 - spec.stages
    model = ConvNeXt(in_chans=spec.in_chans, num_classes=spec.num_classes, depths=spec.depths + (0,) * pad,
                     dims=spec.dims + (spec.dims[-1],) * pad, kernel_sizes=spec.kernel, patch_size=spec.patch,
                     head_norm_first=True)
    if pad:
        model.stages = model.stages[:spec.stages]
        model.feature_info = model.feature_info[:spec.stages]
    if head_seed is not None:
        fc = model.get_classifier()
        gen = torch.Generator().manual_seed(HEAD_STREAM + int(head_seed))
        with torch.no_grad():
            torch.nn.init.trunc_normal_(fc.weight, std=0.02, generator=gen)
            fc.bias.zero_()
    return model


# ------------------------------------------------------------------------------------- templated layout

PER_BLOCK_KINDS = frozenset({"dw", "fc1", "fc2"})


def convnext_layout(spec: ConvNeXtSpec) -> Layout:
    """Which weights are templated: the stem, each downsampling conv, and each block's depthwise kernel and
    MLP (fc1, fc2); per-stage groups are keyed ``kind@stage``."""
    k = spec.kernel
    out = {"stem": LayerGroup(("stem.0.weight",), (spec.dims[0], spec.in_chans, spec.patch, spec.patch))}
    for i, (d, c, h) in enumerate(zip(spec.depths, spec.dims, spec.hiddens, strict=True)):
        if spec.has_downsample(i):
            out[f"down@{i}"] = LayerGroup((f"stages.{i}.downsample.1.weight",), (c, spec.dims[max(i - 1, 0)], 2, 2))
        blocks = [f"stages.{i}.blocks.{j}" for j in range(d)]
        out[f"dw@{i}"] = LayerGroup(tuple(f"{b}.conv_dw.weight" for b in blocks), (c, 1, k, k))
        out[f"fc1@{i}"] = LayerGroup(tuple(f"{b}.mlp.fc1.weight" for b in blocks), (h, c))
        out[f"fc2@{i}"] = LayerGroup(tuple(f"{b}.mlp.fc2.weight" for b in blocks), (c, h))
    return out


def convnext_kinds(spec: ConvNeXtSpec, n: int = 4, block: int = 16) -> dict[str, KindSpec]:
    """Bank kinds: ``n`` templates per kind. MLP and downsampling templates are ``block x block`` (x 2x2);
    the stem's ``block x gcd(in_chans, block) x patch x patch``; a depthwise template is one channel's
    kernel (``1 x 1 x k x k``), so a layer's kernels are per-channel mixes of one shared kernel basis
    instead of ``block`` channels bound to one scaler."""
    kinds = {"stem": KindSpec(n, block, math.gcd(spec.in_chans, block), (spec.patch, spec.patch)),
             "dw": KindSpec(n, 1, 1, (spec.kernel, spec.kernel)),
             "fc1": KindSpec(n, block, block), "fc2": KindSpec(n, block, block)}
    if any(spec.has_downsample(i) for i in range(spec.stages)):
        kinds["down"] = KindSpec(n, block, block, (2, 2))
    return kinds


# ------------------------------------------------------------------------------------- sizes from sizes

E: tuple[Axis, ...] = ((0, "embed", 1),)
H: tuple[Axis, ...] = ((0, "hidden", 1),)
P: tuple[Axis, ...] = ((0, "prev", 1),)
GRID_AXES: dict[str, tuple[Axis, ...]] = {
    "stem": E, "down": ((0, "embed", 1), (1, "prev", 1)), "dw": E,
    "fc1": ((0, "hidden", 1), (1, "embed", 1)), "fc2": ((0, "embed", 1), (1, "hidden", 1)),
}
"""Which channel role each kind's weight rows (0) and columns (1) run over, in the maps of the layer's stage:
``embed`` = the stage's channels, ``hidden`` = its MLP units, ``prev`` = the channels it reads from before."""
BLOCK_AXES: dict[str, tuple[Axis, ...]] = {
    "gamma": E, "conv_dw.weight": E, "conv_dw.bias": E, "norm.weight": E, "norm.bias": E,
    "mlp.fc1.weight": ((0, "hidden", 1), (1, "embed", 1)), "mlp.fc1.bias": H,
    "mlp.fc2.weight": ((0, "embed", 1), (1, "hidden", 1)), "mlp.fc2.bias": E,
}
TEMPLATED = ("stem.0.weight", "downsample.1.weight", "conv_dw.weight", "mlp.fc1.weight", "mlp.fc2.weight")
BLOCK_FREE_AXES = {s: axes for s, axes in BLOCK_AXES.items() if s not in TEMPLATED}
HEAD = ("head.fc.weight", "head.fc.bias")


def param_axes(spec: ConvNeXtSpec) -> dict[str, tuple[int, tuple[Axis, ...]]]:
    """Every parameter of the model: ``(stage, channel axes)`` in that stage's roles. The one table the
    resize rule (free tensors) and weight selection (all tensors) read."""
    last = spec.stages - 1
    out: dict[str, tuple[int, tuple[Axis, ...]]] = {
        "stem.0.weight": (0, E), "stem.0.bias": (0, E), "stem.1.weight": (0, E), "stem.1.bias": (0, E)}
    for i, d in enumerate(spec.depths):
        if spec.has_downsample(i):
            out.update({f"stages.{i}.downsample.0.weight": (i, P), f"stages.{i}.downsample.0.bias": (i, P),
                        f"stages.{i}.downsample.1.weight": (i, GRID_AXES["down"]),
                        f"stages.{i}.downsample.1.bias": (i, E)})
        out.update({f"stages.{i}.blocks.{j}.{s}": (i, axes) for j in range(d) for s, axes in BLOCK_AXES.items()})
    out.update({"norm_pre.weight": (last, E), "norm_pre.bias": (last, E),
                "head.fc.weight": (last, ((1, "embed", 1),)), "head.fc.bias": (last, ())})
    return out


def free_names(spec: ConvNeXtSpec, head: bool = False) -> list[str]:
    """The non-templated parameters (norms, biases, layer scales; the classifier with ``head``)."""
    return [n for n in param_axes(spec) if not n.endswith(TEMPLATED) and (head or n not in HEAD)]


def size_maps(src: ConvNeXtSpec, dst: ConvNeXtSpec, block: int, width_rule: str = "nested",
              depth_rule: str = "nested") -> tuple[SizeMaps, ...]:
    """Per stage, the maps from reference ``src`` to ``dst``: its blocks (depth), its channels and MLP units
    in ``block``-channel blocks, and the channels it reads (``prev``: the stage before's, the stem's for
    stage 0). A stage keeps its place: the stage count, stem and kernel are the bank's."""
    for key in ("stages", "patch", "kernel", "in_chans"):
        if getattr(src, key) != getattr(dst, key):
            raise ValueError(f"the bank's reference ConvNeXt has {key}={getattr(src, key)}, the target "
                             f"{key}={getattr(dst, key)}; make a bank for this {key}")
    bad = [c for c in (*src.dims, *dst.dims) if c % block]
    if bad:
        raise ValueError(f"stage widths {bad} are not multiples of the template block {block}; choose widths "
                         f"that are multiples of {block} or a bank with a smaller block")
    embed = [axis_map(s // block, d // block, width_rule) for s, d in zip(src.dims, dst.dims, strict=True)]
    return tuple(
        SizeMaps(depth=axis_map(src.depths[i], dst.depths[i], depth_rule),
                 roles={"embed": embed[i], "prev": embed[max(i - 1, 0)],
                        "hidden": axis_map(src.hiddens[i] // block, dst.hiddens[i] // block, width_rule)},
                 block=block)
        for i in range(src.stages))


def resize_grids(grids: dict[str, torch.Tensor], maps: tuple[SizeMaps, ...]) -> dict[str, torch.Tensor]:
    out = {}
    for key, g in grids.items():
        kind, _, stage = key.partition("@")
        m = maps[int(stage or 0)]
        out[key] = resize_grid(g, GRID_AXES[kind], m, kind in PER_BLOCK_KINDS, unit=m.block if kind == "dw" else 1)
    return out


_BLOCK = re.compile(r"stages\.(\d+)\.blocks\.(\d+)\.(.+)")


def resize_free(free: dict[str, torch.Tensor], src: ConvNeXtSpec, maps: tuple[SizeMaps, ...],
                head: bool = False) -> dict[str, torch.Tensor]:
    """The target's free tensors from the reference's: each through its stage's maps, per-block ones stacked
    over the stage's blocks through its depth map."""
    axes_of = param_axes(src)
    out: dict[str, torch.Tensor] = {}
    for name in free_names(src, head):
        if not _BLOCK.match(name):
            stage, axes = axes_of[name]
            out[name] = resize_tensor(free[name], axes, maps[stage])
    for i, d in enumerate(src.depths):
        for suffix, axes in BLOCK_FREE_AXES.items():
            made = resize_stack([free[f"stages.{i}.blocks.{j}.{suffix}"] for j in range(d)], axes, maps[i])
            out.update({f"stages.{i}.blocks.{j}.{suffix}": t for j, t in enumerate(made)})
    return out


# ------------------------------------------------------------------------------------- sizes a space names

SIZE_AXES = ("depth", "width")
"""A sweep's size: ``depth`` blocks in every stage and ``width`` channels in stage 0, doubling per stage (as
ConvNeXt scales). The stage count (``stages``, default 2) is the bank's, like the stem patch: a size or the
task's I/O may name it, a bank serves one."""
STAGES = 2
DROP_REASONS = {
    "not_multiple_of_block": "a stage width is not a multiple of the bank's template block",
    "image_too_small": "the stem and the stages' downsampling leave no pixel of the image",
}


def _dims(width: int, stages: int) -> tuple[int, ...]:
    return tuple(width * 2**i for i in range(stages))


def check_size(size: dict, block: int | None = None) -> str | None:
    """Why a ConvNeXt of this size cannot be built (or tiled by ``block``-sided templates); None when it
    can. The image test needs ``img_size`` (and ``patch``) in ``size``; :func:`make_spec` always checks it."""
    stages = int(size.get("stages", STAGES))
    if "img_size" in size and min(_resolutions(size["img_size"], size.get("patch", 2), stages)) < 1:
        return "image_too_small"
    if block and any(c % block for c in _dims(size["width"], stages)):
        return "not_multiple_of_block"
    return None


def make_spec(size: dict, io: dict) -> ConvNeXtSpec:
    """A size (depth, width[, stages]) for a task's images: ``io`` gives in_chans, img_size, num_classes and
    the stem patch (default 2), optionally ``stages`` and ``kernel``."""
    stages = int(size.get("stages", io.get("stages", STAGES)))
    return ConvNeXtSpec(depths=(size["depth"],) * stages, dims=_dims(size["width"], stages),
                        kernel=io.get("kernel", 7), patch=io.get("patch", 2), img_size=io["img_size"],
                        in_chans=io["in_chans"], num_classes=io["num_classes"])


def spec_of_model(model: torch.nn.Module, img_size: int = 28) -> ConvNeXtSpec:
    """The spec of an ordinary timm ``ConvNeXt`` of this family (a ConvNeXt does not know its image size:
    ``img_size`` says it)."""
    try:
        stem = model.stem[0]
        return ConvNeXtSpec(
            depths=tuple(len(s.blocks) for s in model.stages),
            dims=tuple(s.blocks[0].conv_dw.out_channels for s in model.stages),
            kernel=model.stages[0].blocks[0].conv_dw.kernel_size[0], patch=stem.kernel_size[0],
            img_size=img_size, in_chans=stem.in_channels, num_classes=model.get_classifier().out_features)
    except (AttributeError, IndexError, TypeError) as e:
        raise ValueError(f"not a timm ConvNeXt ({type(model).__name__}: {e}); load it with "
                         "weit_core.io.load_model or pass its spec") from e


def size_of(spec: ConvNeXtSpec) -> dict:
    """The size (depth, width, stages, patch, kernel) of a spec whose stages share a depth and double widths."""
    size = {"depth": spec.depths[0], "width": spec.dims[0], "stages": spec.stages, "patch": spec.patch,
            "kernel": spec.kernel}
    if spec.depths != (size["depth"],) * spec.stages or spec.dims != _dims(size["width"], spec.stages):
        raise ValueError(f"ConvNeXt {spec.label} is not one depth for every stage and doubling widths; a size "
                         "(depth, width, stages) cannot name it")
    return size


CONVNEXT = register_family(Family(
    name="convnext", spec_type=ConvNeXtSpec, build=create_convnext, layout=convnext_layout, kinds=convnext_kinds,
    free_names=free_names, size_maps=size_maps, resize_grids=resize_grids, resize_free=resize_free,
    size_axes=SIZE_AXES, make_spec=make_spec, check_size=check_size, drop_reasons=DROP_REASONS,
    spec_of_model=spec_of_model, default_size={"depth": 4, "width": 32, "stages": 2, "patch": 2, "kernel": 7},
    size_of=size_of))  # default: docs/data/fmnist_convnext_ancestry.safetensors (88.2% on Fashion-MNIST)
