"""The ancestry baselines on the DiT family: weight selection shrinks a DiT by the paper's rules (the residual
indices hold on the condition ``c`` too, adaLN rows are selected chunk by chunk, the class table stays new),
and net2net grows one, exactly for depth (adaLN-Zero identities) and for widths that tile."""

from __future__ import annotations

import copy

import pytest
import torch

from weit_core.models import ViTSpec
from weit_core.models.dit import DIT, DiTSpec, create_dit
from weit_core.strategies import can_make, init_model
from weit_core.strategies._common import select_indices
from weit_core.strategies.net2net import grow_dit

BIG = DiTSpec(depth=3, width=48, heads=3)  # hidden 192
SMALL = DiTSpec(depth=2, width=32, heads=2, mlp_ratio=2.0)  # hidden 64: 48 -> 32 is not an integer ratio
TABLE = "y_embedder.embedding_table.weight"


@pytest.fixture(scope="module")
def fmnist(fmnist_dir):
    from weit_core.data import load_fashion_mnist

    return load_fashion_mnist(fmnist_dir, limit=2000)


def _drawn(spec, seed: int) -> torch.nn.Module:
    """A DiT with every tensor drawn (no zero modulation), so any misplaced slice shows in its output."""
    torch.manual_seed(seed)
    model = create_dit(spec)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def big_dit() -> torch.nn.Module:
    return _drawn(BIG, 0)


