"""Target architectures built from a size spec (ViT today; CNN and policy transformers later)."""

from weit_core.models.templated import TemplatedModel
from weit_core.models.vit import (
    INIT_MODES,
    TIMM_MODEL,
    ViTSpec,
    count_templated,
    create_vit,
    vit_kinds,
    vit_layout,
)

__all__ = [
    "INIT_MODES", "TIMM_MODEL", "TemplatedModel", "ViTSpec", "count_templated", "create_vit", "vit_kinds",
    "vit_layout",
]
