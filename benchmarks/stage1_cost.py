"""What a size range costs in stage 1: seconds per epoch of size-aware stage 1 (a range trained by the
sandwich rule) against stage 1 of the reference size alone, same data, teacher, batch, steps and threads.

Both sides train the same ``ElasticModel`` reference (the range's largest size). The range side runs the
largest, the smallest and ``--n-random`` drawn sizes every step (``Sandwich``), the single side the reference
only. Measured two ways:
  * in-process: ``weit_core.stage1.make_bank`` (seconds between epoch ends; no evaluation), and the
    reference alone as distill trained it before stage 1 was size-aware (a ``TemplatedModel``);
  * on Ray Train (``--ray``): ``weit distill``'s ``run_distill`` with one worker, the workers' ``train_s``
    (seconds inside ``distill_epoch``), without the ``--depths/--widths`` flags and with them.
Printed side by side with a FLOP estimate (3 x forward per trained size, plus the teacher's forward); the
last line is one JSON object, ``ratio`` = range / single seconds per epoch in-process, goal <= 2.

    .venv/bin/python benchmarks/stage1_cost.py --limit 4096 --epochs 2 --depths 2,4 --widths 32,64 --ray

Measured 2026-11-27 on the shared 2-core box (1 thread; Fashion-MNIST 4,096 rows; range 2-4 x 32-64,
reference 4x64x2, 3 sizes per step), range / reference seconds per epoch: WAVE (teacher = docs/data's 6x96
ancestry) 1.27 in-process, 1.45 on Ray Train (FLOP estimate 1.26); WeiT (``--teacher none``) 1.80
in-process, 1.74-1.78 on Ray Train (FLOP estimate 1.53). Steady-state ratios swing 1.3-2.1 with the
load other jobs put on the box; small sizes cost more than their FLOPs (each size is resized and
materialized every step). Again late that day with nothing else running: 1.44 in-process over the
shipped bank's range (depth 2-12 x width 64-128, reference 12x128x4; ``--limit 2048``) and over 2-4 x 32-64
(docs/results.md, "Stage 1").
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from pipelines.distill import DistillConfig, parse_sizes, plan_range, run_distill  # noqa: E402
from weit_core.models import TemplatedModel, create_vit, vit_layout  # noqa: E402
from weit_core.models.vit import VIT  # noqa: E402
from weit_core.parquet import prepare_parquet, read_parquet_arrays  # noqa: E402
from weit_core.stage1 import build_elastic, make_bank  # noqa: E402
from weit_core.teacher import load_teacher  # noqa: E402
from weit_core.templates import Scalers, TemplateBank  # noqa: E402
from weit_core.train import fit, iterate_batches, make_optimizer, seed_everything, warmup_cosine  # noqa: E402

ANCESTRY = Path(__file__).resolve().parents[1] / "docs" / "data" / "fmnist_ancestry.safetensors"


def in_process(config: DistillConfig, plan, sizes, teacher, train) -> list[float]:
    """Seconds per epoch of ``make_bank`` over ``sizes`` (None: the reference alone)."""
    el = build_elastic(VIT, plan.ref, n=config.n_templates, block=config.block, width_rule=config.width_rule,
                       depth_rule=config.depth_rule, seed=config.seed)
    marks = [time.perf_counter()]
    make_bank(el, train.x, train.y, sizes=sizes, teacher=teacher, epochs=config.epochs, lr=config.lr,
              batch_size=config.batch_size, n_random=config.n_random, seed=config.seed,
              on_epoch=lambda _: marks.append(time.perf_counter()))
    return [b - a for a, b in zip(marks, marks[1:], strict=False)]


def templated_in_process(config: DistillConfig, plan, teacher, train) -> list[float]:
    """The reference alone as distill trained it before stage 1 was size-aware: a ``TemplatedModel`` (a timm
    ViT whose templated weights are bank x scalers), the same optimizer, schedule and batches as make_bank."""
    seed_everything(config.seed)
    kinds = VIT.kinds(plan.ref, config.n_templates, config.block)
    model = TemplatedModel(create_vit(plan.ref), TemplateBank(kinds), Scalers(vit_layout(plan.ref), kinds))
    model.set_stage("pretrain")
    opt = make_optimizer(model, config.lr, config.weight_decay)
    steps = len(train.x) // config.batch_size
    sched = warmup_cosine(opt, steps * config.epochs, steps)
    marks = [time.perf_counter()]
    fit(model, lambda epoch: iterate_batches(train.x, train.y, config.batch_size, seed=config.seed * 1000 + epoch,
                                             drop_last=True), opt, epochs=config.epochs,
        on_epoch=lambda *_: marks.append(time.perf_counter()), teacher=teacher, tau=config.tau, scheduler=sched)
    return [b - a for a, b in zip(marks, marks[1:], strict=False)]


def on_ray(config: DistillConfig, work: Path, tag: str) -> list[float]:
    """The workers' seconds inside ``distill_epoch`` per epoch, from the last checkpoint's history."""
    _, m = run_distill(replace(config, out=str(work / f"{tag}.safetensors")))
    history = json.loads((Path(m["checkpoint"]) / "state.json").read_text())["history"]
    return [h["train_s"] for h in history]


def flop_ratio(plan, n_random: int, teacher_spec) -> float:
    """Expected training FLOPs per step, range / single: 3 x forward for each trained size (forward +
    backward), the teacher's forward once per batch on both sides."""
    sizes, ref = plan.sizes, plan.ref
    middle = sizes[1:-1]
    drawn = sizes[-1].flops() + (sizes[0].flops() if len(sizes) > 1 else 0)
    if middle:
        drawn += min(n_random, len(middle)) / len(middle) * sum(s.flops() for s in middle)
    t = teacher_spec.flops() if teacher_spec is not None else 0
    return (3 * drawn + t) / (3 * ref.flops() + t)


