"""Stage 1 on Ray Train, on real data: a WAVE bank distilled from a digits ancestry by 2 DDP workers (bank
file, header, MLflow run), a rerun that resumes instead of starting over, a worker SIGKILLed mid-epoch
that the job survives bit-for-bit, WeiT pre-training without a teacher, the ancestry command, and user
mistakes as one-line errors. ``-m slow``: the full Fashion-MNIST recipe (ancestry >= 88%, bank close to it).
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import DIGITS_ANCESTRY
from safetensors.torch import save_file

from pipelines.common import UserError
from pipelines.distill import (
    DistillConfig,
    build_model,
    load_teacher,
    load_train_state,
    run_distill,
    scaling_config,
)
from weit_core.io import load_bank, load_model, save_model
from weit_core.models import vit_kinds
from weit_core.train import evaluate, iterate_batches

CHANCE = 0.1  # ten classes
FAR_ABOVE_CHANCE = 4 * CHANCE
EPOCHS = 3
# one recipe for the two ancestry tests (in process, on Ray Train): a tiny digits ViT that reaches 77-81%
ANCESTRY_RECIPE = dict(depth=2, width=32, heads=2, patch=2, epochs=12, lr=3e-3, batch_size=32,
                       warmup_epochs=0.5)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("distill")


@pytest.fixture(scope="module")
def digits_parquet(work, digits) -> Path:
    """The digits splits as the parquet folder Ray Data reads (``export_parquet``)."""
    from weit_core.data import export_parquet

    export_parquet(digits, work / "digits")
    return work / "digits"


@pytest.fixture(scope="module")
def teacher_file(work, digits_ancestry) -> Path:
    model, acc = digits_ancestry
    return save_model(work / "ancestry.safetensors", model, DIGITS_ANCESTRY, {"val_acc": acc})


@pytest.fixture(scope="module")
def base_config(work, digits_parquet, teacher_file) -> DistillConfig:
    """2 workers x 0.5 CPU on digits; lr/batch chosen so 3 short epochs learn a lot (40 steps each)."""
    return DistillConfig(teacher=str(teacher_file), dataset=str(digits_parquet), epochs=EPOCHS, lr=1e-2,
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
    cfg = {"kind": "templated", "spec": DIGITS_ANCESTRY.to_dict(), "n_templates": 4, "block": 16,
           "order": "scaler_major"}
    aux = build_model(cfg)
    load_train_state(ckpt, cfg, aux)
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


def test_killed_worker_resumes_from_checkpoint_bit_for_bit(wave_run, base_config, work):
    """Rank 1 SIGKILLs itself 2 steps into epoch 2; Ray Train restarts the worker group from the epoch-1
    checkpoint. Data order is a function of (seed, epoch) only (preserve_order + seeded local shuffle),
    optimizer and scheduler state are restored, and the gloo all-reduce of 2 ranks is commutative, so the
    final bank equals the uninterrupted run's exactly."""
    out, clean = wave_run
    config = replace(base_config, out=str(work / "killed.safetensors"), fail_at_epoch=2, max_failures=1)
    killed_out, metrics = run_distill(config)
    header = load_bank(killed_out).header
    assert header["attempt_starts"] == [1, 2]  # the second attempt started at epoch 2, not 1
    assert header["epochs"] == EPOCHS and metrics["resumed_from_epoch"] == 1
    assert any(p.name == "fail_at_epoch_2" for p in (work / "runs").glob("distill-killed-*/*"))
    a, b = _tensors(out), _tensors(killed_out)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=f"{k} differs after the resume")
    assert metrics["test_acc"] == clean["test_acc"]


def test_weit_mode_pretrains_without_teacher(ray_session, base_config, work):
    from mlflow import MlflowClient

    config = replace(base_config, teacher="none", epochs=2, aux={"depth": 2, "width": 32, "heads": 2, "patch": 2},
                     out=str(work / "weit.safetensors"))
    out, metrics = run_distill(config)
    h = load_bank(out).header
    assert h["mode"] == "weit" and h["source_model"] is None and h["epochs"] == 2
    assert "test_agreement" not in metrics and metrics["test_acc"] > FAR_ABOVE_CHANCE, metrics
    run = MlflowClient(config.mlflow_uri).get_run(metrics["run_id"])
    assert run.data.tags["weit.mode"] == "weit" and "test_acc" in run.data.metrics


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
    with pytest.raises(UserError, match="--teacher-checkpoint"):
        load_teacher("vit_tiny_patch16_224")
    with pytest.raises(UserError, match="plain safetensors"):
        load_teacher(str(ckpt))
    with pytest.raises(UserError, match="neither a file nor a timm model"):
        load_teacher("vit_no_such_model")
    with pytest.raises(UserError, match="not found"):
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
