"""``weit ancestry``: train an ordinary model of any family on a task, for users with no pre-trained checkpoint.

A bank can only carry what its ancestry knows, so the default recipe gets a 6x96 ViT (patch 4) to >= 88%
Fashion-MNIST test accuracy on 2 CPU cores. ``workers=0`` trains in this process (``weit_core.ancestry``,
fastest on one small machine); ``workers>0`` runs the same loop on Ray Train (``pipelines.runner``: DDP,
checkpoints, resume).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import torch
import typer

from pipelines import runner as r
from pipelines.common import UserError, git_revision, init_ray
from pipelines.runner import PREFIX, Built
from pipelines.tracking import Tracker
from weit_core.ancestry import train_plain
from weit_core.io import save_model
from weit_core.jobs import job_guard, job_name, worker_config
from weit_core.models import get_family
from weit_core.sizes import parse_size
from weit_core.tasks import get_task
from weit_core.train import seed_everything

EXPERIMENT = "weit-ancestry"
NOT_SETTINGS = ("out", "mlflow_uri", "storage", "address", "experiment", "quiet")
AXES = ("depth", "width", "heads", "patch", "mlp_ratio")  # a family's size keys that have their own option


def build_plain(cfg: dict) -> Built:
    """What a Ray Train worker trains and evaluates: the ancestry itself."""
    family = get_family(cfg["family"])
    model = family.build(family.spec_from_dict(cfg["spec"]))
    return Built(model, model, {f"test_{get_task(cfg['task']).metric}": model})


def train_ancestry(
    dataset: str | None = None, *, family: str | None = None, task: str = "classification",
    size: str | None = None, depth: int | None = None, width: int | None = None, heads: int | None = None,
    patch: int | None = None, mlp_ratio: float | None = None, epochs: int = 12, lr: float = 1e-3,
    weight_decay: float = 0.05, warmup_epochs: float = 1.0, batch_size: int = 128, seed: int = 0, workers: int = 0,
    limit: int | None = None, cpus_per_worker: float = 0.5, threads: int | None = None,
    out: str | Path = "ancestry.safetensors", mlflow_uri: str | None = None, storage: str | None = None,
    address: str | None = None, experiment: str = EXPERIMENT, quiet: bool = False,
) -> tuple[Path, dict]:
    """Train and save an ancestry; returns (model file, metrics incl. test_<metric> and wall_s). In process and
    on Ray share everything but where the data lives and who runs the loop."""
    s = {k: v for k, v in locals().items() if k not in NOT_SETTINGS}
    if epochs < 1 or batch_size < 1 or workers < 0:
        raise UserError("need --epochs >= 1, --batch-size >= 1 and --workers >= 0")
    the_task = get_task(task)
    fam, metric = get_family(family or the_task.default_family), the_task.metric
    flags = {k: v for k in AXES if (v := s[k]) is not None}
    if stray := [k for k in flags if k not in fam.size_keys]:
        raise UserError(f"--{stray[0].replace('_', '-')} is no {fam.name} size key; {fam.name} sizes set "
                        f"{', '.join(fam.size_keys)} (use --size key=value)")
    size_dict = {**parse_size(size, fam), **flags}
    out, t_start = Path(out).resolve(), time.perf_counter()
    name = job_name(out, "ancestry")
    if workers:
        storage, directory, data = r.prepare_job(name, storage, dataset, limit, seed, the_task.load)
        io, data_name, info = data.io, data.info["name"], {"data": data.info}
    else:
        splits = the_task.load(dataset, limit, seed)
        io, data_name, info = splits.io, splits.name, {"data": splits.name}
    try:
        spec = fam.spec_for(size_dict, io)
    except ValueError as e:
        raise UserError(f"ancestry spec: {e}") from e
    if workers:
        resumed = job_guard(directory, s)
        init_ray(address)
        cfg = worker_config(build_plain, spec, epochs=epochs, lr=lr, weight_decay=weight_decay,
                            warmup_epochs=warmup_epochs, batch_size=batch_size, workers=workers,
                            train_rows=data.train_rows, seed=seed, task=the_task.name, threads=threads,
                            cpus_per_worker=cpus_per_worker, family=fam.name)
    elif threads:
        torch.set_num_threads(threads)
    params = {**s, **{f"spec.{k}": v for k, v in spec.to_dict().items()}, "git": git_revision(),
              "num_params": spec.num_params(), "family": fam.name}
    # in process, a fresh MLflow run per job (resuming is what --workers > 0 is for)
    tracker = Tracker(mlflow_uri, experiment, name if workers else f"{name}-{int(time.time())}", params,
                      {"weit.stage": "ancestry", "weit.task": data_name, "weit.task_type": the_task.name})
    where = f"{workers} Ray Train worker(s)" if workers else f"in-process ({torch.get_num_threads()} threads)"
    with tracker:
        if not quiet:
            rows = data.train_rows if workers else len(splits.train)
            print(f"{PREFIX} ancestry {fam.name} {spec.label} ({spec.num_params():,} params) on {data_name}: "
                  f"{rows:,} train examples, {epochs} epochs, {where}"
                  f"{', resuming' if workers and resumed else ''}", flush=True)
        if workers:
            run = r.run_on_ray(cfg, data, tracker, stage="ancestry", name=name, storage=storage, workers=workers,
                               cpus_per_worker=cpus_per_worker, quiet=quiet)
            model, metrics, info = run.weights(cfg), run.final, {**info, "job": name}
        else:
            def on_epoch(row: dict) -> None:
                tracker.log_epoch(row)
                if not quiet:
                    r.print_epoch("ancestry", epochs, row, the_task)

            seed_everything(seed)
            model = fam.build(spec)
            metrics = train_plain(model, splits, the_task, epochs=epochs, lr=lr, weight_decay=weight_decay,
                                  warmup_epochs=warmup_epochs, batch_size=batch_size, seed=seed, on_epoch=on_epoch)
        wall = time.perf_counter() - t_start
        save_model(out, model, spec, {"dataset": dataset, **info, "metrics": metrics, "wall_s": wall,
                                      "recipe": s, "git": git_revision(), "mlflow_run_id": tracker.run_id})
        tracker.finish({f"final_test_{metric}": metrics[f"test_{metric}"], "wall_s": wall,
                        **({f"final_val_{metric}": metrics[f"val_{metric}"]} if f"val_{metric}" in metrics else {})},
                       [out])
    if not quiet:
        print(f"{PREFIX} ancestry written to {out}: test_{metric} {metrics[f'test_{metric}']:.4f} in {wall:.0f}s",
              flush=True)
    now = {"epochs_now": len(run.epochs_now)} if workers else {}
    return out, {**metrics, "wall_s": wall, "run_id": tracker.run_id, "spec": spec.to_dict(), **now}


def ancestry_command(
    dataset: r.Dataset = None,
    family: r.Family = None,
    task: r.TaskName = "classification",
    size: r.Size = None,
    depth: Annotated[int | None, typer.Option(help="Depth (default: the family's, ViT 6).")] = None,
    width: Annotated[int | None, typer.Option(help="Width (default: the family's, ViT 96).")] = None,
    heads: Annotated[int | None, typer.Option(help="ViT attention heads (default 3).")] = None,
    patch: Annotated[int | None, typer.Option(help="Patch size (default: the family's, ViT 4).")] = None,
    mlp_ratio: Annotated[float | None, typer.Option(help="ViT MLP hidden / width (default 4).")] = None,
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
    """Train an ancestry (the teacher `weit distill` reads) of any family and save it as safetensors."""
    train_ancestry(**locals())
