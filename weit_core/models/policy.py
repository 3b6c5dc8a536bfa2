"""Policy targets: a transformer over the last few states (Decision-Transformer-like) that acts.

Each of the last ``context`` (normalized) states is a token: a linear state embedding plus a learned position
embedding, then timm ViT ``Block``s, a final norm, and the last token through the head: logits for discrete
actions, a tanh-squashed action in ``[-1, 1]`` for continuous ones (the environment's bounds are applied
outside, ``weit_core.control.envs.to_env_action``). The blocks are the ViT's, weight names included, so the
templated kinds (qkv, proj, fc1, fc2), their resize rules and every strategy that works through the family
registry apply unchanged; the state embedding and position table are free tensors on the residual axis.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.models.vision_transformer import Block
from torch import nn

from weit_core.models.family import Family, Spec, register_family
from weit_core.models.vit import (
    BLOCK_FREE_AXES,
    DROP_REASONS,
    GRID_AXES,
    HEAD_STREAM,
    PER_BLOCK_KINDS,
    SIZE_AXES,
    BlockRules,
    check_size,
)
from weit_core.resize import Axis
from weit_core.templates import KindSpec, LayerGroup, Layout

POLICY_KINDS = ("qkv", "proj", "fc1", "fc2")
DEFAULT_SIZE = {"depth": 2, "width": 64, "heads": 2, "mlp_ratio": 4.0}


@dataclass(frozen=True)
class PolicySpec(Spec):
    depth: int
    width: int
    heads: int
    mlp_ratio: float = 4.0
    obs_dim: int = 4
    num_classes: int = 2
    """Head outputs: the action count (discrete) or the action width (continuous); named as the other
    families name their head so strategies that check a teacher's head read it alike."""
    discrete: bool = True
    context: int = 4

    def __post_init__(self) -> None:
        if min(self.depth, self.width, self.heads, self.obs_dim, self.num_classes, self.context) < 1:
            raise ValueError(f"depth, width, heads, obs_dim, num_classes and context must be >= 1, got {self}")
        reason = check_size(self.to_dict())
        if reason:
            raise ValueError(f"policy size {self.label}: {DROP_REASONS[reason]}")

    @property
    def hidden(self) -> int:
        return round(self.width * self.mlp_ratio)

    @property
    def label(self) -> str:
        return f"{self.depth}x{self.width}x{self.heads}"

    def num_params(self) -> int:
        d, h = self.width, self.hidden
        per_block = 3 * d * d + 3 * d + d * d + d + h * d + h + d * h + d + 4 * d
        return self.obs_dim * d + d + self.context * d + self.depth * per_block + 2 * d + self.num_classes * (d + 1)

    def flops(self) -> int:
        """Forward multiply-adds x2 for one context (matmuls + attention scores)."""
        t, d, h = self.context, self.width, self.hidden
        block = t * (3 * d * d + d * d + 2 * d * h) + 2 * t * t * d
        return 2 * (t * self.obs_dim * d + self.depth * block + d * self.num_classes)


class TanhLinear(nn.Linear):
    """The continuous head: a linear map squashed to ``(-1, 1)``. The squashing lives in the head module (not
    in ``forward_head``), so whatever fits the head alone (stage 2's linear probe) fits what the policy acts by."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(super().forward(x))


class PolicyTransformer(nn.Module):
    """``forward(x)``: x is B x context x obs_dim, the oldest state first and the current one last."""

    def __init__(self, spec: PolicySpec) -> None:
        super().__init__()
        self.spec = spec
        d = spec.width
        self.state_embed = nn.Linear(spec.obs_dim, d)
        self.pos_embed = nn.Parameter(torch.zeros(1, spec.context, d))
        self.blocks = nn.Sequential(*(Block(d, spec.heads, spec.mlp_ratio, qkv_bias=True) for _ in range(spec.depth)))
        self.norm = nn.LayerNorm(d)
        self.head = (nn.Linear if spec.discrete else TanhLinear)(d, spec.num_classes)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """timm's ViT init: trunc-normal(0.02) linears with zero bias, position table trunc-normal(0.02)."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def get_classifier(self) -> nn.Module:
        return self.head

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.blocks(self.state_embed(x) + self.pos_embed))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x[:, -1]
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


INIT_MODES = ("",)


