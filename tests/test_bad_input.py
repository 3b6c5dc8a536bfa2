"""Bad input through the real `weit` command: one clear `error: ...` line naming the problem and the fix,
exit code 2, and nothing already in the tracking store lost or altered (no half-made runs either). Plus the
no-pickle rule: a pickle posing as a bank is refused without being unpickled, and every `torch.load` in the
source tree passes ``weights_only=True``.

The NaN case is different by design: one trial diverging is not a user error; that trial is FAILED in
MLflow with the reason and the sweep goes on (the plain-function version is in tests/test_sweep.py)."""

from __future__ import annotations

import ast
import pickle
import re
from pathlib import Path

import pytest

from pipelines.cli import main

ROOT = Path(__file__).resolve().parents[1]
CI_SPACE = ROOT / "tune_spaces" / "ci.yaml"


@pytest.fixture(scope="module")
def store(tmp_path_factory, digits_bank, ray_session):
    """A tracking store that already holds a real (2-trial) digits sweep, and the bank it used."""
    from weit_core.io import save_bank

    d = tmp_path_factory.mktemp("bad_input")
    bank, aux, _ = digits_bank
    bank_path = save_bank(d / "bank.safetensors", bank, aux, {"mode": "wave"})
    common = ["--mlflow-uri", f"sqlite:///{d / 'mlruns.db'}", "--storage", str(d / "runs")]
    assert main(["sweep", "--space", str(CI_SPACE), "--bank", str(bank_path), "--limit-trials", "2",
                 "--name", "before", *common]) == 0
    return d, bank_path, common


def snapshot(uri: str) -> dict:
    """Every run in every experiment: id -> (status, metrics, params)."""
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    client = MlflowClient(uri)
    exps = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    return {r.info.run_id: (r.info.status, r.data.metrics, r.data.params)
            for r in client.search_runs(exps, run_view_type=ViewType.ALL, max_results=10_000)}


def run_bad(argv: list[str], capsys) -> str:
    """Run the CLI, require exit code 2 and exactly one line on stderr, `error: ...`; return that line."""
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def write_space(path: Path, task: str, width: int = 32, extra: str = "", strategy: str = "wave") -> Path:
    path.write_text(f"name: {path.stem}\ntasks: [{task}]\nstrategies: [{strategy}]\n"
                    f"sizes: {{depth: [1], width: [{width}], heads: [2], mlp_ratio: [2]}}\n{extra}")
    return path


CASES = {
    "width_not_multiple_of_block": (
        lambda d, bank: ["sweep", "--space", str(write_space(d / "w40.yaml", "{data: digits, patch: 2}", 40)),
                         "--bank", str(bank)],
        r"no valid trial .*width or MLP hidden size is not a multiple of the bank's template block"),
    "distill_width_not_multiple_of_block": (
        lambda d, bank: ["distill", "--dataset", "digits", "--width", "40", "--heads", "2", "--block", "16",
                         "--epochs", "1", "--out", str(d / "w40.safetensors")],
        r"weight is 40x1 .*not a multiple of the template block 16x1; choose sizes that are multiples"),
    "heads_not_dividing_width": (
        lambda d, bank: ["distill", "--dataset", "digits", "--width", "32", "--heads", "3", "--epochs", "1",
                         "--out", str(d / "h3.safetensors")],
        r"heads=3 does not divide width=32; pick heads from \[1, 2, 4, 8, 16, 32\]"),
    "bank_kinds_do_not_match_space": (
        lambda d, bank: ["sweep", "--space", str(write_space(d / "p4.yaml", "{data: digits, patch: 4}")),
                         "--bank", str(bank)],
        r"kind 'patch' has blocks 16x1 kernel \(2, 2\), expected 16x1 kernel \(4, 4\); build a bank with the"),
    "truncated_bank": (
        lambda d, bank: ["sweep", "--space", str(CI_SPACE), "--bank", str(truncated(bank, d))],
        r"not a readable safetensors file .*the file is corrupt or truncated"),
    "space_with_unknown_key": (
        lambda d, bank: ["sweep", "--bank", str(bank), "--space",
                         str(write_space(d / "typo.yaml", "{data: digits, patch: 2}", extra="constraint: {}\n"))],
        r"unknown key 'constraint' in the top level; did you mean 'constraints'"),
    "space_with_unknown_family": (
        lambda d, bank: ["sweep", "--bank", str(bank), "--space",
                         str(write_space(d / "fam.yaml", "{data: digits, patch: 2}", extra="family: vitt\n"))],
        r"fam\.yaml: family: unknown architecture family 'vitt'; available: (\w+, )*vit\b"),
    "parquet_without_label_column": (
        lambda d, bank: ["sweep", "--space", str(write_space(d / "nolabel.yaml",
                                                             f"{{data: {no_label_parquet(d)}, patch: 2}}",
                                                             strategy="scratch"))],
        r"no `label` column \(have \['image', 'target'\]\); add a `label` column with integer class ids"),
    "gpus_per_trial_without_gpu": (
        lambda d, bank: (pytest.skip("this machine has a GPU") if _has_gpu() else
                         ["sweep", "--space", str(CI_SPACE), "--bank", str(bank), "--gpus-per-trial", "0.5"]),
        r"--gpus-per-trial 0.5 but this machine has no GPU; drop the flag, or pass --address"),
}


