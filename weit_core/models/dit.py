"""Diffusion transformer (DiT) targets: a class-conditional denoiser of images built from patches.

In the spirit of Peebles & Xie's reference code (embedders, block, final layer, model), written anew: the image
is cut into patches (a strided conv, as the ViT's), a learned position table is added, and ``depth`` blocks of
attention + MLP are steered by adaLN-Zero: the sum of a timestep and a class embedding gives each block the
shift, scale and gate of its two sub-layers (``adaLN_modulation``: SiLU then one ``width -> 6 width`` linear).
The final layer modulates a last norm the same way and projects each token back to a patch of pixels.

What weit adds: the blocks' matrices carry the ViT's names and kinds (qkv, proj, fc1, fc2, and the patch
projection), so a bank's templates seed classifier and generator blocks alike; the modulation matrix is a
kind of its own (``adaln``: rows are six runs of the residual channels). Everything else is a free tensor on
the residual axis, with its resize rule, so ``wave`` builds any size from a bank. The position table is
learned (initialised to DiT's fixed 2-D sin-cos) so that it is a parameter a bank carries and resizes like
the ViT's. The class table (one row per class plus the null class of classifier-free guidance) is the task's
"head": new for every target, drawn from ``HEAD_STREAM + seed``, never carried by a bank.

Built from scratch the model starts as adaLN-Zero prescribes: every modulation and the final projection are
zero, so each block starts as the identity and the model's first output is zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from timm.layers import Mlp
from timm.models.vision_transformer import Attention
from torch import nn

from weit_core.models import vit
from weit_core.models.family import Family, Spec, register_family
from weit_core.resize import Axis
from weit_core.templates import KindSpec, LayerGroup, Layout

INIT_MODES = ("",)
"""One init: DiT's (xavier-uniform linears, N(0, 0.02) embeddings, zero modulations and final projection)."""
FREQ_DIM = 256
"""Width of the sinusoidal timestep features the timestep MLP reads (DiT's)."""
T_SCALE = 1000.0
"""Timesteps arrive in [0, 1] (a flow's time, or a DDPM step / T); the sinusoid sees ``1000 t``, the range
DiT's integer steps span, so its frequencies resolve the schedule as they do there."""
DEFAULT_SIZE = {"depth": 4, "width": 128, "heads": 4, "mlp_ratio": 4.0, "patch": 4}


class UnpatchifiableError(ValueError):
    """The patch does not tile the image."""