def create_policy(spec: PolicySpec, init_mode: str = "", head_seed: int | None = None) -> PolicyTransformer:
    """An ordinary policy (seed the RNG before calling); ``head_seed`` draws the head from its own stream."""
    if init_mode not in INIT_MODES:
        raise ValueError(f"unknown policy init mode {init_mode!r}; the policy family has {INIT_MODES}")
    model = PolicyTransformer(spec)
    if head_seed is not None:
        gen = torch.Generator().manual_seed(HEAD_STREAM + int(head_seed))
        with torch.no_grad():
            nn.init.trunc_normal_(model.head.weight, std=0.02, generator=gen)
            model.head.bias.zero_()
    return model


def policy_layout(spec: PolicySpec) -> Layout:
    """The ViT's block weights are the templated ones: qkv, proj, fc1, fc2 of every block."""
    d, h, L = spec.width, spec.hidden, range(spec.depth)
    return {
        "qkv": LayerGroup(tuple(f"blocks.{i}.attn.qkv.weight" for i in L), (3 * d, d)),
        "proj": LayerGroup(tuple(f"blocks.{i}.attn.proj.weight" for i in L), (d, d)),
        "fc1": LayerGroup(tuple(f"blocks.{i}.mlp.fc1.weight" for i in L), (h, d)),
        "fc2": LayerGroup(tuple(f"blocks.{i}.mlp.fc2.weight" for i in L), (d, h)),
    }


def policy_kinds(spec: PolicySpec, n: int = 4, block: int = 16) -> dict[str, KindSpec]:
    return {k: KindSpec(n, block, block) for k in POLICY_KINDS}


# ------------------------------------------------------------------------------------- sizes from sizes

E: tuple[Axis, ...] = ((0, "embed", 1),)
FREE_AXES: dict[str, tuple[Axis, ...]] = {
    "state_embed.weight": E, "state_embed.bias": E, "pos_embed": ((2, "embed", 1),), "norm.weight": E,
    "norm.bias": E, "head.weight": ((1, "embed", 1),), "head.bias": (),
}
"""Free tensors outside the blocks and the channel axis they sit on (the block ones are the ViT's)."""
HEAD = ("head.weight", "head.bias")
FIXED = ("obs_dim", "context", "discrete")
"""What a bank's reference and a target must share: the state width, the context length, the action kind."""


RULES = BlockRules("policy", FREE_AXES, BLOCK_FREE_AXES, HEAD, FIXED, GRID_AXES, PER_BLOCK_KINDS,
                   fix="make a bank for this environment and context")


# ------------------------------------------------------------------------------------- sizes a space names


def make_spec(size: dict, io: dict) -> PolicySpec:
    """A size (depth, width, heads, mlp_ratio) for a control task's data: ``io`` gives obs_dim, act_dim,
    discrete and context (``num_classes`` = act_dim for discrete actions)."""
    missing = [k for k in ("obs_dim", "act_dim", "discrete") if k not in io]
    if missing:
        raise ValueError(f"the policy family needs a control task's io ({missing} missing); got {sorted(io)}")
    outputs = io.get("num_classes", io["act_dim"]) if io["discrete"] else io["act_dim"]
    return PolicySpec(depth=size["depth"], width=size["width"], heads=size["heads"],
                      mlp_ratio=size.get("mlp_ratio", 4.0), obs_dim=int(io["obs_dim"]), num_classes=int(outputs),
                      discrete=bool(io["discrete"]), context=int(io.get("context", 4)))


def spec_of_model(model: nn.Module) -> PolicySpec:
    if not isinstance(model, PolicyTransformer):
        raise ValueError(f"not a weit PolicyTransformer ({type(model).__name__}); load it with "
                         "weit_core.io.load_model or pass its spec")
    return model.spec


POLICY = register_family(Family(
    name="policy", spec_type=PolicySpec, build=create_policy, layout=policy_layout, kinds=policy_kinds,
    free_names=RULES.free_names, size_maps=RULES.size_maps, resize_grids=RULES.resize_grids,
    resize_free=RULES.resize_free, size_axes=SIZE_AXES, make_spec=make_spec, check_size=check_size, drop_reasons=DROP_REASONS,
    spec_of_model=spec_of_model, default_size=DEFAULT_SIZE))
