"""The ConvNeXt family: timm's ConvNeXt at any stage depths and widths, one bank for every stage width, wave
and its controls through the registry, the Weight Selection paper's ConvNeXt rule, and the sizes it drops."""

from __future__ import annotations

import pytest
import torch

from weit_core.models import CONVNEXT, ConvNeXtSpec, TemplatedModel, family_of
from weit_core.models.elastic import AtSize
from weit_core.stage1 import build_elastic, make_bank, save_elastic
from weit_core.strategies import can_make, init_model, strategy_info
from weit_core.templates import Scalers, TemplateBank, materialize
from weit_core.train import evaluate, fit, iterate_batches, make_optimizer, seed_everything

DIGITS = {"in_chans": 1, "img_size": 8, "num_classes": 10, "patch": 1}
REF = CONVNEXT.make_spec({"depth": 2, "width": 32}, DIGITS)  # depths 2-2, widths 32-64
RANGE = [CONVNEXT.make_spec({"depth": d, "width": w}, DIGITS) for d in (1, 2) for w in (16, 32)]


def accuracy(model: torch.nn.Module, data) -> float:
    return evaluate(model, iterate_batches(data.test.x, data.test.y, 256, shuffle=False))["acc"]


@pytest.fixture(scope="module")
def convnext_pair(digits, tmp_path_factory):
    """A ConvNeXt ancestry trained on digits and a WAVE bank distilled from it over depths 1-2 x widths 16-32."""
    from weit_core.io import load_bank

    seed_everything(0)
    ancestry = CONVNEXT.build(REF)
    x, y = digits.train.x, digits.train.y
    fit(ancestry, lambda ep: iterate_batches(x, y, 64, seed=ep), make_optimizer(ancestry, 3e-3), epochs=8)
    elastic = build_elastic(CONVNEXT, REF, n=8, block=16, seed=1)  # templates want a higher LR than weights
    make_bank(elastic, x, y, sizes=RANGE, teacher=ancestry.eval(), epochs=10, lr=1e-2, batch_size=64, seed=1)
    path = save_elastic(tmp_path_factory.mktemp("cnx") / "bank.safetensors", elastic, {}, RANGE)
    return ancestry, elastic, load_bank(path)


@pytest.mark.parametrize("spec", [
    ConvNeXtSpec((2, 2), (16, 32), patch=2),  # 28 -> 14 (stem) -> 7 -> 3: stage 0 downsamples after a patch-2 stem
    ConvNeXtSpec((1, 3, 1), (16, 32, 64), patch=2),  # three stages: 7 -> 3 -> 1
    ConvNeXtSpec((2,), (48,), patch=4),  # one stage, no downsampling at all
    ConvNeXtSpec((1, 2), (16, 32), patch=1, img_size=8),  # digits: 8 -> 8 -> 4
])
def test_any_stage_depths_and_widths_build_as_timm_convnext(spec):
    model = CONVNEXT.build(spec, head_seed=0)
    assert type(model).__name__ == "ConvNeXt" and family_of(spec) is CONVNEXT
    assert [len(s.blocks) for s in model.stages] == list(spec.depths)
    assert sum(p.numel() for p in model.parameters()) == spec.num_params()
    x = torch.randn(3, spec.in_chans, spec.img_size, spec.img_size)
    feats = model.forward_features(x)
    assert feats.shape == (3, spec.dims[-1], spec.resolutions()[-1], spec.resolutions()[-1])
    assert model(x).shape == (3, spec.num_classes)
    assert CONVNEXT.spec_from_dict(spec.to_dict()) == spec
    assert CONVNEXT.spec_of_model(model, img_size=spec.img_size) == spec
    # every templated name is a parameter of that shape, and templated + free names are all the parameters
    params = dict(model.named_parameters())
    layout = CONVNEXT.layout(spec)
    templated = {n for g in layout.values() for n in g.names}
    assert all(tuple(params[n].shape) == g.shape for g in layout.values() for n in g.names)
    assert templated | set(CONVNEXT.free_names(spec, head=True)) == set(params)
    assert ("down@0" in layout) == (spec.patch == 2)


