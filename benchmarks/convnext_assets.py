"""Make the shipped ConvNeXt ancestry and bank on Fashion-MNIST, in one process on a CPU (weit_core only).

The ancestry is the largest size of the protocol's range (2 stages, depths 4-4, widths 32-64, patch-2 stem),
trained with the one loop (``weit_core.train.fit``); the bank is stage 1 (``weit_core.stage1``, WAVE mode:
the ancestry as teacher) over every size of the range by the sandwich rule, its reference the ancestry's size.

    python benchmarks/convnext_assets.py --out-dir docs/data        # ~20 min on one busy core
    python benchmarks/convnext_assets.py --ancestry docs/data/fmnist_convnext_ancestry.safetensors --bank-epochs 3

Writes ``fmnist_convnext_ancestry.safetensors`` and ``fmnist_convnext_bank.safetensors`` and ends with one
JSON line (test accuracies, wall times).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from weit_core.data import load_dataset
from weit_core.io import load_model, save_model
from weit_core.models import CONVNEXT
from weit_core.stage1 import build_elastic, make_bank, save_elastic
from weit_core.train import evaluate, fit, iterate_batches, make_optimizer, seed_everything, warmup_cosine

DEPTHS, WIDTHS = (1, 2, 3, 4), (16, 32)
"""The protocol's range: depth (blocks per stage) x stage-0 width, 2 stages."""


def sizes(io: dict) -> list:
    return [CONVNEXT.make_spec({"depth": d, "width": w}, io) for d in DEPTHS for w in WIDTHS]


def test_acc(model: torch.nn.Module, data) -> float:
    return evaluate(model, iterate_batches(data.test.x, data.test.y, 512, shuffle=False))["acc"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", type=Path, default=Path("docs/data"))
    ap.add_argument("--ancestry", type=Path, help="an ancestry made before: make only the bank from it")
    ap.add_argument("--epochs", type=int, default=4, help="ancestry epochs over the 55k training images")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--bank-epochs", type=int, default=1)
    ap.add_argument("--bank-lr", type=float, default=5e-3, help="templates learn slower than plain weights")
    ap.add_argument("--bank-warmup-epochs", type=float, default=0.1)
    ap.add_argument("--n-templates", type=int, default=16)
    ap.add_argument("--block", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1, help="more threads on a shared 2-core box cost 10x CPU per step")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = load_dataset("fashion_mnist")
    c, h, _ = data.input_shape
    io = {"in_chans": c, "img_size": h, "num_classes": data.num_classes, "patch": 2}
    rng = sizes(io)
    ref = max(rng, key=lambda s: s.num_params())
    x, y = data.train.x, data.train.y

    t0 = time.perf_counter()
    if args.ancestry:
        ancestry, header = load_model(args.ancestry)
        if CONVNEXT.spec_from_dict(header["spec"]) != ref:
            raise SystemExit(f"{args.ancestry} is not a {ref.label} ConvNeXt")
    else:
        seed_everything(0)
        ancestry = CONVNEXT.build(ref)
        opt = make_optimizer(ancestry, args.lr)
        steps = len(x) // args.batch_size
        sched = warmup_cosine(opt, steps * args.epochs, steps // 2)
        fit(ancestry, lambda ep: iterate_batches(x, y, args.batch_size, seed=ep, drop_last=True), opt,
            epochs=args.epochs, scheduler=sched,
            on_epoch=lambda ep, st: print(json.dumps({"ancestry_epoch": ep, "loss": round(st["loss"], 4),
                                                      "acc": round(st["acc"], 4), "s": round(st["train_s"], 1)}),
                                          flush=True))
    anc_acc = test_acc(ancestry, data)
    anc_s = time.perf_counter() - t0
    if not args.ancestry:
        save_model(args.out_dir / "fmnist_convnext_ancestry.safetensors", ancestry, ref,
                   {"data": "fashion_mnist", "epochs": args.epochs, "lr": args.lr, "test_acc": anc_acc,
                    "script": "benchmarks/convnext_assets.py"})
    print(json.dumps({"ancestry": ref.label, "params": ref.num_params(), "test_acc": anc_acc}), flush=True)

    t1 = time.perf_counter()
    elastic = build_elastic(CONVNEXT, ref, n=args.n_templates, block=args.block, seed=0)
    val = (data.val.x[:2000], data.val.y[:2000])
    history = make_bank(elastic, x, y, sizes=rng, teacher=ancestry.eval(), epochs=args.bank_epochs,
                        lr=args.bank_lr, warmup_epochs=args.bank_warmup_epochs, batch_size=args.batch_size, seed=0,
                        eval_data=val, on_epoch=lambda r: print(json.dumps(r), flush=True))
    bank_s = time.perf_counter() - t1
    save_elastic(args.out_dir / "fmnist_convnext_bank.safetensors", elastic,
                 {"source_model": "fmnist_convnext_ancestry.safetensors", "data": "fashion_mnist", "mode": "wave",
                  "epochs": len(history), "lr": args.bank_lr, "metrics": history[-1],
                  "script": "benchmarks/convnext_assets.py"}, rng)
    print(json.dumps({"ancestry": ref.label, "ancestry_test_acc": round(anc_acc, 4), "ancestry_s": round(anc_s),
                      "bank_epochs": len(history), "bank_s": round(bank_s),
                      "bank_val_acc": {k: round(v, 4) for k, v in history[-1].items() if k.startswith("eval_acc")}}))


if __name__ == "__main__":
    main()
