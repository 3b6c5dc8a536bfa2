"""The ``weit`` command: help for every command shows defaults, mistakes are one ``error:`` line with exit
code 2, --debug shows the traceback, ``weit data`` reports and converts real data."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipelines import cli
from weit_core import data as wdata

COMMANDS = ["data", "ancestry", "distill", "sweep", "report", "export", "quickstart", "submit"]
"""Every command the README documents; each must be listed by ``weit --help``."""
COMMON_OPTIONS = {
    "--mlflow-uri": ["ancestry", "distill", "sweep", "report", "quickstart", "submit"],
    "--address": ["ancestry", "distill", "sweep", "quickstart", "submit"],
    "--storage": ["ancestry", "distill", "sweep", "quickstart"],
}
HELP_ENV = {"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}
WEIT = Path(sys.executable).with_name("weit")


def _help(*args: str) -> str:
    result = CliRunner().invoke(cli.app, [*args, "--help"], env=HELP_ENV)
    assert result.exit_code == 0, result.output
    return result.output


def test_installed_entry_point_lists_every_command():
    """The console script pip installed (not just the module) starts, lists the commands, exits 0."""
    assert WEIT.is_file(), f"{WEIT} missing: run `pip install -e .` (scripts/setup.sh does)"
    proc = subprocess.run([str(WEIT), "--help"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **HELP_ENV})
    assert proc.returncode == 0, proc.stderr
    for name in COMMANDS:
        assert f" {name} " in proc.stdout, f"`weit --help` does not list {name}:\n{proc.stdout}"
    assert "--debug" in proc.stdout


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_help_shows_defaults(name):
    out = _help(name)
    assert f"weit {name}" in out
    assert "[default:" in out, f"`weit {name} --help` shows no defaults:\n{out}"
    for option, commands in COMMON_OPTIONS.items():
        if name in commands:
            assert option in out, f"`weit {name} --help` lacks {option}"


def test_wrong_flag_is_one_line_exit_2(capsys):
    assert cli.main(["data", "--no-such-flag"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "--no-such-flag" in err[0], err


def test_wrong_flag_through_the_installed_script():
    proc = subprocess.run([str(WEIT), "data", "--limit", "three"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--limit" in lines[0], proc.stderr


def test_typo_in_command_suggests_the_right_one(capsys):
    assert cli.main(["distil"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'distill'" in err


@pytest.fixture
def no_fashion_mnist(tmp_path, monkeypatch):
    """WEIT_DATA points at an empty folder and the Debian package's folder at nowhere."""
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("WEIT_DATA", str(empty))
    monkeypatch.setattr(wdata, "DEFAULT_FASHION_MNIST_DIR", tmp_path / "nowhere")
    return empty


