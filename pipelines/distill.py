"""``weit distill``, stage 1 on Ray Train: build a template bank by distilling an ancestry model (WAVE) or by
constraint-based pre-training on the task alone (WeiT), for one size or a whole size range.

The auxiliary model is an ``ElasticModel`` (templates, the reference size's scalers and free tensors, an aux
head); any size's weights are computed from them by the bank's resize rule. With a range (``--depths/
--widths`` or ``--space``, planned by ``weit_core.sizes``) a ``Sandwich`` trains the largest, the smallest and
``n_random`` drawn sizes every step, so every size of the range is what stage 2 will start from.
``pipelines.runner`` runs it (checkpoints, resume, per-epoch metrics to MLflow).
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Annotated

import ray
import typer

from pipelines import runner as r
from pipelines.common import UserError, git_revision, init_ray
from pipelines.runner import PREFIX, Built
from pipelines.tracking import Tracker
from weit_core.io import load_bank
from weit_core.models import ViTSpec, get_family, vit_kinds, vit_layout
from weit_core.models.elastic import AtSize, Sandwich, range_model
from weit_core.parquet import PreparedData
from weit_core.resize import RULES
from weit_core.sizes import SizeRange, TaskShape, check_range, drop_reasons, keep_sizes
from weit_core.sizes import plan_range as plan_ranges
from weit_core.stage1 import build_elastic, save_elastic
from weit_core.tasks import CLASSIFICATION, get_task
from weit_core.teacher import check_teacher, load_teacher, no_teacher
from weit_core.templates import Scalers

DEFAULT_AUX = {"depth": 6, "width": 96, "heads": 3, "mlp_ratio": 4.0, "patch": 4}
"""The auxiliary size when neither flags nor a weit teacher say otherwise (the Fashion-MNIST recipe)."""
EXPERIMENT = "weit-distill"
NOT_SETTINGS = ("out", "storage", "name", "address", "mlflow_uri", "quiet", "wrap_batches")
"""Config fields that do not change what a job computes (a rerun with other values resumes it)."""


def parse_sizes(text: str | None, flag: str) -> list[int] | None:
    """``"2,4,6"`` -> ``[2, 4, 6]``."""
    try:
        values = None if text is None else [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError as e:
        raise UserError(f"{flag} {text!r}: expected whole numbers separated by commas, e.g. 2,4,6") from e
    if values == []:
        raise UserError(f"{flag} is empty; give a comma-separated list such as 2,4,6")
    return values


@dataclass
class DistillConfig:
    """Everything one stage-1 job needs; every field is logged to MLflow as a param. ``depths``, ``widths``
    and ``teacher_kwargs`` may be given as the CLI's text."""

    teacher: str | None = None  # a weit model file, a timm name (with teacher_checkpoint), or None/"none": WeiT
    teacher_checkpoint: str | None = None
    teacher_kwargs: dict = field(default_factory=dict)
    dataset: str = "fashion_mnist"
    limit: int | None = None
    aux: dict = field(default_factory=dict)
    """Aux ViT size keys (depth, width, heads, mlp_ratio, patch); unset ones come from a weit teacher's spec,
    else ``DEFAULT_AUX``; image size, channels and classes from the data."""
    depths: list[int] | None = None  # a range: depths x widths (None: the reference's)
    widths: list[int] | None = None
    head_dim: int | None = None  # a range's heads = width / head_dim; an explicit aux["heads"] fixes them
    space: str | None = None  # a range: the sizes a tune_spaces YAML keeps
    n_random: int = 1  # sandwich rule: sizes drawn per step besides the largest and the smallest
    width_rule: str = "nested"
    depth_rule: str = "nested"
    n_templates: int = 16
    block: int = 16
    order: str = "scaler_major"
    epochs: int = 10
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    tau: float = 2.0
    batch_size: int = 128  # global: each worker sees batch_size // workers per step
    workers: int = 2
    cpus_per_worker: float = 0.5
    """Fractional on purpose: workers holding every CPU leave none for Ray Data's read tasks (deadlock)."""
    threads: int | None = None
    use_gpu: bool = False
    max_failures: int = 1
    out: str = "bank.safetensors"
    storage: str | None = None
    name: str | None = None
    address: str | None = None
    mlflow_uri: str | None = None
    experiment: str = EXPERIMENT
    seed: int = 0
    quiet: bool = False
    wrap_batches: r.WrapBatches | None = None  # instrumentation, not a setting: a rerun without it resumes

    def __post_init__(self) -> None:
        self.depths = parse_sizes(self.depths, "--depths") if isinstance(self.depths, str) else self.depths
        self.widths = parse_sizes(self.widths, "--widths") if isinstance(self.widths, str) else self.widths
        if isinstance(self.teacher_kwargs, str):
            try:
                self.teacher_kwargs = json.loads(self.teacher_kwargs or "{}")
            except json.JSONDecodeError as e:
                raise UserError(f"--teacher-kwargs is not JSON ({e}); e.g. '{{\"num_classes\": 10}}'") from e
            if not isinstance(self.teacher_kwargs, dict):
                raise UserError("--teacher-kwargs must be a JSON object, e.g. '{\"num_classes\": 10}'")

    @property
    def mode(self) -> str:
        return "weit" if no_teacher(self.teacher) else "wave"