def _inputs(n: int = 6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    labels = torch.tensor([0, 3, -1, 9, 5, -1][:n])  # -1: the null class
    return torch.randn(n, 1, 28, 28, generator=gen), torch.rand(n, generator=gen), labels


def test_weight_selection_at_the_ancestrys_size_reproduces_it(big_dit):
    res = init_model("weight_selection", BIG, ancestry=big_dit, ancestry_spec=BIG, seed=4)
    own, anc = res.model.state_dict(), big_dit.state_dict()
    assert res.info["class_table"] == "new (HEAD_STREAM + seed)"
    assert torch.equal(own[TABLE], create_dit(BIG, head_seed=4).state_dict()[TABLE])  # the head, as wave draws it
    assert all(torch.equal(own[k], anc[k]) for k in own if k != TABLE)
    with torch.no_grad():  # with the ancestry's class table put back: the ancestry's function, to the bit
        res.model.y_embedder.load_state_dict(big_dit.y_embedder.state_dict())
        assert torch.equal(res.model.eval()(*_inputs()), big_dit(*_inputs()))


def test_a_smaller_dit_takes_the_selected_slices(big_dit):
    res = init_model("weight_selection_even", SMALL, ancestry=big_dit, ancestry_spec=BIG, seed=0)
    own, anc = res.model.state_dict(), big_dit.state_dict()
    e, h = select_indices(48, 32, "uniform"), select_indices(192, 64, "uniform")
    assert res.info["ancestry_layers"] == "0,2"

    def runs(n: int) -> torch.Tensor:  # the same residual indices within each of n runs of 48 rows
        return torch.cat([s * 48 + e for s in range(n)])

    b, a = "blocks.1.", "blocks.2."  # target block 1 is ancestry block 2 (even layer selection)
    expect = {
        b + "attn.qkv.weight": anc[a + "attn.qkv.weight"][runs(3)][:, e],
        b + "attn.proj.weight": anc[a + "attn.proj.weight"][e][:, e],
        b + "mlp.fc1.weight": anc[a + "mlp.fc1.weight"][h][:, e],
        b + "mlp.fc2.weight": anc[a + "mlp.fc2.weight"][e][:, h],
        b + "adaLN_modulation.1.weight": anc[a + "adaLN_modulation.1.weight"][runs(6)][:, e],
        b + "adaLN_modulation.1.bias": anc[a + "adaLN_modulation.1.bias"][runs(6)],
        "final_layer.adaLN_modulation.1.weight": anc["final_layer.adaLN_modulation.1.weight"][runs(2)][:, e],
        "final_layer.linear.weight": anc["final_layer.linear.weight"][:, e],  # pixel rows whole (same patch)
        "final_layer.linear.bias": anc["final_layer.linear.bias"],
        "t_embedder.mlp.0.weight": anc["t_embedder.mlp.0.weight"][e],  # frequency columns whole
        "t_embedder.mlp.2.weight": anc["t_embedder.mlp.2.weight"][e][:, e],  # hidden units: the residual indices
        "x_embedder.proj.weight": anc["x_embedder.proj.weight"][e],
        "pos_embed": anc["pos_embed"][..., e],
    }
    for k, v in expect.items():
        assert torch.equal(own[k], v), k
    # the class count is free (the class table is new), as a ViT's head's is
    fewer = DiTSpec(depth=1, width=32, heads=2, num_classes=5)
    assert can_make("weight_selection", fewer, ancestry_spec=BIG) is None
    model = init_model("weight_selection", fewer, ancestry=big_dit, ancestry_spec=BIG).model
    assert model.y_embedder.num_classes == 5


def test_sizes_it_cannot_make_are_one_line_errors_and_reasons(big_dit):
    cases = {
        "larger_than_ancestry": (DiTSpec(depth=4, width=32, heads=2), "depth 4 > 3"),
        "tokens_differ_from_ancestry": (DiTSpec(depth=1, width=32, heads=2, patch=7),
                                        "ancestry patch=4 but target patch=7"),
    }
    for reason, (spec, message) in cases.items():
        assert can_make("weight_selection", spec, ancestry_spec=BIG) == reason
        with pytest.raises(ValueError, match=message) as err:
            init_model("weight_selection", spec, ancestry=big_dit, ancestry_spec=BIG)
        assert "\n" not in str(err.value)
    assert can_make("weight_selection", SMALL, ancestry_spec=ViTSpec(3, 48, 3)) == "ancestry_family_differs"
    assert can_make("net2net", SMALL, ancestry_spec=BIG) == "smaller_than_ancestry"
    assert can_make("weight_selection", SMALL, ancestry_spec=BIG) is None
    assert can_make("weight_selection_head_aware", SMALL, ancestry_spec=BIG) == "family_not_supported"
    # on a grid around the ancestry, can_make is None exactly where init_model builds (a sweep's drop is honest)
    grid = [DiTSpec(depth=d, width=w, heads=w // 16, patch=p) for d in (1, 3, 4) for w in (16, 48, 64) for p in (4, 7)]
    for name in ("weight_selection", "net2net"):
        made = 0
        for spec in grid:
            try:
                init_model(name, spec, ancestry=big_dit, ancestry_spec=BIG)
                built = True
            except ValueError:
                built = False
            assert built == (can_make(name, spec, ancestry_spec=BIG) is None), (name, spec)
            made += built
        assert 0 < made < len(grid), name


def test_weight_selection_runs_through_init_target(big_dit, fmnist):
    from weit_core.stage3 import init_target
    from weit_core.tasks.generation import make_generation_task

    task = make_generation_task("generation_dit_baselines", samples=8, steps=1)
    before = copy.deepcopy(big_dit.state_dict())
    res = init_target("weight_selection", SMALL, fmnist.train, seed=2, ancestry=(big_dit, BIG), task=task)
    assert res.info["strategy"] == "weight_selection" and res.info["ancestry_width"] == 48
    assert res.model(*_inputs()).shape == (6, 1, 28, 28)
    assert all(torch.equal(v, before[k]) for k, v in big_dit.state_dict().items())  # the ancestry is untouched


def test_selection_from_a_trained_dit_denoises_better_than_scratch(fmnist):
    """The paper's claim on a tiny scale: a smaller DiT selected from a briefly trained one starts with a lower
    denoising loss than a scratch DiT of its size (whose zero output predicts nothing), and stays lower after
    the same few training steps."""
    from weit_core.tasks.generation import denoising_loss, make_generation_task
    from weit_core.train import fit, iterate_batches, make_optimizer, seed_everything

    data = fmnist
    io = {"in_chans": 1, "img_size": 28, "num_classes": 10, "patch": 7}  # 16 tokens: seconds on a CPU
    big = DIT.spec_for({"depth": 2, "width": 64, "heads": 4}, io)
    small = DIT.spec_for({"depth": 1, "width": 32, "heads": 2}, io)
    task = make_generation_task("generation_dit_selection", samples=8, steps=1)
    val = list(iterate_batches(data.val.x[:256], data.val.y[:256], 256, shuffle=False))

    def train(model: torch.nn.Module, steps: int) -> None:
        fit(model, lambda ep: iterate_batches(data.train.x, data.train.y, 64, seed=ep, drop_last=True),
            make_optimizer(model, 3e-3), epochs=1, max_steps=steps, task=task)

    seed_everything(0)
    ancestry = create_dit(big)
    train(ancestry, 25)
    selected = init_model("weight_selection", small, ancestry=ancestry, ancestry_spec=big, seed=0).model
    seed_everything(0)
    scratch = create_dit(small)
    start = denoising_loss(selected, val), denoising_loss(scratch, val)
    assert start[0] < 0.9 * start[1], start
    train(selected, 10)
    train(scratch, 10)
    after = denoising_loss(selected, val), denoising_loss(scratch, val)
    assert after[0] < after[1], (start, after)


# ---------------------------------------------------------------- net2net

GROWTH = {
    "depth": (DiTSpec(depth=4, width=32, heads=2), {}),
    "depth_append": (DiTSpec(depth=3, width=32, heads=2), {"depth_placement": "append"}),
    "width_tiled_heads_copied": (DiTSpec(depth=3, width=64, heads=4, mlp_ratio=5.0), {}),
    "head_dim": (DiTSpec(depth=2, width=64, heads=2), {}),
    "heads_zero": (DiTSpec(depth=2, width=64, heads=4), {"head_mode": "zero"}),
}
SOURCE = DiTSpec(depth=2, width=32, heads=2)


def max_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    """Largest output difference in float64, so only the grown weights' float32 storage counts."""
    x, t, y = _inputs()
    with torch.no_grad():
        return float((copy.deepcopy(a).double().eval()(x.double(), t.double(), y)
                      - copy.deepcopy(b).double().eval()(x.double(), t.double(), y)).abs().max())


@pytest.fixture(scope="module")
def small_dit() -> torch.nn.Module:
    return _drawn(SOURCE, 1)


@pytest.mark.parametrize("case", sorted(GROWTH))
def test_net2net_grows_a_dit_computing_the_same_function(small_dit, case):
    spec, kw = GROWTH[case]
    grown, info = grow_dit(small_dit, SOURCE, spec, keep_head=True, seed=2, **kw)
    assert info["function_preserving"] == "exact" and max_diff(small_dit, grown) < 1e-5, case
    with torch.no_grad():  # and in float32
        torch.testing.assert_close(grown.eval()(*_inputs()), small_dit(*_inputs()), rtol=1e-4, atol=1e-5)
    for t in set(range(spec.depth)) - {int(i) for i in info["ancestry_blocks_at"].split(",")}:
        assert not grown.blocks[t].adaLN_modulation[1].weight.any()  # new blocks: adaLN-Zero, the identity


def test_net2net_on_a_dit_states_what_it_does_not_preserve(small_dit):
    spec = DiTSpec(depth=2, width=48, heads=3)  # 32 -> 48: no tiling
    grown, info = grow_dit(small_dit, SOURCE, spec, keep_head=True)
    assert info["embed_mode"] == "random" and info["function_preserving"].startswith("no")
    assert max_diff(small_dit, grown) > 1e-2
    with pytest.raises(ValueError, match="mean_pad.*gates"):
        grow_dit(small_dit, SOURCE, spec, embed_mode="mean_pad")
    res = init_model("net2net", GROWTH["depth"][0], ancestry=small_dit, ancestry_spec=SOURCE, seed=3)
    assert res.info["class_table"] == "new (HEAD_STREAM + seed)"
    assert torch.equal(res.model.y_embedder.embedding_table.weight,
                       create_dit(GROWTH["depth"][0], head_seed=3).y_embedder.embedding_table.weight)
    with pytest.raises(ValueError, match="only grows.*width 32 -> 16"):
        init_model("net2net", DiTSpec(depth=2, width=16, heads=1), ancestry=small_dit, ancestry_spec=SOURCE)
