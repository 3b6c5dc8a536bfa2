"""The init-quality protocol (docs/design.md "The evaluation protocol") for the ConvNeXt family, on a CPU.

Every (size, strategy, seed) job builds the init once through the registry (``weit_core.stage3``, as a sweep
trial does: stage 2 on the same labeled subset for wave, its random-bank control and scratch_fit), then trains a
copy per stage-3 budget with the one recipe (AdamW, warm-up then cosine over that budget) on a fixed
Fashion-MNIST subset, scoring fixed validation and test subsets at budget 0 (the init), ~100 steps and one epoch of the
subset. Rows go to a JSONL file in ``benchmarks/init_quality.py``'s form, so its summary (tables, shares of
cells won, budgets to match) reads them; the run resumes by skipping finished jobs and splits into parts.

    python benchmarks/convnext_protocol.py --bank docs/data/fmnist_convnext_bank.safetensors \\
        --ancestry docs/data/fmnist_convnext_ancestry.safetensors --out /tmp/cnx.jsonl [--part 1/2]
    python benchmarks/convnext_protocol.py --out /tmp/cnx.jsonl --summarize
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from convnext_assets import DEPTHS, WIDTHS  # noqa: E402
from init_quality import add_recipe_args, cell_stats, load_ancestry, run_jobs, summarize  # noqa: E402

from weit_core.data import load_dataset  # noqa: E402
from weit_core.io import load_bank  # noqa: E402
from weit_core.models import CONVNEXT  # noqa: E402
from weit_core.stage3 import Recipe, init_target, score, train_target  # noqa: E402
from weit_core.train import cycle_batches  # noqa: E402

STRATEGIES = "wave,wave_random_bank,scratch_fit,scratch,weight_selection"


def shares(path: Path, budgets: list[int], wave: str = "wave") -> dict:
    """Per baseline: the share of (size, budget) cells where wave's mean test accuracy is higher, at budget
    0 and over the stage-3 budgets, with the cell counts."""
    rows = [r for r in map(json.loads, path.read_text().splitlines()) if "skipped" not in r]
    cells = cell_stats(rows, [0, *budgets])
    out: dict = {}
    for base in sorted({lab for _, lab, _ in cells} - {wave}):
        for name, bs in (("init", [0]), ("trained", budgets)):
            pairs = [(cells[(s, wave, b)]["mean"], v["mean"]) for (s, lab, b), v in cells.items()
                     if lab == base and b in bs and (s, wave, b) in cells]
            out[f"vs_{base}_{name}"] = f"{sum(w > o for w, o in pairs)}/{len(pairs)}"
    return out


def run_job(size: dict, label: str, seed: int, *, data, train, bank, ancestry, args) -> dict:
    """One (size, strategy, seed), as a sweep trial makes it: the init once (``stage3.init_target``), then a
    copy trained by ``train_target`` for each budget (that many steps of an endless shuffled stream of the
    stage-3 subset, the schedule over exactly those steps), scored on the fixed val and test subsets."""
    c, h, _ = data.input_shape
    spec = CONVNEXT.make_spec(size, {"in_chans": c, "img_size": h, "num_classes": data.num_classes, "patch": 2})
    res = init_target(label, spec, data.train, seed=seed, fit_examples=args.fit_examples, bank=bank,
                      ancestry=ancestry, fit_steps=args.fit_steps, fit_lr=args.fit_lr)
    vs = data.val.subset(args.val_examples, seed=54321)  # the same images for every job
    ts = data.test.subset(args.test_examples, seed=12345)
    epoch = len(train) // args.batch_size
    runs = []
    for budget in sorted({args.steps, epoch}):
        recipe = Recipe(args.lr, batch_size=args.batch_size, weight_decay=args.weight_decay, warmup=args.warmup,
                        seed=seed)
        stream = cycle_batches(train.x, train.y, args.batch_size, seed=seed * 1000)
        (last,) = train_target(copy.deepcopy(res.model), train, vs, recipe, test=ts, score_init=False,
                               batches=lambda _epoch, s=stream: s, steps_per_epoch=budget)
        runs.append({"lr": args.lr, "budget": budget, "val": last["val_acc"], "test": last["test_acc"]})
    return {"size": CONVNEXT.size_name(size), "label": spec.label, "strategy": label, "seed": seed,
            "data": data.name, "init": {k: score(res.model, d)["acc"] for k, d in (("val", vs), ("test", ts))},
            "runs": runs, "init_seconds": res.info["init_seconds"], "params": spec.num_params(),
            "steps_per_epoch": epoch, "info": {k: v for k, v in res.info.items() if isinstance(v, str | int | float | bool)},
            "recipe": {"train_examples": len(train), "batch_size": args.batch_size, "lr": args.lr, "warmup": args.warmup,
                       "weight_decay": args.weight_decay, "fit_steps": args.fit_steps, "fit_lr": args.fit_lr,
                       "fit_examples": args.fit_examples}}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bank")
    ap.add_argument("--ancestry")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--strategies", default=STRATEGIES)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--train-examples", type=int, default=5000, help="the stage-3 subset (one epoch = a budget)")
    ap.add_argument("--steps", type=int, default=100, help="the short stage-3 budget")
    add_recipe_args(ap, batch_size=32, fit_examples=1000)
    ap.add_argument("--val-examples", type=int, default=1000)
    ap.add_argument("--test-examples", type=int, default=2000)
    ap.add_argument("--part", default="1/1")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--summarize", action="store_true")
    args = ap.parse_args(argv)
    epoch = args.train_examples // args.batch_size
    if not args.summarize:
        torch.set_num_threads(args.threads)
        data = load_dataset("fashion_mnist")
        train = data.train.subset(args.train_examples, seed=0)
        bank = load_bank(args.bank) if args.bank else None
        ancestry = load_ancestry(args.ancestry)
        io = {"in_chans": 1, "img_size": 28, "num_classes": 10, "patch": 2}
        jobs = [(CONVNEXT.size_name(size), CONVNEXT.make_spec(size, io), lab, int(seed), size)
                for seed in args.seeds.split(",") for size in ({"depth": d, "width": w} for d in DEPTHS for w in WIDTHS)
                for lab in args.strategies.split(",")]
        run_jobs(args.out, jobs, args.part, ancestry,
                 lambda size, lab, seed: run_job(size, lab, seed, data=data, train=train, bank=bank, ancestry=ancestry,
                                                 args=args),
                 lambda row: (f"init {100 * row.get('init', {}).get('test', 0):.1f} "
                              + " ".join(f"{r['budget']}:{100 * r['test']:.1f}" for r in row.get("runs", []))))
    budgets = sorted({args.steps, epoch})
    print(json.dumps({**summarize(args.out, budgets, "wave", epoch), "won": shares(args.out, budgets)}))


if __name__ == "__main__":
    main()
