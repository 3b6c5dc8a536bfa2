"""The init-quality protocol (benchmarks/task_protocol.py) end to end on tiny configurations (real CartPole
rollouts), and wave seeding a policy from a bank of another family (templates + scalers of the shared kinds, free tensors fresh)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FMNIST_BANK = ROOT / "docs" / "data" / "fmnist_bank.safetensors"
CONVNEXT_BANK = ROOT / "docs" / "data" / "fmnist_convnext_bank.safetensors"
PENDULUM_IO = {"env_id": "Pendulum-v1", "obs_dim": 3, "act_dim": 1, "discrete": False, "context": 4}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh expert cache: CartPole's scripted expert makes its data and reference there."""
    monkeypatch.setenv("WEIT_CACHE", str(tmp_path / "cache"))
    return tmp_path


def test_wave_seeds_a_policy_from_a_vit_bank_with_templates_and_scalers_only():
    from weit_core.io import load_bank
    from weit_core.models.policy import POLICY
    from weit_core.strategies import init_model
    from weit_core.strategies.wave import random_like

    bank = load_bank(FMNIST_BANK)
    assert bank.header["family"] == "vit"
    spec = POLICY.spec_for({"depth": 2, "width": 32, "heads": 2}, PENDULUM_IO)
    with pytest.raises(ValueError, match="inherit='scalers'"):  # its free tensors are a ViT's: not inherited
        init_model("wave", spec, bank=bank, fit_steps=0, seed=0)
    res = init_model("wave", spec, bank=bank, inherit="scalers", fit_steps=0, seed=0)
    assert res.info["cross_family"] is True and res.info["bank_family"] == "vit"
    assert res.info["free_params"].startswith("timm_init") and res.info["scalers"].startswith("resampled")
    model, scratch = res.model, init_model("scratch", spec, seed=0).model
    state, fresh = model.state_dict(), scratch.state_dict()
    torch.testing.assert_close(state["state_embed.weight"], fresh["state_embed.weight"])  # free: the family's init
    # the templated weights come from the bank: another (untrained) bank of the same shape gives others
    templates, aux, _, header = random_like(bank, None, seed=0)
    other = init_model("wave", spec, bank=templates, aux_scalers=aux, inherit="scalers", fit_steps=0, seed=0).model
    for name in ("blocks.0.attn.qkv.weight", "blocks.1.mlp.fc2.weight"):
        assert not torch.equal(state[name], fresh[name]) and not torch.equal(state[name], other.state_dict()[name])
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(5, 4, 3))).all()


def test_a_bank_without_the_targets_kinds_is_refused_in_one_line():
    from weit_core.io import load_bank
    from weit_core.models.policy import POLICY
    from weit_core.strategies import init_model

    spec = POLICY.spec_for({"depth": 1, "width": 16, "heads": 1}, PENDULUM_IO)
    with pytest.raises(ValueError, match=r"no templates of kind\(s\) \[.*'qkv'") as e:
        init_model("wave", spec, bank=load_bank(CONVNEXT_BANK), inherit="scalers", fit_steps=0, seed=0)
    assert "\n" not in str(e.value)


def _tiny_assets(family, task, data, ref, small, out: Path, steps: int) -> tuple[Path, Path]:
    """An ancestry trained ``steps`` steps and a two-size bank from it, written under ``out``."""
    from weit_core.io import save_model
    from weit_core.stage1 import build_elastic, make_bank, save_elastic
    from weit_core.train import fit, iterate_batches, make_optimizer, seed_everything

    seed_everything(0)
    ancestry = family.build(ref)
    fit(ancestry, lambda ep: iterate_batches(data.train.x, data.train.y, 64, seed=ep), make_optimizer(ancestry, 3e-3),
        epochs=1, task=task, max_steps=steps)
    save_model(out / "anc.safetensors", ancestry, ref, {})
    elastic = build_elastic(family, ref, n=4, block=16)
    make_bank(elastic, data.train.x, data.train.y, sizes=[small, ref], epochs=1, max_steps=min(steps, 10), task=task)
    save_elastic(out / "bank.safetensors", elastic, {}, [small, ref])
    return out / "anc.safetensors", out / "bank.safetensors"


