"""Init strategies on real data (digits): the registry, wave from a bank distilled in-process, the
controls, and the invariants of stage 2 (bank untouched, exact step budget)."""

from __future__ import annotations

import copy

import pytest
import torch

from weit_core.models import ViTSpec, create_vit, vit_kinds, vit_layout
from weit_core.strategies import available, init_model
from weit_core.templates import Scalers, TemplateBank
from weit_core.train import evaluate, fit_scalers, iterate_batches

TARGET = ViTSpec(depth=3, width=48, heads=3, patch=2, img_size=8)


def val_acc(model, digits) -> float:
    return evaluate(model, iterate_batches(digits.val.x, digits.val.y, 256, shuffle=False))["acc"]


def test_registry_lists_the_core_strategies_and_rejects_unknown():
    assert {"scratch", "scratch_fit", "wave", "wave_random_bank"} <= set(available())
    with pytest.raises(ValueError, match="unknown init strategy 'nope'.*scratch"):
        init_model("nope", TARGET)


def test_distilled_bank_learns(digits_ancestry, digits_bank):
    teacher_acc = digits_ancestry[1]
    _, _, aux_acc = digits_bank
    assert teacher_acc > 0.85, teacher_acc  # the ancestry has something to pass on
    assert aux_acc > 0.8, aux_acc  # a model built only from the bank


def test_wave_init_is_far_above_chance_before_any_stage3_step(digits, digits_bank):
    bank, aux, _ = digits_bank
    before = copy.deepcopy(bank.state_dict())
    fit = digits.train.subset(256, seed=0)
    res = init_model("wave", TARGET, bank=bank, aux_scalers=aux, fit_data=(fit.x, fit.y), fit_steps=100, seed=0)
    acc = val_acc(res.model, digits)
    assert acc > 0.5, acc  # chance is 0.1
    assert res.info["fit_steps"] == 100 and res.info["scaler_init"] == "resample"
    assert res.info["scaler_count"] > 0 and res.info["strategy"] == "wave" and res.info["init_seconds"] > 0
    for k, v in bank.state_dict().items():  # the shared bank is never modified by stage 2
        assert torch.equal(v, before[k]), k
    # the result is an ordinary timm model with an ordinary state_dict
    assert set(res.model.state_dict()) == set(create_vit(TARGET).state_dict())


def test_fit_scalers_trains_scalers_not_the_bank(digits, digits_bank):
    from weit_core.models import TemplatedModel
    from weit_core.templates import resample_scalers

    bank, aux, _ = digits_bank
    model = TemplatedModel(create_vit(TARGET), copy.deepcopy(bank), resample_scalers(aux, vit_layout(TARGET)))
    model.set_stage("fit")
    bank_before = copy.deepcopy(model.bank.state_dict())
    scalers_before = copy.deepcopy(model.scalers.state_dict())
    stats = fit_scalers(model, digits.train.x[:200], digits.train.y[:200], steps=7, batch_size=32)
    assert stats["steps"] == 7
    for k, v in model.bank.state_dict().items():
        assert torch.equal(v, bank_before[k]), k
    assert any(not torch.equal(v, scalers_before[k]) for k, v in model.scalers.state_dict().items())


def test_controls_run_with_the_same_budget(digits, digits_bank):
    bank, aux, _ = digits_bank
    fit = digits.train.subset(256, seed=0)
    common = dict(fit_data=(fit.x, fit.y), fit_steps=30, seed=1)
    sf = init_model("scratch_fit", TARGET, **common)
    rb = init_model("wave_random_bank", TARGET, bank=bank, aux_scalers=aux, **common)
    sc = init_model("scratch", TARGET, seed=1, init_mode="jax")
    assert sf.info["fit_steps"] == rb.info["fit_steps"] == 30
    assert rb.info["bank"] == "random" and sc.info["init_mode"] == "jax" and sc.info["fit_steps"] == 0
    # the random bank really is a different bank of the same shape
    assert rb.info["template_count"] == bank.num_numbers()
    # fitting helps: both fitted controls beat the untouched scratch model, by a margin
    untouched = val_acc(sc.model, digits)
    assert val_acc(sf.model, digits) > untouched + 0.05 and val_acc(rb.model, digits) > untouched + 0.05, untouched


def test_strategies_are_deterministic_under_a_seed(digits, digits_bank):
    bank, aux, _ = digits_bank
    fit = digits.train.subset(128, seed=0)
    a = init_model("wave", TARGET, bank=bank, aux_scalers=aux, fit_data=(fit.x, fit.y), fit_steps=5, seed=3)
    b = init_model("wave", TARGET, bank=bank, aux_scalers=aux, fit_data=(fit.x, fit.y), fit_steps=5, seed=3)
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k]), k


def test_wave_needs_its_sources():
    kinds = vit_kinds(TARGET, n=2, block=16)
    with pytest.raises(ValueError, match="needs fit_data"):
        init_model("wave", TARGET, bank=TemplateBank(kinds), aux_scalers=Scalers(vit_layout(TARGET), kinds))
    with pytest.raises(ValueError, match="aux scalers"):
        init_model("wave", TARGET, bank=TemplateBank(kinds), fit_steps=0)
    other = ViTSpec(depth=1, width=32, heads=2, patch=4, img_size=8)
    with pytest.raises(ValueError, match="kernel"):
        init_model("wave", TARGET, bank=TemplateBank(vit_kinds(other, 2, 16)), scaler_init="random", fit_steps=0)
