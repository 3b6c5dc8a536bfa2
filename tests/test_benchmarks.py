"""The benchmarks run end to end at toy scale and end with one JSON line (what runs are compared by), and the
init-quality benchmark's bookkeeping (parts, resume, summary, epochs-to-match) does what its docstring says."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def load_benchmark(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_benchmark(*args: str, timeout: float = 600) -> tuple[str, dict]:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    out = proc.stdout.strip()
    return out, json.loads(out.splitlines()[-1])


def job(size, strategy, seed, runs, spe=10):
    """A result row: ``runs`` maps (lr, budget) -> (val, test)."""
    return {"size": size, "strategy": strategy, "seed": seed, "steps_per_epoch": spe,
            "runs": [{"lr": lr, "budget": b, "val": v, "test": t} for (lr, b), (v, t) in runs.items()]}


def test_init_quality_summary_picks_each_strategys_lr_on_val_and_counts_the_shares(tmp_path, capsys):
    iq = load_benchmark("init_quality")
    rows = []
    for seed in (0, 1):
        # wave: the low LR wins on val at 10 steps (test 0.70), the high one at 20 steps (test 0.84)
        rows.append(job("2x32x2", "wave", seed, {(1e-3, 10): (0.72, 0.70), (3e-3, 10): (0.60, 0.90),
                                                 (1e-3, 20): (0.80, 0.80), (3e-3, 20): (0.85, 0.84)}))
        rows.append(job("2x32x2", "wave_random_bank", seed, {(1e-3, 10): (0.6, 0.60), (1e-3, 20): (0.8, 0.83)}))
        rows.append(job("2x32x2", "scratch_fit", seed, {(1e-3, 10): (0.4, 0.40), (1e-3, 20): (0.6, 0.60)}))
        rows.append(job("2x32x2", "weight_selection", seed, {(1e-3, 10): (0.7, 0.71 + 0.02 * seed),
                                                             (1e-3, 20): (0.8, 0.82)}))
    rows.append({"size": "2x32x2", "strategy": "net2net", "seed": 0, "skipped": "smaller_than_ancestry"})
    path = tmp_path / "iq.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    cells = iq.cell_stats(iq._rows(path)[0], [10, 20])
    assert cells[("2x32x2", "wave", 10)]["lr"] == 1e-3 and cells[("2x32x2", "wave", 10)]["mean"] == 0.70
    assert cells[("2x32x2", "wave", 20)]["lr"] == 3e-3 and cells[("2x32x2", "wave", 20)]["mean"] == 0.84
    assert cells[("2x32x2", "weight_selection", 10)]["std"] > 0
    summary = iq.summarize(path, [10, 20], epoch_budget=20)
    # 10 steps: wave 0.70 < weight selection 0.72, ahead of every control; 20 steps: 0.84 beats both, and the
    # random bank (0.83) by less than 2 points
    assert summary["vs_weight_selection"] == 0.5 and summary["leads_controls"] == 1.0
    assert summary["random_bank_plus2_at_epoch"] == 0.0 and summary["vs_net2net"] is None
    assert summary["cells"]["vs_weight_selection"] == 2 and summary["jobs"] == 8
    out = capsys.readouterr().out
    assert "n/a: net2net at 2x32x2: smaller_than_ancestry" in out
    # the random bank reaches wave's 10-step mean (0.70) by 20 steps: "match x" 2.0
    assert [line.split()[-1] for line in out.splitlines() if line.startswith("2x32x2")] == ["2.0", ">1.0"]


def test_init_quality_still_summarizes_the_first_protocols_results(capsys):
    """The rows docs/results.md's first tables came from (one fixed LR, checkpoints of one run) summarize
    to what that page says: wave behind weight selection, net2net and TLEG everywhere, ahead of its controls."""
    iq = load_benchmark("init_quality")
    summary = iq.summarize(ROOT / "docs" / "data" / "init_quality_fmnist.jsonl", [100, 200])
    assert summary["vs_weight_selection"] == 0.0 and summary["vs_net2net"] == 0.0 and summary["vs_tleg_fit"] == 0.0
    assert summary["leads_controls"] == 1.0 and summary["cells"]["leads_controls"] == 24


@pytest.mark.parametrize("part", ["0/2", "3/2", "2", "a/b"])
def test_init_quality_rejects_a_bad_part(part):
    iq = load_benchmark("init_quality")
    with pytest.raises(SystemExit, match="--part must be i/k"):
        iq.parse_part(part)


def test_init_quality_runs_in_parts_and_resumes(tmp_path, monkeypatch, capsys, fmnist_dir):
    """Two parts split the jobs between them; a third run over all of them finds nothing left to do; every job
    trains one run per (lr, budget) from the same init."""
    iq = load_benchmark("init_quality")
    out = tmp_path / "iq.jsonl"
    argv = ["init_quality.py", "--out", str(out), "--sizes", "2x32x2", "--strategies", "scratch,scratch_fit",
            "--seeds", "0", "--budgets", "3,6", "--lrs", "1e-3,3e-3", "--val-examples", "128",
            "--test-examples", "256", "--batch-size", "32", "--fit-steps", "3", "--fit-examples", "128",
            "--threads", "1"]
    lines = []
    for part in ("1/2", "2/2", "1/1"):
        monkeypatch.setattr(sys, "argv", [*argv, "--part", part])
        iq.main()
        lines.append(out.read_text().splitlines())
    assert [len(x) for x in lines] == [1, 2, 2]  # part 1: one job, part 2: the other, then a resume: none
    rows = [json.loads(x) for x in lines[-1]]
    assert {r["strategy"] for r in rows} == {"scratch", "scratch_fit"}
    for r in rows:
        assert {(x["lr"], x["budget"]) for x in r["runs"]} == {(1e-3, 3), (1e-3, 6), (3e-3, 3), (3e-3, 6)}
        assert all(0.0 <= x[k] <= 1.0 for x in r["runs"] for k in ("val", "test")) and r["params"] > 0
        assert r["recipe"]["schedule"] == "cosine" and r["recipe"]["warmup"] == 0.1
    assert rows[1]["info"]["fit_steps"] == 3  # scratch_fit's stage 2 ran on the budget it was given
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["jobs"] == 2


def test_sweep_overhead_prints_its_table_then_one_json_line():
    """Both arms (plain loops, Tune) on 4 trials of 2 steps: the benchmark's own path, not a mock of it."""
    text, figs = run_benchmark("benchmarks/sweep_overhead.py", "--trials", "4", "--steps", "2", "--slots", "2",
                               "--num-cpus", "2")
    assert "ratio Tune / ideal" in text and "goal ratio <= 1.10" in text
    assert figs["trials"] == 4 and figs["slots"] == 2 and figs["repeats"] == 1
    assert figs["ratio"] > 0 and figs["tune_wall_s"] > 0 and figs["plain_work_before_s"] > 0