def mean(xs: list[float]) -> float:
    return sum(xs) / max(len(xs), 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="fashion_mnist")
    ap.add_argument("--limit", type=int, default=4096, help="rows per split (fashion_mnist's limit)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--teacher", default=str(ANCESTRY) if ANCESTRY.is_file() else "none",
                    help="a weit ancestry file (WAVE; default: docs/data's Fashion-MNIST ancestry) or none (WeiT)")
    ap.add_argument("--depths", default="2,4")
    ap.add_argument("--widths", default="32,64")
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--n-random", type=int, default=1)
    ap.add_argument("--ray", action="store_true", help="also through run_distill on Ray Train (1 worker)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="weit-bench-") as tmp:
        work = Path(tmp)
        config = DistillConfig(
            teacher=args.teacher, dataset=args.dataset, limit=args.limit, epochs=args.epochs,
            batch_size=args.batch_size, workers=1, cpus_per_worker=float(args.threads), threads=args.threads,
            depths=parse_sizes(args.depths, "--depths"), widths=parse_sizes(args.widths, "--widths"),
            head_dim=args.head_dim, n_random=args.n_random, storage=str(work / "runs"),
            mlflow_uri=f"sqlite:///{work / 'mlruns.db'}", quiet=True)
        teacher = None if config.mode == "weit" else load_teacher(args.teacher)
        data = prepare_parquet(config.dataset, work / "data", config.limit, config.seed)
        plan = plan_range(config, data, teacher.spec if teacher else None)
        train = read_parquet_arrays(data.paths["train"])
        t_model = teacher.model.eval() if teacher else None

        single = in_process(config, plan, None, t_model, train)
        ranged = in_process(config, plan, plan.sizes, t_model, train)
        templated = templated_in_process(config, plan, t_model, train)
        rows = [("in-process make_bank", single, ranged),
                ("in-process, reference as TemplatedModel", templated, ranged)]
        if args.ray:
            alone = replace(config, depths=None, widths=None, head_dim=None,
                            aux={"depth": plan.ref.depth, "width": plan.ref.width, "heads": plan.ref.heads,
                                 "mlp_ratio": plan.ref.mlp_ratio, "patch": plan.ref.patch})
            rows.append(("Ray Train, 1 worker (train_s)", on_ray(alone, work, "single"), on_ray(config, work, "range")))

    steps = -(-data.train_rows // args.batch_size)
    est = flop_ratio(plan, args.n_random, teacher.spec if teacher else None)
    print(f"\nstage-1 cost of a size range: mode {config.mode}, {data.train_rows} rows x {args.epochs} epochs, batch "
          f"{args.batch_size} (~{steps} steps/epoch), {args.threads} thread(s)")
    print(f"range {' '.join(s.label for s in plan.sizes)}; reference {plan.ref.label}; "
          f"{plan.draws_per_step(args.n_random)} sizes per step (n_random {args.n_random}); FLOP estimate {est:.2f}x")
    print(f"{'s / epoch':40s} {'reference':>10s} {'range':>10s} {'ratio':>7s} {'steady':>7s}")
    out = {}
    for label, a, b in rows:
        steady = mean(b[1:]) / mean(a[1:]) if len(a) > 1 else mean(b) / mean(a)
        print(f"{label:40s} {mean(a):10.2f} {mean(b):10.2f} {mean(b) / mean(a):7.2f} {steady:7.2f}")
        key = "ray" if label.startswith("Ray") else "vs_templated" if "Templated" in label else "in_process"
        out[key] = {"single_s_per_epoch": round(mean(a), 3), "range_s_per_epoch": round(mean(b), 3),
                    "ratio": round(mean(b) / mean(a), 3), "steady_ratio": round(steady, 3)}
    print(json.dumps({"ratio": out["in_process"]["ratio"], "goal": 2.0,
                      "ray_ratio": out.get("ray", {}).get("ratio"), "flop_ratio": round(est, 3), "mode": config.mode,
                      "sizes": [s.label for s in plan.sizes], "reference": plan.ref.label,
                      "draws_per_step": plan.draws_per_step(args.n_random), "rows": data.train_rows,
                      "epochs": args.epochs, "threads": args.threads, **out}))


if __name__ == "__main__":
    main()
