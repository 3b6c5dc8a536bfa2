"""Make a task's ancestry and bank for the init-quality protocol in one process on a CPU (weit_core only).

The ancestry is a model of the task's family larger than every size of the protocol's range (``ANCESTRY``),
trained on the task's default data by ``weit_core.ancestry.train_plain`` (the code ``weit ancestry --task``
runs). The bank is stage 1 (``weit_core.stage1``, WAVE mode: the ancestry as teacher) over the range's sizes
and the reference, the reference being the ancestry's size.

    python benchmarks/task_assets.py --task control:Acrobot-v1 --out-dir docs/data
    python benchmarks/task_assets.py --task control:Pendulum-v1 --out-dir docs/data
    python benchmarks/task_assets.py --task generation:500x10 --out-dir docs/data --epochs 8 --bank-epochs 3 --batch-size 128

Writes ``<stem>_ancestry.safetensors`` and ``<stem>_bank.safetensors`` (``control_<env>`` for a control task,
``fmnist_dit`` for generation) and ends with one JSON line (the ancestry's test metric, the bank's per-size
metric, wall times).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from weit_core.ancestry import train_plain
from weit_core.io import load_model, save_model
from weit_core.models import get_family
from weit_core.stage1 import build_elastic, make_bank, save_elastic
from weit_core.tasks import get_task
from weit_core.train import seed_everything

RANGES = {"policy": ((1, 2, 3, 4), (16, 32)), "dit": ((1, 2, 3), (32, 64))}
"""The protocol's range per family: depth x width, heads = width / 16, MLP ratio 4 (every width and hidden a
multiple of the bank's block, 16)."""
ANCESTRY = {"depth": 4, "width": 64, "heads": 4, "mlp_ratio": 4.0}
"""Deeper and wider than every size of either range, so weight selection can make them all."""


def size_of(depth: int, width: int) -> dict:
    return {"depth": depth, "width": width, "heads": width // 16, "mlp_ratio": 4.0}


def sizes(family: str, io: dict) -> list:
    fam = get_family(family)
    depths, widths = RANGES[family]
    return [fam.spec_for(size_of(d, w), io) for d in depths for w in widths]


def asset_paths(out_dir: Path, task: str) -> tuple[Path, Path]:
    stem = f"control_{task.split(':', 1)[1].split('-')[0].lower()}" if task.startswith("control:") else "fmnist_dit"
    return out_dir / f"{stem}_ancestry.safetensors", out_dir / f"{stem}_bank.safetensors"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", required=True, help="control:<env id> (a cached expert) or generation[:<samples>x<steps>]")
    ap.add_argument("--out-dir", type=Path, default=Path("docs/data"))
    ap.add_argument("--ancestry", type=Path, help="an ancestry made before: make only the bank from it")
    ap.add_argument("--epochs", type=int, default=30, help="ancestry epochs over the task's training split")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--bank-epochs", type=int, default=10)
    ap.add_argument("--bank-lr", type=float, default=3e-3)
    ap.add_argument("--n-templates", type=int, default=16)
    ap.add_argument("--block", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    task = get_task(args.task)
    family = get_family(task.default_family)
    if family.name not in RANGES:
        raise SystemExit(f"{args.task}: no protocol range for the {family.name} family here (have "
                         f"{', '.join(RANGES)}); the image families have their own: init_quality.py, convnext_assets.py")
    data = task.load(None)
    rng = sizes(family.name, data.io)
    ref = family.spec_for(ANCESTRY, data.io)
    anc_path, bank_path = asset_paths(args.out_dir, args.task)
    m = task.metric

    t0 = time.perf_counter()
    if args.ancestry:
        ancestry, header = load_model(args.ancestry)
        if family.spec_from_dict(header["spec"]) != ref:
            raise SystemExit(f"{args.ancestry} is not a {ref.label} {family.name} for {args.task}")
        last = {f"test_{m}": header.get(f"test_{m}")}
    else:
        seed_everything(0)
        ancestry = family.build(ref)
        last = train_plain(ancestry, data, task, epochs=args.epochs, lr=args.lr, weight_decay=0.05,
                           warmup_epochs=1.0, batch_size=args.batch_size, seed=0,
                           on_epoch=lambda r: print(json.dumps({k: round(v, 4) for k, v in r.items()}), flush=True))
        save_model(anc_path, ancestry, ref, {"task": task.name, "epochs": args.epochs, "lr": args.lr,
                                             f"test_{m}": last[f"test_{m}"], "script": "benchmarks/task_assets.py"})
    anc_s = time.perf_counter() - t0

    t1 = time.perf_counter()
    elastic = build_elastic(family, ref, n=args.n_templates, block=args.block, seed=0)
    val = (data.val.x, data.val.y)
    history = make_bank(elastic, data.train.x, data.train.y, sizes=[*rng, ref], teacher=ancestry.eval(),
                        epochs=args.bank_epochs, lr=args.bank_lr, warmup_epochs=1.0, batch_size=args.batch_size,
                        seed=0, eval_data=val, task=task, on_epoch=lambda r: print(json.dumps(r), flush=True))
    bank_s = time.perf_counter() - t1
    save_elastic(bank_path, elastic, {"source_model": anc_path.name, "task": task.name, "mode": "wave",
                                      "epochs": len(history), "lr": args.bank_lr, "metrics": history[-1],
                                      "script": "benchmarks/task_assets.py"}, [*rng, ref])
    print(json.dumps({"task": args.task, "ancestry": ref.label, "params": ref.num_params(),
                      f"ancestry_test_{m}": last[f"test_{m}"], "ancestry_s": round(anc_s), "bank_epochs": len(history),
                      "bank_s": round(bank_s), "bank_eval": {k: v for k, v in history[-1].items() if k.startswith("eval")},
                      "ancestry_path": str(anc_path), "bank_path": str(bank_path)}))


if __name__ == "__main__":
    main()
