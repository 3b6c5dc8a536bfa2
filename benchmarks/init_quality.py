"""Does a WAVE init beat honest controls? DESIGN.md "Evaluation protocol" on Fashion-MNIST.

For every (size, strategy, seed): build the init (stage 2 for wave-like strategies and scratch_fit, all on
the same subset and step budget), then train it (stage 3) with the same recipe, recording test accuracy at
every checkpoint step. Results are appended to a JSONL file, one line per finished job, so the benchmark
runs in parts (``--part 2/5``), survives interruption and resumes by skipping finished jobs.

    python benchmarks/init_quality.py --bank BANK --ancestry ANCESTRY --out results.jsonl [--part i/k]
    python benchmarks/init_quality.py --out results.jsonl --summarize      # table + JSON only

The summary prints, per size and budget, mean +/- std per strategy, whether wave leads every control,
and "epochs to match": how many times wave's budget the best control needs to reach wave's mean accuracy
(looked up on the recorded curve, capped at the horizon = 15x the shortest budget).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # parts run side by side: no spinning OpenMP threads

import torch  # noqa: E402

from weit_core.data import load_fashion_mnist  # noqa: E402
from weit_core.io import load_bank, load_model  # noqa: E402
from weit_core.models import ViTSpec  # noqa: E402
from weit_core.strategies import available, init_model  # noqa: E402
from weit_core.train import evaluate, iterate_batches, make_optimizer, seed_everything, train_epoch  # noqa: E402

# The 12 sizes of docs/results.md's run: depth 2-12 (every even depth) at widths 64, 96 and 128.
SIZES = [(2, 64, 2), (2, 128, 4), (4, 64, 2), (4, 96, 3), (4, 128, 4), (6, 64, 2), (6, 96, 3), (8, 64, 2),
         (8, 96, 3), (10, 64, 2), (12, 64, 2), (12, 96, 3)]
CONTROLS = ("scratch", "scratch_fit", "wave_random_bank")
NEEDS_BANK = ("wave", "wave_random_bank")
BASELINES = ("weight_selection", "weight_selection_even", "weight_selection_consecutive",
             "weight_selection_head_aware", "mimetic", "tleg", "tleg_fit", "net2net")


def parse_sizes(text: str) -> list[tuple[int, int, int]]:
    return [tuple(int(v) for v in s.split("x")) for s in text.split(",")] if text else SIZES


def parse_part(text: str) -> tuple[int, int]:
    """``i/k``: run the jobs whose index is i-1 modulo k, so k processes side by side split the list."""
    try:
        i, k = (int(v) for v in text.split("/"))
    except ValueError:
        i = k = 0
    if not 1 <= i <= k:
        raise SystemExit(f"--part must be i/k with 1 <= i <= k (e.g. --part 2/3), got {text!r}")
    return i, k


def batch_stream(x, y, batch_size: int, seed: int):
    """Endless shuffled batches, a new order each epoch; stage 3 is measured in steps, not epochs."""
    epoch = 0
    while True:
        yield from iterate_batches(x, y, batch_size, seed=seed * 1000 + epoch, drop_last=True)
        epoch += 1


def run_job(size, strategy, seed, *, data, bank, ancestry, args) -> dict:
    depth, width, heads = size
    spec = ViTSpec(depth=depth, width=width, heads=heads, patch=4, img_size=28, in_chans=1, num_classes=10)
    fit = data.train.subset(args.fit_examples, seed=1000 + seed)
    sources = dict(seed=seed, fit_data=(fit.x, fit.y), fit_steps=args.fit_steps, fit_lr=args.fit_lr)
    if bank is not None:
        sources.update(bank=bank.bank, aux_scalers=bank.aux_scalers)
    if ancestry is not None:
        sources.update(ancestry=ancestry[0], ancestry_spec=ancestry[1])
    t0 = time.perf_counter()
    res = init_model(strategy, spec, **sources)
    init_s = time.perf_counter() - t0
    model = res.model
    seed_everything(seed)
    opt = make_optimizer(model, args.lr, 0.05)
    checkpoints = sorted({int(c) for c in args.checkpoints.split(",")})
    ts = data.test.subset(args.test_examples, seed=12345)  # the same test images for every job
    test = lambda: evaluate(model, iterate_batches(ts.x, ts.y, 512, shuffle=False))["acc"]  # noqa: E731
    stream = batch_stream(data.train.x, data.train.y, args.batch_size, seed)
    curve, done = {0: test()}, 0
    for c in checkpoints:
        done += train_epoch(model, stream, opt, max_steps=c - done)["steps"]
        curve[done] = test()
    return {"size": f"{depth}x{width}x{heads}", "strategy": strategy, "seed": seed, "curve": curve,
            "test_examples": len(ts),
            "init_seconds": round(init_s, 2), "params": spec.num_params(), "info": res.info,
            "steps_per_epoch": len(data.train) // args.batch_size}


def summarize(path: Path, budgets: list[int]) -> dict:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    skipped = sorted({(r["size"], r["strategy"], r["skipped"]) for r in rows if "skipped" in r})
    rows = [r for r in rows if "skipped" not in r]
    by: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        r["curve"] = {int(k): v for k, v in r["curve"].items()}
        by.setdefault((r["size"], r["strategy"]), []).append(r)
    sizes = sorted({s for s, _ in by}, key=lambda s: tuple(int(v) for v in s.split("x")))
    strategies = sorted({st for _, st in by}, key=lambda s: (s != "wave", s))
    spe = rows[0]["steps_per_epoch"] if rows else 1

    def stat(size, strat, step):
        accs = [r["curve"][step] for r in by.get((size, strat), []) if step in r["curve"]]
        if not accs:
            return None
        return statistics.mean(accs), (statistics.stdev(accs) if len(accs) > 1 else 0.0), len(accs)

    wins = total = 0
    print(f"\nstage-3 test accuracy (%), mean ± std over seeds (n); steps/epoch = {spe}")
    head = f"{'size':<10}{'steps':>6} " + "".join(f"{s:>22}" for s in strategies) + f"{'wave leads':>11}{'match x':>9}"
    print(head)
    for size in sizes:
        for b in budgets:
            cells, means = [], {}
            for s in strategies:
                v = stat(size, s, b)
                cells.append(f"{100 * v[0]:>13.2f} ± {100 * v[1]:4.2f} ({v[2]})" if v else f"{'-':>22}")
                if v:
                    means[s] = v[0]
            lead, match = "", ""
            controls = [c for c in CONTROLS if c in means]
            if "wave" in means and controls:
                total += 1
                ok = all(means["wave"] > means[c] for c in controls)
                wins += ok
                lead = "yes" if ok else "no"
                best = max(controls, key=lambda c: means[c])
                match = epochs_to_match(by[(size, best)], means["wave"], b)
            print(f"{size:<10}{b:>6} " + "".join(cells) + f"{lead:>11}{match:>9}")
    share = wins / total if total else math.nan
    print(f"\nwave ahead of every control in {wins}/{total} (size, budget) cells")
    for size, strat, why in skipped:
        print(f"n/a: {strat} at {size}: {why}")
    return {"wave_leads_share": round(share, 3), "cells": total, "jobs": len(rows), "sizes": len(sizes)}


def epochs_to_match(runs: list[dict], target: float, budget: int) -> str:
    """Smallest recorded step at which the control's mean reaches ``target``, as a multiple of ``budget``."""
    steps = sorted(set.intersection(*(set(r["curve"]) for r in runs)))
    for s in steps:
        if statistics.mean(r["curve"][s] for r in runs) >= target:
            return f"{s / budget:.1f}"
    return f">{steps[-1] / budget:.1f}" if steps else "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bank", help="weit bank (safetensors) distilled from a well-trained ancestry")
    ap.add_argument("--ancestry", help="the ancestry model (weit model safetensors), for the baselines")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--sizes", default="", help="e.g. 2x64x2,4x96x3 (default: 12 sizes, depth 2-12)")
    ap.add_argument("--strategies", default="wave,scratch,scratch_fit,wave_random_bank,weight_selection,mimetic,"
                    "tleg_fit,net2net", help="baselines that cannot make a size (e.g. net2net only grows) are "
                    "recorded as n/a for it")
    ap.add_argument("--test-examples", type=int, default=10_000,
                    help="test images scored at each checkpoint (a fixed subset; all 10k by default)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--checkpoints", default="200,430,860,1290,2150,3000",
                    help="stage-3 steps at which test accuracy is recorded (horizon = last)")
    ap.add_argument("--budgets", default="200,430,1290", help="the reported budgets (subset of checkpoints)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--fit-steps", type=int, default=100)
    ap.add_argument("--fit-lr", type=float, default=1e-3)
    ap.add_argument("--fit-examples", type=int, default=2000)
    ap.add_argument("--part", default="1/1", help="run only every k-th job, offset i (i/k)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--summarize", action="store_true")
    args = ap.parse_args()
    budgets = [int(b) for b in args.budgets.split(",")]
    i, k = parse_part(args.part)
    if not args.summarize:
        torch.set_num_threads(args.threads)
        strategies = args.strategies.split(",")
        unknown = set(strategies) - set(available())
        if unknown:
            raise SystemExit(f"unknown strategies {sorted(unknown)}; available: {available()}")
        if any(s in NEEDS_BANK for s in strategies) and not args.bank:
            raise SystemExit("--bank is required for wave / wave_random_bank")
        if any(s in BASELINES and s != "mimetic" for s in strategies) and not args.ancestry:
            raise SystemExit("--ancestry is required for the ancestry-based baselines (or drop them from "
                             "--strategies)")
        data = load_fashion_mnist()
        bank = load_bank(args.bank) if args.bank else None
        ancestry = None
        if args.ancestry:
            model, header = load_model(args.ancestry)
            ancestry = (model, ViTSpec.from_dict(header["spec"]))
        done = set()
        if args.out.exists():
            for line in args.out.read_text().splitlines():
                if line.strip():
                    r = json.loads(line)
                    done.add((r["size"], r["strategy"], r["seed"]))
        jobs = [(size, s, int(seed)) for size in parse_sizes(args.sizes) for seed in args.seeds.split(",")
                for s in strategies]
        jobs = [j for n, j in enumerate(jobs) if n % k == i - 1]
        for size, s, seed in jobs:
            key = ("x".join(map(str, size)), s, seed)
            if key in done:
                continue
            t0 = time.perf_counter()
            try:
                row = run_job(size, s, seed, data=data, bank=bank, ancestry=ancestry, args=args)
            except ValueError as e:  # this strategy cannot make this size from this ancestry
                if s not in BASELINES:
                    raise
                row = {"size": key[0], "strategy": s, "seed": seed, "skipped": str(e).splitlines()[0][:200]}
                with args.out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(f"{key}: n/a ({row['skipped']})", flush=True)
                continue
            row["wall_seconds"] = round(time.perf_counter() - t0, 1)
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{key}: " + " ".join(f"{st}:{100 * a:.1f}" for st, a in row["curve"].items())
                  + f"  ({row['wall_seconds']} s)", flush=True)
    print(json.dumps(summarize(args.out, budgets)))


if __name__ == "__main__":
    main()
