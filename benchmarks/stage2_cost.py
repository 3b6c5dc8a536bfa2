"""What stage 2 costs: wave's initialization of a size (resize rule + stage-2 fit + materialize) against one
full stage-3 training epoch of the same size, on the same machine and threads (goal: <= 5%).

    python benchmarks/stage2_cost.py --bank docs/data/fmnist_bank.safetensors --sizes 2x64x2,6x96x3,12x128x4

Prints one row per size (seconds and the ratio side by side) and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from weit_core.data import load_fashion_mnist
from weit_core.io import load_bank
from weit_core.models import ViTSpec, create_vit
from weit_core.stage3 import Recipe
from weit_core.strategies import init_model
from weit_core.train import cycle_batches, fit, make_optimizer


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bank", default="docs/data/fmnist_bank.safetensors")
    ap.add_argument("--sizes", default="2x64x2,6x96x3,12x128x4")
    ap.add_argument("--fit-steps", type=int, default=100)
    ap.add_argument("--fit-examples", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--epoch-steps", type=int, default=None,
                    help="time this many stage-3 steps and scale to a full epoch (default: the full epoch)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_fashion_mnist()
    bank = load_bank(args.bank)
    subset = data.train.subset(args.fit_examples, seed=1000)
    steps_per_epoch = len(data.train) // args.batch_size
    rows = []
    print(f"{'size':<10}{'stage 2 s':>11}{'epoch s':>10}{'ratio':>8}   (epoch = {steps_per_epoch} steps of "
          f"{args.batch_size}; stage 2 = {args.fit_steps} steps on {len(subset)} examples)")
    for text in args.sizes.split(","):
        d, w, h = (int(v) for v in text.split("x"))
        spec = ViTSpec(depth=d, width=w, heads=h)
        t0 = time.perf_counter()
        init_model("wave", spec, bank=bank, fit_data=(subset.x, subset.y), fit_steps=args.fit_steps, seed=0)
        stage2 = time.perf_counter() - t0
        model = create_vit(spec, head_seed=0)
        n = args.epoch_steps or steps_per_epoch
        recipe = Recipe(1e-3, batch_size=args.batch_size)  # stage 3 as every strategy gets it
        stream = cycle_batches(data.train.x, data.train.y, args.batch_size)
        t0 = time.perf_counter()
        opt = make_optimizer(model, recipe.lr, recipe.weight_decay)
        fit(model, lambda _epoch, s=stream: s, opt, epochs=1, max_steps=n, scheduler=recipe.scheduler(opt, n))
        epoch = (time.perf_counter() - t0) * steps_per_epoch / n
        rows.append({"size": text, "stage2_s": round(stage2, 2), "epoch_s": round(epoch, 1),
                     "ratio": round(stage2 / epoch, 4)})
        print(f"{text:<10}{stage2:>11.2f}{epoch:>10.1f}{stage2 / epoch:>8.3f}", flush=True)
    worst = max(r["ratio"] for r in rows)
    print(f"worst ratio {worst:.3f} (goal <= 0.05)")
    print(json.dumps({"ratio": worst, "goal": 0.05, "met": worst <= 0.05, "rows": rows, "threads": args.threads,
                      "fit_steps": args.fit_steps}))


if __name__ == "__main__":
    main()
