"""``weit distill``, stage 1 on Ray Train: build a template bank by distilling an ancestry model (WAVE) or by
constraint-based pre-training on the task alone (WeiT), for one size or a whole size range, of any family.

The auxiliary model is an ``ElasticModel`` (templates, the reference size's scalers and free tensors, an aux
head) of the teacher's family (else ``--family``, else the task's default); any size's weights are computed
from them by the bank's resize rule. With a range (``--depths/--widths`` or ``--space``, planned by
``weit_core.stage1.plan``) a ``Sandwich`` trains the largest, the smallest and ``n_random`` drawn sizes every
step. ``pipelines.runner`` runs it (checkpoints, resume, per-epoch metrics to MLflow).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, replace
from pathlib import Path
from typing import Annotated

import ray
import typer

from pipelines import runner as r
from pipelines.common import UserError, git_revision, init_ray
from pipelines.runner import PREFIX, Built
from pipelines.tracking import Tracker
from weit_core.io import load_bank
from weit_core.jobs import job_guard, job_name, worker_config
from weit_core.models import family_of, get_family
from weit_core.models.elastic import AtSize, Sandwich, range_model
from weit_core.parquet import PreparedData
from weit_core.resize import RULES
from weit_core.sizes import SizeRange, describe_drops
from weit_core.stage1 import DistillConfig, build_elastic, parse_sizes, plan, save_elastic, space_sizes
from weit_core.tasks import CLASSIFICATION, Task, get_task
from weit_core.teacher import check_teacher, load_teacher, no_teacher
from weit_core.templates import Scalers

__all__ = ["DistillConfig", "aux_spec", "build_aux", "parse_sizes", "plan_range", "run_distill"]
NOT_SETTINGS = ("out", "storage", "name", "address", "mlflow_uri", "quiet", "wrap_batches")
"""Config fields that do not change what a job computes (a rerun with other values resumes it)."""


def plan_range(config: DistillConfig, data: PreparedData, teacher_spec=None, task: Task | None = None) -> SizeRange:
    """The reference size and the range of a job (``weit_core.stage1.plan``) for the data's ``io``."""
    try:
        family = config.aux_family(task or get_task(config.task), teacher_spec)
        space = space_sizes(config, data.io, family) if config.space is not None else None
        return plan(config, family, data.io, teacher_spec, space)
    except ValueError as e:
        raise UserError(str(e)) from e


def aux_spec(config: DistillConfig, data: PreparedData, teacher_spec=None):
    """The aux size without a range: explicit flags, else the weit teacher's size, else the family default."""
    return plan_range(replace(config, depths=None, widths=None, space=None), data, teacher_spec).ref


# ----------------------------------------------------------------------------------------- the job


def build_aux(cfg: dict) -> Built:
    """What a worker trains: the aux model (seeded by ``cfg["seed"]``), in a ``Sandwich`` over ``cfg["sizes"]``
    when a range is given; scored at the reference and, with a range, at each watched size."""
    family, metric = get_family(cfg.get("family", "vit")), get_task(cfg.get("task", CLASSIFICATION.name)).metric
    spec, seed = family.spec_from_dict(cfg["spec"]), cfg.get("seed", 0)
    elastic = build_elastic(family, spec, n=cfg["n_templates"], block=cfg["block"], order=cfg["order"],
                            width_rule=cfg.get("width_rule", "nested"), depth_rule=cfg.get("depth_rule", "nested"),
                            seed=seed)
    # Every DDP rank must run the same sizes at every step: the Sandwich draws them from its own seeded
    # random.Random, restarted from (seed, epoch) at each epoch, so a resumed epoch draws what the lost one drew.
    model = range_model(elastic, [family.spec_from_dict(d) for d in cfg.get("sizes") or []], cfg.get("n_random", 1),
                        seed=seed)
    at = {s.label: AtSize(elastic, s) for s in map(family.spec_from_dict, cfg.get("watch") or [cfg["spec"]])}
    evals = {f"test_{metric}": at[spec.label],
             **({f"test_{metric}/{k}": m for k, m in at.items()} if cfg.get("sizes") else {})}
    reseed = (lambda epoch: model.reseed(seed * 100_003 + epoch)) if isinstance(model, Sandwich) else None
    return Built(model, elastic, evals, reseed)


