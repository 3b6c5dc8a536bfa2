"""Stage 1 on Ray Train, on real data: a WAVE bank distilled from a digits ancestry by 2 DDP workers (bank
file, header, MLflow run), a rerun that resumes instead of starting over, a bank trained over a size range
(sandwich rule) whose every size is what stage 2 starts from, a worker of that run SIGKILLed mid-epoch that
the job survives bit-for-bit, WeiT pre-training of a range without a teacher, the ancestry command, and user
mistakes (bad ranges too) as one-line errors before Ray starts. ``-m slow``: the full
Fashion-MNIST recipe (ancestry >= 88%, bank close to it).
"""

from __future__ import annotations

import os
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import DIGITS_ANCESTRY
from ray_machinery import CrashAfter, ship_by_value
from safetensors.torch import save_file

from pipelines.common import UserError
from pipelines.distill import DistillConfig, build_aux, plan_range, run_distill
from pipelines.runner import scaling_config
from weit_core.io import load_bank, load_model, save_model
from weit_core.jobs import load_train_state
from weit_core.models import ViTSpec, vit_kinds
from weit_core.models.elastic import AtSize
from weit_core.models.vit import VIT
from weit_core.parquet import prepare_parquet
from weit_core.stage1 import load_elastic
from weit_core.strategies import init_model
from weit_core.teacher import TeacherError, check_teacher, load_teacher, rebuild_teacher
from weit_core.train import evaluate, iterate_batches

CI_SPACE = Path(__file__).resolve().parents[1] / "tune_spaces" / "ci.yaml"
CHANCE = 0.1  # ten classes
FAR_ABOVE_CHANCE = 4 * CHANCE
EPOCHS = 3
# one recipe for the two ancestry tests (in process, on Ray Train): a tiny digits ViT that reaches 77-81%
ANCESTRY_RECIPE = dict(depth=2, width=32, heads=2, patch=2, epochs=12, lr=3e-3, batch_size=32,
                       warmup_epochs=0.5)