def test_materialize_prints_its_table_then_one_json_line():
    text, figs = run_benchmark("benchmarks/materialize.py", "--repeats", "1", "--threads", "1")
    assert "materialize, no_grad" in text
    assert figs["repeats"] == 1 and figs["ratio"] > 0 and figs["weights"] > 80_000_000  # ViT-B's templated weights


def test_init_quality_is_deterministic_for_a_seed_and_the_shipped_bank_passes_something_on(
        tmp_path, monkeypatch, fmnist_dir):
    """The same job twice gives the same accuracies (what makes a recorded run re-checkable); another seed
    does not. And relations that hold on any machine, where golden numbers would not: WAVE from the shipped
    bank (2 of its reference's 6 layers, its new head fitted for 40 steps) starts far above the untrained scratch model (near chance), and 5 stage-3
    steps do not undo that lead."""
    data = ROOT / "docs" / "data"
    iq = load_benchmark("init_quality")
    got = []
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        out = tmp_path / f"{name}.jsonl"
        monkeypatch.setattr(sys, "argv", [
            "init_quality.py", "--bank", str(data / "fmnist_bank_2.safetensors"), "--out", str(out),
            "--sizes", "2x96x3", "--seeds", seed, "--strategies", "wave,scratch", "--budgets", "5",
            "--fit-steps", "40", "--fit-examples", "128", "--val-examples", "256", "--test-examples", "256",
            "--threads", "1"])
        iq.main()
        got.append({r["strategy"]: r for r in map(json.loads, out.read_text().splitlines())})
    scores = [{k: (r["init"], r["runs"]) for k, r in rows.items()} for rows in got]
    assert scores[0] == scores[1] and scores[0]["wave"] != scores[2]["wave"]
    for rows in got:
        wave, scratch = rows["wave"], rows["scratch"]
        assert scratch["init"]["test"] < 0.25  # ten classes: an untrained model is near chance
        assert wave["init"]["test"] > scratch["init"]["test"] + 0.2, (wave["init"], scratch["init"])
        assert wave["runs"][0]["test"] > scratch["runs"][0]["test"], (wave["runs"], scratch["runs"])


def test_bank_capacity_fits_a_full_rank_bank_exactly_and_a_small_one_loosely():
    """A bank with as many templates as a block has entries (N = block^2) can hold any weights: fitted to a
    model it reproduces it (error ~0, the same outputs); a bank of few templates cannot (a large error)."""
    bench = load_benchmark("bank_capacity")
    from weit_core.models import get_family
    from weit_core.models.elastic import AtSize
    from weit_core.stage1 import build_elastic
    from weit_core.train import seed_everything

    vit = get_family("vit")
    spec = vit.spec_for({"depth": 1, "width": 16, "heads": 2, "mlp_ratio": 2.0},
                        {"in_chans": 1, "img_size": 8, "num_classes": 3, "patch": 4})
    seed_everything(0)
    model = vit.build(spec).eval()
    full = build_elastic(vit, spec, n=16, block=4, seed=0)
    assert bench.fit_bank_to(full, model, steps=600, lr=1e-2) < 0.01
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(AtSize(full, spec).eval()(x), model(x), atol=0.1, rtol=0.1)
    assert bench.fit_bank_to(build_elastic(vit, spec, n=1, block=4, seed=0), model, steps=300, lr=1e-2) > 0.3
