"""The init-quality protocol (docs/design.md "The evaluation protocol") for a task's own family, on a CPU:
policies on a control task (``control:<env>``), DiTs on class-conditional generation (``generation:...``).

Every (size, strategy, seed) job builds the init once through the registry (``weit_core.stage3.init_target``,
as a sweep trial does: stage 2 on the same training subset and step budget for every wave label and
scratch_fit), scores it by the task's metric (``return_norm``: D4RL-style, 0 = uniform random, 100 = the
expert, the task's 10 seeded evaluation episodes; ``fid``: the task's fixed seeded samples against the
validation images, lower is better), then trains a copy per stage-3 budget with the one recipe (AdamW, warm-up
then cosine over exactly that many steps, one learning rate for every strategy) and scores it again. Rows are
appended to a JSONL file, one per finished job; a rerun skips finished jobs, ``--part i/k`` splits the list.

Strategy labels are ``name{opt=v;...}`` (``benchmarks/init_quality.py``); ``bank=NAME`` picks a bank given as
``--extra-bank NAME=PATH`` (the default bank is ``--bank``). For control the default list adds to the
protocol's strategies the task-agnostic test: ``wave{inherit=scalers}`` (the policy bank's templates + scalers,
free tensors fresh), ``wave{bank=fmnist;inherit=scalers}`` (the same from the Fashion-MNIST ViT bank) and
``wave_random_bank{inherit=scalers}`` (the same from an untrained bank).

The summary's steps-to-match: per size, the smallest budget at which each label reaches wave's score at the
smallest budget (``>B`` where none of its budgets does).

    python benchmarks/task_protocol.py --task control:Acrobot-v1 --bank docs/data/control_acrobot_bank.safetensors \\
        --ancestry docs/data/control_acrobot_ancestry.safetensors \\
        --extra-bank fmnist=docs/data/fmnist_bank_6ep.safetensors --out docs/data/init_quality_control_acrobot.jsonl
    python benchmarks/task_protocol.py --task control:Acrobot-v1 --out docs/data/init_quality_control_acrobot.jsonl --summarize
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
from init_quality import add_recipe_args, load_ancestry, parse_label, run_jobs  # noqa: E402
from task_assets import RANGES, size_of  # noqa: E402

from weit_core.io import load_bank  # noqa: E402
from weit_core.models import get_family  # noqa: E402
from weit_core.stage3 import Recipe, init_target, score, train_target  # noqa: E402
from weit_core.strategies import strategy_info  # noqa: E402
from weit_core.tasks import Task, get_task  # noqa: E402
from weit_core.train import cycle_batches  # noqa: E402

STRATEGIES = {
    "policy": ("wave,wave_random_bank,scratch_fit,scratch,weight_selection,wave{inherit=scalers},"
               "wave{bank=fmnist;inherit=scalers},wave_random_bank{inherit=scalers}"),
    "dit": "wave,wave_random_bank,scratch_fit,scratch,weight_selection",
}


def run_job(size: dict, label: str, seed: int, *, task: Task, data, banks: dict, ancestry, args) -> dict:
    """One (size, strategy, seed): the init once, its score, then a copy trained for each budget (that many
    steps of one endless shuffled stream of the training split) and its score."""
    name, opts = parse_label(label)
    spec = get_family(task.default_family).spec_for(size, data.io)
    bank = banks[opts.pop("bank", "")] if "bank" in strategy_info(name).needs else None
    res = init_target(name, spec, data.train, seed=seed, fit_examples=args.fit_examples, bank=bank,
                      ancestry=ancestry, fit_steps=args.fit_steps, fit_lr=args.fit_lr, task=task, **opts)
    m = task.metric
    runs = []
    for budget in args.budgets:
        recipe = Recipe(args.lr, batch_size=args.batch_size, weight_decay=args.weight_decay, warmup=args.warmup,
                        seed=seed)
        stream = cycle_batches(data.train.x, data.train.y, args.batch_size, seed=seed * 1000)
        t0 = time.perf_counter()
        (last,) = train_target(copy.deepcopy(res.model), data.train, data.val, recipe, task=task, score_init=False,
                               batches=lambda _epoch, s=stream: s, steps_per_epoch=budget)
        runs.append({"lr": args.lr, "budget": budget, m: last[f"val_{m}"], "train_loss": last["train_loss"],
                     "seconds": round(time.perf_counter() - t0, 1)})
    recipe = {"train_examples": len(data.train), "batch_size": args.batch_size, "lr": args.lr, "warmup": args.warmup,
              "weight_decay": args.weight_decay, "fit_steps": args.fit_steps, "fit_lr": args.fit_lr,
              "fit_examples": args.fit_examples}
    return {"task": task.name, **({"env": data.io["env_id"]} if "env_id" in data.io else {}), "size": spec.label,
            "strategy": label, "seed": seed, "params": spec.num_params(),
            "init": {m: score(res.model, data.val, task=task)[m]}, "runs": runs, "init_seconds": res.info["init_seconds"],
            "info": {k: v for k, v in res.info.items() if isinstance(v, str | int | float | bool)}, "recipe": recipe}


def cells(path: Path, metric: str) -> dict:
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


def steps_to_match(cs: dict, sizes: list[str], labels: list[str], budgets: list[int], task: Task,
                   wave: str) -> dict[str, dict[str, str]]:
    """label -> size -> the smallest budget at which the label reaches wave's score at the smallest trained
    budget (``>B``: not within its largest budget ``B``)."""
    trained = [b for b in budgets if b > 0]
    out: dict[str, dict[str, str]] = {}
    if not trained:
        return out
    for lab in (lab for lab in labels if lab != wave):
        for size in sizes:
            if (ref := cs.get((size, wave, trained[0]))) is None:
                continue
            have = [b for b in trained if (size, lab, b) in cs]
            hit = next((b for b in have if not task.better(ref["mean"], cs[(size, lab, b)]["mean"])), None)
            out.setdefault(lab, {})[size] = str(hit) if hit is not None else f">{have[-1]}" if have else "-"
    return out


def summarize(path: Path, task: Task, wave: str = "wave") -> dict:
    """A markdown table (mean ± std over seeds, best per row in bold), steps-to-match, and, per budget, each
    label's mean over sizes and its ratio to wave's; returns the cells wave wins against each other label."""
    cs = cells(path, task.metric)
    sizes = sorted({s for s, _, _ in cs}, key=lambda s: (cs[next(k for k in cs if k[0] == s)]["params"], s))
    labels = sorted({lab for _, lab, _ in cs}, key=lambda s: (s != wave, not s.startswith("wave"), s))
    budgets = sorted({b for _, _, b in cs})
    print(f"\n{task.metric} ({'higher' if task.mode == 'max' else 'lower'} is better)")
    print("| size | params | steps | " + " | ".join(f"`{lab}`" for lab in labels) + " |")
    print("|---|---:|---:|" + "---:|" * len(labels))
    for size in sizes:
        for b in budgets:
            vals = {lab: cs[(size, lab, b)] for lab in labels if (size, lab, b) in cs}
            best = task.best({lab: v["mean"] for lab, v in vals.items()})
            row = [(f"**{v['mean']:.1f} ± {v['std']:.1f}**" if lab == best else f"{v['mean']:.1f} ± {v['std']:.1f}")
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
    match = steps_to_match(cs, sizes, labels, budgets, task, wave)
    if match:
        print(f"\nsteps to reach `{wave}` at {min(b for b in budgets if b > 0)} steps:")
        print("| size | " + " | ".join(f"`{lab}`" for lab in match) + " |")
        print("|---|" + "---:|" * len(match))
        for size in sizes:
            print(f"| {size} | " + " | ".join(match[lab].get(size, "-") for lab in match) + " |")
    won: dict[str, str] = {}
    for lab in labels:
        if lab == wave:
            continue
        for name, bs in (("init", [0]), ("trained", [b for b in budgets if b > 0])):
            pairs = [(cs[(s, wave, b)]["mean"], cs[(s, lab, b)]["mean"]) for s in sizes for b in bs
                     if (s, wave, b) in cs and (s, lab, b) in cs]
            won[f"vs_{lab}_{name}"] = f"{sum(task.better(a, o) for a, o in pairs)}/{len(pairs)}"
    jobs = sum(1 for line in path.read_text().splitlines() if line.strip())
    return {"jobs": jobs, "sizes": len(sizes), "budgets": budgets, "metric": task.metric, "mode": task.mode,
            "wave": wave, "won": won, "steps_to_match": match,
            "mean_over_sizes": {lab: {str(b): round(v, 2) for b, v in bm.items()} for lab, bm in means.items()}}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", required=True, help="control:<env id> or generation[:<samples>x<steps>]")
    ap.add_argument("--bank", help="the family's bank (task_assets.py)")
    ap.add_argument("--extra-bank", action="append", default=[], metavar="NAME=PATH")
    ap.add_argument("--ancestry")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--strategies", help="comma-separated labels (default: the family's list, STRATEGIES)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--sizes", default="", help="depth x width, e.g. 1x16,2x32 (default: task_assets.RANGES)")
    ap.add_argument("--budgets", default="25,100", help="stage-3 steps, each its own run from the init")
    add_recipe_args(ap, batch_size=64, fit_examples=1024)
    ap.add_argument("--limit", type=int, help="at most this many rows per split (a quick look; the protocol uses all)")
    ap.add_argument("--part", default="1/1")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--summarize", action="store_true")
    args = ap.parse_args(argv)
    args.budgets = [int(b) for b in args.budgets.split(",")]
    task = get_task(args.task)
    family = get_family(task.default_family)
    if not args.summarize:
        torch.set_num_threads(args.threads)
        data = task.load(None, args.limit)
        banks = {"": load_bank(args.bank) if args.bank else None}
        banks.update({n: load_bank(p) for n, p in (e.split("=", 1) for e in args.extra_bank)})
        ancestry = load_ancestry(args.ancestry)
        depths, widths = RANGES[family.name]
        dims = ([tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")] if args.sizes
                else [(d, w) for d in depths for w in widths])
        labels = (args.strategies or STRATEGIES[family.name]).split(",")
        specs = [(size_of(d, w), family.spec_for(size_of(d, w), data.io)) for d, w in dims]
        jobs = [(spec.label, spec, lab, int(s), size) for s in args.seeds.split(",") for size, spec in specs
                for lab in labels]
        m = task.metric
        run_jobs(args.out, jobs, args.part, ancestry,
                 lambda size, lab, seed: run_job(size, lab, seed, task=task, data=data, banks=banks, ancestry=ancestry,
                                                 args=args),
                 lambda row: (f"init {row.get('init', {}).get(m, 0):.1f} "
                              + " ".join(f"{r['budget']}:{r[m]:.1f}" for r in row.get("runs", []))))
    print(json.dumps({"task": args.task, **summarize(args.out, task)}))


if __name__ == "__main__":
    main()
