"""The maths of weight templates: materialize against a naive per-block loop, gradients per stage,
resampling, and every shape error."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from weit_core.models import TemplatedModel, ViTSpec, create_vit, vit_kinds, vit_layout
from weit_core.templates import (
    KindSpec,
    LayerGroup,
    Scalers,
    TemplateBank,
    materialize,
    materialize_kind,
    resample_scalers,
)


def naive(grid: torch.Tensor, templates: torch.Tensor, order: str) -> torch.Tensor:
    """W_l as a double loop over blocks (and the kron definition for the other order)."""
    L, n, P, Q = grid.shape
    _, a, b, *k = templates.shape
    out = torch.zeros(L, P * a, Q * b, *k, dtype=torch.float64)
    for layer in range(L):
        for t in range(n):
            if order == "scaler_major":
                for p in range(P):
                    for q in range(Q):
                        out[layer, p * a:(p + 1) * a, q * b:(q + 1) * b] += grid[layer, t, p, q] * templates[t]
            else:
                for i in range(a):
                    for j in range(b):
                        block = grid[layer, t][(...,) + (None,) * len(k)] * templates[t, i, j]
                        out[layer, i * P:(i + 1) * P, j * Q:(j + 1) * Q] += block
    return out


@settings(max_examples=40, deadline=None)
@given(
    L=st.integers(1, 3), n=st.integers(1, 4), a=st.integers(1, 5), b=st.integers(1, 5), P=st.integers(1, 4),
    Q=st.integers(1, 4), kernel=st.sampled_from([(), (2, 2), (3,)]),
    order=st.sampled_from(["scaler_major", "template_major"]), seed=st.integers(0, 2**16),
)
def test_materialize_equals_naive_block_loop(L, n, a, b, P, Q, kernel, order, seed):
    g = torch.Generator().manual_seed(seed)
    grid = torch.randn(L, n, P, Q, generator=g, dtype=torch.float64)
    templates = torch.randn(n, a, b, *kernel, generator=g, dtype=torch.float64)
    torch.testing.assert_close(materialize_kind(templates, grid, order), naive(grid, templates, order))


def test_scaler_major_is_torch_kron():
    g = torch.Generator().manual_seed(0)
    grid, templates = torch.randn(1, 3, 4, 2, generator=g), torch.randn(3, 5, 6, generator=g)
    expected = sum(torch.kron(grid[0, t], templates[t]) for t in range(3))
    torch.testing.assert_close(materialize_kind(templates, grid)[0], expected)
    expected_t = sum(torch.kron(templates[t], grid[0, t]) for t in range(3))
    torch.testing.assert_close(materialize_kind(templates, grid, "template_major")[0], expected_t)


def test_materialize_names_and_shapes_match_timm():
    spec = ViTSpec(depth=3, width=48, heads=3)
    w = materialize(TemplateBank(vit_kinds(spec, n=2, block=16)), Scalers(vit_layout(spec), vit_kinds(spec, 2, 16)))
    params = dict(create_vit(spec).named_parameters())
    assert len(w) == 1 + 4 * 3
    for name, t in w.items():
        assert t.shape == params[name].shape, name


SPEC = ViTSpec(depth=2, width=32, heads=2, patch=2, img_size=8)


def _templated(stage: str) -> TemplatedModel:
    kinds = vit_kinds(SPEC, n=2, block=16)
    model = TemplatedModel(create_vit(SPEC), TemplateBank(kinds), Scalers(vit_layout(SPEC), kinds))
    model.set_stage(stage)
    return model


@pytest.mark.parametrize("stage", ["pretrain", "fit"])
def test_gradients_reach_exactly_the_trainable_set(stage):
    model = _templated(stage)
    model(torch.randn(4, 1, 8, 8)).logsumexp(-1).sum().backward()
    for name, p in model.named_parameters():
        if name.startswith("bank.") and stage == "fit":
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    # the templated weights are not parameters of the wrapped model any more
    assert not any(n.endswith(("qkv.weight", "fc1.weight", "fc2.weight", "attn.proj.weight", "patch_embed.proj.weight"))
                   for n, _ in model.base.named_parameters())


def test_materialize_into_gives_the_same_function():
    model = _templated("fit")
    plain = model.materialize_into(create_vit(SPEC))
    x = torch.randn(5, 1, 8, 8)
    model.eval()
    torch.testing.assert_close(plain.eval()(x), model(x), rtol=0, atol=1e-6)
    assert set(plain.state_dict()) == set(create_vit(SPEC).state_dict())


def test_scaler_count_is_tiny_for_vit_tiny():
    spec = ViTSpec(depth=12, width=192, heads=3, img_size=32, patch=4, in_chans=3)
    kinds = vit_kinds(spec, n=4, block=32)
    kinds["patch"] = KindSpec(4, 32, 1, (4, 4))
    sc = Scalers(vit_layout(spec), kinds)
    weights = sum(t.numel() for t in materialize(TemplateBank(kinds), sc).values())
    assert sc.num_numbers() < 25_000 and weights > 5_000_000  # the papers: ~20k scalers make ~5M weights


def test_resample_depth_and_width_keep_statistics():
    src_spec, dst_spec = ViTSpec(depth=4, width=64, heads=4), ViTSpec(depth=7, width=96, heads=4)
    kinds = vit_kinds(src_spec, n=3, block=16)
    aux = Scalers(vit_layout(src_spec), kinds)
    with torch.no_grad():  # give each source layer its own scale so interpolation is visible
        for g in aux.grids.values():
            g.mul_(torch.arange(1, g.shape[0] + 1, dtype=g.dtype).view(-1, 1, 1, 1))
    out = resample_scalers(aux, vit_layout(dst_spec))
    for kind, g in out.grids.items():
        src = aux.grids[kind].detach()
        assert g.shape[:2] == (dst_spec.depth if kind != "patch" else 1, 3)
        # end layers map to end layers: first/last target layer keep the first/last source layer's std
        if kind != "patch":
            for s_l, d_l in ((0, 0), (-1, -1)):
                torch.testing.assert_close(g[d_l].std((1, 2)), src[s_l].std((1, 2)), rtol=1e-4, atol=1e-6)
            # a middle layer's std lies between its two source neighbours' stds
            mid = g[3].std((1, 2))
            lo, hi = src[1].std((1, 2)), src[2].std((1, 2))
            assert torch.all(mid >= torch.minimum(lo, hi) - 1e-5) and torch.all(mid <= torch.maximum(lo, hi) + 1e-5)
    same = resample_scalers(aux, vit_layout(src_spec))
    for kind in aux.grids:
        torch.testing.assert_close(same.grids[kind], aux.grids[kind].detach())


def test_shape_errors_name_layer_kind_and_sizes():
    kinds = vit_kinds(ViTSpec(depth=1, width=32, heads=2), n=2, block=16)
    with pytest.raises(ValueError, match=r"kind 'patch'.*patch_embed\.proj\.weight.*24x1.*16x1.*width % 16"):
        Scalers(vit_layout(ViTSpec(depth=1, width=24, heads=2)), kinds)
    qkv_only = {"qkv": kinds["qkv"]}
    with pytest.raises(ValueError, match=r"kind 'qkv'.*blocks\.0\.attn\.qkv\.weight.*72x24.*16x16"):
        Scalers({"qkv": vit_layout(ViTSpec(depth=1, width=24, heads=2))["qkv"]}, qkv_only)
    with pytest.raises(ValueError, match=r"heads=5 does not divide width=32"):
        ViTSpec(depth=1, width=32, heads=5)
    partial = {k: v for k, v in kinds.items() if k != "fc2"}
    with pytest.raises(ValueError, match=r"no templates for kind\(s\) \['fc2'\]"):
        Scalers(vit_layout(ViTSpec(depth=1, width=32, heads=2)), partial)
    with pytest.raises(ValueError, match=r"kernel \(8, 8\).*kernel \(4, 4\)"):
        Scalers(vit_layout(ViTSpec(depth=1, width=32, heads=2, patch=8, img_size=32)), kinds)
    with pytest.raises(ValueError, match="Kronecker order"):
        TemplateBank(kinds, order="bogus")
    bad = Scalers({"proj": LayerGroup(("x",), (32, 32))}, {"proj": KindSpec(2, 16, 16)})
    with pytest.raises(ValueError, match="rebuild the scalers"):
        materialize(TemplateBank({"proj": KindSpec(3, 16, 16)}), bad)
