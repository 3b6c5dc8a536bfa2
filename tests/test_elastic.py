"""The resize rule, the size-aware auxiliary model and full inheritance, on real tensors and real data.

A size made from the reference by the ``nested`` rule must be an exact sub-model of it (every tensor that
reads or writes a residual channel agrees on which channel it is); stage 2 must start from exactly what
stage 1 trained for that size; banks round-trip through safetensors; old banks still load."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import DIGITS_ANCESTRY
from weit_core.io import load_bank
from weit_core.models.vit import VIT, ViTSpec
from weit_core.resize import apply_axis, axis_map, is_selection
from weit_core.stage1 import build_elastic, load_elastic, make_bank, save_elastic
from weit_core.strategies import init_model
from weit_core.train import evaluate, iterate_batches

REF = ViTSpec(depth=3, width=48, heads=3, patch=2, img_size=8)
RANGE = [ViTSpec(depth=d, width=w, heads=w // 16, patch=2, img_size=8) for d in (1, 2, 3) for w in (16, 32, 48)]


def acc(model, split) -> float:
    return evaluate(model, iterate_batches(split.x, split.y, 256, shuffle=False))["acc"]


@pytest.fixture(scope="module")
def digits_elastic(digits, digits_ancestry):
    """A size-aware bank on digits: reference 2x32x2 (the ancestry's size), range depth 1-2 x width 16-32,
    distilled from the digits ancestry with the sandwich rule (~20 s)."""
    teacher, _ = digits_ancestry
    sizes = [ViTSpec(depth=d, width=w, heads=w // 16, patch=2, img_size=8) for d in (1, 2) for w in (16, 32)]
    el = build_elastic(VIT, DIGITS_ANCESTRY, n=4, block=16, seed=1)
    make_bank(el, digits.train.x, digits.train.y, sizes=sizes, teacher=teacher, epochs=25, lr=3e-3,
              batch_size=64, warmup_epochs=1, seed=1)
    return el.eval(), sizes


# ------------------------------------------------------------------------------------------ the rule


def test_axis_maps():
    assert torch.equal(axis_map(4, 2, "nested"), torch.eye(4)[:2])
    assert torch.equal(axis_map(5, 3, "spread"), torch.eye(5)[[0, 2, 4]])
    grow = axis_map(2, 3, "nested")  # growth is interpolation under every rule
    assert torch.allclose(grow, torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]))
    assert is_selection(axis_map(6, 4, "nested")) and not is_selection(grow)
    assert torch.equal(axis_map(3, 3, "interp"), torch.eye(3))
    with pytest.raises(ValueError, match="unknown resize rule"):
        axis_map(3, 2, "nearest")
    # a map applies to every section of an axis alike (qkv rows are q, k, v runs)
    t = torch.arange(12.0).reshape(12, 1)  # 3 sections x 2 blocks x 2 channels
    out = apply_axis(t, 0, axis_map(2, 1, "nested"), sections=3, unit=2)
    assert out.flatten().tolist() == [0, 1, 4, 5, 8, 9]


def test_a_nested_size_is_an_exact_sub_model_of_the_reference():
    el = build_elastic(VIT, REF, n=4, block=16, seed=0)
    small = ViTSpec(depth=2, width=32, heads=2, patch=2, img_size=8)
    big, sub = el.state_for(REF), el.state_for(small)
    c = torch.arange(32)  # the first 2 blocks of 16 channels
    qkv_rows = torch.cat([c, 48 + c, 96 + c])
    h = torch.arange(4 * 32)
    for i in range(2):  # the first layers
        p = f"blocks.{i}."
        assert torch.allclose(sub[p + "attn.qkv.weight"], big[p + "attn.qkv.weight"][qkv_rows][:, c])
        assert torch.allclose(sub[p + "attn.qkv.bias"], big[p + "attn.qkv.bias"][qkv_rows])
        assert torch.allclose(sub[p + "attn.proj.weight"], big[p + "attn.proj.weight"][c][:, c])
        assert torch.allclose(sub[p + "mlp.fc1.weight"], big[p + "mlp.fc1.weight"][h][:, c])
        assert torch.allclose(sub[p + "mlp.fc2.weight"], big[p + "mlp.fc2.weight"][c][:, h])
        for n in ("norm1.weight", "norm1.bias", "norm2.weight", "attn.proj.bias", "mlp.fc2.bias"):
            assert torch.allclose(sub[p + n], big[p + n][c])
    assert torch.allclose(sub["patch_embed.proj.weight"], big["patch_embed.proj.weight"][c])
    assert torch.allclose(sub["pos_embed"], big["pos_embed"][..., c])
    assert torch.allclose(sub["cls_token"], big["cls_token"][..., c])
    assert torch.allclose(sub["head.weight"], big["head.weight"][:, c])
    assert set(sub) == set(VIT.build(small).state_dict())


def test_interpolated_sizes_keep_the_scale_of_the_scalers():
    el = build_elastic(VIT, REF, n=4, block=16, seed=0)
    wide = ViTSpec(depth=5, width=80, heads=5, patch=2, img_size=8)  # grown: interpolated, never trained
    grids, free = el.parts_for(wide)
    src = el.scalers.grids["qkv"].detach()
    assert grids["qkv"].shape == (5, 4, 15, 5)
    assert grids["qkv"].std().item() == pytest.approx(src.std().item(), rel=0.15)
    assert free["blocks.4.norm1.weight"].shape == (80,)


def test_every_size_trains_the_shared_reference_parameters():
    el = build_elastic(VIT, REF, n=4, block=16, seed=0)
    x = torch.randn(4, 1, 8, 8)
    el(x, spec=ViTSpec(depth=1, width=16, heads=1, patch=2, img_size=8)).sum().backward()
    g = el.scalers.grids["qkv"].grad
    assert g is not None and g[0, :, :1, :1].abs().sum() > 0  # the used sub-grid of the first layer ...
    assert g[1:].abs().sum() == 0 and g[0, :, 1:3].abs().sum() == 0  # ... and nothing the size does not use
    assert el.free["blocks__0__norm1__weight"].grad[:16].abs().sum() > 0
    assert el.bank.templates["fc1"].grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------ stage 1 -> 2


def test_the_init_at_the_aux_size_is_the_aux(digits, digits_elastic, tmp_path):
    el, sizes = digits_elastic
    path = save_elastic(tmp_path / "bank.safetensors", el, {"mode": "wave"}, sizes)
    loaded = load_bank(path)
    assert loaded.free is not None and not any(k.startswith("head.") for k in loaded.free)
    assert loaded.header["resize"] == {"width_rule": "nested", "depth_rule": "nested"}
    res = init_model("wave", DIGITS_ANCESTRY, bank=loaded, fit_steps=0, seed=0)
    assert res.info["free_params"] == "bank" and res.info["in_stage1_range"] is True
    want = {k: v for k, v in el.state_for(DIGITS_ANCESTRY).items() if not k.startswith("head.")}
    got = res.model.state_dict()
    for k, v in want.items():
        assert torch.allclose(got[k], v.detach(), atol=1e-6), k
    x = digits.val.x[:64]
    aux = VIT.build(DIGITS_ANCESTRY)
    aux.load_state_dict({k: v.detach() for k, v in el.state_for(DIGITS_ANCESTRY).items()})
    with torch.no_grad():  # the features are the aux model's; only the head is new
        assert torch.allclose(res.model.eval().forward_features(x), aux.eval().forward_features(x), atol=1e-5)
        again = load_elastic(loaded, VIT).eval()  # the same bank rebuilds the same aux model at every size
        for s in sizes:
            a, b = again.state_for(s, head=False), el.state_for(s, head=False)
            assert set(a) == set(b) and all(torch.allclose(a[k], b[k]) for k in a)


def test_a_size_in_the_range_with_the_aux_head_is_far_above_chance_and_the_random_bank(digits, digits_elastic,
                                                                                      tmp_path):
    el, sizes = digits_elastic
    loaded = load_bank(save_elastic(tmp_path / "bank.safetensors", el, {}, sizes))
    small = ViTSpec(depth=1, width=16, heads=1, patch=2, img_size=8)
    head = {k: v.detach() for k, v in el.state_for(small).items() if k.startswith("head.")}

    def with_head(strategy):
        m = init_model(strategy, small, bank=loaded, fit_steps=0, seed=0).model
        m.load_state_dict({**m.state_dict(), **head})
        return acc(m, digits.val)

    trained, random = with_head("wave"), with_head("wave_random_bank")
    assert trained > 0.6 and trained > random + 0.3, (trained, random)


def test_old_banks_still_load_and_are_recorded_as_timm_init(digits):
    loaded = load_bank("docs/data/fmnist_bank_2.safetensors")
    assert loaded.free is None and loaded.aux_scalers is not None
    spec = ViTSpec(depth=2, width=64, heads=2)
    fit = digits.train.subset(64, seed=0)  # shapes only matter here: 8x8 digits do not fit a 28x28 bank
    res = init_model("wave", spec, bank=loaded, fit_steps=0, seed=0, fit_data=(fit.x, fit.y))
    assert res.info["free_params"].startswith("timm_init") and res.info["scalers"].startswith("resampled")


def test_stage2_probe_on_cached_features_is_the_head_fit_inside_the_model(digits, digits_elastic, tmp_path):
    """Stage 2 on a bank with free tensors fits the new head alone; doing it on features computed once must
    give exactly the head that fitting it inside the whole (frozen) model gives, batch for batch."""
    from weit_core.strategies.wave import _start
    from weit_core.train import fit_scalers

    el, sizes = digits_elastic
    loaded = load_bank(save_elastic(tmp_path / "bank.safetensors", el, {}, sizes))
    spec = ViTSpec(depth=2, width=32, heads=2, patch=2, img_size=8)
    fit = digits.train.subset(200, seed=0)
    fast = init_model("wave", spec, bank=loaded, fit_data=(fit.x, fit.y), fit_steps=12, fit_batch_size=32, seed=0)
    assert fast.info["fit_head_steps"] == 12 and fast.info["fit_steps"] == 12
    model, _ = _start(spec, loaded.bank, loaded.aux_scalers, loaded.free, loaded.header, seed=0, init_mode="",
                      scaler_init="resample", inherit="all")
    model.set_stage("fit")
    fit_scalers(model, fit.x, fit.y, steps=12, lr=3e-3, batch_size=32, seed=0, warm_steps=12,
                warm_params=list(model.base.head.parameters()))
    assert torch.allclose(model.base.head.weight, fast.model.head.weight, atol=1e-6)
    assert not torch.allclose(model.base.head.weight, init_model("wave", spec, bank=loaded, fit_steps=0).model.head.weight)