def test_control_protocol_runs_end_to_end_and_summarizes(cache, capsys):
    """Tiny CartPole assets made in process, then the protocol at one size, one seed, a few steps: a row per
    strategy with the fields the table reads, a rerun skips them all, and the summary's JSON line comes last."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import task_protocol

    from weit_core.models.policy import POLICY
    from weit_core.tasks import get_task

    task = get_task("control:CartPole-v1")
    data = task.load(None)
    ref = POLICY.spec_for({"depth": 2, "width": 32, "heads": 2}, data.io)
    small = POLICY.spec_for({"depth": 1, "width": 16, "heads": 1}, data.io)
    _tiny_assets(POLICY, task, data, ref, small, cache, 30)
    out = cache / "rows.jsonl"
    argv = ["--task", "control:CartPole-v1", "--bank", str(cache / "bank.safetensors"), "--ancestry", str(cache / "anc.safetensors"),
            "--extra-bank", f"fmnist={FMNIST_BANK}", "--out", str(out), "--sizes", "1x16", "--seeds", "0",
            "--budgets", "3", "--fit-steps", "3", "--fit-examples", "64"]
    task_protocol.main(argv)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    labels = task_protocol.STRATEGIES["policy"].split(",")
    assert [r["strategy"] for r in rows] == labels and all(r["size"] == "1x16x1" for r in rows)
    for r in rows:
        assert set(r) >= {"task", "env", "size", "strategy", "seed", "params", "init", "runs", "info", "recipe"}
        assert [run["budget"] for run in r["runs"]] == [3] and -50 < r["init"]["return_norm"] < 200
    by = {r["strategy"]: r for r in rows}
    assert by["wave{bank=fmnist;inherit=scalers}"]["info"]["bank_family"] == "vit"
    assert by["wave"]["info"]["free_params"] == "bank" and "cross_family" not in by["wave"]["info"]
    assert by["scratch_fit"]["info"]["fit_steps"] == 3
    task_protocol.main(argv)  # resumed: nothing left to run
    assert len(out.read_text().splitlines()) == len(labels)
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["jobs"] == len(labels) and last["budgets"] == [0, 3]
    assert set(last["mean_over_sizes"]) == set(labels) and last["won"]["vs_scratch_init"] in ("0/1", "1/1")


def test_generation_protocol_ranks_lower_fid_first_and_reports_steps_to_match(tmp_path, capsys):
    """The same protocol on DiTs: a tiny bank from a briefly trained DiT ancestry, one size, wave against
    scratch; FID rows, and a summary that counts a *lower* FID as a win and gives steps-to-match."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import task_protocol

    from weit_core.models.dit import DIT
    from weit_core.tasks import get_task

    task = get_task("generation:20x2")
    data = task.load(None, 256)
    ref = DIT.spec_for({"depth": 2, "width": 32, "heads": 2}, data.io)
    small = DIT.spec_for({"depth": 1, "width": 32, "heads": 2}, data.io)
    _tiny_assets(DIT, task, data, ref, small, tmp_path, 4)
    out = tmp_path / "rows.jsonl"
    task_protocol.main(["--task", "generation:20x2", "--bank", str(tmp_path / "bank.safetensors"), "--ancestry",
                        str(tmp_path / "anc.safetensors"), "--out", str(out), "--sizes", "1x32", "--seeds", "0",
                        "--strategies", "wave,scratch,weight_selection", "--budgets", "2,4", "--fit-steps", "2",
                        "--fit-examples", "64", "--limit", "256", "--batch-size", "32"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["strategy"] for r in rows] == ["wave", "scratch", "weight_selection"]
    for r in rows:
        assert r["task"] == "generation:20x2" and r["size"] == "1x32x2" and "env" not in r
        assert r["init"]["fid"] > 0 and [run["budget"] for run in r["runs"]] == [2, 4]
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["metric"] == "fid" and last["mode"] == "min" and last["budgets"] == [0, 2, 4]
    cs = task_protocol.cells(out, "fid")
    wave, scratch = cs[("1x32x2", "wave", 0)]["mean"], cs[("1x32x2", "scratch", 0)]["mean"]
    assert last["won"]["vs_scratch_init"] == ("1/1" if wave < scratch else "0/1")
    match = last["steps_to_match"]["scratch"]["1x32x2"]
    reached = [b for b in (2, 4) if cs[("1x32x2", "scratch", b)]["mean"] <= cs[("1x32x2", "wave", 2)]["mean"]]
    assert match == (str(reached[0]) if reached else ">4")