# a size range on digits: `--depths 1,2 --widths 16,32 --head-dim 16` (patch 2 from the teacher); its largest
# size, the reference, is the ancestry's own size
RANGE = dict(depths=[1, 2], widths=[16, 32], head_dim=16, n_random=1)
RANGE_EPOCHS = 6  # the smallest size learns slower than the reference: 3 epochs leave it near 35%
RANGE_SIZES = [replace(DIGITS_ANCESTRY, depth=d, width=w, heads=w // 16) for d in (1, 2) for w in (16, 32)]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("distill")


@pytest.fixture(scope="module")
def digits_parquet(work, digits) -> Path:
    """The digits splits as the parquet folder Ray Data reads (``export_parquet``)."""
    from weit_core.parquet import export_parquet

    export_parquet(digits, work / "digits")
    return work / "digits"


@pytest.fixture(scope="module")
def teacher_file(work, digits_ancestry) -> Path:
    model, acc = digits_ancestry
    return save_model(work / "ancestry.safetensors", model, DIGITS_ANCESTRY, {"val_acc": acc})


@pytest.fixture(scope="module")
def base_config(work, digits_parquet, teacher_file) -> DistillConfig:
    """2 workers x 0.5 CPU on digits; lr/batch chosen so 3 short epochs learn a lot (40 steps each); N = 4
    templates (not the default 16) keeps these runs small."""
    return DistillConfig(teacher=str(teacher_file), dataset=str(digits_parquet), epochs=EPOCHS, lr=1e-2,
                         n_templates=4,
                         warmup_epochs=0.5, batch_size=32, workers=2, cpus_per_worker=0.5,
                         out=str(work / "wave.safetensors"), storage=str(work / "runs"),
                         mlflow_uri=f"sqlite:///{work / 'mlruns.db'}", seed=0, quiet=True)


@pytest.fixture(scope="module")
def wave_run(ray_session, base_config):
    out, metrics = run_distill(base_config)
    return out, metrics


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    loaded = load_bank(path)
    return {**{f"t.{k}": v for k, v in loaded.bank.templates.items()},
            **{f"s.{k}": v for k, v in loaded.aux_scalers.grids.items()}}


def test_wave_bank_file_header_and_mlflow(wave_run, base_config, digits):
    from mlflow import MlflowClient

    out, metrics = wave_run
    loaded = load_bank(out, expect_kinds=vit_kinds(DIGITS_ANCESTRY, 4, 16))
    h = loaded.header
    assert h["mode"] == "wave" and h["epochs"] == EPOCHS and h["N"] == 4 and h["a"] == h["b"] == 16
    assert h["source_model"]["kind"] == "weit-model" and h["source_model"]["spec"] == DIGITS_ANCESTRY.to_dict()
    assert h["aux_spec"] == DIGITS_ANCESTRY.to_dict() and h["data"]["train"] == len(digits.train)
    assert h["metrics"]["test_acc"] == metrics["test_acc"] and h["attempt_starts"] == [1]
    assert metrics["test_acc"] > FAR_ABOVE_CHANCE, metrics
    assert metrics["test_agreement"] > FAR_ABOVE_CHANCE, metrics
    assert metrics["epochs_now"] == EPOCHS

    # The aux model rebuilt from the last checkpoint (templated weights = bank x scalers, nothing else)
    # scores on the real test split exactly what the workers reported.
    ckpt = Path(metrics["checkpoint"])
    aux = build_aux(_elastic_cfg(DIGITS_ANCESTRY)).keep
    load_train_state(ckpt, aux)
    acc = evaluate(aux, iterate_batches(digits.test.x, digits.test.y, 256, shuffle=False))["acc"]
    assert acc == pytest.approx(metrics["test_acc"], abs=1e-9)

    client = MlflowClient(base_config.mlflow_uri)
    run = client.get_run(metrics["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["weit.mode"] == "wave" and run.data.tags["weit.task"] == "digits"
    assert run.data.params["lr"] == str(base_config.lr) and run.data.params["aux.width"] == "32"
    for key in ("loss", "test_acc", "test_agreement", "train_acc"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == list(range(1, EPOCHS + 1))
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {out.name, out.with_suffix(".json").name} <= artifacts


def test_rerun_resumes_and_redoes_nothing(wave_run, base_config):
    from mlflow import MlflowClient

    out, first = wave_run
    before = _tensors(out)
    out2, again = run_distill(base_config)
    assert out2 == out and again["epochs_now"] == 0 and again["resumed_from_epoch"] == EPOCHS
    assert again["run_id"] == first["run_id"]  # the same MLflow run, continued
    after = _tensors(out)
    assert all(torch.equal(before[k], after[k]) for k in before)
    steps = [m.step for m in MlflowClient(base_config.mlflow_uri).get_metric_history(first["run_id"], "loss")]
    assert steps == list(range(1, EPOCHS + 1))  # no epoch logged twice


def test_weit_mode_pretrains_a_range_without_teacher(ray_session, base_config, work):
    from mlflow import MlflowClient

    config = replace(base_config, teacher="none", epochs=RANGE_EPOCHS, aux={"patch": 2}, **RANGE,
                     out=str(work / "weit.safetensors"))
    out, metrics = run_distill(config)
    h = load_bank(out).header
    assert h["mode"] == "weit" and h["source_model"] is None and h["epochs"] == RANGE_EPOCHS
    assert h["aux_spec"] == DIGITS_ANCESTRY.to_dict() and len(h["size_range"]) == 4
    assert "test_agreement" not in metrics and metrics["test_acc"] > FAR_ABOVE_CHANCE, metrics
    assert metrics["test_acc/1x16x1"] > FAR_ABOVE_CHANCE, metrics
    run = MlflowClient(config.mlflow_uri).get_run(metrics["run_id"])
    assert run.data.tags["weit.mode"] == "weit" and {"test_acc", "test_acc/1x16x1"} <= set(run.data.metrics)


# ----------------------------------------------------------------------------------------- a size range


@pytest.fixture(scope="module")
def range_run(ray_session, base_config, work):
    """WAVE over depth 1-2 x width 16-32 (4 sizes, 3 per step: largest, smallest, one drawn)."""
    config = replace(base_config, **RANGE, epochs=RANGE_EPOCHS, out=str(work / "range.safetensors"))
    return config, *run_distill(config)


def _elastic_cfg(spec: ViTSpec) -> dict:
    return {"spec": spec.to_dict(), "n_templates": 4, "block": 16, "order": "scaler_major"}


def test_range_bank_header_rebuild_and_every_watched_size(range_run, digits):
    from mlflow import MlflowClient

    config, out, metrics = range_run
    loaded = load_bank(out, expect_kinds=vit_kinds(DIGITS_ANCESTRY, 4, 16))
    h = loaded.header
    assert h["aux_spec"] == DIGITS_ANCESTRY.to_dict()  # the largest of the range
    assert sorted(map(str, h["size_range"])) == sorted(str(s.to_dict()) for s in RANGE_SIZES)
    assert h["resize"] == {"width_rule": "nested", "depth_rule": "nested"}
    assert h["n_random"] == 1 and h["draws_per_step"] == 3 and h["range_source"] == "--depths/--widths"
    assert loaded.free is not None and h["free"] == sorted(loaded.free)
    assert "pos_embed" in loaded.free and not any(k.startswith("head.") for k in loaded.free)
    assert h["epochs"] == RANGE_EPOCHS and out.with_suffix(".json").is_file()

    # the aux model of the last checkpoint (its head included) scores, at each watched size, exactly what
    # the workers reported; the bank file rebuilds the same model at every size of the range
    aux = build_aux(_elastic_cfg(DIGITS_ANCESTRY)).keep
    load_train_state(Path(metrics["checkpoint"]), aux)
    for label in ("1x16x1", "2x32x2"):
        size = next(s for s in RANGE_SIZES if s.label == label)
        got = evaluate(AtSize(aux, size), iterate_batches(digits.test.x, digits.test.y, 256, shuffle=False))["acc"]
        assert got == pytest.approx(metrics[f"test_acc/{label}"], abs=1e-9), label
        assert got > FAR_ABOVE_CHANCE, (label, got)
    assert metrics["test_acc"] == metrics["test_acc/2x32x2"]
    rebuilt = load_elastic(loaded, VIT)
    for s in RANGE_SIZES:
        a, b = rebuilt.state_for(s, head=False), aux.state_for(s, head=False)
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), s

    client = MlflowClient(config.mlflow_uri)
    for key in ("test_acc/1x16x1", "test_acc/2x32x2", "test_agreement"):
        steps = [m.step for m in client.get_metric_history(metrics["run_id"], key)]
        assert steps == list(range(1, RANGE_EPOCHS + 1)), key
    assert client.get_run(metrics["run_id"]).data.params["size_range"] == "1x16x1 2x16x1 1x32x2 2x32x2"


def test_range_bank_initializes_its_smallest_size_better_than_a_random_bank(range_run, digits):
    """What stage 2 receives for a size the range trained, with a new head and the same small fit budget."""
    _, out, _ = range_run
    small = RANGE_SIZES[0]
    fit = digits.train.subset(256, seed=0)
    common = dict(bank=load_bank(out), fit_data=(fit.x, fit.y), fit_steps=30, seed=0)
    wave, rnd = init_model("wave", small, **common), init_model("wave_random_bank", small, **common)
    assert wave.info["in_stage1_range"] is True and wave.info["free_params"] == "bank"

    def val(m):
        return evaluate(m, iterate_batches(digits.val.x, digits.val.y, 256, shuffle=False))["acc"]

    assert val(wave.model) > val(rnd.model) + 0.2, (val(wave.model), val(rnd.model))  # measured: 0.58 vs 0.19


def test_range_run_killed_mid_epoch_resumes_bit_for_bit(range_run, base_config, work):
    """Rank 1 SIGKILLs itself 2 steps into epoch 2 (a test hook through ``wrap_batches``); Ray Train restarts the worker group from the epoch-1
    checkpoint (the whole aux model, optimizer and scheduler). Data order is a function of (seed, epoch) only
    (preserve_order + seeded local shuffle), the sandwich's size draws restart from (seed, epoch) every epoch,
    and the gloo all-reduce of 2 ranks is commutative, so the final bank equals the uninterrupted range run's
    exactly. (The reference-only path checkpoints and restores through the same code.)"""
    config, out, clean = range_run
    ship_by_value()
    marker = work / "killed" / "fail_at_epoch_2"
    killed_out, metrics = run_distill(replace(config, out=str(work / "range_killed.safetensors"),
                                              wrap_batches=CrashAfter(epoch=2, marker=marker)))
    header = load_bank(killed_out).header
    assert header["attempt_starts"] == [1, 2]  # the second attempt started at epoch 2, not 1
    assert header["epochs"] == RANGE_EPOCHS and metrics["resumed_from_epoch"] == 1
    assert marker.read_text().startswith("killed pid")  # the worker really died
    a, b = _tensors(out), _tensors(killed_out)
    free_a, free_b = load_bank(out).free, load_bank(killed_out).free
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=f"{k} differs after the resume")
    for k in free_a:
        torch.testing.assert_close(free_b[k], free_a[k], rtol=0, atol=0, msg=f"free {k} differs after the resume")
    assert metrics["test_acc/1x16x1"] == clean["test_acc/1x16x1"]


def test_every_rank_draws_the_same_sizes():
    """Two ranks build the model from the same config and reseed each epoch as train_worker does."""
    cfg = {**_elastic_cfg(DIGITS_ANCESTRY), "sizes": [s.to_dict() for s in RANGE_SIZES], "n_random": 1, "seed": 3}
    ranks = [build_aux(cfg), build_aux(cfg)]
    for e in (1, 2):
        for built in ranks:
            built.on_epoch_start(e)
        a, b = ([built.model.draw() for _ in range(20)] for built in ranks)
        assert a == b and len({tuple(d) for d in a}) > 1  # the same draws, and not always the same size
        assert all(d[:2] == [RANGE_SIZES[-1], RANGE_SIZES[0]] for d in a)  # largest and smallest every step


def test_space_range_keeps_the_sizes_the_sweep_keeps(digits_parquet, work):
    from weit_core.sizes import check_size
    from weit_core.space import load_space
    from weit_core.trials import size_points

    data = prepare_parquet(str(digits_parquet), work / "space_data")
    plan = plan_range(DistillConfig(space=str(CI_SPACE)), data, None)
    space = load_space(CI_SPACE)
    keep = [p for p in size_points(space) if not check_size(p, data.io, 2, space.constraints, 16)]
    assert {(s.depth, s.width, s.heads, s.mlp_ratio) for s in plan.sizes} == {
        (p["depth"], p["width"], p["heads"], p["mlp_ratio"]) for p in keep}
    assert plan.dropped and sum(plan.dropped.values()) == len(size_points(space)) - len(keep)
    ref = plan.ref  # max depth, max width, max MLP ratio of the range; the patch of the space's task
    assert (ref.depth, ref.width, ref.mlp_ratio, ref.patch) == (max(p["depth"] for p in keep),
                                                                max(p["width"] for p in keep), 2.0, 2)


def test_distill_flags_and_make_banks_plan_the_same_range(digits_parquet, work):
    """`--depths 1,2 --widths 16,32 --head-dim 16` and make_banks' grid go through one planner
    (``weit_core.sizes``): the same reference (the largest size) and sizes, smallest first; a size the
    reference cannot reach by the resize rule is an error that names it."""
    from weit_core.sizes import grid, largest, size_range

    data = prepare_parquet(str(digits_parquet), work / "plan_data")
    plan = plan_range(DistillConfig(aux={"patch": 2}, **RANGE), data, None)
    points = grid([1, 2], [16, 32], head_dim=16)
    io = {"patch": 2, "img_size": 8, "in_chans": 1, "num_classes": 10}
    same = size_range(VIT, VIT.make_spec(largest(points, 16), io), points, block=16)
    assert plan.ref == same.ref == DIGITS_ANCESTRY
    assert plan.sizes == same.sizes == sorted(RANGE_SIZES, key=lambda s: s.num_params())
    assert plan.watch == [RANGE_SIZES[0], DIGITS_ANCESTRY] and plan.draws_per_step(1) == 3
    with pytest.raises(ValueError, match=r"size 1x24x1x4 of the range: width 24 is not a multiple of the template"):
        size_range(VIT, DIGITS_ANCESTRY, [{"depth": 1, "width": 24, "heads": 1, "mlp_ratio": 4.0}], block=16)


BAD_RANGES = {
    "width off the block": (["--widths", "24,32"], r"width 24 of the widths is not a multiple of the template block 16"),
    "empty list": (["--depths", ""], r"--depths is empty; give a comma-separated list"),
    "not a number": (["--depths", "2,x"], r"--depths '2,x': expected whole numbers"),
    "heads not dividing a width": (["--widths", "16,32", "--heads", "3"], r"heads 3 does not divide width 16"),
    "head dim not dividing a width": (["--widths", "16,32", "--head-dim", "32"],
                                      r"head_dim 32 does not divide width 16"),
    "unknown rule": (["--widths", "32", "--width-rule", "grow"], r"choose from nested, spread, interp"),
}


@pytest.mark.parametrize("case", list(BAD_RANGES))
def test_bad_range_is_one_line_before_ray_starts(case, work, capsys, monkeypatch):
    import pipelines.distill
    from pipelines.cli import main

    def no_ray(*_, **__):
        raise AssertionError("Ray was started for a bad range")

    monkeypatch.setattr(pipelines.distill, "init_ray", no_ray)
    argv, pattern = BAD_RANGES[case]
    capsys.readouterr()
    rc = main(["distill", "--dataset", "digits", *argv, "--out", str(work / "bad_range.safetensors"),
               "--storage", str(work / "runs")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert re.search(pattern, err[0]), err[0]


def test_use_gpu_wires_scaling_config_and_needs_gpus(ray_session, base_config, work):
    """Not run on a GPU here: the flag reaches ScalingConfig, and a machine without GPUs says so."""
    sc = scaling_config(2, 0.5, use_gpu=True)
    assert sc.use_gpu and sc.num_gpus_per_worker == 1 and sc.num_cpus_per_worker == 0.5
    assert not scaling_config(2, 0.5, use_gpu=False).use_gpu
    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has GPUs; the no-GPU error cannot be shown")
    with pytest.raises(UserError, match="--use-gpu"):
        run_distill(replace(base_config, use_gpu=True, out=str(work / "gpu.safetensors")))


def test_timm_name_and_plain_checkpoint_as_teacher(digits_ancestry, digits, tmp_path):
    """A user's own timm model: name + kwargs + a plain safetensors state_dict (no weit header)."""
    model, _ = digits_ancestry
    ckpt = tmp_path / "user.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    t = load_teacher("vit_tiny_patch16_224", str(ckpt), DIGITS_ANCESTRY.timm_kwargs())
    assert t.info["kind"] == "timm" and t.spec is None
    x = digits.test.x[:32]
    with torch.no_grad():
        torch.testing.assert_close(t.model(x), model.eval()(x))
        torch.testing.assert_close(rebuild_teacher(t.shipment())(x), model(x))  # what a Ray worker runs
    check_teacher(t, (1, 8, 8), 10)
    with pytest.raises(TeacherError, match=r"outputs \(10,\) per example but the data has 7 classes"):
        check_teacher(t, (1, 8, 8), 7)
    with pytest.raises(TeacherError, match="--teacher-checkpoint"):
        load_teacher("vit_tiny_patch16_224")
    with pytest.raises(TeacherError, match="plain safetensors"):
        load_teacher(str(ckpt))
    with pytest.raises(TeacherError, match="neither a file nor a timm model"):
        load_teacher("vit_no_such_model")
    with pytest.raises(TeacherError, match="not found"):
        load_teacher(str(tmp_path / "missing.safetensors"))


def test_bad_aux_size_is_a_user_error(base_config, work):
    with pytest.raises(UserError, match="multiple of the template block"):
        run_distill(replace(base_config, aux={"width": 24, "heads": 2}, out=str(work / "bad.safetensors")))


def test_ancestry_in_process_on_digits(digits, tmp_path):
    from mlflow import MlflowClient

    from pipelines.ancestry import train_ancestry

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    path, metrics = train_ancestry("digits", **ANCESTRY_RECIPE, out=tmp_path / "anc.safetensors",
                                   mlflow_uri=uri, quiet=True)
    model, header = load_model(path)
    assert header["spec"] == DIGITS_ANCESTRY.to_dict()
    assert header["info"]["metrics"]["epoch"] == ANCESTRY_RECIPE["epochs"]
    acc = evaluate(model, iterate_batches(digits.test.x, digits.test.y, 256, shuffle=False))["acc"]
    assert acc == pytest.approx(metrics["test_acc"], abs=1e-9) and acc > FAR_ABOVE_CHANCE
    history = MlflowClient(uri).get_metric_history(metrics["run_id"], "test_acc")
    assert [m.step for m in history] == list(range(1, ANCESTRY_RECIPE["epochs"] + 1))


@pytest.mark.slow
def test_ancestry_on_ray_train(ray_session, digits_parquet, tmp_path):
    from pipelines.ancestry import train_ancestry

    path, metrics = train_ancestry(str(digits_parquet), **ANCESTRY_RECIPE, out=tmp_path / "anc.safetensors",
                                   workers=2, storage=str(tmp_path / "runs"),
                                   mlflow_uri=f"sqlite:///{tmp_path / 'mlruns.db'}", quiet=True)
    model, header = load_model(path)
    assert metrics["epochs_now"] == ANCESTRY_RECIPE["epochs"], metrics
    assert metrics["test_acc"] > FAR_ABOVE_CHANCE, metrics
    assert header["info"]["job"].startswith("ancestry-")


@pytest.mark.slow
def test_fashion_mnist_bank_close_to_its_ancestry(ray_session, tmp_path):
    """The full recipe on the real Fashion-MNIST train split with 2 CPU workers. Reuses an ancestry from
    $WEIT_FMNIST_ANCESTRY when given (it takes long to train), else trains one with the default recipe."""
    from pipelines.ancestry import train_ancestry

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    ancestry = os.environ.get("WEIT_FMNIST_ANCESTRY")
    if ancestry:
        anc_acc = load_model(ancestry)[1]["info"]["metrics"]["test_acc"]
    else:
        path, m = train_ancestry("fashion_mnist", out=tmp_path / "ancestry.safetensors", mlflow_uri=uri)
        ancestry, anc_acc = str(path), m["test_acc"]
    assert anc_acc >= 0.88
    epochs = int(os.environ.get("WEIT_FMNIST_DISTILL_EPOCHS", "8"))
    _, metrics = run_distill(DistillConfig(teacher=ancestry, dataset="fashion_mnist", epochs=epochs, workers=2,
                                           out=str(tmp_path / "bank.safetensors"), storage=str(tmp_path / "runs"),
                                           mlflow_uri=uri))
    assert metrics["test_acc"] >= anc_acc - 0.03, (metrics["test_acc"], anc_acc)