def test_one_bank_tiles_every_stage_width():
    """One bank (one fc1 kind) serves stage widths 16..192: every stage's fc1 layers are scaler-weighted
    sums of the same templates, block by block."""
    assert set(CONVNEXT.kinds(REF)) == {"stem", "dw", "fc1", "fc2", "down"}
    assert set(CONVNEXT.kinds(ConvNeXtSpec((2,), (48,), patch=4))) == {"stem", "dw", "fc1", "fc2"}  # nothing downsamples
    for width in (16, 32, 48):
        spec = ConvNeXtSpec((1, 2), (width, 2 * width), patch=2)
        bank = TemplateBank(CONVNEXT.kinds(spec, n=3, block=16))
        scalers = Scalers(CONVNEXT.layout(spec), bank.kinds)
        weights = materialize(bank, scalers)
        for stage, c in enumerate(spec.dims):
            w = weights[f"stages.{stage}.blocks.0.mlp.fc1.weight"]
            s, t = scalers.grids[f"fc1@{stage}"][0], bank.templates["fc1"]
            assert w.shape == (4 * c, c) and s.shape == (3, 4 * c // 16, c // 16)
            by_hand = sum(torch.kron(s[k], t[k]) for k in range(3))
            torch.testing.assert_close(w, by_hand)
            dw = weights[f"stages.{stage}.blocks.0.conv_dw.weight"]  # each channel mixes one kernel basis
            torch.testing.assert_close(dw[5, 0], torch.einsum("k,kij->ij", scalers.grids[f"dw@{stage}"][0, :, 5, 0],
                                                              bank.templates["dw"][:, 0, 0]))
    # a model of any width is a TemplatedModel over the one bank
    model = TemplatedModel(CONVNEXT.build(spec), bank, scalers)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_sizes_it_cannot_build_are_dropped_with_a_reason():
    assert CONVNEXT.check_size({"depth": 2, "width": 24}, 16) == "not_multiple_of_block"
    assert CONVNEXT.check_size({"depth": 2, "width": 24}, None) is None
    assert CONVNEXT.check_size({"depth": 1, "width": 16, "stages": 3, "img_size": 8, "patch": 2}, 16) == "image_too_small"
    assert set(CONVNEXT.drop_reasons) >= {"not_multiple_of_block", "image_too_small"}
    with pytest.raises(ValueError, match="no pixel left"):
        CONVNEXT.make_spec({"depth": 1, "width": 16, "stages": 3}, {**DIGITS, "patch": 2})


def test_strategies_declare_their_families():
    small = RANGE[0]
    for name in ("net2net", "tleg_fit", "mimetic", "weight_selection_head_aware"):
        assert not strategy_info(name).supports("convnext")
        assert can_make(name, small, ancestry_spec=REF) == "family_not_supported"
    with pytest.raises(ValueError, match="not 'convnext'"):
        init_model("mimetic", small)
    for name in ("wave", "wave_random_bank", "scratch", "scratch_fit", "weight_selection"):
        assert strategy_info(name).supports("convnext") and can_make(name, small, ancestry_spec=REF) is None
    assert can_make("weight_selection", CONVNEXT.make_spec({"depth": 3, "width": 16}, DIGITS),
                    ancestry_spec=REF) == "larger_than_ancestry"
    from weit_core.models import ViTSpec

    assert can_make("weight_selection", small, ancestry_spec=ViTSpec(2, 32, 2)) == "ancestry_family_differs"


def test_weight_selection_reproduces_the_parent_and_selects_per_stage(convnext_pair, digits):
    ancestry, _, _ = convnext_pair
    x = digits.val.x[:32]
    same = init_model("weight_selection", REF, ancestry=ancestry, ancestry_spec=REF).model.eval()
    torch.testing.assert_close(same.forward_features(x), ancestry.eval().forward_features(x))
    # depths 1-1, widths 16-32 from 2-2 x 32-64: first block of each stage, every second channel and MLP unit
    small = CONVNEXT.make_spec({"depth": 1, "width": 16}, DIGITS)
    got = init_model("weight_selection", small, ancestry=ancestry, ancestry_spec=REF).model.state_dict()
    src = ancestry.state_dict()
    e1, h1, e0 = torch.arange(32) * 2, torch.arange(128) * 2, torch.arange(16) * 2
    torch.testing.assert_close(got["stages.1.blocks.0.mlp.fc1.weight"], src["stages.1.blocks.0.mlp.fc1.weight"][h1][:, e1])
    torch.testing.assert_close(got["stages.1.downsample.1.weight"], src["stages.1.downsample.1.weight"][e1][:, e0])
    torch.testing.assert_close(got["stages.1.downsample.0.weight"], src["stages.1.downsample.0.weight"][e0])
    torch.testing.assert_close(got["stages.0.blocks.0.conv_dw.weight"], src["stages.0.blocks.0.conv_dw.weight"][e0])
    torch.testing.assert_close(got["norm_pre.bias"], src["norm_pre.bias"][e1])
    assert not torch.equal(got["head.fc.weight"], src["head.fc.weight"][:, e1])  # the classifier is new


def test_wave_is_the_aux_model_and_inherits_what_stage1_learned(convnext_pair, digits):
    """At the aux's own size wave computes the aux's features exactly; at a smaller size of the range it is
    that size of the aux (nested rule); after the same stage 2 it beats the same pipeline on a random bank."""
    ancestry, elastic, bank = convnext_pair
    x = digits.val.x[:64]
    for spec in (REF, RANGE[0]):
        model = init_model("wave", spec, bank=bank, fit_steps=0, seed=0)
        assert model.info["in_stage1_range"] and model.info["free_params"] == "bank"
        aux = CONVNEXT.build(spec)
        aux.load_state_dict({k: v.detach() for k, v in elastic.state_for(spec).items()})
        with torch.no_grad():
            torch.testing.assert_close(model.model.eval().forward_features(x), aux.eval().forward_features(x))
    aux_acc = accuracy(AtSize(elastic, RANGE[0]), digits)
    assert aux_acc > 0.7, aux_acc
    fit_data = (digits.train.x[:256], digits.train.y[:256])
    accs = {name: accuracy(init_model(name, RANGE[0], bank=bank, fit_data=fit_data, fit_steps=50, seed=0).model,
                           digits) for name in ("wave", "wave_random_bank", "scratch_fit")}
    assert accs["wave"] > 0.7 and accs["wave"] > max(accs["wave_random_bank"], accs["scratch_fit"]) + 0.1, accs