@pytest.mark.parametrize("argv", [["data"], ["ancestry", "--limit", "64", "--epochs", "1"]])
def test_missing_data_is_one_line_with_the_fix(no_fashion_mnist, tmp_path, monkeypatch, capsys, argv):
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: ") and "apt-get install dataset-fashion-mnist" in err[0]
    assert str(no_fashion_mnist) in err[0]  # names where it looked
    assert not (tmp_path / "ancestry.safetensors").exists()


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback(no_fashion_mnist, capsys, where):
    argv = ["--debug", "data"] if where == "before" else ["data", "--debug"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "DataNotFoundError" in err
    assert err.strip().splitlines()[-1].startswith("error: ")


def test_unexpected_error_is_one_line_exit_1(monkeypatch, capsys):
    """Fault injection: a bug (not a user mistake) deep in a command -> one line, exit 1, --debug hint."""
    def broken(**_):
        raise RuntimeError("simulated internal failure\nsecond line of detail")

    monkeypatch.setattr(wdata, "load_fashion_mnist", broken)
    assert cli.main(["data"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: RuntimeError: simulated internal failure (run with --debug for the traceback)"]


def test_user_error_classification():
    """ValueErrors weit raises on purpose are user mistakes; ValueErrors from inside libraries are bugs."""
    import torch

    from weit_core.io import WeitFileError, read_header
    from weit_core.templates import KindSpec

    with pytest.raises(WeitFileError) as bad_file:
        read_header("/nonexistent/bank.safetensors")
    assert cli.is_user_error(bad_file.value)
    with pytest.raises(ValueError) as bad_spec:
        KindSpec(0, 16, 16)
    assert cli.is_user_error(bad_spec.value)
    with pytest.raises(ValueError) as torch_error:
        torch.nn.functional.cross_entropy(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))
    assert not cli.is_user_error(torch_error.value)
    assert not cli.is_user_error(RuntimeError("x"))


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("weit ")


def test_data_converts_digits_to_parquet_that_reloads(tmp_path, capsys):
    out = tmp_path / "digits_pq"
    assert cli.main(["data", "digits", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    original = wdata.load_digits()
    for split in ("train", "val", "test"):
        assert (out / f"{split}.parquet").is_file() and str(out / f"{split}.parquet") in printed
    reloaded = wdata.load_dataset(str(out))
    assert [len(reloaded.train), len(reloaded.val), len(reloaded.test)] == \
        [len(original.train), len(original.val), len(original.test)]
    assert f"{len(original.train):,} train" in printed
    assert cli.main(["data", str(out)]) == 0  # the folder is a dataset weit reads back


def test_data_reports_where_fashion_mnist_is(capsys):
    where = wdata.find_fashion_mnist()  # the real files (scripts/setup.sh installs them)
    assert cli.main(["data", "fashion_mnist", "--limit", "100"]) == 0
    out = capsys.readouterr().out
    assert str(where) in out and "100 train" in out and "10 classes" in out


def test_module_entry_point_runs_like_the_script():
    """``python -m pipelines.cli`` is what ``weit submit`` runs on the cluster."""
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "data", "--bogus"], capture_output=True,
                          text=True, timeout=120, cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ")


def test_help_does_not_import_the_heavy_stack():
    """``weit --help`` answers without importing torch, Ray or MLflow (the stage modules load lazily)."""
    code = ("import sys; from pipelines.cli import main; rc = main(['--help']); "
            "print(sorted(m for m in ('torch', 'ray', 'mlflow') if m in sys.modules)); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **HELP_ENV})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_no_arguments_prints_help():
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **HELP_ENV}, cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 0 and "Commands" in proc.stdout



# ------------------------------------------------------------------------------------------- quickstart


def test_quickstart_without_data_fails_first_in_one_line(no_fashion_mnist, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["quickstart", "--out-dir", str(tmp_path / "qs")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "apt-get install dataset-fashion-mnist" in err[0]
    assert not (tmp_path / "qs").exists() and not (tmp_path / "mlruns.db").exists()


def test_quickstart_space_covers_the_shipped_pair_and_every_control():
    """The shipped quickstart space: six sizes inside the shipped bank's range and under the shipped ancestry,
    WAVE + its controls + scratch + the baselines that copy the ancestry, two learning rates; net2net makes only
    the ancestry's own size, and the sweep drops its other pairs before any trial."""
    from pipelines.quickstart import DEFAULT_SPACE, SHIPPED_ANCESTRY, SHIPPED_BANK
    from weit_core.io import load_bank, read_header
    from weit_core.models import ViTSpec
    from weit_core.space import load_space
    from weit_core.trials import expand, inspect_tasks

    space = load_space(DEFAULT_SPACE)
    ancestry = ViTSpec.from_dict(read_header(SHIPPED_ANCESTRY)["spec"])
    bank = load_bank(SHIPPED_BANK)
    expansion = expand(space, inspect_tasks(space), bank_block=bank.bank.kinds["qkv"].a, ancestry_spec=ancestry)
    sizes = {(t["depth"], t["width"], t["heads"]) for t in expansion.trials}
    assert sizes == {(d, w, w // 32) for d in (2, 4, 6) for w in (64, 96)}
    trained = {(s["depth"], s["width"], s["heads"]) for s in bank.header["size_range"]}
    assert sizes <= trained  # every size is one stage 1 trained
    assert {"wave", "wave_random_bank", "scratch", "scratch_fit", "weight_selection", "net2net"} == set(space.strategies)
    assert expansion.pairs_dropped == {"smaller_than_ancestry": 5}  # (task, strategy, size) pairs: net2net below 6x96
    assert len(expansion.trials) == (6 * 5 + 1) * 2


TINY_SPACE = """
name: tiny
tasks:
  - {name: fashion_mnist, data: fashion_mnist, patch: 4, limit: 600, val_limit: 200}
strategies: [wave, scratch_fit, weight_selection]
sizes: {depth: [1, 2], width: [32], heads: [1]}
training: {epochs: 1, steps_per_epoch: 3, fit_steps: 3, fit_examples: 64, test_eval: false}
"""


@pytest.mark.slow
def test_quickstart_end_to_end_then_reuses_everything(tmp_path, monkeypatch):
    """The real pipeline on a tiny budget (Ray Train + Tune + MLflow), then a re-run that rebuilds nothing."""
    from pipelines.quickstart import QuickstartBudget, run_quickstart

    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.yaml").write_text(TINY_SPACE)
    budget = QuickstartBudget(from_scratch=True, ancestry_depth=2, ancestry_width=32, ancestry_heads=1,
                              ancestry_epochs=1, ancestry_limit=600, distill_epochs=1, distill_limit=600)
    first = run_quickstart(tmp_path / "qs", budget=budget, space=tmp_path / "tiny.yaml", quiet=True)
    assert first.ancestry.is_file() and first.bank.is_file()
    assert not any(first.reused.values())
    assert {p.name for p in first.plots} == {"acc_vs_params_fashion_mnist.png", "convergence_fashion_mnist.png"}
    board = first.leaderboard.leaderboard
    assert set(board["strategy"]) == {"wave", "scratch_fit", "weight_selection"} and len(board) == 6
    assert first.mlflow_ui.endswith(f"ui --backend-store-uri sqlite:///{tmp_path / 'mlruns.db'} --host 127.0.0.1 "
                                    f"--port 5000")
    mtime = first.bank.stat().st_mtime_ns
    second = run_quickstart(tmp_path / "qs", budget=budget, space=tmp_path / "tiny.yaml", quiet=True)
    assert second.reused == {"ancestry": True, "distill": True, "sweep": True, "report": False}
    assert second.sweep == first.sweep and second.bank.stat().st_mtime_ns == mtime
