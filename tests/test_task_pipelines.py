"""Control and generation through the CLI as a user runs them: data, ancestry, ``weit distill`` (Ray Train),
``weit sweep`` (Ray Tune) on the shipped CI spaces, ``weit report``; the leaderboard and the champion follow
each task's direction (return higher first, FID lower first); generation trials log a sample grid per
evaluation and the report shows the strategies' grids side by side. Slow: minutes each."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _weit(*args: str, tmp: Path, timeout: int = 900) -> str:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "WEIT_CACHE": str(tmp / "cache"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}"}
    run = subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=tmp, env=env, capture_output=True,
                         text=True, timeout=timeout)
    assert run.returncode == 0, f"weit {' '.join(args)}\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    return run.stdout


def _ranked(tmp: Path, sweep: str, metric: str, mode: str) -> tuple[pd.DataFrame, pd.Series, object]:
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["weit-sweep"], filter_string="tags.`weit.kind` = 'trial'")
    assert len(runs) and (runs["status"] == "FINISHED").all() and set(runs["tags.weit.mode"]) == {mode}
    final = runs.groupby(["tags.weit.strategy", "tags.weit.size"])[f"metrics.{metric}"].mean()
    board = pd.read_csv(tmp / "report" / "leaderboard.csv")
    return board, final.sort_values(ascending=mode == "min"), mlflow.MlflowClient(uri)


def test_control_from_expert_data_to_a_champion_policy(tmp_path):
    data = tmp_path / "cartpole"
    _weit("data", "control:CartPole-v1", "--out", str(data), "--episodes", "30", tmp=tmp_path)
    assert (data / "train.parquet").is_file() or any(data.glob("*.parquet"))
    _weit("ancestry", "--task", "control:CartPole-v1", "--dataset", str(data), "--size", "depth=2,width=32,heads=2",
          "--epochs", "3", "--out", "anc.safetensors", tmp=tmp_path)
    _weit("distill", "--task", "control:CartPole-v1", "--dataset", str(data), "--teacher", "anc.safetensors",
          "--depths", "1,2", "--widths", "16,32", "--epochs", "1", "--workers", "1", "--out", "bank.safetensors",
          tmp=tmp_path)
    space = (ROOT / "tune_spaces" / "ci_control.yaml").read_text().replace(
        "    task: control:CartPole-v1\n", f"    task: control:CartPole-v1\n    data: {data}\n")
    (tmp_path / "space.yaml").write_text(space)
    _weit("sweep", "--space", "space.yaml", "--bank", "bank.safetensors", "--storage", str(tmp_path / "tune"),
          tmp=tmp_path)
    _weit("report", "--sweep", "ci_control", "--out", "report", tmp=tmp_path)
    board, final, client = _ranked(tmp_path, "ci_control", "val_return_norm_e2", "max")
    ranked = [final[k] for k in zip(board["strategy"], board["size"], strict=True)]
    assert len(ranked) == len(final) and ranked == sorted(ranked, reverse=True)  # highest first (ties any order)
    assert final.iloc[0] > 50  # far above the random policy's 0 (100 = the expert)
    champion = client.get_model_version_by_alias("weit-cartpole", "champion")
    assert champion.tags["mode"] == "max"


def test_generation_from_a_dit_ancestry_to_the_lowest_fid_champion(tmp_path):
    _weit("ancestry", "--task", "generation:200x4", "--size", "depth=2,width=32,heads=2", "--epochs", "1",
          "--limit", "2000", "--out", "anc.safetensors", tmp=tmp_path)
    _weit("distill", "--task", "generation:200x4", "--teacher", "anc.safetensors", "--depths", "1,2", "--widths",
          "16,32", "--epochs", "1", "--limit", "1000", "--workers", "1", "--out", "bank.safetensors", tmp=tmp_path)
    space = (ROOT / "tune_spaces" / "ci_dit.yaml").read_text()
    (tmp_path / "space.yaml").write_text(space.replace("limit: 2000", "limit: 1000"))
    _weit("sweep", "--space", "space.yaml", "--bank", "bank.safetensors", "--ancestry", "anc.safetensors",
          "--storage", str(tmp_path / "tune"), "--limit-trials", "6", tmp=tmp_path)
    _weit("report", "--sweep", "ci_dit", "--out", "report", tmp=tmp_path)
    board, final, client = _ranked(tmp_path, "ci_dit", "val_fid_e2", "min")
    ranked = [final[k] for k in zip(board["strategy"], board["size"], strict=True)]
    assert len(ranked) == len(final) and ranked == sorted(ranked)  # lowest first
    champion = client.get_model_version_by_alias("weit-fmnist_gen", "champion")
    assert champion.tags["mode"] == "min"
    assert {"fid_vs_params_fmnist_gen.png", "convergence_fmnist_gen.png", "samples_fmnist_gen.png"} <= {
        p.name for p in (tmp_path / "report").iterdir()}  # samples: each strategy's grid at the winning size
    assert "](./samples_fmnist_gen.png)" in (tmp_path / "report" / "leaderboard.md").read_text()
    trial = mlflow.search_runs(experiment_names=["weit-sweep"], filter_string="tags.`weit.kind` = 'trial'").run_id[0]
    pngs = [f.path for f in client.list_artifacts(trial, "images") if f.path.endswith(".png")]
    assert sorted(int(p.split("+")[2]) for p in pngs) == [0, 1, 2]  # a sample grid per evaluation