def run_distill(config: DistillConfig) -> tuple[Path, dict]:
    """Stage 1 end to end; returns (bank path, metrics of the final epoch + job facts)."""
    config.check()  # before the data is read or Ray started
    task, out = get_task(config.task), Path(config.out).resolve()
    metric, name = task.metric, config.name or job_name(out, "distill")
    teacher = None if no_teacher(config.teacher) else load_teacher(
        config.teacher, config.teacher_checkpoint, config.teacher_kwargs)
    storage, directory, data = r.prepare_job(name, config.storage, config.dataset, config.limit, config.seed,
                                             task.load)
    plan = plan_range(config, data, teacher.spec if teacher else None, task)
    spec, labels, family = plan.ref, [s.label for s in plan.sizes], family_of(plan.ref)
    if teacher is not None:
        check_teacher(teacher, data.input_shape, data.num_classes, task)
    kinds = family.kinds(spec, config.n_templates, config.block)
    settings = {k: v for k, v in asdict(replace(config, wrap_batches=None)).items() if k not in NOT_SETTINGS}
    settings.update(aux_spec=spec.to_dict(), size_range=labels or None)
    resumed = job_guard(directory, settings)

    init_ray(config.address)
    # only a local Ray is known to be all there is; a cluster may autoscale GPU workers in after the start
    gpus = ray.cluster_resources().get("GPU", 0)
    if config.use_gpu and not (config.address or os.environ.get("RAY_ADDRESS")) and gpus < config.workers:
        raise UserError(f"--use-gpu needs {config.workers} GPU(s) but this machine's Ray sees {gpus:g}; drop "
                        f"--use-gpu or pass --address of a GPU cluster")
    c = config
    cfg = worker_config(
        build_aux, spec, epochs=c.epochs, lr=c.lr, weight_decay=c.weight_decay, warmup_epochs=c.warmup_epochs,
        batch_size=c.batch_size, workers=c.workers, train_rows=data.train_rows, seed=c.seed, threads=c.threads,
        cpus_per_worker=c.cpus_per_worker, n_templates=c.n_templates, block=c.block, order=c.order, tau=c.tau,
        task=task.name, family=family.name, wrap_batches=c.wrap_batches, n_random=c.n_random,
        # through the object store: workers on other nodes need no access to the teacher's file
        teacher=[ray.put(teacher.shipment())] if teacher is not None else None,
        sizes=[s.to_dict() for s in plan.sizes] or None, width_rule=c.width_rule, depth_rule=c.depth_rule,
        watch=[s.to_dict() for s in plan.watch], draws_per_step=plan.draws_per_step(c.n_random))
    template_numbers = sum(math.prod(k.template_shape) for k in kinds.values())
    scaler_numbers = Scalers(family.layout(spec), kinds).num_numbers()
    params = {**{k: v for k, v in settings.items() if k not in ("aux", "aux_spec", "teacher_kwargs")},
              **{f"aux.{k}": v for k, v in spec.to_dict().items()}, "teacher_kwargs": json.dumps(c.teacher_kwargs),
              "mode": c.mode, "job": name, "out": str(out), "storage": storage, "git": git_revision(),
              "template_numbers": template_numbers, "aux_scalers": scaler_numbers, "aux_family": family.name,
              "steps_per_epoch": cfg["steps_per_epoch"], "per_worker_batch": cfg["batch_size"],
              "free_params": "timm_init+trained", "size_range": " ".join(labels) or "reference",
              "range_source": plan.source, "draws_per_step": cfg["draws_per_step"]}
    tags = {"weit.stage": "distill", "weit.mode": c.mode, "weit.task": data.info["name"], "weit.task_type": task.name}
    rule = f"rule {c.width_rule}/{c.depth_rule}"
    with Tracker(c.mlflow_uri, c.experiment, name, params, tags) as tracker:
        if not c.quiet:
            print(f"{PREFIX} distill {name}: mode {c.mode}, aux {family.name} {spec.label} from {template_numbers:,} "
                  f"template + {scaler_numbers:,} scaler numbers, {data.info['train']:,} train examples, "
                  f"{c.workers} worker(s) x {c.cpus_per_worker} CPU{', GPU' if c.use_gpu else ''}"
                  f"{', resuming' if resumed else ''}", flush=True)
            if plan.sizes:
                print(f"{PREFIX} size range ({plan.source}): {len(labels)} size(s) {labels[0]} .. {labels[-1]}, "
                      f"reference {spec.label}, {rule}, {cfg['draws_per_step']} size(s) per step"
                      + (f"; dropped {sum(plan.dropped.values())} space size(s): "
                         f"{describe_drops(plan.dropped, family)}" if plan.dropped else ""), flush=True)
        run = r.run_on_ray(cfg, data, tracker, stage="distill", name=name, storage=storage, workers=c.workers,
                           cpus_per_worker=c.cpus_per_worker, use_gpu=c.use_gpu, max_failures=c.max_failures,
                           quiet=c.quiet)
        final = run.final
        header = {
            "mode": c.mode, "N": c.n_templates, "a": c.block, "b": c.block, "task": task.name,
            "source_model": teacher.info if teacher else None, "data": data.info,
            "epochs": run.state["epoch"], "metrics": final, "aux_spec": spec.to_dict(), "job": name,
            "seed": c.seed, "tau": c.tau if teacher else None, "lr": c.lr,
            "batch_size": c.batch_size, "workers": c.workers, "attempt_starts": run.state["starts"],
            "git": git_revision(), "mlflow_run_id": tracker.run_id, "n_random": c.n_random if plan.sandwich else None,
            "draws_per_step": cfg["draws_per_step"], "range_source": plan.source, "space_dropped": plan.dropped or None,
        }
        # templates, aux scalers, free tensors (not the aux head), the resize rule, the size range, aux_spec
        save_elastic(out, run.weights(cfg), header, plan.sizes or None)
        header_json = out.with_suffix(".json")
        header_json.write_text(json.dumps(load_bank(out).header, indent=1, default=str))
        tracker.finish({f"final_test_{metric}": final[f"test_{metric}"], "fit_s": run.fit_s,
                        **({"final_test_agreement": final["test_agreement"]} if "test_agreement" in final else {})}, [out, header_json])
    if not c.quiet:
        agree = f", agreement {final['test_agreement']:.4f}" if "test_agreement" in final else ""
        print(f"{PREFIX} bank written to {out} (test_{metric} {final[f'test_{metric}']:.4f}{agree}; {run.fit_s:.0f}s "
              f"in fit, {len(run.epochs_now)} epoch(s) trained now"
              + (f"; {len(labels)} sizes, {rule}" if plan.sizes else "") + ")", flush=True)
    resumed_from = run.state["starts"][-1] - 1 if run.epochs_now else run.state["epoch"]
    return out, {**final, "fit_s": run.fit_s, "epochs_now": len(run.epochs_now), "resumed_from_epoch": resumed_from,
                 "run_id": tracker.run_id, "job": name, "checkpoint": str(run.checkpoint_dir),
                 "aux_spec": spec.to_dict()}


