"""Materialize every templated weight of a ViT-B-sized target vs a plain copy of the same bytes.

    python benchmarks/materialize.py [--repeats 15] [--threads 2] [--block 16] [--n 4]

Goal (issue 2): materialize <= 2x the copy, median of repeats. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from weit_core.models import ViTSpec, vit_kinds, vit_layout
from weit_core.templates import Scalers, TemplateBank, materialize


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up (allocator, threads)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--block", type=int, default=16)
    ap.add_argument("--n", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    spec = ViTSpec(depth=12, width=768, heads=12, patch=16, img_size=224, in_chans=3, num_classes=1000)
    kinds = vit_kinds(spec, n=args.n, block=args.block)
    bank, scalers = TemplateBank(kinds), Scalers(vit_layout(spec), kinds)
    with torch.no_grad():
        numel = sum(w.numel() for w in materialize(bank, scalers).values())
    src = torch.randn(numel)

    def copy() -> None:
        src.clone()

    def mat_no_grad() -> None:
        with torch.no_grad():
            materialize(bank, scalers)

    def mat_autograd() -> None:
        materialize(bank, scalers)

    t_copy = median_seconds(copy, args.repeats)
    t_mat = median_seconds(mat_no_grad, args.repeats)
    t_grad = median_seconds(mat_autograd, args.repeats)
    rows = [("plain copy (clone)", t_copy), ("materialize, no_grad", t_mat), ("materialize, autograd on", t_grad)]
    print(f"ViT-B target: depth 12, width 768, {numel / 1e6:.1f}M templated weights ({numel * 4 / 2**20:.0f} MiB), "
          f"N={args.n}, block {args.block}, {scalers.num_numbers():,} scalers, {args.threads} threads, "
          f"median of {args.repeats}")
    print(f"{'what':<28}{'median s':>10}{'x copy':>9}")
    for name, t in rows:
        print(f"{name:<28}{t:>10.4f}{t / t_copy:>9.2f}")
    print(json.dumps({"ratio": round(t_mat / t_copy, 3), "ratio_autograd": round(t_grad / t_copy, 3),
                      "weights": numel, "scalers": scalers.num_numbers(), "repeats": args.repeats}))


if __name__ == "__main__":
    main()
