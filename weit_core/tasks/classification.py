"""Image classification: cross-entropy, accuracy (higher is better), KL(teacher || student)·τ² to a teacher."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from weit_core.tasks import Task, register


def _correct(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return (outputs.argmax(-1) == targets).sum()


def _kl(outputs: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    return F.kl_div(F.log_softmax(outputs / tau, -1), F.log_softmax(teacher / tau, -1), log_target=True,
                    reduction="batchmean") * tau**2


def _agree(outputs: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return (outputs.argmax(-1) == teacher.argmax(-1)).sum()


CLASSIFICATION = register(Task("classification", F.cross_entropy, _correct, metric="acc", mode="max",
                               distill_loss=_kl, agreement=_agree))
