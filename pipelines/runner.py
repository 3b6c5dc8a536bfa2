"""The one Ray Train runner, for ``weit distill`` and ``weit ancestry --workers N``: each worker builds what the
job trains (``cfg["build"](cfg)``, a :class:`Built`), resumes from the last checkpoint, runs
``weit_core.train.fit`` over its Ray Data shard (DDP) and after every epoch scores the test split (each rank a
slice, the sums all-reduced), reports, and rank 0 checkpoints. Data order is a function of (seed, epoch) only,
so a restarted worker group redoes a lost epoch exactly; re-running a command resumes it (Ray Train restores a
run from ``(storage_path, name)``, the name from the output file). The driver hands rank 0's reports to MLflow
and the terminal as they come."""

from __future__ import annotations

import json
import queue as queue_lib
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import ray
import ray.data
import ray.train
import torch
import typer
from torch import nn

from pipelines.common import storage_path
from pipelines.tracking import Tracker
from weit_core.jobs import all_reduce_sums, epoch_line, load_train_state, outputs, save_train_state
from weit_core.parquet import Loader, PreparedData, batch_to_tensors, prepare_parquet
from weit_core.tasks import Task, get_task
from weit_core.teacher import rebuild_teacher
from weit_core.train import evaluate, fit, iterate_batches, make_optimizer, seed_everything, warmup_cosine

PREFIX = "[weit]"
EVAL_BATCH = 512
MATERIALIZE_MAX_BYTES = 2 << 30

WrapBatches = Callable[..., Iterator]
"""``wrap(batches, *, epoch, rank, world) -> batches`` around each epoch's training batches in every worker:
timing, logging, or a test's injected fault."""

# the options `weit ancestry` and `weit distill` share
Dataset = Annotated[str | None, typer.Option(help="fashion_mnist, digits, a parquet path, or what the task reads "
                                                    "(default: the task's, classification: fashion_mnist).")]
Family = Annotated[str | None, typer.Option(help="Architecture family (vit, convnext, ...; default: the task's).")]
TaskName = Annotated[str, typer.Option("--task", help="Task: classification, or kind:arg (control:CartPole-v1).")]
Size = Annotated[str | None, typer.Option(help="Any family's size keys, e.g. depth=2,width=64.")]
Limit = Annotated[int | None, typer.Option(help="At most this many examples per split (smoke runs).")]
Epochs = Annotated[int, typer.Option(help="Training epochs.")]
Lr = Annotated[float, typer.Option(help="Peak AdamW learning rate (warm-up, then cosine).")]
BatchSize = Annotated[int, typer.Option(help="Global batch size (split over workers).")]
Seed = Annotated[int, typer.Option(help="Random seed.")]
CpusPerWorker = Annotated[float, typer.Option(help="CPUs per Ray Train worker (fractional leaves room for Ray "
                                                   "Data).")]
Threads = Annotated[int | None, typer.Option(help="Torch threads per worker (default: round(cpus)).")]
Storage = Annotated[str | None, typer.Option(help="Ray Train storage (checkpoints); default ./weit_runs.")]
Address = Annotated[str | None, typer.Option(
    help="Ray cluster address (default: start a local Ray; 'auto': the head `ray start` runs here).")]
MlflowUri = Annotated[str | None, typer.Option(help="MLflow tracking URI.")]


@dataclass
class Built:
    """What a job's ``build(cfg)`` gives each worker."""

    model: nn.Module  # trained (DDP-wrapped by the runner)
    keep: nn.Module  # what a checkpoint holds: ``model`` or the part of it the job keeps
    evals: dict[str, nn.Module]
    """``test_<metric>[/<size>]`` -> module scored every epoch; ``test_<metric>`` is the job's own."""
    on_epoch_start: Callable[[int], None] | None = None
    """Restarts per-epoch randomness (a sandwich's size draws) so a redone epoch repeats the lost one."""


def prepare_job(name: str, storage: str | None, dataset: str, limit: int | None, seed: int,
                load: Loader | None = None) -> tuple[str, Path, PreparedData]:
    """The job's storage, its directory (settings, prepared data; a local temp dir when storage is remote)
    and its data (``load``: the task's loader) as parquet there."""
    storage = storage_path(storage)
    directory = Path(storage) / name if "://" not in storage else Path(tempfile.gettempdir()) / name
    return storage, directory, prepare_parquet(dataset, directory / "data", limit, seed, load)


# ------------------------------------------------------------------------------------------------ worker side