# ------------------------------------------------------------------------------------------ sizes


def _spec(config: DistillConfig, data: PreparedData, size: dict) -> ViTSpec:
    """An aux (reference) size with the data's I/O, checked against the bank's templates."""
    c, h, w = data.input_shape
    if h != w:
        raise UserError(f"images are {h}x{w}; the ViT specs here need square images")
    try:
        spec = ViTSpec(img_size=h, in_chans=c, num_classes=data.num_classes, **size)
        Scalers(vit_layout(spec), vit_kinds(spec, config.n_templates, config.block))
    except ValueError as e:
        raise UserError(f"aux model: {e}") from e
    return spec


def check_range_flags(config: DistillConfig) -> None:
    """What is wrong with a range's flags, one line, before anything is read or Ray is started."""
    c = config
    if c.space is not None and (c.depths, c.widths, c.head_dim) != (None, None, None):
        raise UserError("--space lists the sizes itself; drop --depths / --widths / --head-dim")
    try:
        check_range(depths=c.depths, widths=c.widths, heads=c.aux.get("heads"), head_dim=c.head_dim, block=c.block,
                    n_random=c.n_random, width_rule=c.width_rule, depth_rule=c.depth_rule)
    except ValueError as e:
        raise UserError(f"distill range: {e}") from e


def plan_range(config: DistillConfig, data: PreparedData, teacher_spec: ViTSpec | None) -> SizeRange:
    """The reference size and the range of a job (``weit_core.sizes.plan_range``): aux keys given by flags,
    the rest from a weit teacher's size, else ``DEFAULT_AUX``; the range from --depths/--widths or --space."""
    check_range_flags(config)
    if unknown := set(config.aux) - set(DEFAULT_AUX):
        raise UserError(f"unknown aux size key(s) {sorted(unknown)}; use {sorted(DEFAULT_AUX)}")
    base = {k: getattr(teacher_spec, k) for k in DEFAULT_AUX} if teacher_spec else dict(DEFAULT_AUX)
    given = {k: v for k, v in config.aux.items() if v is not None}
    space = (_space_sizes(config, data, given.get("patch"), base) if config.space is not None
             else {"source": "--depths/--widths"})
    try:
        return plan_ranges(lambda size: _spec(config, data, size), base, given, depths=config.depths,
                           widths=config.widths, head_dim=config.head_dim, block=config.block,
                           width_rule=config.width_rule, depth_rule=config.depth_rule, **space)
    except ValueError as e:
        raise UserError(str(e)) from e


def aux_spec(config: DistillConfig, data: PreparedData, teacher_spec: ViTSpec | None) -> ViTSpec:
    """The aux size without a range: explicit flags, else the weit teacher's size, else ``DEFAULT_AUX``."""
    return plan_range(replace(config, depths=None, widths=None, space=None), data, teacher_spec).ref


def _space_sizes(config: DistillConfig, data: PreparedData, patch: int | None, base: dict) -> dict:
    """The sizes of a search space this bank can serve (those the sweep would keep for the data's shape and
    this bank's block), the drops counted by reason; ``base["patch"]`` becomes the space's."""
    from pipelines.spaces import load_space, size_points

    space = load_space(config.space)
    patches = sorted({t.patch for t in space.tasks})
    if patch is None and len(patches) > 1:
        raise UserError(f"{config.space}: its tasks use patches {patches}; pass --patch for this bank")
    base["patch"] = patch or (patches[0] if patches else base["patch"])
    c, h, _ = data.input_shape
    try:
        kept, dropped = keep_sizes(size_points(space), TaskShape(int(c), int(h), data.num_classes), base["patch"],
                                   space.constraints, config.block)
    except ValueError as e:
        raise UserError(f"{config.space}: {e}") from e
    if not kept:
        raise UserError(f"{config.space}: no size of the space can be trained by a block-{config.block} bank on "
                        f"this data ({_describe_drops(dropped)})")
    return {"points": kept, "dropped": dropped, "source": f"space {config.space}"}


