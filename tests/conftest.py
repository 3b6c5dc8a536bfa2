"""Shared fixtures: real data slices, a bank distilled in-process on digits, a local Ray, a sqlite MLflow."""

from __future__ import annotations

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # Ray >= 2.59 token auth breaks later CLI/job calls
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

from weit_core.models import ViTSpec, create_vit  # noqa: E402
from weit_core.models.vit import VIT  # noqa: E402
from weit_core.stage1 import build_elastic, make_bank  # noqa: E402
from weit_core.train import evaluate, fit, iterate_batches, make_optimizer, seed_everything  # noqa: E402

# one thread: the test models are tiny, and Ray workers/servers share the 2 cores (2 threads each oversubscribe)
torch.set_num_threads(1)

DIGITS_ANCESTRY = ViTSpec(depth=2, width=32, heads=2, patch=2, img_size=8, in_chans=1, num_classes=10)


@pytest.fixture(scope="session")
def fmnist_dir():
    """The real Fashion-MNIST files: a test skips where they are not installed, but fails in CI, whose setup
    installs them (a silent skip there would hide a broken setup)."""
    from weit_core.data import DataNotFoundError, find_fashion_mnist

    try:
        return find_fashion_mnist()
    except DataNotFoundError as e:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"Fashion-MNIST must be present in CI: {e}")
        pytest.skip(f"Fashion-MNIST not installed (run `sudo apt-get install dataset-fashion-mnist`): {e}")


@pytest.fixture(scope="session")
def digits():
    from weit_core.data import load_digits

    return load_digits(seed=0)


@pytest.fixture(scope="session")
def digits_ancestry(digits):
    """A small ViT trained on digits (the teacher for test banks): ~92% val accuracy in ~15 s."""
    seed_everything(0)
    model = create_vit(DIGITS_ANCESTRY)
    fit(model, lambda epoch: iterate_batches(digits.train.x, digits.train.y, 64, seed=epoch - 1),
        make_optimizer(model, 3e-3), epochs=30)
    acc = evaluate(model, iterate_batches(digits.val.x, digits.val.y, 256, shuffle=False))["acc"]
    return model.eval(), acc


@pytest.fixture(scope="session")
def digits_bank(digits, digits_ancestry):
    """(bank, aux_scalers, aux_acc): a WAVE bank distilled in-process from the digits ancestry into an
    auxiliary model of the same size built only from templates (stage 1 as ``weit_core.stage1`` runs it, on
    the reference size alone)."""
    teacher, _ = digits_ancestry
    aux = build_elastic(VIT, DIGITS_ANCESTRY, n=4, block=16, seed=1)
    make_bank(aux, digits.train.x, digits.train.y, teacher=teacher, epochs=30, lr=3e-3, batch_size=64, seed=1)
    acc = evaluate(aux, iterate_batches(digits.val.x, digits.val.y, 256, shuffle=False))["acc"]
    return aux.bank, aux.scalers, acc


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray (2 CPUs, dashboard on loopback) for the whole test session, started as the pipelines
    start theirs (``init_ray``: always a new Ray, never a ``ray start`` head left on the machine)."""
    ray = pytest.importorskip("ray")
    from pipelines.common import init_ray

    init_ray(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture
def mlflow_uri(tmp_path):
    """A fresh sqlite MLflow store per test (absolute URI, as workers need)."""
    return f"sqlite:///{tmp_path / 'mlruns.db'}"


@pytest.fixture
def mlflow_server(tmp_path):
    """A loopback ``mlflow server`` over a fresh sqlite file, for tests with many concurrent writers."""
    from mlflow_machinery import start_mlflow_server

    server = start_mlflow_server(tmp_path / "mlflow.db")
    yield server
    server.stop()
