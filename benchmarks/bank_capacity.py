"""How much of an ancestry a template bank can hold: the bank's templates and scalers fitted to the ancestry's
templated weights by least squares (Adam on the mean relative error per tensor), its free tensors copied, and
the aux model that results scored at the ancestry's size *before* any stage-1 step.

This is stage 1 warm-started from the ancestry in its purest form: if a bank of the usual capacity could
hold the ancestry, an aux model (and so ``wave``) could start where the ancestry is. It measures that
ceiling per template count N (block fixed): the relative error left, the bank's numbers against the
weights they generate, and the aux's metric against the ancestry's.

    python benchmarks/bank_capacity.py --ancestry docs/data/fmnist_ancestry.safetensors --ns 16,64
    python benchmarks/bank_capacity.py --ancestry docs/data/fmnist_dit_ancestry.safetensors --task generation:500x10 --ns 16,64

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from weit_core.io import load_model
from weit_core.models import get_family
from weit_core.models.elastic import AtSize
from weit_core.stage1 import build_elastic
from weit_core.tasks import get_task
from weit_core.templates import materialize_grids
from weit_core.train import evaluate, iterate_batches


def fit_bank_to(elastic, model, steps: int, lr: float) -> float:
    """Copy ``model``'s free tensors into the aux model and fit templates + scalers to its templated weights
    (same size); returns the mean relative squared error per tensor left."""
    target = {k: v.detach() for k, v in model.named_parameters()}
    layout = elastic.family.layout(elastic.ref_spec)
    with torch.no_grad():
        for name, p in elastic.free_tensors().items():
            p.copy_(target[name])
    opt = torch.optim.Adam([*elastic.bank.parameters(), *elastic.scalers.parameters()], lr)
    err = torch.tensor(float("nan"))
    for _ in range(steps):
        w = materialize_grids(elastic.bank, dict(elastic.scalers.grids.items()), layout)
        err = torch.stack([((w[k] - target[k]) ** 2).sum() / (target[k] ** 2).sum() for k in w]).mean()
        opt.zero_grad()
        err.backward()
        opt.step()
    return float(err.detach())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ancestry", required=True)
    ap.add_argument("--task", default="classification")
    ap.add_argument("--ns", default="16,64", help="template counts N to try")
    ap.add_argument("--block", type=int, default=16)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--eval-examples", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, header = load_model(args.ancestry)
    family = get_family(header.get("family", "vit"))
    ref = family.spec_from_dict(header["spec"])
    task = get_task(args.task)
    data = task.load(None, args.eval_examples)
    m = task.metric

    def score(net) -> float:
        return evaluate(net, iterate_batches(data.val.x, data.val.y, 500, shuffle=False), task=task)[m]

    base = score(model)
    rows = []
    print(f"{family.name} ancestry {ref.label}: val {m} {base:.4g}\n")
    print(f"| N | block | bank + scalers | templated weights | relative error | aux {m} at {ref.label} | ancestry |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n in (int(v) for v in args.ns.split(",")):
        elastic = build_elastic(family, ref, n=n, block=args.block, seed=0)
        t0 = time.perf_counter()
        err = fit_bank_to(elastic, model, args.steps, args.lr)
        numbers = sum(p.numel() for p in (*elastic.bank.parameters(), *elastic.scalers.parameters()))
        weights = sum(w.numel() for w in materialize_grids(elastic.bank, dict(elastic.scalers.grids.items()),
                                                           family.layout(ref)).values())
        aux = score(AtSize(elastic, ref))
        rows.append({"n": n, "block": args.block, "bank_numbers": numbers, "templated_weights": weights,
                     "relative_error": round(err, 4), f"aux_{m}": aux, "fit_s": round(time.perf_counter() - t0, 1)})
        print(f"| {n} | {args.block} | {numbers:,} | {weights:,} | {err:.3f} | {aux:.4g} | {base:.4g} |", flush=True)
    print(json.dumps({"ancestry": args.ancestry, "family": family.name, "spec": ref.label, "task": task.name,
                      f"ancestry_{m}": base, "steps": args.steps, "rows": rows}))


if __name__ == "__main__":
    main()