def train_worker(cfg: dict) -> None:
    """Per-worker body: build, maybe resume, then ``fit`` with evaluation + report + checkpoint per epoch."""
    import ray.train.torch

    t_setup, ctx = time.perf_counter(), ray.train.get_context()
    torch.set_num_threads(cfg["threads"])
    rank, world, device = ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device()
    task, metric = get_task(cfg["task"]), get_task(cfg["task"]).metric
    seed_everything(cfg["seed"])
    built: Built = cfg["build"](cfg)
    ddp = ray.train.torch.prepare_model(built.model)  # moves to the device; DDP when world > 1
    optimizer = make_optimizer(ddp, cfg["lr"], cfg["weight_decay"])
    scheduler = warmup_cosine(optimizer, cfg["total_steps"], cfg["warmup_steps"])
    state = {"epoch": 0, "global_step": 0, "history": [], "starts": []}
    if checkpoint := ray.train.get_checkpoint():
        with checkpoint.as_directory() as d:
            state = load_train_state(Path(d), built.keep, optimizer, scheduler)
    state["starts"].append(state["epoch"] + 1)
    if state["epoch"] >= cfg["epochs"]:
        return  # a finished job run again: nothing to redo
    teacher = rebuild_teacher(ray.get(cfg["teacher"][0]), device) if cfg["teacher"] else None
    evals = list({id(m): m for m in built.evals.values()}.values())

    # Every worker gets the whole test split and scores its slice rank::world; the sums are all-reduced.
    xs, ys = zip(*(batch_to_tensors(b) for b in ray.train.get_dataset_shard("test").iter_batches(
        batch_size=4096, batch_format="numpy")), strict=True)
    tx, ty = torch.cat(xs)[rank::world], torch.cat(ys)[rank::world]
    # agreement compares outputs on the same inputs, so only where the batch itself is the input (no prepare)
    agreeable = teacher is not None and task.agreement is not None and task.prepare is None
    t_out = outputs(teacher, tx, device) if agreeable else None
    teacher_score = (0.0 if teacher is None else float(task.score(t_out, ty)) if agreeable and task.evaluate is None
                     else evaluate(teacher, iterate_batches(tx, ty, EVAL_BATCH, shuffle=False), task=task,
                               device=device)[metric] * len(ty))
    train_shard, wrap, t_first = ray.train.get_dataset_shard("train"), cfg["wrap_batches"], []

    def batches(epoch: int) -> Iterator:
        t_first.append(time.perf_counter())
        if built.on_epoch_start is not None:
            built.on_epoch_start(epoch)
        # blocks arrive in a fixed order (preserve_order) and the local shuffle is seeded by (seed, epoch)
        raw = train_shard.iter_batches(batch_size=cfg["batch_size"], batch_format="numpy", prefetch_batches=2,
                                       local_shuffle_buffer_size=cfg["shuffle_buffer"],
                                       local_shuffle_seed=cfg["seed"] * 100_003 + epoch)
        out = (batch_to_tensors(b) for b in raw)
        return wrap(out, epoch=epoch, rank=rank, world=world) if wrap is not None else out

    def on_epoch(epoch: int, st: dict) -> None:
        t1 = time.perf_counter()
        scores = [evaluate(m, iterate_batches(tx, ty, EVAL_BATCH, shuffle=False), task=task, device=device)[metric]
                  for m in evals]
        agreed = (float(task.agreement(outputs(built.evals[f"test_{metric}"], tx, device), t_out))
                  if agreeable else 0.0)
        n, m = st["examples"], len(ty)
        s = all_reduce_sums([st["loss"] * n, st[task.batch_metric] * n, st.get("agreement", 0.0) * n, n, st["steps"], agreed,
                         teacher_score, m, *(a * m for a in scores)], device)
        score_of = {id(mod): v / s[7] for mod, v in zip(evals, s[8:], strict=True)}
        state["epoch"], state["global_step"] = epoch, state["global_step"] + st["steps"]
        metrics = {"epoch": epoch, "loss": s[0] / s[3], f"train_{task.batch_metric}": s[1] / s[3],
                   **{name: score_of[id(mod)] for name, mod in built.evals.items()},
                   "lr": optimizer.param_groups[0]["lr"], "steps": state["global_step"], "train_s": st["train_s"],
                   "eval_s": time.perf_counter() - t1, "epoch_s": st["train_s"] + time.perf_counter() - t1,
                   "examples": int(s[3]) // cfg.get("draws_per_step", 1)}  # a sandwich stacks its sizes' outputs
        if epoch == state["starts"][-1]:
            metrics["setup_s"] = t_first[0] - t_setup  # worker start to first step: build, resume, teacher, data
        if teacher is not None:
            metrics[f"teacher_test_{metric}"] = s[6] / s[7]
        if agreeable:
            metrics.update({"train_agreement": s[2] / s[3], "test_agreement": s[5] / s[7]})
        state["history"].append(metrics)
        if rank == 0:
            with tempfile.TemporaryDirectory(prefix="weit-ckpt-") as d:
                save_train_state(Path(d), built.keep, optimizer, scheduler, state)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                                 checkpoint_dir_name=f"epoch_{epoch:04d}")
        else:
            ray.train.report(metrics)

    fit(ddp, batches, optimizer, epochs=cfg["epochs"], start_epoch=state["epoch"] + 1, on_epoch=on_epoch,
        teacher=teacher, tau=cfg["tau"], task=task, device=device, scheduler=scheduler)


