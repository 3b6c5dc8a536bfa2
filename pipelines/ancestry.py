"""``weit ancestry``: train an ordinary timm ViT on a task, for users with no pre-trained checkpoint.

A bank can only carry what its ancestry knows, so the default recipe gets a 6x96 ViT (patch 4) to >= 88%
Fashion-MNIST test accuracy on 2 CPU cores. ``workers=0`` trains in this process (fastest on one small machine);
``workers>0`` runs the same loop on Ray Train (``pipelines.runner``: DDP, checkpoints, resume).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import torch
import typer

from pipelines import runner as r
from pipelines.common import UserError, git_revision, init_ray
from pipelines.runner import EVAL_BATCH, PREFIX, Built
from pipelines.tracking import Tracker
from weit_core.data import load_splits
from weit_core.io import save_model
from weit_core.models import ViTSpec, create_vit
from weit_core.tasks import CLASSIFICATION
from weit_core.train import evaluate, fit, iterate_batches, make_optimizer, seed_everything, warmup_cosine

EXPERIMENT = "weit-ancestry"
TASK = CLASSIFICATION  # what an ancestry is trained and scored on
METRIC = TASK.metric
NOT_SETTINGS = ("out", "mlflow_uri", "storage", "address", "experiment", "quiet")


def build_plain(cfg: dict) -> Built:
    """What a Ray Train worker trains and evaluates: the ancestry ViT itself."""
    model = create_vit(ViTSpec.from_dict(cfg["spec"]))
    return Built(model, model, {f"test_{METRIC}": model})


def train_ancestry(
    dataset: str = "fashion_mnist", *, depth: int = 6, width: int = 96, heads: int = 3, patch: int = 4,
    mlp_ratio: float = 4.0, epochs: int = 12, lr: float = 1e-3, weight_decay: float = 0.05,
    warmup_epochs: float = 1.0, batch_size: int = 128, seed: int = 0, workers: int = 0, limit: int | None = None,
    cpus_per_worker: float = 0.5, threads: int | None = None, out: str | Path = "ancestry.safetensors",
    mlflow_uri: str | None = None, storage: str | None = None, address: str | None = None,
    experiment: str = EXPERIMENT, quiet: bool = False,
) -> tuple[Path, dict]:
    """Train and save an ancestry ViT; returns (model file, metrics incl. test_acc and wall_s). In process and
    on Ray share everything but where the data lives and who runs the loop."""
    s = {k: v for k, v in locals().items() if k not in NOT_SETTINGS}
    if epochs < 1 or batch_size < 1 or workers < 0:
        raise UserError("need --epochs >= 1, --batch-size >= 1 and --workers >= 0")
    out, t_start = Path(out).resolve(), time.perf_counter()
    name = r.job_name(out, "ancestry")
    if workers:
        storage, directory, data = r.prepare_job(name, storage, dataset, limit, seed)
        shape, n_classes, data_name, info = data.input_shape, data.num_classes, data.info["name"], {"data": data.info}
    else:
        splits = load_splits(dataset, limit, seed)
        shape, n_classes, data_name, info = splits.input_shape, splits.num_classes, splits.name, {"data": splits.name}
    c, h, w = shape
    if h != w:
        raise UserError(f"images are {h}x{w}; the ViT specs here need square images")
    try:
        spec = ViTSpec(depth=depth, width=width, heads=heads, mlp_ratio=mlp_ratio, patch=patch, img_size=h,
                       in_chans=c, num_classes=n_classes)
    except ValueError as e:
        raise UserError(f"ancestry spec: {e}") from e
    if workers:
        resumed = r.job_guard(directory, s)
        init_ray(address)
        cfg = r.worker_config(build_plain, spec, epochs=epochs, lr=lr, weight_decay=weight_decay,
                              warmup_epochs=warmup_epochs, batch_size=batch_size, workers=workers,
                              train_rows=data.train_rows, seed=seed, task=TASK.name, threads=threads,
                              cpus_per_worker=cpus_per_worker)
    elif threads:
        torch.set_num_threads(threads)
    params = {**s, **{f"spec.{k}": v for k, v in spec.to_dict().items()}, "git": git_revision(),
              "num_params": spec.num_params()}
    # in process, a fresh MLflow run per job (resuming is what --workers > 0 is for)
    tracker = Tracker(mlflow_uri, experiment, name if workers else f"{name}-{int(time.time())}", params,
                      {"weit.stage": "ancestry", "weit.task": data_name, "weit.task_type": TASK.name})
    with tracker:
        if workers:
            if not quiet:
                print(f"{PREFIX} ancestry {spec.depth}x{spec.width} on {data_name}: {data.train_rows:,} train "
                      f"examples, {workers} Ray Train worker(s){', resuming' if resumed else ''}", flush=True)
            run = r.run_on_ray(cfg, data, tracker, stage="ancestry", name=name, storage=storage, workers=workers,
                               cpus_per_worker=cpus_per_worker, quiet=quiet)
            model, metrics, info = run.weights(cfg), run.final, {**info, "job": name}
        else:
            model, metrics = _fit_here(s, splits, spec, tracker, quiet)
        wall = time.perf_counter() - t_start
        save_model(out, model, spec, {"dataset": dataset, **info, "metrics": metrics, "wall_s": wall,
                                      "recipe": s, "git": git_revision(), "mlflow_run_id": tracker.run_id})
        tracker.finish({f"final_test_{METRIC}": metrics[f"test_{METRIC}"], "wall_s": wall,
                        **({f"final_val_{METRIC}": metrics[f"val_{METRIC}"]} if f"val_{METRIC}" in metrics else {})},
                       [out])
    if not quiet:
        print(f"{PREFIX} ancestry written to {out}: test_{METRIC} {metrics[f'test_{METRIC}']:.4f} in {wall:.0f}s",
              flush=True)
    now = {"epochs_now": len(run.epochs_now)} if workers else {}
    return out, {**metrics, "wall_s": wall, "run_id": tracker.run_id, "spec": spec.to_dict(), **now}


def _fit_here(s: dict, splits, spec: ViTSpec, tracker: Tracker, quiet: bool) -> tuple[torch.nn.Module, dict]:
    """The in-process loop: ``weit_core.train.fit``, scoring val and test every epoch."""
    x, y = splits.train.x, splits.train.y
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
        val, test = (evaluate(model, iterate_batches(split.x, split.y, EVAL_BATCH, shuffle=False), task=TASK)
                     for split in (splits.val, splits.test))
        metrics.update({"epoch": epoch, "loss": st["loss"], f"train_{METRIC}": st[METRIC], f"val_{METRIC}": val[METRIC],
                        f"test_{METRIC}": test[METRIC], "lr": optimizer.param_groups[0]["lr"],
                        "epoch_s": st["train_s"] + time.perf_counter() - t0})
        tracker.log_epoch(metrics)
        if not quiet:
            r.print_epoch("ancestry", s["epochs"], metrics, METRIC)

    fit(model, lambda epoch: iterate_batches(x, y, s["batch_size"], seed=s["seed"] * 100_003 + epoch), optimizer,
        epochs=s["epochs"], on_epoch=on_epoch, task=TASK, scheduler=scheduler)
    return model, metrics


def ancestry_command(
    dataset: r.Dataset = "fashion_mnist",
    depth: Annotated[int, typer.Option(help="ViT depth.")] = 6,
    width: Annotated[int, typer.Option(help="ViT width (embedding dim).")] = 96,
    heads: Annotated[int, typer.Option(help="Attention heads.")] = 3,
    patch: Annotated[int, typer.Option(help="Patch size.")] = 4,
    mlp_ratio: Annotated[float, typer.Option(help="MLP hidden / width.")] = 4.0,
    epochs: r.Epochs = 12,
    lr: r.Lr = 1e-3,
    batch_size: r.BatchSize = 128,
    limit: r.Limit = None,
    out: Annotated[str, typer.Option(help="Model file to write (safetensors).")] = "ancestry.safetensors",
    seed: r.Seed = 0,
    workers: Annotated[int, typer.Option(help="0 = train in this process; N = N Ray Train workers.")] = 0,
    cpus_per_worker: r.CpusPerWorker = 0.5,
    threads: r.Threads = None,
    storage: r.Storage = None,
    address: r.Address = None,
    mlflow_uri: r.MlflowUri = None,
) -> None:
    """Train an ancestry ViT (the teacher `weit distill` reads) and save it as safetensors."""
    train_ancestry(**locals())
