"""An architecture family: the one place that knows a family's shapes.

A family builds an ordinary model from a size spec, says which weights are templated (layout, bank kinds),
and how a reference size's scalers and free tensors become another size's (the resize rule stage 1 trains
through and stage 2 starts from). Strategies, stage 1 and the pipelines ask the family, never the model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from weit_core.resize import SizeMaps
from weit_core.templates import KindSpec, Layout


@dataclass(frozen=True)
class Family:
    name: str
    spec_type: type
    build: Callable[..., nn.Module]
    """``build(spec, init_mode="", head_seed=None)``: an ordinary model."""
    layout: Callable[[Any], Layout]
    kinds: Callable[..., dict[str, KindSpec]]
    """``kinds(spec, n, block)``: the bank kinds this family's templated weights need."""
    free_names: Callable[..., list[str]]
    """``free_names(spec, head=False)``: the non-templated parameters a bank carries."""
    size_maps: Callable[..., SizeMaps]
    """``size_maps(src, dst, block, width_rule, depth_rule)``."""
    resize_grids: Callable[[dict[str, torch.Tensor], SizeMaps], dict[str, torch.Tensor]]
    resize_free: Callable[..., dict[str, torch.Tensor]]
    """``resize_free(free, src, maps, head=False)``."""

    def spec_from_dict(self, d: dict) -> Any:
        return self.spec_type.from_dict(d)