def _describe_drops(dropped: dict) -> str:
    return ", ".join(f"{n} {drop_reasons().get(k, k)}" for k, n in Counter(dropped).most_common())


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
    if config.epochs < 1 or config.workers < 1 or config.batch_size < config.workers:
        raise UserError("need --epochs >= 1, --workers >= 1 and --batch-size >= --workers")
    check_range_flags(config)  # before the data is read or Ray started
    task, out = CLASSIFICATION, Path(config.out).resolve()
    metric, name = task.metric, config.name or r.job_name(out, "distill")
    teacher = None if no_teacher(config.teacher) else load_teacher(
        config.teacher, config.teacher_checkpoint, config.teacher_kwargs)
    storage, directory, data = r.prepare_job(name, config.storage, config.dataset, config.limit, config.seed)
    plan = plan_range(config, data, teacher.spec if teacher else None)
    spec, labels = plan.ref, [s.label for s in plan.sizes]
    if teacher is not None:
        check_teacher(teacher, data.input_shape, data.num_classes)
    kinds = vit_kinds(spec, config.n_templates, config.block)
    settings = {k: v for k, v in asdict(replace(config, wrap_batches=None)).items() if k not in NOT_SETTINGS}
    settings.update(aux_spec=spec.to_dict(), size_range=labels or None)
    resumed = r.job_guard(directory, settings)

    init_ray(config.address)
    # only a local Ray is known to be all there is; a cluster may autoscale GPU workers in after the start
    gpus = ray.cluster_resources().get("GPU", 0)
    if config.use_gpu and not (config.address or os.environ.get("RAY_ADDRESS")) and gpus < config.workers:
        raise UserError(f"--use-gpu needs {config.workers} GPU(s) but this machine's Ray sees {gpus:g}; drop "
                        f"--use-gpu or pass --address of a GPU cluster")
    cfg = r.worker_config(
        build_aux, spec, epochs=config.epochs, lr=config.lr, weight_decay=config.weight_decay,
        warmup_epochs=config.warmup_epochs, batch_size=config.batch_size, workers=config.workers,
        train_rows=data.train_rows, seed=config.seed, threads=config.threads, cpus_per_worker=config.cpus_per_worker,
        n_templates=config.n_templates, block=config.block, order=config.order, tau=config.tau, task=task.name,
        # through the object store: workers on other nodes need no access to the teacher's file
        teacher=[ray.put(teacher.shipment())] if teacher is not None else None, wrap_batches=config.wrap_batches,
        sizes=[s.to_dict() for s in plan.sizes] or None, n_random=config.n_random, width_rule=config.width_rule,
        depth_rule=config.depth_rule, watch=[s.to_dict() for s in plan.watch],
        draws_per_step=plan.draws_per_step(config.n_random))
    template_numbers = sum(math.prod(k.template_shape) for k in kinds.values())
    scaler_numbers = Scalers(vit_layout(spec), kinds).num_numbers()
    params = {**{k: v for k, v in settings.items() if k not in ("aux", "aux_spec", "teacher_kwargs")},
              **{f"aux.{k}": v for k, v in spec.to_dict().items()}, "teacher_kwargs": json.dumps(config.teacher_kwargs),
              "mode": config.mode, "job": name, "out": str(out), "storage": storage, "git": git_revision(),
              "template_numbers": template_numbers, "aux_scalers": scaler_numbers,
              "steps_per_epoch": cfg["steps_per_epoch"], "per_worker_batch": cfg["batch_size"],
              "free_params": "timm_init+trained", "size_range": " ".join(labels) or "reference",
              "range_source": plan.source, "draws_per_step": cfg["draws_per_step"]}
    tags = {"weit.stage": "distill", "weit.mode": config.mode, "weit.task": data.info["name"],
            "weit.task_type": task.name}
    rule = f"rule {config.width_rule}/{config.depth_rule}"
    with Tracker(config.mlflow_uri, config.experiment, name, params, tags) as tracker:
        if not config.quiet:
            print(f"{PREFIX} distill {name}: mode {config.mode}, aux {spec.depth}x{spec.width} from "
                  f"{template_numbers:,} template + {scaler_numbers:,} scaler numbers, {data.info['train']:,} train "
                  f"examples, {config.workers} worker(s) x {config.cpus_per_worker} CPU"
                  f"{', GPU' if config.use_gpu else ''}{', resuming' if resumed else ''}", flush=True)
            if plan.sizes:
                print(f"{PREFIX} size range ({plan.source}): {len(labels)} size(s) {labels[0]} .. {labels[-1]}, "
                      f"reference {spec.label}, {rule}, {cfg['draws_per_step']} size(s) per step"
                      + (f"; dropped {sum(plan.dropped.values())} space size(s): {_describe_drops(plan.dropped)}"
                         if plan.dropped else ""), flush=True)
        run = r.run_on_ray(cfg, data, tracker, stage="distill", name=name, storage=storage, workers=config.workers,
                           cpus_per_worker=config.cpus_per_worker, use_gpu=config.use_gpu,
                           max_failures=config.max_failures, quiet=config.quiet)
        final = run.final
        header = {
            "mode": config.mode, "N": config.n_templates, "a": config.block, "b": config.block,
            "source_model": teacher.info if teacher else None, "data": data.info,
            "epochs": run.state["epoch"], "metrics": final, "aux_spec": spec.to_dict(), "job": name,
            "seed": config.seed, "tau": config.tau if teacher else None, "lr": config.lr,
            "batch_size": config.batch_size, "workers": config.workers, "attempt_starts": run.state["starts"],
            "git": git_revision(), "mlflow_run_id": tracker.run_id, "n_random": config.n_random if plan.sandwich else None,
            "draws_per_step": cfg["draws_per_step"], "range_source": plan.source, "space_dropped": plan.dropped or None,
        }
        # templates, aux scalers, free tensors (not the aux head), the resize rule, the size range, aux_spec
        save_elastic(out, run.weights(cfg), header, plan.sizes or None)
        header_json = out.with_suffix(".json")
        header_json.write_text(json.dumps(load_bank(out).header, indent=1, default=str))
        tracker.finish({f"final_test_{metric}": final[f"test_{metric}"], "fit_s": run.fit_s,
                        **({"final_test_agreement": final["test_agreement"]} if teacher else {})}, [out, header_json])
    if not config.quiet:
        agree = f", agreement {final['test_agreement']:.4f}" if teacher else ""
        print(f"{PREFIX} bank written to {out} (test_{metric} {final[f'test_{metric}']:.4f}{agree}; {run.fit_s:.0f}s "
              f"in fit, {len(run.epochs_now)} epoch(s) trained now"
              + (f"; {len(labels)} sizes, {rule}" if plan.sizes else "") + ")", flush=True)
    resumed_from = run.state["starts"][-1] - 1 if run.epochs_now else run.state["epoch"]
    return out, {**final, "fit_s": run.fit_s, "epochs_now": len(run.epochs_now), "resumed_from_epoch": resumed_from,
                 "run_id": tracker.run_id, "job": name, "checkpoint": str(run.checkpoint_dir),
                 "aux_spec": spec.to_dict()}


