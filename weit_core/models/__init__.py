"""Architecture families in one registry (ViT, ConvNeXt; policy and diffusion transformers as they land):
``get_family(name)``, ``family_of(spec)``. Each family module ends with ``register_family``."""

from weit_core.models.convnext import CONVNEXT, ConvNeXtSpec, create_convnext
from weit_core.models.dit import DIT, DiTSpec, create_dit  # noqa: F401  (the diffusion transformer family)
from weit_core.models.family import Family, family_names, family_of, get_family, register_family
from weit_core.models.policy import POLICY, PolicySpec, create_policy  # noqa: F401  (the policy family)
from weit_core.models.templated import TemplatedModel
from weit_core.models.vit import (
    INIT_MODES,
    TIMM_MODEL,
    VIT,
    ViTSpec,
    count_templated,
    create_vit,
    vit_kinds,
    vit_layout,
)

__all__ = [
    "CONVNEXT", "INIT_MODES", "TIMM_MODEL", "VIT", "ConvNeXtSpec", "Family", "TemplatedModel", "ViTSpec",
    "count_templated", "create_convnext", "create_vit", "family_names", "family_of", "get_family",
    "register_family", "vit_kinds", "vit_layout",
]
