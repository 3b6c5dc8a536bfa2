"""A task's loss and metric behind one small interface, so the loop never assumes images or labels."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Task:
    """``loss(outputs, targets)`` is a mean; ``score(outputs, targets)`` a *sum* over the batch, so that
    averages over uneven batches and data-parallel shards stay exact."""

    name: str
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    metric: str = "acc"


def _correct(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return (outputs.argmax(-1) == targets).sum()


CLASSIFICATION = Task("classification", F.cross_entropy, _correct, "acc")