def _has_gpu() -> bool:
    import torch

    return torch.cuda.device_count() > 0


def truncated(bank: Path, d: Path) -> Path:
    data = bank.read_bytes()
    out = d / "truncated.safetensors"
    out.write_bytes(data[: len(data) // 2])
    return out


def no_label_parquet(d: Path) -> Path:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = d / "nolabel.parquet"
    pq.write_table(pa.table({"image": [np.zeros((8, 8), np.uint8).tobytes()] * 4, "target": [0, 1, 2, 3]}), out)
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_loses_nothing(case, store, capsys, tmp_path):
    d, bank, common = store
    uri = common[1]
    before = snapshot(uri)
    argv, pattern = CASES[case]
    line = run_bad([*argv(tmp_path, bank), *common], capsys)
    assert re.search(pattern, line), line
    assert snapshot(uri) == before  # nothing lost, nothing altered, no half-made run left behind


def test_pickle_posing_as_bank_or_teacher_is_refused_and_never_unpickled(store, capsys, tmp_path):
    d, _, common = store
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):  # unpickling this would create the marker file
            return (open, (str(marker), "w"))

    evil = tmp_path / "bank.safetensors"
    evil.write_bytes(pickle.dumps(Payload()))
    before = snapshot(common[1])
    for argv in (["sweep", "--space", str(CI_SPACE), "--bank", str(evil)],
                 ["distill", "--teacher", str(evil), "--dataset", "digits", "--out", str(tmp_path / "b.safetensors")]):
        line = run_bad([*argv, *common], capsys)
        assert "looks like a pickle / torch.save file" in line and "never unpickled" in line, line
        assert not marker.exists()
    assert snapshot(common[1]) == before


def test_nan_trial_fails_with_its_reason_and_the_sweep_goes_on(store, capsys, tmp_path):
    """A diverging trial (lr 1e30) is not a user error: the command finishes (exit 0), that trial's run
    is FAILED with the reason, the healthy trial FINISHED, earlier runs untouched."""
    from mlflow import MlflowClient

    d, bank, common = store
    before = snapshot(common[1])
    space = tmp_path / "nan.yaml"
    space.write_text("name: nan\ntasks:\n  - {name: ok, data: digits, patch: 2}\n"
                     "  - {name: diverges, data: digits, patch: 2, training: {lr: 1.0e+30}}\n"
                     "strategies: [scratch]\nsizes: {depth: 1, width: 16, heads: 2, mlp_ratio: 2}\n"
                     "training: {epochs: 1, fit_steps: 0, fit_examples: 0}\n")
    assert main(["sweep", "--space", str(space), *common]) == 0
    assert "1 failed" in capsys.readouterr().out
    after = snapshot(common[1])
    assert all(after[k] == v for k, v in before.items())
    client = MlflowClient(common[1])
    new = [client.get_run(k) for k in set(after) - set(before)]
    trials = {r.data.tags.get("weit.task"): r for r in new if r.data.tags.get("weit.kind") == "trial"}
    assert trials["ok"].info.status == "FINISHED"
    assert trials["diverges"].info.status == "FAILED"
    assert "NonFiniteLossError: loss became" in trials["diverges"].data.tags["weit.failure"]
    assert "lower the learning rate" in trials["diverges"].data.tags["weit.failure"]


def unsafe_loads(path: Path) -> list[int]:
    """Line numbers of `torch.load(...)` calls in ``path`` that do not pass `weights_only=True` literally."""
    tree = ast.parse(path.read_text(), str(path))
    lines = []
    for n in ast.walk(tree):
        if (isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "load"
                and isinstance(n.func.value, ast.Name) and n.func.value.id == "torch"):
            kw = {k.arg: k.value for k in n.keywords}
            if not (isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
                lines.append(n.lineno)
    return lines


def test_every_torch_load_in_the_tree_is_weights_only(tmp_path):
    """No pickle of untrusted files: each `torch.load(...)` passes `weights_only=True`, and no library
    module imports pickle."""
    probe = tmp_path / "probe.py"
    probe.write_text("torch.load(f)\ntorch.load(f, weights_only=False)\ntorch.load(f, weights_only=True)\n")
    assert unsafe_loads(probe) == [1, 2]  # the scan catches what it must
    files = [p for top in ("weit_core", "pipelines", "benchmarks", "scripts", "tests") if (ROOT / top).is_dir()
             for p in (ROOT / top).rglob("*.py")]
    assert len(files) > 10
    offenders = [f"{p.relative_to(ROOT)}:{n}" for p in files for n in unsafe_loads(p)]
    offenders += [f"{p.relative_to(ROOT)}: imports pickle" for p in files
                  if p.parent.name != "tests" and "import pickle" in p.read_text()]
    assert not offenders, f"torch.load without weights_only=True, or pickle: {offenders}"
