"""The baseline strategies do what their papers say, checked on real tensors: weight selection takes the
documented slices, mimetic products hit their targets, tleg_fit recovers a linear ancestry, net2net growth
preserves a trained digits ancestry's outputs, and every baseline yields an ordinary timm model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from weit_core.models import ViTSpec, create_vit
from weit_core.strategies import init_model
from weit_core.strategies._common import infer_vit_spec
from weit_core.strategies.mimetic import mimetic_targets
from weit_core.strategies.net2net import grow_vit
from weit_core.strategies.tleg import BLOCK_PARAMS, SHARED_PARAMS, fit_learngene

DIGITS_ANCESTRY = ViTSpec(depth=2, width=32, heads=2, patch=2, img_size=8)  # as in conftest
BIG = ViTSpec(depth=4, width=192, heads=3, patch=2, img_size=8)  # a ViT-Tiny-width ancestry on 8x8 inputs


@pytest.fixture(scope="module")
def big_ancestry() -> VisionTransformer:
    torch.manual_seed(7)
    return create_vit(BIG).eval()


def ref_uniform(n: int, m: int) -> np.ndarray:
    """The reference code's rule, written independently: every k-th index, else round(linspace)."""
    return np.arange(m) * (n // m) if n % m == 0 else np.round(np.linspace(0, n - 1, m)).astype(int)


def sd(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.state_dict().items()}


def fresh_head(spec: ViTSpec, seed: int) -> torch.Tensor:
    return init_model("scratch", spec, seed=seed).model.head.weight.detach()


# ---------------------------------------------------------------- weight selection

@pytest.mark.parametrize("width,heads", [(160, 5), (96, 3)])  # 192 -> 160 non-integer, 192 -> 96 integer ratio
def test_weight_selection_takes_the_documented_slices(big_ancestry, width, heads):
    spec = ViTSpec(depth=2, width=width, heads=heads, patch=2, img_size=8, mlp_ratio=3.0)
    res = init_model("weight_selection", spec, ancestry=big_ancestry, seed=3)
    a, t = sd(big_ancestry), sd(res.model)
    e = torch.as_tensor(ref_uniform(192, width))
    h = torch.as_tensor(ref_uniform(768, spec.hidden))
    if width == 96:
        assert e.tolist() == list(range(0, 192, 2))
    assert torch.equal(t["patch_embed.proj.weight"], a["patch_embed.proj.weight"][e])
    assert torch.equal(t["pos_embed"], a["pos_embed"][..., e]) and torch.equal(t["cls_token"], a["cls_token"][..., e])
    assert torch.equal(t["norm.weight"], a["norm.weight"][e])
    for blk in range(2):  # first_n: target block i <- ancestry block i
        p = f"blocks.{blk}."
        for s in range(3):  # q, k and v sections selected with the same indices
            rows = slice(s * width, (s + 1) * width)
            assert torch.equal(t[p + "attn.qkv.weight"][rows], a[p + "attn.qkv.weight"][s * 192 + e][:, e]), (blk, s)
            assert torch.equal(t[p + "attn.qkv.bias"][rows], a[p + "attn.qkv.bias"][s * 192 + e])
        assert torch.equal(t[p + "attn.proj.weight"], a[p + "attn.proj.weight"][e][:, e])
        assert torch.equal(t[p + "mlp.fc1.weight"], a[p + "mlp.fc1.weight"][h][:, e])
        assert torch.equal(t[p + "mlp.fc2.weight"], a[p + "mlp.fc2.weight"][e][:, h])
        assert torch.equal(t[p + "mlp.fc2.bias"], a[p + "mlp.fc2.bias"][e])
        assert torch.equal(t[p + "norm2.bias"], a[p + "norm2.bias"][e])
    assert torch.equal(res.model.head.weight, fresh_head(spec, 3))  # the classifier is never copied
    assert res.info["layer_selection"] == "first_n" and res.info["element_selection"] == "uniform"
    assert res.info["ancestry_layers"] == "0,1" and res.info["head_aware"] is False


@pytest.mark.parametrize("name,kw,depth,expect", [
    ("weight_selection", {}, 2, [0, 1]),
    ("weight_selection_even", {}, 2, [0, 2]),  # integer ratio: every 2nd block
    ("weight_selection", {"layer_selection": "even"}, 3, [0, 2, 3]),  # round(linspace(0, 3, 3)) = 0, 1.5->2, 3
])
def test_layer_selection_picks_the_documented_blocks(big_ancestry, name, kw, depth, expect):
    spec = ViTSpec(depth=depth, width=192, heads=3, patch=2, img_size=8)
    res = init_model(name, spec, ancestry=big_ancestry, **kw)
    a, t = sd(big_ancestry), sd(res.model)
    assert res.info["ancestry_layers"] == ",".join(map(str, expect))
    for i, j in enumerate(expect):  # same width: the blocks are copied whole
        for p in BLOCK_PARAMS:
            assert torch.equal(t[f"blocks.{i}.{p}"], a[f"blocks.{j}.{p}"]), (i, j, p)


def test_consecutive_element_selection_keeps_the_leading_indices(big_ancestry):
    spec = ViTSpec(depth=1, width=64, heads=2, patch=2, img_size=8)
    t = sd(init_model("weight_selection_consecutive", spec, ancestry=big_ancestry).model)
    a = sd(big_ancestry)
    assert torch.equal(t["blocks.0.attn.qkv.weight"][64:128], a["blocks.0.attn.qkv.weight"][192:256, :64])
    assert torch.equal(t["blocks.0.mlp.fc1.weight"], a["blocks.0.mlp.fc1.weight"][:256, :64])


def test_head_aware_selection_keeps_whole_heads(big_ancestry):
    spec = ViTSpec(depth=1, width=128, heads=2, patch=2, img_size=8)  # 3 heads of 64 -> 2 heads of 64
    a = sd(big_ancestry)["blocks.0.attn.qkv.weight"]
    res = init_model("weight_selection", spec, ancestry=big_ancestry, head_aware=True)
    t = sd(res.model)["blocks.0.attn.qkv.weight"]
    e = torch.as_tensor(ref_uniform(192, 128))
    for s in range(3):
        for th, ah in enumerate(ref_uniform(3, 2)):  # heads 0 and 2, each whole
            rows = slice(s * 128 + th * 64, s * 128 + (th + 1) * 64)
            assert torch.equal(t[rows], a[s * 192 + ah * 64:s * 192 + (ah + 1) * 64][:, e]), (s, th)
    proj_t, proj_a = sd(res.model)["blocks.0.attn.proj.weight"], sd(big_ancestry)["blocks.0.attn.proj.weight"]
    assert torch.equal(proj_t[:, 64:], proj_a[e][:, 128:192])
    # without head_aware the same target mixes ancestry heads inside target head 1
    flat = init_model("weight_selection", spec, ancestry=big_ancestry).model.blocks[0].attn.qkv.weight.detach()
    src_heads = {int(i) // 64 for i in e[64:128]}
    assert len(src_heads) == 2 and not torch.equal(flat, t)


def test_weight_selection_refuses_what_it_cannot_do(big_ancestry):
    with pytest.raises(ValueError, match="'weight_selection' needs an ancestry.*--ancestry"):
        init_model("weight_selection", DIGITS_ANCESTRY)
    with pytest.raises(ValueError, match="width 256 > 192"):
        init_model("weight_selection", ViTSpec(depth=1, width=256, heads=4, patch=2, img_size=8), ancestry=big_ancestry)
    with pytest.raises(ValueError, match="head_aware.*heads <= 3"):
        init_model("weight_selection_head_aware", ViTSpec(depth=1, width=160, heads=5, patch=2, img_size=8),
                   ancestry=big_ancestry)
    with pytest.raises(ValueError, match="patch=2 but target patch=4"):
        init_model("weight_selection", ViTSpec(depth=1, width=64, heads=2, patch=4, img_size=8), ancestry=big_ancestry)


# ---------------------------------------------------------------- mimetic

def test_mimetic_products_match_their_targets_per_head():
    spec = ViTSpec(depth=2, width=48, heads=3, patch=2, img_size=8)
    res = init_model("mimetic", spec, seed=5)
    d, k = 48, 16
    targets = mimetic_targets(spec, seed=5)
    for blk, tgt in zip(res.model.blocks, targets, strict=True):
        w = blk.attn.qkv.weight.detach().double()
        for h, a in enumerate(tgt["qk"]):
            prod = w[h * k:(h + 1) * k].T @ w[d + h * k:d + (h + 1) * k]  # = W_q^h W_k^hᵀ in x W notation
            u, s, vh = torch.linalg.svd(a)
            best = (u[:, :k] * s[:k]) @ vh[:k]  # Eckart-Young: the best rank-head_dim approximation
            assert torch.allclose(prod, best, atol=1e-5), (h, (prod - best).abs().max())
            rel = torch.linalg.norm(prod - a) / torch.linalg.norm(a)
            assert abs(rel - s[k:].norm() / s.norm()) < 1e-5
            assert prod.diagonal().mean() > 4 * (prod - torch.diag(prod.diagonal())).abs().mean()  # identity-like
        vo = (blk.attn.proj.weight.detach().double() @ w[2 * d:]).T  # = W_v W_proj in x W notation
        assert torch.allclose(vo, tgt["vo"], atol=1e-5)
        assert vo.diagonal().mean() < -0.3  # negative identity, beta2 = 0.4
    assert res.info["alpha1"] == 0.7 and res.info["beta2"] == 0.4 and res.info["source"] == "data_free"
    # everything except the attention weights keeps timm's init
    scratch = sd(init_model("scratch", spec, seed=5).model)
    for name, v in sd(res.model).items():
        if not name.endswith(("attn.qkv.weight", "attn.proj.weight")):
            assert torch.equal(v, scratch[name]), name


def test_mimetic_alpha_beta_are_settings():
    spec = ViTSpec(depth=1, width=32, heads=2, patch=2, img_size=8)
    res = init_model("mimetic", spec, alpha1=0.0, beta1=1.0, alpha2=0.0, beta2=1.0)
    w = res.model.blocks[0].attn.qkv.weight.detach().double()
    vo = (res.model.blocks[0].attn.proj.weight.detach().double() @ w[64:]).T
    assert torch.allclose(vo, -torch.eye(32, dtype=torch.float64), atol=1e-6)  # exactly -I
    for h in range(2):  # rank-16 approximations of I: orthogonal projectors of rank 16
        prod = w[h * 16:(h + 1) * 16].T @ w[32 + h * 16:32 + (h + 1) * 16]
        assert torch.allclose(prod @ prod, prod, atol=1e-5) and abs(prod.trace() - 16) < 1e-4
    assert res.info["alpha1"] == 0.0 and res.info["beta2"] == 1.0


# ---------------------------------------------------------------- TLEG

def linear_ancestry(spec: ViTSpec, position: str = "official") -> tuple[torch.nn.Module, dict, dict]:
    torch.manual_seed(11)
    model = create_vit(spec)
    gen_a = {p: torch.randn_like(model.state_dict()[f"blocks.0.{p}"]) for p in BLOCK_PARAMS}
    gen_b = {p: torch.randn_like(v) for p, v in gen_a.items()}
    coef = [(i + (position == "one_based")) / spec.depth for i in range(spec.depth)]
    with torch.no_grad():
        for i, c in enumerate(coef):
            for p in BLOCK_PARAMS:
                model.state_dict()[f"blocks.{i}.{p}"].copy_(gen_a[p] + c * gen_b[p])
    return model, gen_a, gen_b


@pytest.mark.parametrize("position", ["official", "one_based"])
def test_tleg_fit_reconstructs_a_linear_ancestry(position):
    src = ViTSpec(depth=4, width=32, heads=2, patch=2, img_size=8)
    anc, theta_a, theta_b = linear_ancestry(src, position)
    same = init_model("tleg_fit", src, ancestry=anc, position=position)
    assert same.info["fit_relative_residual"] < 1e-6
    for k, v in sd(anc).items():
        if not k.startswith("head"):
            assert torch.allclose(sd(same.model)[k], v, atol=1e-5), k
    deeper = ViTSpec(depth=6, width=32, heads=2, patch=2, img_size=8)
    res = init_model("tleg_fit", deeper, ancestry=anc, position=position)
    t = sd(res.model)
    for i in range(6):
        c = (i + (position == "one_based")) / 6
        for p in BLOCK_PARAMS:
            assert torch.allclose(t[f"blocks.{i}.{p}"], theta_a[p] + c * theta_b[p], atol=1e-5), (i, p)
    for k in SHARED_PARAMS:
        assert torch.equal(t[k], sd(anc)[k])
    assert res.info["position"] == position and res.info["learngene"].startswith("least_squares")
    # the paper's path: the same learngene given explicitly expands to the same model
    gene, _ = fit_learngene(anc, 4, position)
    explicit = init_model("tleg", deeper, learngene=gene, position=position)
    for k, v in t.items():
        assert torch.equal(v, sd(explicit.model)[k]), k


def test_tleg_fit_on_the_trained_digits_ancestry(digits_ancestry):
    anc, _ = digits_ancestry  # depth 2: the line through its two blocks; doubling depth lands on them
    res = init_model("tleg_fit", ViTSpec(depth=4, width=32, heads=2, patch=2, img_size=8), ancestry=anc)
    t, a = sd(res.model), sd(anc)
    for p in BLOCK_PARAMS:
        assert torch.allclose(t[f"blocks.0.{p}"], a[f"blocks.0.{p}"], atol=1e-5)
        assert torch.allclose(t[f"blocks.2.{p}"], a[f"blocks.1.{p}"], atol=1e-5)


def test_tleg_needs_the_right_sources(digits_ancestry):
    anc, _ = digits_ancestry
    with pytest.raises(ValueError, match="width 32 vs 48"):
        init_model("tleg_fit", ViTSpec(depth=3, width=48, heads=2, patch=2, img_size=8), ancestry=anc)
    with pytest.raises(ValueError, match="'tleg_fit' needs an ancestry.*--ancestry"):
        init_model("tleg_fit", DIGITS_ANCESTRY)
    with pytest.raises(ValueError, match="learngene.*tleg_fit"):
        init_model("tleg", DIGITS_ANCESTRY)


# ---------------------------------------------------------------- net2net

GROWTH = {
    "depth": (ViTSpec(depth=5, width=32, heads=2, patch=2, img_size=8), {}),
    "depth_append": (ViTSpec(depth=3, width=32, heads=2, patch=2, img_size=8), {"depth_placement": "append"}),
    "mlp_hidden": (ViTSpec(depth=2, width=32, heads=2, patch=2, img_size=8, mlp_ratio=6.0), {}),
    "heads_copy": (ViTSpec(depth=2, width=64, heads=4, patch=2, img_size=8), {}),
    "heads_zero": (ViTSpec(depth=2, width=64, heads=4, patch=2, img_size=8), {"head_mode": "zero"}),
    "head_dim": (ViTSpec(depth=2, width=64, heads=2, patch=2, img_size=8), {}),
    "all_at_once": (ViTSpec(depth=3, width=96, heads=4, patch=2, img_size=8, mlp_ratio=5.0), {}),
    "width_not_a_multiple": (ViTSpec(depth=2, width=48, heads=3, patch=2, img_size=8), {}),  # auto -> mean_pad
    "width_q2_plus_pad": (ViTSpec(depth=3, width=80, heads=5, patch=2, img_size=8, mlp_ratio=3.0), {}),
}


def max_diff(a: torch.nn.Module, b: torch.nn.Module, x: torch.Tensor) -> float:
    """Largest logit difference, computed in float64 so only the grown weights' float32 storage counts."""
    import copy

    a64, b64 = copy.deepcopy(a).double().eval(), copy.deepcopy(b).double().eval()
    with torch.no_grad():
        return float((a64(x.double()) - b64(x.double())).abs().max())


@pytest.mark.parametrize("case", sorted(GROWTH))
def test_net2net_growth_preserves_the_function(digits, digits_ancestry, case):
    anc, _ = digits_ancestry
    spec, kw = GROWTH[case]
    grown, info = grow_vit(anc, DIGITS_ANCESTRY, spec, keep_head=True, seed=2, **kw)
    x = digits.val.x
    assert info["function_preserving"] == "exact"
    assert max_diff(anc, grown, x) < 1e-5, case
    with torch.no_grad():  # and in the float32 the model is trained in: the same predictions
        assert torch.equal(anc(x).argmax(1), grown.eval()(x).argmax(1))
    new_blocks = set(range(spec.depth)) - {int(i) for i in info["ancestry_blocks_at"].split(",")}
    for t in new_blocks:  # identity blocks: nothing written into the residual stream
        blk = grown.blocks[t]
        assert not blk.attn.proj.weight.any() and not blk.mlp.fc2.weight.any() and not blk.mlp.fc2.bias.any()


def test_net2net_random_embedding_mapping_is_stated_honestly(digits, digits_ancestry):
    anc, _ = digits_ancestry
    spec = ViTSpec(depth=2, width=48, heads=3, patch=2, img_size=8)  # 32 -> 48: not a multiple
    x = digits.val.x
    padded, info = grow_vit(anc, DIGITS_ANCESTRY, spec, keep_head=True)
    assert info["embed_mode"] == "mean_pad" and info["function_preserving"] == "exact"
    rand, info = grow_vit(anc, DIGITS_ANCESTRY, spec, keep_head=True, embed_mode="random")  # the paper's rule
    assert info["function_preserving"].startswith("no")
    assert max_diff(anc, rand, x) > 1e-2  # unequal copy counts shift LayerNorm's mean and variance
    noisy, info = grow_vit(anc, DIGITS_ANCESTRY, GROWTH["depth"][0], keep_head=True, noise=0.01)
    assert info["function_preserving"] == "no (noise)" and max_diff(anc, noisy, x) > 1e-5


def test_net2net_as_a_strategy_keeps_a_fresh_head_and_refuses_to_shrink(digits_ancestry):
    anc, _ = digits_ancestry
    spec = GROWTH["all_at_once"][0]
    res = init_model("net2net", spec, ancestry=anc, seed=4)
    assert torch.equal(res.model.head.weight, fresh_head(spec, 4))
    assert res.info["noise"] == 0.0 and res.info["embed_mode"] == "tile" and res.info["head_mode"] == "copy"
    with pytest.raises(ValueError, match="only grows.*width 32 -> 16"):
        init_model("net2net", ViTSpec(depth=2, width=16, heads=1, patch=2, img_size=8), ancestry=anc)
    with pytest.raises(ValueError, match="head_dim 16 -> 12"):
        init_model("net2net", ViTSpec(depth=2, width=48, heads=4, patch=2, img_size=8), ancestry=anc)
    with pytest.raises(ValueError, match="'net2net' needs an ancestry.*--ancestry"):
        init_model("net2net", spec)


# ---------------------------------------------------------------- all baselines

SMALLER = ViTSpec(depth=1, width=24, heads=2, patch=2, img_size=8)
LARGER = ViTSpec(depth=3, width=64, heads=4, patch=2, img_size=8)
DEEPER = ViTSpec(depth=3, width=32, heads=2, patch=2, img_size=8)
CASES = [
    ("weight_selection", SMALLER), ("weight_selection_even", SMALLER), ("weight_selection_consecutive", SMALLER),
    ("weight_selection_head_aware", ViTSpec(depth=1, width=16, heads=1, patch=2, img_size=8)),
    ("mimetic", LARGER), ("tleg_fit", DEEPER), ("net2net", LARGER),
]


@pytest.mark.parametrize("name,spec", CASES, ids=[c[0] for c in CASES])
def test_every_baseline_yields_an_ordinary_timm_model(digits, digits_ancestry, name, spec):
    anc, _ = digits_ancestry
    assert infer_vit_spec(anc) == DIGITS_ANCESTRY
    res = init_model(name, spec, ancestry=anc, ancestry_spec=DIGITS_ANCESTRY, seed=1)
    assert type(res.model) is VisionTransformer
    plain = create_vit(spec)
    plain.load_state_dict(res.model.state_dict(), strict=True)  # a full, ordinary state_dict
    assert res.info["strategy"] == name and res.info["init_seconds"] >= 0 and res.info["init_mode"] == "timm_default"
    assert all(isinstance(v, str | int | float | bool) for v in res.info.values()), res.info  # loggable params
    with torch.no_grad():
        assert torch.isfinite(plain(digits.val.x[:32])).all()
    again = init_model(name, spec, ancestry=anc, seed=1)  # deterministic under a seed; spec inferred
    for k, v in res.model.state_dict().items():
        assert torch.equal(v, again.model.state_dict()[k]), k


# ---------------------------------------------------------------- declarations: needs and can_make

def _grid_around(anc: ViTSpec) -> list[ViTSpec]:
    """Sizes on every side of the ancestry (shallower/deeper, narrower/wider, fewer/more heads, narrower/wider
    MLP) plus targets whose tokens differ (another patch, image size, channel count)."""
    out = []
    for depth in (1, anc.depth, anc.depth + 1):
        for width in (16, anc.width, 64):
            for heads in (1, 2, 4):
                for ratio in (2.0, 4.0, 5.0):
                    if width % heads == 0:
                        out.append(ViTSpec(depth=depth, width=width, heads=heads, mlp_ratio=ratio, patch=anc.patch,
                                           img_size=anc.img_size, in_chans=anc.in_chans))
    out += [ViTSpec(depth=1, width=16, heads=1, patch=4, img_size=anc.img_size),
            ViTSpec(depth=1, width=16, heads=1, patch=anc.patch, img_size=16),
            ViTSpec(depth=1, width=16, heads=1, patch=anc.patch, img_size=anc.img_size, in_chans=3),
            ViTSpec(depth=anc.depth, width=anc.width, heads=anc.heads, patch=4, img_size=anc.img_size)]
    return out


def test_can_make_says_none_exactly_when_the_strategy_succeeds():
    """The registered check and the strategy cannot disagree: on a grid of sizes around an ancestry,
    ``can_make`` is None exactly for the sizes ``init_model`` builds, and a reason otherwise."""
    from weit_core.strategies import CANNOT_MAKE, available, can_make

    torch.manual_seed(0)
    anc = create_vit(DIGITS_ANCESTRY).eval()
    grid = _grid_around(DIGITS_ANCESTRY)
    names = [n for n in available() if n.startswith("weight_selection")] + ["net2net", "tleg_fit"]
    made, reasons = {}, {}
    for name in names:
        for spec in grid:
            reason = can_make(name, spec, ancestry_spec=DIGITS_ANCESTRY)
            try:
                init_model(name, spec, ancestry=anc, ancestry_spec=DIGITS_ANCESTRY, fit_steps=0)
                ok = True
            except ValueError:
                ok = False
            assert ok == (reason is None), (name, spec, reason)
            assert reason is None or reason in CANNOT_MAKE
            made[name] = made.get(name, 0) + ok
            reasons.setdefault(name, set()).add(reason)
    # the grid reaches every side: each ancestry strategy both makes some sizes and refuses others
    assert reasons["weight_selection"] >= {None, "larger_than_ancestry", "tokens_differ_from_ancestry"}
    assert "heads_exceed_ancestry" in reasons["weight_selection_head_aware"]
    assert reasons["net2net"] >= {None, "smaller_than_ancestry", "tokens_differ_from_ancestry"}
    assert reasons["tleg_fit"] >= {None, "width_differs_from_ancestry"}
    for name in ("mimetic", "scratch"):  # data-free: every size
        assert all(can_make(name, spec, ancestry_spec=DIGITS_ANCESTRY) is None for spec in grid)
    # without the ancestry an ancestry strategy cannot make anything, and says why
    assert can_make("net2net", DIGITS_ANCESTRY) == "needs_ancestry"
    assert can_make("scratch", DIGITS_ANCESTRY) is None


def test_strategies_declare_what_they_need(monkeypatch):
    import weit_core.strategies as registry
    from weit_core.strategies import InitResult, register, strategy_info

    registry.available()  # every module registered first, then a copy: the test strategy below stays in it
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    assert strategy_info("scratch").needs == frozenset() and strategy_info("mimetic").needs == frozenset()
    assert strategy_info("scratch_fit").needs == {"fit_data"}
    for name in ("weight_selection", "weight_selection_even", "net2net", "tleg_fit"):
        assert strategy_info(name).needs == {"ancestry"} and strategy_info(name).check is not None, name
    assert strategy_info("tleg").needs == {"learngene"}  # no sweep can pass one
    with pytest.raises(ValueError, match="unknown needs \\['gpu'\\]"):
        register("needs_a_gpu", needs=("gpu",))
    with pytest.raises(ValueError, match="unknown init strategy 'nope'"):
        strategy_info("nope")

    @register("test_plain_register")  # plain @register still works: needs nothing, makes every size
    def plain(spec, **_):
        return InitResult(create_vit(spec))

    info = strategy_info("test_plain_register")
    assert info.fn is plain and info.needs == frozenset() and info.check is None
