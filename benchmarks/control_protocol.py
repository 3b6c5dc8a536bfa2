"""The init-quality protocol (docs/design.md "The evaluation protocol") for policies on a control task, on a CPU.

Every (size, strategy, seed) job builds the init once through the registry (``weit_core.stage3.init_target``,
as a sweep trial does: stage 2 on the same expert subset and step budget for every wave label and scratch_fit),
scores it by the task's rollouts (``return_norm``: D4RL-style, 0 = uniform random, 100 = the expert, the task's
10 seeded evaluation episodes), then trains a copy per stage-3 budget with the one recipe (AdamW, warm-up then
cosine over exactly that many steps, one learning rate for every strategy) and scores it again. Rows are
appended to a JSONL file, one per finished job; a rerun skips finished jobs, ``--part i/k`` splits the list.

Strategy labels are ``name{opt=v;...}`` (``benchmarks/init_quality.py``); ``bank=NAME`` picks a bank given as
``--extra-bank NAME=PATH`` (the default bank is ``--bank``). The default list adds to the protocol's strategies
the task-agnostic test: ``wave{inherit=scalers}`` (the policy bank's templates + scalers, free tensors fresh),
``wave{bank=fmnist;inherit=scalers}`` (the same from the Fashion-MNIST ViT bank) and
``wave_random_bank{inherit=scalers}`` (the same from an untrained bank).

    python benchmarks/control_protocol.py --env Acrobot-v1 --bank docs/data/control_acrobot_bank.safetensors \\
        --ancestry docs/data/control_acrobot_ancestry.safetensors \\
        --extra-bank fmnist=docs/data/fmnist_bank.safetensors --out docs/data/init_quality_control_acrobot.jsonl
    python benchmarks/control_protocol.py --env Acrobot-v1 --out docs/data/init_quality_control_acrobot.jsonl --summarize
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from control_assets import DEPTHS, WIDTHS, size_of  # noqa: E402
from init_quality import done_jobs, load_ancestry, parse_label, parse_part  # noqa: E402

from weit_core.io import load_bank  # noqa: E402
from weit_core.models.policy import POLICY  # noqa: E402
from weit_core.stage3 import Recipe, init_target, score, train_target  # noqa: E402
from weit_core.strategies import can_make, strategy_info  # noqa: E402
from weit_core.tasks import get_task  # noqa: E402
from weit_core.train import cycle_batches  # noqa: E402

STRATEGIES = ("wave,wave_random_bank,scratch_fit,scratch,weight_selection,wave{inherit=scalers},"
              "wave{bank=fmnist;inherit=scalers},wave_random_bank{inherit=scalers}")
CONTROLS = ("wave_random_bank", "scratch_fit", "scratch")


def run_job(size: dict, label: str, seed: int, *, task, data, banks: dict, ancestry, args) -> dict:
    """One (size, strategy, seed): the init once, its return, then a copy trained for each budget (that many
    steps of one endless shuffled stream of the training contexts) and its return."""
    name, opts = parse_label(label)
    spec = POLICY.spec_for(size, data.io)
    bank = banks[opts.pop("bank", "")] if "bank" in strategy_info(name).needs else None
    res = init_target(name, spec, data.train, seed=seed, fit_examples=args.fit_examples, bank=bank,
                      ancestry=ancestry, fit_steps=args.fit_steps, fit_lr=args.fit_lr, task=task, **opts)
    m = task.metric
    runs = []
    for budget in args.budgets:
        recipe = Recipe(args.lr, batch_size=args.batch_size, weight_decay=args.weight_decay, warmup=args.warmup,
                        seed=seed)
        stream = cycle_batches(data.train.x, data.train.y, args.batch_size, seed=seed * 1000)
        (last,) = train_target(copy.deepcopy(res.model), data.train, data.val, recipe, task=task, score_init=False,
                               batches=lambda _epoch, s=stream: s, steps_per_epoch=budget)
        runs.append({"lr": args.lr, "budget": budget, m: last[f"val_{m}"], "train_loss": last["train_loss"]})
    return {"env": data.io["env_id"], "size": spec.label, "strategy": label, "seed": seed, "params": spec.num_params(),
            "init": {m: score(res.model, data.val, task=task)[m]}, "runs": runs, "init_seconds": res.info["init_seconds"],
            "info": {k: v for k, v in res.info.items() if isinstance(v, str | int | float | bool)},
            "recipe": {"train_contexts": len(data.train), "batch_size": args.batch_size, "lr": args.lr,
                       "warmup": args.warmup, "weight_decay": args.weight_decay, "fit_steps": args.fit_steps,
                       "fit_lr": args.fit_lr, "fit_examples": args.fit_examples, "eval_episodes": 10}}


def cells(path: Path, metric: str = "return_norm") -> dict:
    """(size, label, budget) -> {mean, std, n, params}: over seeds; budget 0 is the init."""
    by: dict[tuple, list[float]] = {}
    params: dict[str, int] = {}
    for r in (json.loads(line) for line in path.read_text().splitlines() if line.strip()):
        if "skipped" in r:
            continue
        params[r["size"]] = r["params"]
        by.setdefault((r["size"], r["strategy"], 0), []).append(r["init"][metric])
        for run in r["runs"]:
            by.setdefault((r["size"], r["strategy"], run["budget"]), []).append(run[metric])
    return {k: {"mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0, "n": len(v),
                "params": params[k[0]]} for k, v in by.items()}


def summarize(path: Path, wave: str = "wave") -> dict:
    """A markdown table (mean ± std over seeds, best per row in bold) and, per budget, each label's mean over
    sizes and its ratio to wave's; returns the cells wave wins against each other label and those means."""
    cs = cells(path)
    sizes = sorted({s for s, _, _ in cs}, key=lambda s: (cs[next(k for k in cs if k[0] == s)]["params"], s))
    labels = sorted({lab for _, lab, _ in cs}, key=lambda s: (s != wave, not s.startswith("wave"), s))
    budgets = sorted({b for _, _, b in cs})
    print("\n| size | params | steps | " + " | ".join(f"`{lab}`" for lab in labels) + " |")
    print("|---|---:|---:|" + "---:|" * len(labels))
    for size in sizes:
        for b in budgets:
            vals = {lab: cs[(size, lab, b)] for lab in labels if (size, lab, b) in cs}
            best = max(v["mean"] for v in vals.values())
            row = [(f"**{v['mean']:.1f} ± {v['std']:.1f}**" if v["mean"] == best else f"{v['mean']:.1f} ± {v['std']:.1f}")
                   if (v := vals.get(lab)) else "-" for lab in labels]
            params = next(iter(vals.values()))["params"]
            print(f"| {size} | {params / 1000:.0f}k | {b} | " + " | ".join(row) + " |")
    means = {lab: {b: statistics.mean(cs[(s, lab, b)]["mean"] for s in sizes if (s, lab, b) in cs) for b in budgets
                   if any((s, lab, b) in cs for s in sizes)} for lab in labels}
    print("\nmean over sizes (ratio to wave's):")
    print("| steps | " + " | ".join(f"`{lab}`" for lab in labels) + " |")
    print("|---:|" + "---:|" * len(labels))
    for b in budgets:
        w = means.get(wave, {}).get(b)
        cols = [f"{means[lab][b]:.1f} ({means[lab][b] / w:.2f})" if b in means[lab] and w else
                (f"{means[lab][b]:.1f}" if b in means[lab] else "-") for lab in labels]
        print(f"| {b} | " + " | ".join(cols) + " |")
    won: dict[str, str] = {}
    for lab in labels:
        if lab == wave:
            continue
        for name, bs in (("init", [0]), ("trained", [b for b in budgets if b > 0])):
            pairs = [(cs[(s, wave, b)]["mean"], cs[(s, lab, b)]["mean"]) for s in sizes for b in bs
                     if (s, wave, b) in cs and (s, lab, b) in cs]
            won[f"vs_{lab}_{name}"] = f"{sum(a > o for a, o in pairs)}/{len(pairs)}"
    jobs = sum(1 for line in path.read_text().splitlines() if line.strip())
    return {"jobs": jobs, "sizes": len(sizes), "budgets": budgets, "wave": wave, "won": won,
            "mean_over_sizes": {lab: {str(b): round(v, 2) for b, v in bm.items()} for lab, bm in means.items()}}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--env", required=True)
    ap.add_argument("--bank", help="the policy bank (control_assets.py)")
    ap.add_argument("--extra-bank", action="append", default=[], metavar="NAME=PATH")
    ap.add_argument("--ancestry")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--strategies", default=STRATEGIES)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--sizes", default="", help="depth x width, e.g. 1x16,2x32 (default: the range of control_assets)")
    ap.add_argument("--budgets", default="25,100", help="stage-3 steps, each its own run from the init")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3, help="the one stage-3 peak learning rate")
    ap.add_argument("--warmup", type=float, default=0.1)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--fit-steps", type=int, default=100)
    ap.add_argument("--fit-lr", type=float, default=1e-3)
    ap.add_argument("--fit-examples", type=int, default=1024)
    ap.add_argument("--part", default="1/1")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--summarize", action="store_true")
    args = ap.parse_args(argv)
    args.budgets = [int(b) for b in args.budgets.split(",")]
    if not args.summarize:
        torch.set_num_threads(args.threads)
        i, k = parse_part(args.part)
        task = get_task(f"control:{args.env}")
        data = task.load(None)
        banks = {"": load_bank(args.bank) if args.bank else None}
        banks.update({n: load_bank(p) for n, p in (e.split("=", 1) for e in args.extra_bank)})
        ancestry = load_ancestry(args.ancestry)
        dims = ([tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")] if args.sizes
                else [(d, w) for d in DEPTHS for w in WIDTHS])
        done = done_jobs(args.out)
        jobs = [(size_of(d, w), lab, int(s)) for s in args.seeds.split(",") for d, w in dims
                for lab in args.strategies.split(",")]
        for size, lab, seed in jobs[i - 1::k]:
            spec = POLICY.spec_for(size, data.io)
            if (spec.label, lab, seed) in done:
                continue
            why = can_make(parse_label(lab)[0], spec, ancestry_spec=ancestry[1] if ancestry else None)
            t0 = time.perf_counter()
            row = ({"size": spec.label, "strategy": lab, "seed": seed, "skipped": why} if why else
                   run_job(size, lab, seed, task=task, data=data, banks=banks, ancestry=ancestry, args=args))
            row["wall_seconds"] = round(time.perf_counter() - t0, 1)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            runs = " ".join(f"{r['budget']}:{r['return_norm']:.1f}" for r in row.get("runs", []))
            print(f"{spec.label} {lab} {seed}: {why or ''} init {row.get('init', {}).get('return_norm', 0):.1f} "
                  f"{runs} ({row['wall_seconds']} s)", flush=True)
    print(json.dumps({"env": args.env, **summarize(args.out)}))


if __name__ == "__main__":
    main()