RULE = f"{' | '.join(RULES)}."


def distill_command(
    teacher: Annotated[str, typer.Option(help="Ancestry: a weit model file, a timm model name (with "
                                              "--teacher-checkpoint), or 'none' for WeiT pre-training.")] = "none",
    teacher_checkpoint: Annotated[str | None, typer.Option(help="Safetensors state_dict for a timm --teacher.")] = None,
    teacher_kwargs: Annotated[str | None, typer.Option(help="JSON kwargs for timm.create_model(--teacher).")] = None,
    dataset: r.Dataset = "fashion_mnist",
    limit: r.Limit = None,
    depth: Annotated[int | None, typer.Option(help="Aux ViT depth (default: teacher's, else 6).")] = None,
    width: Annotated[int | None, typer.Option(help="Aux ViT width (default: teacher's, else 96).")] = None,
    heads: Annotated[int | None, typer.Option(help="Aux ViT heads (default: teacher's, else 3).")] = None,
    patch: Annotated[int | None, typer.Option(help="Aux ViT patch size (default: teacher's, else 4).")] = None,
    mlp_ratio: Annotated[float | None, typer.Option(help="Aux ViT MLP ratio (default: teacher's, else 4).")] = None,
    depths: Annotated[str | None, typer.Option(help="Size range: depths to train, e.g. 2,4,6 (crossed with "
                                                    "--widths; the reference defaults to the largest).")] = None,
    widths: Annotated[str | None, typer.Option(help="Size range: widths to train, e.g. 64,96 (multiples of "
                                                    "--block).")] = None,
    head_dim: Annotated[int | None, typer.Option(help="Range: heads = width / head dim (default: the teacher's, "
                                                      "else 32); --heads fixes the heads instead.")] = None,
    space: Annotated[str | None, typer.Option(help="Size range: the valid sizes of a tune_spaces YAML (those "
                                                   "the sweep would keep for this bank).")] = None,
    n_random: Annotated[int, typer.Option(help="Sizes drawn per step besides the largest and the smallest "
                                               "(sandwich rule).")] = 1,
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
    out: Annotated[str, typer.Option(help="Bank file to write (safetensors); also names the job for "
                                          "resume.")] = "bank.safetensors",
    storage: r.Storage = None,
    name: Annotated[str | None, typer.Option(help="Job name (default: derived from --out).")] = None,
    address: r.Address = None,
    mlflow_uri: r.MlflowUri = None,
    seed: r.Seed = 0,
) -> None:
    """Stage 1: build a template bank by distilling an ancestry (WAVE) or pre-training (WeiT) on Ray Train,
    for one size or a size range (--depths/--widths or --space)."""
    options = locals()
    aux = {k: v for k in DEFAULT_AUX if (v := options.pop(k)) is not None}
    run_distill(DistillConfig(**options, aux=aux))
