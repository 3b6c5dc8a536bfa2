"""``weit ancestry``: train an ordinary timm ViT on a task, for users with no pre-trained checkpoint.

A bank can only carry what its ancestry knows, so the default recipe is the one that gets a 6x96 ViT
(patch 4) to >= 88% Fashion-MNIST test accuracy on 2 CPU cores: AdamW, peak lr 1e-3, one warm-up epoch
then cosine, batch 128, 12 epochs. ``workers=0`` trains in this process (fastest on one small machine);
``workers>0`` runs the same loop (``weit_core.train.fit``) on Ray Train through ``pipelines.runner`` (DDP,
checkpoints, resume). The result is a weit model file (``weit_core.io.save_model``) that ``weit distill
--teacher`` reads.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import torch
import typer

from pipelines.common import UserError, git_revision, init_ray, storage_path
from pipelines.runner import (
    PREFIX,
    Built,
    job_dir,
    job_guard,
    job_name,
    print_epoch,
    run_on_ray,
    threads_for,
    worker_config,
)
from pipelines.tracking import Tracker
from weit_core.data import load_splits, prepare_parquet
from weit_core.io import save_model
from weit_core.models import ViTSpec, create_vit
from weit_core.train import evaluate, fit, iterate_batches, make_optimizer, seed_everything, warmup_cosine

EXPERIMENT = "weit-ancestry"
EVAL_BATCH = 512


def _spec(s: dict, input_shape, num_classes: int) -> ViTSpec:
    c, h, w = input_shape
    if h != w:
        raise UserError(f"images are {h}x{w}; the ViT specs here need square images")
    try:
        return ViTSpec(depth=s["depth"], width=s["width"], heads=s["heads"], mlp_ratio=s["mlp_ratio"],
                       patch=s["patch"], img_size=h, in_chans=c, num_classes=num_classes)
    except ValueError as e:
        raise UserError(f"ancestry spec: {e}") from e


def build_plain(cfg: dict) -> Built:
    """What a Ray Train worker trains and evaluates: the ancestry ViT itself."""
    model = create_vit(ViTSpec.from_dict(cfg["spec"]))
    return Built(model, model, {"test_acc": model})


def train_ancestry(
    dataset: str = "fashion_mnist", *, depth: int = 6, width: int = 96, heads: int = 3, patch: int = 4,
    mlp_ratio: float = 4.0, epochs: int = 12, lr: float = 1e-3, weight_decay: float = 0.05,
    warmup_epochs: float = 1.0, batch_size: int = 128, out: str | Path = "ancestry.safetensors", seed: int = 0,
    workers: int = 0, cpus_per_worker: float = 0.5, threads: int | None = None, limit: int | None = None,
    mlflow_uri: str | None = None, storage: str | None = None, address: str | None = None,
    experiment: str = EXPERIMENT, quiet: bool = False,
) -> tuple[Path, dict]:
    """Train and save an ancestry ViT; returns (model file, metrics incl. test_acc and wall_s)."""
    if epochs < 1 or batch_size < 1 or workers < 0:
        raise UserError("need --epochs >= 1, --batch-size >= 1 and --workers >= 0")
    out = Path(out).resolve()
    settings = {"dataset": dataset, "depth": depth, "width": width, "heads": heads, "patch": patch,
                "mlp_ratio": mlp_ratio, "epochs": epochs, "lr": lr, "weight_decay": weight_decay,
                "warmup_epochs": warmup_epochs, "batch_size": batch_size, "seed": seed, "workers": workers,
                "limit": limit, "cpus_per_worker": cpus_per_worker, "threads": threads}
    train = _train_in_process if workers == 0 else _train_on_ray
    t_start = time.perf_counter()
    model, spec, metrics, info, tracker = train(settings, out, mlflow_uri, experiment, quiet, storage, address)
    now = {"epochs_now": info.pop("epochs_now")} if "epochs_now" in info else {}
    with tracker:
        wall = time.perf_counter() - t_start
        save_model(out, model, spec, {"dataset": dataset, **info, "metrics": metrics, "wall_s": wall,
                                      "recipe": settings, "git": git_revision(), "mlflow_run_id": tracker.run_id})
        tracker.finish({"final_test_acc": metrics["test_acc"], "wall_s": wall,
                        **({"final_val_acc": metrics["val_acc"]} if "val_acc" in metrics else {})}, [out])
    if not quiet:
        print(f"{PREFIX} ancestry written to {out}: test_acc {metrics['test_acc']:.4f} in {wall:.0f}s", flush=True)
    return out, {**metrics, "wall_s": wall, "run_id": tracker.run_id, "spec": spec.to_dict(), **now}


def _tracker(uri, experiment, job, settings, spec: ViTSpec, data_name: str) -> Tracker:
    params = {**settings, **{f"spec.{k}": v for k, v in spec.to_dict().items()}, "git": git_revision(),
              "num_params": spec.num_params()}
    tags = {"weit.stage": "ancestry", "weit.task": data_name, "weit.task_type": "classification"}
    return Tracker(uri, experiment, job, params, tags)


def _train_in_process(s: dict, out: Path, mlflow_uri, experiment, quiet, *_):
    splits = load_splits(s["dataset"], s["limit"], s["seed"])
    spec = _spec(s, splits.input_shape, splits.num_classes)
    if s["threads"]:
        torch.set_num_threads(s["threads"])
    # a fresh MLflow run per in-process job (no resume here: that is what --workers > 0 is for)
    tracker = _tracker(mlflow_uri, experiment, f"{job_name(out, 'ancestry')}-{int(time.time())}", s, spec,
                       splits.name)
    x, y = splits.train.x, splits.train.y
    with tracker:
        seed_everything(s["seed"])
        model = create_vit(spec)
        optimizer = make_optimizer(model, s["lr"], s["weight_decay"])
        steps = -(-len(x) // s["batch_size"])
        scheduler = warmup_cosine(optimizer, steps * s["epochs"], round(steps * s["warmup_epochs"]))
        if not quiet:
            print(f"{PREFIX} ancestry {spec.depth}x{spec.width} ({spec.num_params():,} params) on {splits.name}: "
                  f"{len(x):,} train examples, {s['epochs']} epochs, in-process ({torch.get_num_threads()} threads)",
                  flush=True)
        metrics: dict = {}

        def on_epoch(epoch: int, st: dict) -> None:
            t0 = time.perf_counter()
            val = evaluate(model, iterate_batches(splits.val.x, splits.val.y, EVAL_BATCH, shuffle=False))
            test = evaluate(model, iterate_batches(splits.test.x, splits.test.y, EVAL_BATCH, shuffle=False))
            metrics.update(epoch=epoch, loss=st["loss"], train_acc=st["acc"], val_acc=val["acc"], test_acc=test["acc"],
                           lr=optimizer.param_groups[0]["lr"], epoch_s=st["train_s"] + time.perf_counter() - t0)
            tracker.log_epoch(metrics)
            if not quiet:
                print_epoch("ancestry", s["epochs"], metrics)

        fit(model, lambda epoch: iterate_batches(x, y, s["batch_size"], seed=s["seed"] * 100_003 + epoch), optimizer,
            epochs=s["epochs"], on_epoch=on_epoch, scheduler=scheduler)
    return model, spec, metrics, {"data": splits.name}, tracker


def _train_on_ray(s: dict, out: Path, mlflow_uri, experiment, quiet, storage, address):
    name = job_name(out, "ancestry")
    storage = storage_path(storage)
    directory = job_dir(storage, name)
    data = prepare_parquet(s["dataset"], directory / "data", s["limit"], s["seed"])
    spec = _spec(s, data.input_shape, data.num_classes)
    resumed = job_guard(directory, s)
    init_ray(address)
    cfg = worker_config(build_plain, spec, epochs=s["epochs"], lr=s["lr"], weight_decay=s["weight_decay"],
                        warmup_epochs=s["warmup_epochs"], batch_size=s["batch_size"], workers=s["workers"],
                        train_rows=data.train_rows, seed=s["seed"], threads=threads_for(s["cpus_per_worker"], s["threads"]))
    tracker = _tracker(mlflow_uri, experiment, name, s, spec, data.info["name"])
    if not quiet:
        print(f"{PREFIX} ancestry {spec.depth}x{spec.width} on {data.info['name']}: {data.train_rows:,} train "
              f"examples, {s['workers']} Ray Train worker(s){', resuming' if resumed else ''}", flush=True)
    with tracker:
        run = run_on_ray(cfg, data, tracker, stage="ancestry", name=name, storage=storage, workers=s["workers"],
                         cpus_per_worker=s["cpus_per_worker"], quiet=quiet)
    return run.weights(cfg), spec, run.final, {"data": data.info, "job": name, "epochs_now": len(run.epochs_now)}, tracker


def ancestry_command(
    dataset: Annotated[str, typer.Option(help="fashion_mnist, digits, or a parquet path.")] = "fashion_mnist",
    depth: Annotated[int, typer.Option(help="ViT depth.")] = 6,
    width: Annotated[int, typer.Option(help="ViT width (embedding dim).")] = 96,
    heads: Annotated[int, typer.Option(help="Attention heads.")] = 3,
    patch: Annotated[int, typer.Option(help="Patch size.")] = 4,
    mlp_ratio: Annotated[float, typer.Option(help="MLP hidden / width.")] = 4.0,
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 12,
    lr: Annotated[float, typer.Option(help="Peak AdamW learning rate (1 warm-up epoch, then cosine).")] = 1e-3,
    batch_size: Annotated[int, typer.Option(help="Batch size.")] = 128,
    limit: Annotated[int | None, typer.Option(help="At most this many examples per split (smoke runs).")] = None,
    out: Annotated[str, typer.Option(help="Model file to write (safetensors).")] = "ancestry.safetensors",
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    workers: Annotated[int, typer.Option(help="0 = train in this process; N = N Ray Train workers.")] = 0,
    cpus_per_worker: Annotated[float, typer.Option(help="CPUs per Ray Train worker.")] = 0.5,
    threads: Annotated[int | None, typer.Option(help="Torch threads (default: torch's / round(cpus)).")] = None,
    storage: Annotated[str | None, typer.Option(help="Ray Train storage (workers > 0).")] = None,
    address: Annotated[str | None, typer.Option(help="Ray cluster address (workers > 0).")] = None,
    mlflow_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI.")] = None,
) -> None:
    """Train an ancestry ViT (the teacher `weit distill` reads) and save it as safetensors."""
    train_ancestry(dataset, depth=depth, width=width, heads=heads, patch=patch, mlp_ratio=mlp_ratio, epochs=epochs,
                   lr=lr, batch_size=batch_size, limit=limit, out=out, seed=seed, workers=workers,
                   cpus_per_worker=cpus_per_worker, threads=threads, storage=storage, address=address,
                   mlflow_uri=mlflow_uri)
