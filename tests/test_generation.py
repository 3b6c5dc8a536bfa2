"""The DiT family and the generation task on real Fashion-MNIST: a DiT trains through the one loop (its
denoising loss falls; in the slow test its FID too), evaluation repeats to the number, class_acc is reported
only where the judge knows the data, and a bank builds DiTs of two sizes through ``wave`` exactly as the
bank's auxiliary model computes them."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from weit_core.models import get_family
from weit_core.models.dit import DIT, UnpatchifiableError, create_dit
from weit_core.models.elastic import AtSize
from weit_core.tasks import get_task
from weit_core.tasks.generation import denoising_loss, make_generation_task, prepare, sample
from weit_core.train import evaluate, fit, iterate_batches, make_optimizer, seed_everything

IO = {"in_chans": 1, "img_size": 28, "num_classes": 10}
SMALL = {"depth": 2, "width": 32, "heads": 2}


@pytest.fixture(scope="module")
def fmnist(fmnist_dir):
    from weit_core.data import load_fashion_mnist

    return load_fashion_mnist(fmnist_dir, limit=2000)


def _train(model: nn.Module, data, steps: int, lr: float, task, batch_size: int = 64) -> list[dict]:
    per_epoch = len(data.train) // batch_size
    return fit(model, lambda ep: iterate_batches(data.train.x, data.train.y, batch_size, seed=ep, drop_last=True),
               make_optimizer(model, lr), epochs=-(-steps // per_epoch), max_steps=per_epoch, task=task)


def test_the_family_builds_any_size_and_starts_as_adaln_zero(tmp_path):
    from weit_core.io import load_model, save_model

    fam = get_family("dit")
    assert get_task("generation").default_family == "dit" and get_task("generation").mode == "min"
    for size in (SMALL, {"depth": 3, "width": 48, "heads": 3, "mlp_ratio": 2.0, "patch": 7}):
        spec = fam.spec_for(size, IO)
        seed_everything(0)
        model = create_dit(spec)
        assert sum(p.numel() for p in model.parameters()) == spec.num_params()
        x, t, y = torch.randn(3, 1, 28, 28), torch.rand(3), torch.tensor([0, 9, -1])
        assert model(x, t, y).shape == x.shape and not model(x, t, y).any()  # zero modulation, zero output
        assert set(fam.layout(spec)) == {"patch", "qkv", "proj", "fc1", "fc2", "adaln"}
    assert set(fam.kinds(spec)) >= set(get_family("vit").kinds(get_family("vit").spec_for(SMALL, IO)))
    with torch.no_grad():
        model.final_layer.linear.weight.normal_()  # something to survive the round trip
    loaded, header = load_model(save_model(tmp_path / "dit.safetensors", model, spec))
    assert header["family"] == "dit" and loaded.spec == spec
    torch.testing.assert_close(loaded(x, t, y), model.eval()(x, t, y))


def test_an_unpatchifiable_size_is_a_one_line_error():
    with pytest.raises(UnpatchifiableError) as err:
        get_family("dit").spec_for({**SMALL, "patch": 5}, IO)
    assert "\n" not in str(err.value) and "patch 5 does not divide image size 28" in str(err.value)
    assert DIT.check_size({**SMALL, "patch": 5, "img_size": 28}, 16) == "patch_not_dividing_image"
    assert DIT.check_size({**SMALL, "patch": 4, "img_size": 28}, 16) is None
    assert "patch_not_dividing_image" in DIT.drop_reasons


def test_prepare_reproduces_from_the_seed_and_drops_labels(fmnist):
    x, y = fmnist.train.x[:1000], fmnist.train.y[:1000]
    seed_everything(3)
    (xt, t, labels), v = prepare(x, y)
    seed_everything(3)
    (xt2, t2, labels2), v2 = prepare(x, y)
    assert torch.equal(xt, xt2) and torch.equal(t, t2) and torch.equal(labels, labels2) and torch.equal(v, v2)
    tb = t.view(-1, 1, 1, 1)
    torch.testing.assert_close(xt, (1 - tb) * x + tb * (v + x))  # the straight line, velocity = noise - image
    dropped = (labels == -1).float().mean().item()
    assert 0.05 < dropped < 0.15 and torch.equal(labels[labels >= 0], y[labels >= 0])


def test_a_dit_trained_through_the_loop_denoises_better_and_evaluates_reproducibly(fmnist):
    task = make_generation_task("generation_test", samples=48, steps=2)
    val = list(iterate_batches(fmnist.val.x[:256], fmnist.val.y[:256], 128, shuffle=False))
    seed_everything(0)
    model = create_dit(DIT.spec_for(SMALL, IO))
    before = denoising_loss(model, val)
    history = _train(model, fmnist, 150, 3e-3, task)
    after = denoising_loss(model, val)
    assert "mse" in history[-1] and "fid" not in history[-1] and after < 0.6 * before, (before, after)

    from weit_core import fid

    first = evaluate(model, val, task=task)
    fid._REAL_STATS.clear()
    again = evaluate(model, val, task=task)
    assert first == again and first["samples"] == 48 and 0 <= first["class_acc"] <= 1, first
    labels = val[0][1][:8]  # classifier-free guidance: the null class runs alongside and changes the samples
    plain, guided = (sample(model, labels, (1, 28, 28), steps=2, guidance=w) for w in (1.0, 3.0))
    assert plain.shape == guided.shape == (8, 1, 28, 28) and not torch.allclose(plain, guided)
    real = [(val[0][0][:48], val[0][1][:48])]  # the loss is on the real images the samples are compared with
    assert first["real_class_acc"] > 0.8 and first["loss"] == pytest.approx(denoising_loss(model, real), rel=1e-5)


def test_class_acc_is_omitted_where_the_judge_does_not_know_the_data():
    from weit_core.data import load_digits

    d = load_digits(img_size=28)
    task = make_generation_task("generation_digits", samples=32, steps=1)
    seed_everything(0)
    out = evaluate(create_dit(DIT.spec_for(SMALL, d.io)), iterate_batches(d.val.x, d.val.y, 64, shuffle=False),
                   task=task)
    assert "fid" in out and "class_acc" not in out, out


def test_a_bank_builds_two_dit_sizes_through_wave_exactly(fmnist, tmp_path):
    from weit_core.io import load_bank
    from weit_core.stage1 import build_elastic, save_elastic
    from weit_core.strategies import init_model

    ref = DIT.spec_for({"depth": 2, "width": 32, "heads": 2}, IO)
    small = DIT.spec_for({"depth": 1, "width": 16, "heads": 1}, IO)
    elastic = build_elastic(DIT, ref, n=2, block=16, seed=0)
    task = make_generation_task("generation_bank", samples=8, steps=1)
    _train(AtSize(elastic, ref), fmnist, 30, 3e-3, task)  # stage 1's one size, on the DiT's three inputs
    path = save_elastic(tmp_path / "dit_bank.safetensors", elastic, {}, [small, ref])
    bank = load_bank(path)
    x, t, y = fmnist.val.x[:16], torch.rand(16), fmnist.val.y[:16]
    for spec in (ref, small):
        model = init_model("wave", spec, bank=bank, fit_steps=0, seed=0).model
        state = model.state_dict()
        expected = {k: v.detach() for k, v in elastic.state_for(spec, head=False).items()}
        assert set(state) == set(expected) | {"y_embedder.embedding_table.weight"}
        for k, v in expected.items():
            torch.testing.assert_close(state[k], v, msg=k)
        assert state["blocks.0.adaLN_modulation.1.bias"].abs().sum() > 0  # trained, not the zero init
        with torch.no_grad():  # and the plain model computes what the aux model computes at that size
            with torch.device("meta"):
                shell = create_dit(spec)
            aux = functional_call(shell.to_empty(device="cpu").eval(), {**expected, "y_embedder.embedding_table.weight":
                                  state["y_embedder.embedding_table.weight"]}, (x, t, y))
            torch.testing.assert_close(model.eval()(x, t, y), aux)
    # stage 2 with the task's loss and the ancestry as teacher (a DiT's class count read from its spec)
    fit = (fmnist.train.x[:128], fmnist.train.y[:128])
    res = init_model("wave", small, bank=bank, fit_steps=4, fit_data=fit, seed=0, task=task, fit_teacher="ancestry",
                     ancestry=create_dit(ref))
    assert res.info["fit_teacher"] == "ancestry" and res.info["fit_steps"] == 4 and 0 < res.info["fit_loss"] < 10


def test_a_users_parquet_of_images_is_a_generation_task(tmp_path):
    """Labelled images a user brings as parquet (here scikit-learn's digits at 28 x 28): the generation task
    loads them, a DiT sized by their shape learns to denoise them, and FID is computed against them (no
    class_acc: the Fashion-MNIST judge does not know digits)."""
    from weit_core.data import load_digits
    from weit_core.parquet import export_parquet

    export_parquet(load_digits(img_size=28), tmp_path / "digits")
    task = get_task("generation:32x2")
    data = task.load(str(tmp_path / "digits"))
    assert data.io == IO and len(data.train) > 1000
    seed_everything(0)
    model = create_dit(DIT.spec_for(SMALL, data.io))
    val = [(data.val.x[:128], data.val.y[:128])]
    before = denoising_loss(model, val)
    _train(model, data, 40, 3e-3, task)
    assert denoising_loss(model, val) < before - 0.2
    out = evaluate(model, iterate_batches(data.val.x, data.val.y, 64, shuffle=False), task=task)
    assert out["fid"] > 0 and "class_acc" not in out


def test_a_dit_bank_trains_without_a_teacher_weit_mode(fmnist, tmp_path):
    """WeiT's mode (no ancestry): stage 1 trains the templates on the denoising loss itself, every size of the
    range; the bank's sizes then denoise better than the same bank untrained, and wave builds from it."""
    from weit_core.io import load_bank
    from weit_core.stage1 import build_elastic, make_bank, save_elastic
    from weit_core.strategies import init_model

    ref = DIT.spec_for({"depth": 2, "width": 32, "heads": 2}, IO)
    small = DIT.spec_for({"depth": 1, "width": 16, "heads": 1}, IO)
    task = make_generation_task("generation_weit", samples=8, steps=1)
    elastic = build_elastic(DIT, ref, n=2, block=16, seed=0)
    val = [(fmnist.val.x[:128], fmnist.val.y[:128])]
    before = {s.label: denoising_loss(AtSize(elastic, s), val) for s in (small, ref)}
    history = make_bank(elastic, fmnist.train.x, fmnist.train.y, sizes=[small, ref], teacher=None, epochs=1,
                        max_steps=30, lr=3e-3, batch_size=64, task=task)
    after = {s.label: denoising_loss(AtSize(elastic, s), val) for s in (small, ref)}
    assert len(history) == 1 and all(after[k] < before[k] - 0.1 for k in before), (before, after)
    bank = load_bank(save_elastic(tmp_path / "weit.safetensors", elastic, {"mode": "weit"}, [small, ref]))
    assert bank.header["mode"] == "weit" and len(bank.header["size_range"]) == 2
    model = init_model("wave", small, bank=bank, fit_steps=0, seed=0).model
    assert denoising_loss(model, val) == pytest.approx(after[small.label], rel=0.05)


@pytest.mark.slow
def test_a_trained_dit_has_a_lower_fid_than_an_untrained_one(fmnist):
    task = make_generation_task("generation_slow", samples=500, steps=10)
    val = list(iterate_batches(fmnist.val.x[:500], fmnist.val.y[:500], 250, shuffle=False))
    seed_everything(0)
    model = create_dit(DIT.spec_for({"depth": 2, "width": 64, "heads": 2}, IO))
    untrained = evaluate(model, val, task=task)
    _train(model, fmnist, 900, 3e-3, task)
    trained = evaluate(model, val, task=task)
    assert trained["fid"] < 0.8 * untrained["fid"] and trained["class_acc"] > untrained["class_acc"] + 0.1, (
        untrained, trained)