# ------------------------------------------------------------------------------------------------ driver side


class _ReportQueue(ray.train.UserCallback):
    """Runs in the Ray Train controller: forwards rank 0's per-epoch metrics to the driver's queue."""

    def __init__(self, q) -> None:
        self.q = q

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        if metrics and metrics[0]:
            self.q.put(dict(metrics[0]))


@dataclass
class RayRun:
    """What a Ray Train job left behind: the latest checkpoint's directory and what ran this time."""

    checkpoint_dir: Path
    state: dict
    epochs_now: list[int]
    fit_s: float

    @property
    def final(self) -> dict:
        return dict(self.state["history"][-1])

    def weights(self, cfg: dict) -> nn.Module:
        """What the job keeps (``Built.keep``), built here with the last checkpoint's weights."""
        keep = cfg["build"](cfg).keep
        load_train_state(self.checkpoint_dir, keep)
        return keep


def scaling_config(workers: int, cpus_per_worker: float, use_gpu: bool) -> ray.train.ScalingConfig:
    """``use_gpu`` adds one GPU per worker (TorchTrainer then picks NCCL and a CUDA device)."""
    return ray.train.ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                   resources_per_worker={"CPU": cpus_per_worker})


def ray_datasets(data: PreparedData) -> dict:
    """Ray Datasets over the parquet files. Data below ``MATERIALIZE_MAX_BYTES`` is materialized once in the
    object store: re-reading parquet costs 5-20 s of task start-up per epoch here, materialized blocks ~0.2 s."""
    import logging

    logging.getLogger("ray.data").setLevel(logging.ERROR)  # per-execution lines would drown the epoch lines
    ray.data.DataContext.get_current().enable_progress_bars = False
    materialize = sum(Path(p).stat().st_size for p in data.paths.values()) <= MATERIALIZE_MAX_BYTES
    out = {s: ray.data.read_parquet(data.paths[s]) for s in ("train", "test")}
    return {s: ds.materialize() for s, ds in out.items()} if materialize else out


def print_epoch(stage: str, epochs: int, m: dict, task: Task) -> None:
    print(f"{PREFIX} {epoch_line(stage, epochs, m, task.metric, task.batch_metric)}", flush=True)


def run_on_ray(cfg: dict, data: PreparedData, tracker: Tracker, *, stage: str, name: str, storage: str,
               workers: int, cpus_per_worker: float, use_gpu: bool = False, max_failures: int = 1,
               quiet: bool = False) -> RayRun:
    """Run :func:`train_worker` under a ``TorchTrainer``; each epoch is logged to ``tracker`` once (as rank 0
    reports it, or from the checkpoint's history for epochs a restarted driver missed)."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Queue

    q = Queue(actor_options={"num_cpus": 0})
    run_config = RunConfig(name=name, storage_path=storage, failure_config=FailureConfig(max_failures=max_failures),
                           checkpoint_config=CheckpointConfig(num_to_keep=2), callbacks=[_ReportQueue(q)],
                           logging_config=LoggingConfig(log_level="WARNING"))
    with warnings.catch_warnings():  # Ray's own defaults trip its deprecation of `exclude_resources`
        warnings.simplefilter("ignore")
        ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = True  # deterministic shards: resumed epochs replay the same batches
    trainer = TorchTrainer(train_worker, train_loop_config=cfg,
                           scaling_config=scaling_config(workers, cpus_per_worker, use_gpu), run_config=run_config,
                           datasets=ray_datasets(data), dataset_config=DataConfig(
                               datasets_to_split=["train"], execution_options=ingest, enable_shard_locality=False))
    epochs_now: list[int] = []
    stop, task = threading.Event(), get_task(cfg["task"])

    def pump() -> None:
        while True:
            try:
                m = q.get(timeout=0.5)
            except queue_lib.Empty:
                if stop.is_set():
                    return
                continue
            epochs_now.append(int(m["epoch"]))
            tracker.log_epoch(m)
            if not quiet:
                print_epoch(stage, cfg["epochs"], m, task)

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as e:
        raise RuntimeError(f"Ray Train job {name} failed after {max_failures} restart(s): {e}") from e
    finally:
        fit_s = time.perf_counter() - t0
        stop.set()
        thread.join()
        q.shutdown()
    if result.checkpoint is None:
        raise RuntimeError(f"Ray Train job {name} ended without a checkpoint")
    ckpt = Path(result.checkpoint.path)
    run = RayRun(ckpt, json.loads((ckpt / "state.json").read_text()), epochs_now, fit_s)
    for m in run.state["history"]:  # epochs whose report the driver missed (e.g. a driver restart)
        tracker.log_epoch(m)
    return run
