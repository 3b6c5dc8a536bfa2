"""Any ``nn.Module`` whose templated weights come from a bank and scalers in the forward pass.

The templated parameters are removed from the wrapped model, so ``parameters()`` holds exactly what is
trained: bank + scalers + free parameters (biases, norms, embeddings, head). Stage 1 trains all of them;
stage 2 freezes the bank. ``materialize_into`` turns the result into an ordinary model.
"""

from __future__ import annotations

import torch
from torch import nn

from weit_core.templates import Layout, Scalers, TemplateBank, materialize


def _owner(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return (root.get_submodule(path) if path else root), attr


class TemplatedModel(nn.Module):
    """Wraps ``base`` so that the weights named in ``scalers.layout`` are ``materialize(bank, scalers)``."""

    def __init__(self, base: nn.Module, bank: TemplateBank, scalers: Scalers) -> None:
        super().__init__()
        self.base, self.bank, self.scalers = base, bank, scalers
        params = dict(base.named_parameters())
        for group in scalers.layout.values():
            for name in group.names:
                if name not in params:
                    raise ValueError(f"layout names {name!r}, which the model does not have")
                if tuple(params[name].shape) != group.shape:
                    raise ValueError(
                        f"{name}: model weight is {tuple(params[name].shape)}, layout says {group.shape}"
                    )
                module, attr = _owner(base, name)
                del module._parameters[attr]
        self._install(self.weights(), detach=True)

    @property
    def layout(self) -> Layout:
        return self.scalers.layout

    def weights(self) -> dict[str, torch.Tensor]:
        return materialize(self.bank, self.scalers)

    def _install(self, weights: dict[str, torch.Tensor], detach: bool = False) -> None:
        for name, w in weights.items():
            module, attr = _owner(self.base, name)
            setattr(module, attr, w.detach() if detach else w)

    def free_parameters(self) -> dict[str, nn.Parameter]:
        return dict(self.base.named_parameters())

    def forward(self, *args, **kwargs):
        self._install(self.weights())
        return self.base(*args, **kwargs)

    @torch.no_grad()
    def materialize_into(self, model: nn.Module) -> nn.Module:
        """Write plain weights (materialized + free) into an ordinary model of the same architecture."""
        state = {k: v.detach().clone() for k, v in self.base.state_dict().items()}
        state.update({k: v.detach().clone() for k, v in self.weights().items()})
        model.load_state_dict(state, strict=True)
        return model

    def set_stage(self, stage: str) -> None:
        """``pretrain``: everything trains (stage 1); ``fit``: bank frozen, scalers + free params train."""
        if stage not in ("pretrain", "fit"):
            raise ValueError(f"unknown stage {stage!r}; use 'pretrain' or 'fit'")
        self.bank.requires_grad_(stage == "pretrain")
        self.scalers.requires_grad_(True)
        self.base.requires_grad_(True)
