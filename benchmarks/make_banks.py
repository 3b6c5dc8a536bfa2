"""Make template banks in process (no Ray) for the init-quality study: one bank per variant, side by side.

Each variant is stage 1 (``weit_core.stage1``) with one setting changed from the default recipe, so the
study can say which change moved what. ``weit distill`` is the same stage 1 on Ray Train; this script is for
a single machine (a GPU box without Ray, or a laptop) and writes the same bank files.

    python benchmarks/make_banks.py --ancestry docs/data/fmnist_ancestry.safetensors --out-dir banks \
        --variants default,single,N8,N16,b8,b32,tmaj --epochs 30 --time-budget-s 240 --device cuda

A variant is ``NAME`` from :data:`VARIANTS` or ``NAME:key=v;key=v`` over the defaults (``n``, ``block``,
``order``, ``range`` = ``full`` | ``ref``, ``width_rule``, ``depth_rule``, ``teacher`` = ``ancestry`` | ``none``,
``epochs``, ``lr``, ``n_random``, ``init`` = a bank file to continue training). Each bank's header records its settings and per-epoch accuracies of a few
sizes; a ``<name>.log`` beside it has one JSON line per epoch.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

DEFAULTS = {"n": 4, "block": 16, "order": "scaler_major", "range": "full", "width_rule": "nested",
            "depth_rule": "nested", "teacher": "ancestry", "epochs": None, "lr": None, "n_random": 1, "init": ""}
VARIANTS = {
    "default": {},
    "single": {"range": "ref"},  # one size, as the first design: the reference alone
    "N8": {"n": 8}, "N16": {"n": 16}, "b8": {"block": 8}, "b32": {"block": 32},
    "tmaj": {"order": "template_major"}, "interp": {"width_rule": "interp", "depth_rule": "interp"},
    "weit": {"teacher": "none"},
}


def parse_variant(text: str) -> tuple[str, dict]:
    name, _, rest = text.partition(":")
    opts = dict(DEFAULTS, **VARIANTS.get(name, {}))
    if name not in VARIANTS and not rest:
        raise SystemExit(f"unknown variant {name!r}; known: {', '.join(VARIANTS)} (or NAME:key=v;...)")
    for item in filter(None, rest.split(";")):
        k, _, v = item.partition("=")
        if k not in DEFAULTS:
            raise SystemExit(f"variant {name}: unknown key {k!r}; keys: {', '.join(DEFAULTS)}")
        opts[k] = type(DEFAULTS[k])(v) if DEFAULTS[k] is not None else float(v) if k == "lr" else int(v)
    return name, opts


def make_one(name: str, opts: dict, args: argparse.Namespace) -> Path:
    import torch

    from weit_core.data import load_dataset
    from weit_core.io import load_model
    from weit_core.models.vit import VIT, ViTSpec
    from weit_core.sizes import grid, largest, size_range
    from weit_core.stage1 import build_elastic, make_bank, save_elastic

    torch.set_num_threads(args.threads)
    data = load_dataset(args.data)
    c, h, _ = data.input_shape
    points = grid(args.depths, args.widths, head_dim=args.head_dim)
    io = {"patch": args.patch, "img_size": h, "in_chans": c, "num_classes": data.num_classes}
    plan = size_range(VIT, VIT.make_spec(largest(points, args.head_dim), io), points, block=opts["block"],
                      width_rule=opts["width_rule"], depth_rule=opts["depth_rule"])
    ref, sizes = plan.ref, plan.sizes
    teacher = None
    if opts["teacher"] == "ancestry":
        teacher, _ = load_model(args.ancestry)
    if opts["range"] == "ref":
        anc = ViTSpec.from_dict(load_model(args.ancestry)[1]["spec"]) if args.ancestry else ref
        ref, sizes = anc, [anc]
    if opts["init"]:  # continue training a bank this script wrote (its aux head was not kept: a new one)
        from weit_core.io import load_bank
        from weit_core.stage1 import load_elastic

        el = load_elastic(load_bank(opts["init"]), VIT)
        ref = el.ref_spec
    else:
        el = build_elastic(VIT, ref, n=opts["n"], block=opts["block"], order=opts["order"],
                           width_rule=opts["width_rule"], depth_rule=opts["depth_rule"], seed=args.seed)
    ev = data.val.subset(2000, seed=0)
    log = args.out_dir / f"{name}.log"
    t0 = time.perf_counter()

    def on_epoch(row: dict) -> None:
        with log.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"[{name}] " + json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}),
              flush=True)

    watch = list(dict.fromkeys([min(sizes, key=lambda s: s.num_params()), ref]
                               + [s for s in sizes if (s.depth, s.width) in ((4, 64), (6, 96), (8, 96))]))
    history = make_bank(el, data.train.x, data.train.y, sizes=sizes, teacher=teacher,
                        epochs=opts["epochs"] or args.epochs, lr=opts["lr"] or args.lr, batch_size=args.batch_size,
                        warmup_epochs=1.0, n_random=opts["n_random"], seed=args.seed, device=args.device,
                        time_budget_s=args.time_budget_s, max_steps=args.max_steps, eval_data=(ev.x, ev.y),
                        eval_sizes=watch,
                        on_epoch=on_epoch)
    header = {"mode": "wave" if teacher is not None else "weit", "variant": name, "settings": opts,
              "source_model": args.ancestry if teacher is not None else None, "data": data.name,
              "epochs": len(history), "metrics": history[-1], "wall_s": round(time.perf_counter() - t0, 1),
              "device": args.device}
    path = save_elastic(args.out_dir / f"bank_{name}.safetensors", el.cpu(), header, sizes)
    (args.out_dir / f"bank_{name}.json").write_text(json.dumps(header, indent=1, default=str))
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ancestry", help="the teacher (weit model safetensors); variants with teacher=none skip it")
    ap.add_argument("--data", default="fashion_mnist")
    ap.add_argument("--out-dir", type=Path, required=True)
    ap.add_argument("--variants", default="default")
    ap.add_argument("--depths", default="2,4,6,8,10,12")
    ap.add_argument("--widths", default="64,96,128")
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--patch", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--time-budget-s", type=float, default=None,
                    help="per bank: as many epochs as the first epoch's wall time fits in")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--max-steps", type=int, default=None, help="cap on steps per epoch (smoke runs)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--jobs", type=int, default=1, help="banks made side by side (one process each)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.depths = [int(v) for v in args.depths.split(",")]
    args.widths = [int(v) for v in args.widths.split(",")]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    variants = [parse_variant(v) for v in args.variants.split(",")]
    if any(o["teacher"] == "ancestry" for _, o in variants) and not args.ancestry:
        raise SystemExit("--ancestry is required for variants distilled from a teacher")
    if args.one is not None:
        name, opts = variants[int(args.one)]
        print(f"[{name}] wrote {make_one(name, opts, args)}", flush=True)
        return
    procs: list[subprocess.Popen] = []
    failed = []
    for i in range(len(variants)):
        while len([p for p in procs if p.poll() is None]) >= args.jobs:
            time.sleep(1)
        cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--one", str(i)]
        procs.append(subprocess.Popen(cmd, env=dict(os.environ, OMP_WAIT_POLICY="PASSIVE")))
    for (name, _), p in zip(variants, procs, strict=True):
        if p.wait() != 0:
            failed.append(name)
    print(json.dumps({"banks": [n for n, _ in variants if n not in failed], "failed": failed}))
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