@dataclass(frozen=True)
class DiTSpec(Spec):
    depth: int
    width: int
    heads: int
    mlp_ratio: float = 4.0
    patch: int = 4
    img_size: int = 28
    in_chans: int = 1
    num_classes: int = 10
    """Conditioning classes; the class table has one more row, the null class (no label)."""

    def __post_init__(self) -> None:
        if min(self.depth, self.width, self.heads, self.patch, self.img_size, self.in_chans) < 1:
            raise ValueError(f"depth, width, heads, patch, img_size and in_chans must be >= 1, got {self}")
        if self.img_size % self.patch:
            raise UnpatchifiableError(f"DiT patch {self.patch} does not divide image size {self.img_size}; pick a "
                                      f"patch from {[p for p in range(1, self.img_size + 1) if self.img_size % p == 0]}")
        reason = check_size(self.to_dict())
        if reason:
            raise ValueError(f"DiT size {self.label}: {DROP_REASONS[reason]}")

    @property
    def hidden(self) -> int:
        return round(self.width * self.mlp_ratio)

    @property
    def label(self) -> str:
        return f"{self.depth}x{self.width}x{self.heads}"

    @property
    def tokens(self) -> int:
        return (self.img_size // self.patch) ** 2

    @property
    def patch_pixels(self) -> int:
        return self.patch**2 * self.in_chans

    def num_params(self) -> int:
        d, h, t, pp = self.width, self.hidden, self.tokens, self.patch_pixels
        block = (3 * d * d + 3 * d) + (d * d + d) + (h * d + h) + (d * h + d) + (6 * d * d + 6 * d)
        return (pp * d + d + t * d + FREQ_DIM * d + d + d * d + d + (self.num_classes + 1) * d
                + self.depth * block + (2 * d * d + 2 * d) + (d * pp + pp))

    def flops(self) -> int:
        """Forward multiply-adds x2 for one image at one timestep (matmuls and attention scores)."""
        t, d, h, pp = self.tokens, self.width, self.hidden, self.patch_pixels
        block = t * (3 * d * d + d * d + 2 * d * h) + 2 * t * t * d + 6 * d * d
        return 2 * (t * d * pp + FREQ_DIM * d + d * d + self.depth * block + 2 * d * d + t * d * pp)


# ----------------------------------------------------------------------------------------------- embedders


def sincos_table(width: int, grid: int) -> torch.Tensor:
    """DiT's fixed 2-D sin-cos position table, ``(grid², width)``: half the channels code the row, half the
    column, each as sines then cosines of geometric frequencies."""

    def one_axis(dim: int, pos: torch.Tensor) -> torch.Tensor:
        half = dim // 2
        omega = 1.0 / 10000 ** (torch.arange(half, dtype=torch.float64) / max(half, 1))
        out = pos[:, None] * omega[None]
        return torch.cat([out.sin(), out.cos(), torch.zeros(len(pos), dim - 2 * half, dtype=torch.float64)], 1)

    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                                indexing="ij")
    return torch.cat([one_axis(width // 2, rows.flatten()), one_axis(width - width // 2, cols.flatten())], 1).float()


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch x patch`` patches -> tokens (a strided conv, named as timm's)."""

    def __init__(self, patch: int, in_chans: int, width: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, width, patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of ``T_SCALE * t`` through a two-layer SiLU MLP."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FREQ_DIM, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = FREQ_DIM // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = (T_SCALE * t.float())[:, None] * freqs[None]
        return self.mlp(torch.cat([args.cos(), args.sin()], -1).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """One row per class plus the null class (row ``num_classes``); a label < 0 means no label."""

    def __init__(self, num_classes: int, width: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, width)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(torch.where(y < 0, torch.full_like(y, self.num_classes), y))


# ------------------------------------------------------------------------------------------------- block


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """Attention and MLP, each on an affine-free norm modulated by the condition and gated back in."""

    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, num_heads=heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(width, round(width * mlp_ratio), act_layer=lambda: nn.GELU(approximate="tanh"))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


# ------------------------------------------------------------------------------------------- final layer


class FinalLayer(nn.Module):
    """The last norm, modulated by the condition, projected to each token's patch of pixels."""

    def __init__(self, width: int, patch_pixels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, patch_pixels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


# ------------------------------------------------------------------------------------------------- model


class DiT(nn.Module):
    """``forward(x, t, y)``: noisy images N×C×H×W, timesteps N in [0, 1], labels N (< 0: no label) ->
    N×C×H×W (what the task trains it to predict: noise, velocity...)."""

    def __init__(self, spec: DiTSpec) -> None:
        super().__init__()
        self.spec = spec
        d = spec.width
        self.x_embedder = PatchEmbed(spec.patch, spec.in_chans, d)
        self.pos_embed = nn.Parameter(torch.zeros(1, spec.tokens, d))
        self.t_embedder = TimestepEmbedder(d)
        self.y_embedder = LabelEmbedder(spec.num_classes, d)
        self.blocks = nn.ModuleList(DiTBlock(d, spec.heads, spec.mlp_ratio) for _ in range(spec.depth))
        self.final_layer = FinalLayer(d, spec.patch_pixels)

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """DiT's init: xavier-uniform linears (and patch conv), zero biases, N(0, 0.02) class table and
        timestep MLP, sin-cos positions; then adaLN-Zero (modulations and final projection zero)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        self.pos_embed.copy_(sincos_table(self.spec.width, self.spec.img_size // self.spec.patch)[None])
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for layer in [b.adaLN_modulation[1] for b in self.blocks] + [self.final_layer.adaLN_modulation[1],
                                                                      self.final_layer.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def get_classifier(self) -> nn.Module:
        """The task-specific part a strategy leaves new (as a classifier's head): the class table."""
        return self.y_embedder

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        s = self.spec
        g, p, c = s.img_size // s.patch, s.patch, s.in_chans
        return x.reshape(len(x), g, g, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(len(x), c, g * p, g * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if y is None:
            y = torch.full((len(x),), -1, dtype=torch.long, device=x.device)
        c = self.t_embedder(t) + self.y_embedder(y)
        h = self.x_embedder(x) + self.pos_embed
        for block in self.blocks:
            h = block(h, c)
        return self.unpatchify(self.final_layer(h, c))


def create_dit(spec: DiTSpec, init_mode: str = "", head_seed: int | None = None) -> DiT:
    """An ordinary DiT with DiT's init (seed the RNG before calling). ``head_seed``: draw the class table from
    its own stream ``HEAD_STREAM + seed`` (N(0, 0.02)), as every strategy draws the head it leaves new."""
    if init_mode not in INIT_MODES:
        raise ValueError(f"unknown DiT init mode {init_mode!r}; choose one of {INIT_MODES}")
    model = DiT(spec)
    model.initialize_weights()
    if head_seed is not None:
        gen = torch.Generator().manual_seed(vit.HEAD_STREAM + int(head_seed))
        with torch.no_grad():
            model.y_embedder.embedding_table.weight.normal_(0, 0.02, generator=gen)
    return model


# ------------------------------------------------------------------------------------- templated layout


def dit_layout(spec: DiTSpec) -> Layout:
    """Templated: the patch projection and each block's qkv, proj, fc1, fc2 (the ViT's kinds) and adaLN
    modulation matrix (``6 width x width``)."""
    d, h, b = spec.width, spec.hidden, [f"blocks.{i}" for i in range(spec.depth)]
    return {
        "patch": LayerGroup(("x_embedder.proj.weight",), (d, spec.in_chans, spec.patch, spec.patch)),
        "qkv": LayerGroup(tuple(f"{n}.attn.qkv.weight" for n in b), (3 * d, d)),
        "proj": LayerGroup(tuple(f"{n}.attn.proj.weight" for n in b), (d, d)),
        "fc1": LayerGroup(tuple(f"{n}.mlp.fc1.weight" for n in b), (h, d)),
        "fc2": LayerGroup(tuple(f"{n}.mlp.fc2.weight" for n in b), (d, h)),
        "adaln": LayerGroup(tuple(f"{n}.adaLN_modulation.1.weight" for n in b), (6 * d, d)),
    }


def dit_kinds(spec: DiTSpec, n: int = 4, block: int = 16) -> dict[str, KindSpec]:
    """The ViT's kinds for this patch and channel count, plus ``adaln`` (``block x block`` templates)."""
    return {**vit.vit_kinds(spec, n, block), "adaln": KindSpec(n, block, block)}


# ------------------------------------------------------------------------------------- sizes from sizes

E: tuple[Axis, ...] = ((0, "embed", 1),)
GRID_AXES: dict[str, tuple[Axis, ...]] = {**vit.GRID_AXES, "adaln": ((0, "embed", 6), (1, "embed", 1))}
PER_BLOCK_KINDS = vit.PER_BLOCK_KINDS | {"adaln"}
FREE_AXES: dict[str, tuple[Axis, ...]] = {
    "x_embedder.proj.bias": E, "pos_embed": ((2, "embed", 1),), "t_embedder.mlp.0.weight": E,
    "t_embedder.mlp.0.bias": E, "t_embedder.mlp.2.weight": ((0, "embed", 1), (1, "embed", 1)), "t_embedder.mlp.2.bias": E,
    "final_layer.adaLN_modulation.1.weight": ((0, "embed", 2), (1, "embed", 1)),
    "final_layer.adaLN_modulation.1.bias": ((0, "embed", 2),),
    "final_layer.linear.weight": ((1, "embed", 1),), "final_layer.linear.bias": (),
    "y_embedder.embedding_table.weight": ((1, "embed", 1),),
}
BLOCK_FREE_AXES: dict[str, tuple[Axis, ...]] = {
    **{k: v for k, v in vit.BLOCK_FREE_AXES.items() if not k.startswith("norm")},  # DiT's norms have no affine
    "adaLN_modulation.1.bias": ((0, "embed", 6),),
}
HEAD = ("y_embedder.embedding_table.weight",)
FIXED = ("patch", "img_size", "in_chans")
"""What a bank's reference and a target must share (the patch templates' kernel, the position grid)."""


RULES = vit.BlockRules("DiT", FREE_AXES, BLOCK_FREE_AXES, HEAD, FIXED, GRID_AXES, PER_BLOCK_KINDS)


# ------------------------------------------------------------------------------------- sizes a space names

SIZE_AXES = ("depth", "width", "heads", "mlp_ratio")
DROP_REASONS = {
    "heads_not_dividing_width": "heads do not divide width",
    "mlp_hidden_not_integer": "width x mlp_ratio is not an integer",
    "patch_not_dividing_image": "the patch does not divide the image size",
    "not_multiple_of_block": "width or MLP hidden size is not a multiple of the bank's template block",
}


def check_size(size: dict, block: int | None = None) -> str | None:
    """Why a DiT of this size cannot be built (or tiled by ``block``-sized templates); None when it can. The
    patch test needs ``img_size`` in ``size`` (:func:`make_spec` always checks it)."""
    w, h, r = size["width"], size["heads"], size.get("mlp_ratio", 4.0)
    if w % h:
        return "heads_not_dividing_width"
    hidden = w * r
    if abs(hidden - round(hidden)) > 1e-9:
        return "mlp_hidden_not_integer"
    if "img_size" in size and size["img_size"] % size.get("patch", DEFAULT_SIZE["patch"]):
        return "patch_not_dividing_image"
    if block and (w % block or round(hidden) % block):
        return "not_multiple_of_block"
    return None


def make_spec(size: dict, io: dict) -> DiTSpec:
    """A size (depth, width, heads, mlp_ratio[, patch]) for a task's images: ``io`` gives in_chans, img_size,
    num_classes (and the patch, when the size does not)."""
    img = io["img_size"]
    if isinstance(img, (list, tuple)):
        raise ValueError(f"images are {img[0]}x{img[1]}; the DiT family needs square images")
    return DiTSpec(depth=size["depth"], width=size["width"], heads=size["heads"],
                   mlp_ratio=size.get("mlp_ratio", 4.0), patch=size.get("patch", io.get("patch", DEFAULT_SIZE["patch"])),
                   img_size=int(img), in_chans=io["in_chans"], num_classes=io["num_classes"])


def spec_of_model(model: nn.Module) -> DiTSpec:
    if not isinstance(model, DiT):
        raise ValueError(f"not a weit DiT ({type(model).__name__}); load it with weit_core.io.load_model or "
                         "pass its spec")
    return model.spec


DIT = register_family(Family(
    name="dit", spec_type=DiTSpec, build=create_dit, layout=dit_layout, kinds=dit_kinds, free_names=RULES.free_names,
    size_maps=RULES.size_maps, resize_grids=RULES.resize_grids, resize_free=RULES.resize_free, size_axes=SIZE_AXES,
    make_spec=make_spec, check_size=check_size, drop_reasons=DROP_REASONS, spec_of_model=spec_of_model,
    default_size=DEFAULT_SIZE))