RULE = f"{' | '.join(RULES)}."
AXES = ("depth", "width", "heads", "patch", "mlp_ratio")


def distill_command(
    teacher: Annotated[str, typer.Option(help="A weit model file, a timm name (+ checkpoint), or 'none': WeiT.")] = "none",
    teacher_checkpoint: Annotated[str | None, typer.Option(help="Safetensors state_dict for a timm --teacher.")] = None,
    teacher_kwargs: Annotated[str | None, typer.Option(help="JSON kwargs for timm.create_model(--teacher).")] = None,
    dataset: r.Dataset = None,
    task: r.TaskName = "classification",
    family: Annotated[str | None, typer.Option(help="Aux family (default: the teacher's, else the task's).")] = None,
    limit: r.Limit = None,
    size: r.Size = None,
    depth: Annotated[int | None, typer.Option(help="Aux depth (default: teacher's, else the family's).")] = None,
    width: Annotated[int | None, typer.Option(help="Aux width (default: teacher's, else the family's).")] = None,
    heads: Annotated[int | None, typer.Option(help="Aux ViT heads (default: teacher's, else 3).")] = None,
    patch: Annotated[int | None, typer.Option(help="Aux patch size (default: teacher's, else the family's).")] = None,
    mlp_ratio: Annotated[float | None, typer.Option(help="Aux ViT MLP ratio (default: teacher's, else 4).")] = None,
    depths: Annotated[str | None, typer.Option(help="Size range: depths, e.g. 2,4,6 (x --widths; ref: the largest).")] = None,
    widths: Annotated[str | None, typer.Option(help="Size range: widths, e.g. 64,96 (multiples of --block).")] = None,
    head_dim: Annotated[int | None, typer.Option(help="ViT range: heads = width / head dim (default: the "
                                                      "teacher's, else 32); --heads fixes the heads instead.")] = None,
    space: Annotated[str | None, typer.Option(help="Size range: the sizes a tune_spaces YAML's sweep keeps.")] = None,
    n_random: Annotated[int, typer.Option(help="Sizes drawn per step beside the largest and smallest.")] = 1,
    width_rule: Annotated[str, typer.Option(help=f"How a size's channels come from the reference's: {RULE}")] = "nested",
    depth_rule: Annotated[str, typer.Option(help=f"How a size's layers come from the reference's: {RULE}")] = "nested",
    n_templates: Annotated[int, typer.Option(help="Templates per kind (N); 16 measured best of 4, 8, 16.")] = 16,
    block: Annotated[int, typer.Option(help="Template block size a = b.")] = 16,
    epochs: r.Epochs = 10,
    lr: r.Lr = 1e-3,
    tau: Annotated[float, typer.Option(help="Distillation temperature.")] = 2.0,
    batch_size: r.BatchSize = 128,
    workers: Annotated[int, typer.Option(help="Ray Train workers.")] = 2,
    cpus_per_worker: r.CpusPerWorker = 0.5,
    threads: r.Threads = None,
    use_gpu: Annotated[bool, typer.Option("--use-gpu", help="One GPU per worker (NCCL).")] = False,
    max_failures: Annotated[int, typer.Option(help="Worker-group restarts from the last checkpoint.")] = 1,
    out: Annotated[str, typer.Option(help="Bank file to write; also names the job (resume).")] = "bank.safetensors",
    storage: r.Storage = None,
    name: Annotated[str | None, typer.Option(help="Job name (default: derived from --out).")] = None,
    address: r.Address = None,
    mlflow_uri: r.MlflowUri = None,
    seed: r.Seed = 0,
) -> None:
    """Stage 1: build a template bank by distilling an ancestry (WAVE) or pre-training (WeiT) on Ray Train,
    for one size or a size range (--depths/--widths or --space), of any family and task."""
    options = locals()
    aux = {k: v for k in AXES if (v := options.pop(k)) is not None}
    run_distill(DistillConfig(**options, aux=aux))
