"""Every strategy's new task head comes from its own stream: a target built with the ancestry's own spec and
seed must not redraw the head the ancestry started training from (its trained features still fit that head,
which made weight selection look trained before any step)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import DIGITS_ANCESTRY
from weit_core.models import create_vit
from weit_core.strategies import init_model
from weit_core.train import evaluate, iterate_batches, seed_everything


def _val_acc(model, digits) -> float:
    return evaluate(model, iterate_batches(digits.val.x, digits.val.y, 256, shuffle=False))["acc"]


def test_weight_selection_at_the_ancestry_size_gets_a_truly_new_head(digits, digits_ancestry):
    ancestry, anc_acc = digits_ancestry
    seed_everything(0)  # how conftest built the ancestry: its first head came from this stream
    leaked = create_vit(DIGITS_ANCESTRY).head.weight.detach().clone()
    res = init_model("weight_selection", DIGITS_ANCESTRY, ancestry=ancestry, seed=0)
    head = res.model.head.weight.detach()
    assert not torch.equal(head, leaked)
    cos = F.cosine_similarity(head.flatten(), leaked.flatten(), dim=0).item()
    assert abs(cos) < 0.15, cos
    # the untrained new head leaves the ancestry's features at chance level, far below the ancestry
    assert anc_acc > 0.85 and _val_acc(res.model, digits) < 0.5

@pytest.mark.parametrize("strategy", ["scratch", "mimetic", "weight_selection", "tleg_fit"])
def test_strategies_draw_the_same_new_head_for_a_seed(digits_ancestry, strategy):
    """The head is no part of what a strategy inherits: for one seed every strategy starts from the same one."""
    ancestry, _ = digits_ancestry
    ref = init_model("scratch", DIGITS_ANCESTRY, seed=3).model.head.weight
    got = init_model(strategy, DIGITS_ANCESTRY, ancestry=ancestry, seed=3).model.head.weight
    other = init_model(strategy, DIGITS_ANCESTRY, ancestry=ancestry, seed=4).model.head.weight
    assert torch.equal(got, ref) and not torch.equal(got, other)
