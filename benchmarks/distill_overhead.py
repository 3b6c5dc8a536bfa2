"""What Ray Train costs over a plain PyTorch loop for stage 1.

Both sides run ``weit_core.train.distill_epoch`` on the same aux model (same seed, same initial weights),
the same training rows (the parquet Ray Data reads; the plain loop reads it into tensors), the same batch
size, number of steps, LR schedule and torch threads, and both evaluate on the test split every epoch.
Ray side: ``run_distill`` with 1 worker (TorchTrainer, Ray Data ingest, per-epoch checkpoint + report).
Plain side: one process, ``iterate_batches`` over in-memory tensors, a safetensors checkpoint per epoch.

Reported, excluding Ray cluster start (``ray.init``, timed separately):
  * training loop: seconds inside ``distill_epoch`` (batches pulled from Ray Data vs from memory);
  * job wall: ``trainer.fit()`` (worker start-up, data, checkpoints, teardown) vs the plain loop's total.
The last line is one JSON object: ``ratio`` = training-loop ratio, ``fit_ratio`` = job-wall ratio.

    .venv/bin/python benchmarks/distill_overhead.py --limit 8192 --epochs 3
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from pipelines.common import init_ray  # noqa: E402
from pipelines.distill import DistillConfig, aux_spec, build_aux, run_distill  # noqa: E402
from weit_core.jobs import save_train_state, worker_config  # noqa: E402
from weit_core.parquet import prepare_parquet, read_parquet_arrays  # noqa: E402
from weit_core.teacher import load_teacher  # noqa: E402
from weit_core.train import evaluate, fit, iterate_batches, make_optimizer, seed_everything, warmup_cosine  # noqa: E402


def plain_loop(config: DistillConfig, data, spec, teacher, work: Path) -> dict:
    """The same job as one process, no Ray: returns per-epoch train seconds and the total."""
    torch.set_num_threads(config.threads)
    train, test = read_parquet_arrays(data.paths["train"]), read_parquet_arrays(data.paths["test"])
    cfg = worker_config(build_aux, spec, epochs=config.epochs, lr=config.lr, weight_decay=config.weight_decay,
                        warmup_epochs=config.warmup_epochs, batch_size=config.batch_size, workers=1,
                        train_rows=data.train_rows, seed=config.seed, threads=config.threads,
                        n_templates=config.n_templates, block=config.block, order=config.order)
    t_start = time.perf_counter()
    seed_everything(config.seed)
    built = build_aux(cfg)
    optimizer = make_optimizer(built.model, cfg["lr"], cfg["weight_decay"])
    scheduler = warmup_cosine(optimizer, cfg["total_steps"], cfg["warmup_steps"])
    t_model = teacher.model.eval() if teacher else None
    train_s, state = [], {"epoch": 0, "global_step": 0, "history": [], "starts": [1]}

    def on_epoch(epoch: int, st: dict) -> None:
        train_s.append(st["train_s"])
        ev = evaluate(built.evals["test_acc"], iterate_batches(test.x, test.y, 512, shuffle=False))
        state.update(epoch=epoch, global_step=state["global_step"] + st["steps"])
        state["history"].append({"epoch": epoch, "loss": st["loss"], "test_acc": ev["acc"]})
        d = work / f"plain_epoch_{epoch}"
        d.mkdir(parents=True, exist_ok=True)
        save_train_state(d, built.keep, optimizer, scheduler, state)

    fit(built.model, lambda epoch: iterate_batches(train.x, train.y, cfg["batch_size"], seed=config.seed + epoch),
        optimizer, epochs=config.epochs, on_epoch=on_epoch, teacher=t_model, tau=config.tau, scheduler=scheduler)
    return {"train_s": train_s, "total_s": time.perf_counter() - t_start, "steps": state["global_step"],
            "test_acc": state["history"][-1]["test_acc"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="fashion_mnist")
    ap.add_argument("--limit", type=int, default=8192, help="rows per split (fashion_mnist's limit)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--teacher", default="none", help="a weit ancestry file for WAVE, or none (WeiT)")
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--heads", type=int, default=2)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="weit-bench-") as tmp:
        work = Path(tmp)
        config = DistillConfig(
            teacher=args.teacher, dataset=args.dataset, limit=args.limit, epochs=args.epochs,
            batch_size=args.batch_size, workers=1, cpus_per_worker=float(args.threads), threads=args.threads,
            aux={"depth": args.depth, "width": args.width, "heads": args.heads}, out=str(work / "bank.safetensors"),
            storage=str(work / "runs"), mlflow_uri=f"sqlite:///{work / 'mlruns.db'}", quiet=True,
        )
        teacher = None if config.mode == "weit" else load_teacher(args.teacher)
        data = prepare_parquet(config.dataset, work / "data", config.limit, config.seed)
        spec = aux_spec(config, data, teacher.spec if teacher else None)

        plain = plain_loop(config, data, spec, teacher, work)
        t0 = time.perf_counter()
        init_ray(None)
        ray_init_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        _, m = run_distill(config)
        run_distill_s = time.perf_counter() - t0
        history = json.loads((Path(m["checkpoint"]) / "state.json").read_text())["history"]

    ray_train = [h["train_s"] for h in history]
    loop_ratio = sum(ray_train) / sum(plain["train_s"])
    steady = (sum(ray_train[1:]) / sum(plain["train_s"][1:])) if len(ray_train) > 1 else loop_ratio
    fit_ratio = m["fit_s"] / plain["total_s"]
    rows = [
        ("training loop, all epochs (distill_epoch)", sum(ray_train), sum(plain["train_s"])),
        ("training loop, epochs 2.. (steady state)", sum(ray_train[1:]), sum(plain["train_s"][1:])),
        ("job wall: trainer.fit() vs plain total", m["fit_s"], plain["total_s"]),
    ]
    print(f"\nstage-1 overhead: {spec.depth}x{spec.width} aux, mode {config.mode}, {data.train_rows} rows x "
          f"{args.epochs} epochs, batch {args.batch_size}, {plain['steps']} steps, {args.threads} thread(s)")
    print(f"{'':44s} {'Ray Train':>10s} {'plain':>10s} {'ratio':>7s}")
    for label, a, b in rows:
        print(f"{label:44s} {a:10.2f} {b:10.2f} {a / b:7.2f}")
    print(f"{'worker set-up (build, teacher, test data)':44s} {history[0].get('setup_s', 0.0):10.2f}")
    print(f"{'ray.init (excluded)':44s} {ray_init_s:10.2f}")
    print(f"{'run_distill() incl. driver prep + MLflow':44s} {run_distill_s:10.2f}")
    print(f"test acc: Ray {m['test_acc']:.4f}  plain {plain['test_acc']:.4f}  (Ray steps {m['steps']})")
    print(json.dumps({"ratio": round(loop_ratio, 3), "steady_ratio": round(steady, 3),
                      "fit_ratio": round(fit_ratio, 3), "steps": plain["steps"], "ray_steps": m["steps"],
                      "fit_s": round(m["fit_s"], 2), "plain_s": round(plain["total_s"], 2)}))


if __name__ == "__main__":
    main()
