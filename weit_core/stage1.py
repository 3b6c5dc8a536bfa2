"""Stage 1: what a job is (:class:`DistillConfig`), the sizes it trains (:func:`plan`), and, in one process,
making a template bank over a size range with a teacher (WAVE) or without (WeiT).

The same pieces run inside Ray Train's workers (``pipelines/distill.py``); this in-process form serves the
tests, the benchmarks and anyone without a cluster. The loop is :func:`weit_core.train.fit`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from weit_core.models.elastic import AtSize, ElasticModel, range_model
from weit_core.models.family import Family, family_of, get_family
from weit_core.sizes import SizeRange, check_range, describe_drops, keep_sizes, parse_size, plan_range
from weit_core.tasks import CLASSIFICATION, Task
from weit_core.templates import Scalers, TemplateBank
from weit_core.train import (
    evaluate,
    fit,
    iterate_batches,
    make_optimizer,
    seed_everything,
    warmup_cosine,
)


def parse_sizes(text: str | None, flag: str) -> list[int] | None:
    """``"2,4,6"`` -> ``[2, 4, 6]``."""
    try:
        values = None if text is None else [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError as e:
        raise ValueError(f"{flag} {text!r}: expected whole numbers separated by commas, e.g. 2,4,6") from e
    if values == []:
        raise ValueError(f"{flag} is empty; give a comma-separated list such as 2,4,6")
    return values


@dataclass
class DistillConfig:
    """Everything one stage-1 job needs; every field is logged as a param. ``depths``, ``widths``, ``size`` and
    ``teacher_kwargs`` may be given as the CLI's text."""

    teacher: str | None = None  # a weit model file, a timm name (with teacher_checkpoint), or None/"none": WeiT
    teacher_checkpoint: str | None = None
    teacher_kwargs: dict = field(default_factory=dict)
    dataset: str | None = None  # None: the task's own (classification: Fashion-MNIST)
    task: str = "classification"
    family: str | None = None  # the aux family: a weit teacher's, else this, else the task's default
    limit: int | None = None
    aux: dict = field(default_factory=dict)
    """Aux size keys (the family's ``size_keys``); unset ones come from a weit teacher's size, else the family's
    ``default_size``; the rest of the spec (image size, channels, classes) from the data's ``io``."""
    size: str | None = None  # more aux keys as text: "depth=2,width=64"
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
    experiment: str = "weit-distill"
    seed: int = 0
    quiet: bool = False
    wrap_batches: Callable | None = None  # instrumentation, not a setting: a rerun without it resumes

    def __post_init__(self) -> None:
        self.depths = parse_sizes(self.depths, "--depths") if isinstance(self.depths, str) else self.depths
        self.widths = parse_sizes(self.widths, "--widths") if isinstance(self.widths, str) else self.widths
        if isinstance(self.teacher_kwargs, str):
            try:
                self.teacher_kwargs = json.loads(self.teacher_kwargs or "{}")
            except json.JSONDecodeError as e:
                raise ValueError(f"--teacher-kwargs is not JSON ({e}); e.g. '{{\"num_classes\": 10}}'") from e
            if not isinstance(self.teacher_kwargs, dict):
                raise ValueError("--teacher-kwargs must be a JSON object, e.g. '{\"num_classes\": 10}'")

    @property
    def mode(self) -> str:
        return "weit" if str(self.teacher).strip().lower() in ("", "none") else "wave"

    def check(self) -> None:
        """What is wrong with the flags, one line, before anything is read or Ray is started."""
        if self.epochs < 1 or self.workers < 1 or self.batch_size < self.workers:
            raise ValueError("need --epochs >= 1, --workers >= 1 and --batch-size >= --workers")
        if self.space is not None and (self.depths, self.widths, self.head_dim) != (None, None, None):
            raise ValueError("--space lists the sizes itself; drop --depths / --widths / --head-dim")
        try:
            check_range(depths=self.depths, widths=self.widths, heads=self.aux.get("heads"), head_dim=self.head_dim,
                        block=self.block, n_random=self.n_random, width_rule=self.width_rule,
                        depth_rule=self.depth_rule)
        except ValueError as e:
            raise ValueError(f"distill range: {e}") from e

    def aux_family(self, task: Task, teacher_spec: Any = None) -> Family:
        """A weit teacher's family (``--family`` must agree), else ``--family``, else the task's default."""
        if teacher_spec is not None:
            fam = family_of(teacher_spec)
            if self.family not in (None, fam.name):
                raise ValueError(f"the teacher is a {fam.name} but --family is {self.family}; drop --family "
                                 f"(the teacher's family is the bank's)")
            return fam
        return get_family(self.family or task.default_family)


def plan(config: DistillConfig, family: Family, io: dict, teacher_spec: Any = None,
         space: dict | None = None) -> SizeRange:
    """The reference size and the range of a job: aux keys given by flags, the rest from a weit teacher's size,
    else the family's ``default_size``; the range from --depths/--widths or a space's kept sizes (``space``:
    ``points``, ``dropped``, ``source``, its ``patch``). Each spec is checked against the bank's templates."""
    config.check()
    given = {**parse_size(config.size, family), **{k: v for k, v in config.aux.items() if v is not None}}
    if unknown := sorted(set(given) - set(family.size_keys)):
        raise ValueError(f"unknown {family.name} size key(s) {unknown}; {family.name} sizes set "
                         f"{', '.join(family.size_keys)}")
    base = {**family.default_size, **(family.size_from_spec(teacher_spec) if teacher_spec is not None else {})}
    space = dict(space or {"source": "--depths/--widths"})
    if (patch := space.pop("patch", None)) is not None:
        base["patch"] = given.get("patch", patch)

    def make(size: dict) -> Any:
        try:
            spec = family.spec_for(size, io)
            Scalers(family.layout(spec), family.kinds(spec, config.n_templates, config.block))
        except ValueError as e:
            raise ValueError(f"aux model: {e}") from e
        return spec

    return plan_range(make, base, given, depths=config.depths, widths=config.widths, head_dim=config.head_dim,
                      block=config.block, width_rule=config.width_rule, depth_rule=config.depth_rule, family=family,
                      **space)


def space_sizes(config: DistillConfig, io: dict, family: Family) -> dict:
    """What :func:`plan` takes from ``config.space`` (a tune_spaces YAML): the sizes a block-``config.block``
    bank can serve on this data (those the sweep would keep), the drops by reason, and the patch of the
    space's tasks (``--patch`` chooses where they differ)."""
    from weit_core.space import load_space
    from weit_core.trials import size_points

    source, space = config.space, load_space(config.space)
    points = size_points(space)
    if (fam := getattr(space, "family", "vit")) != family.name:
        raise ValueError(f"{source} sizes a {fam}, this bank is a {family.name}; pass --family {fam}")
    patches, patch = sorted({t.patch for t in space.tasks}), config.aux.get("patch")
    if patch is None and len(patches) > 1:
        raise ValueError(f"{source}: its tasks use patches {patches}; pass --patch for this bank")
    patch = patch or (patches[0] if patches else family.default_size.get("patch"))
    kept, dropped = keep_sizes(points, io, patch, space.constraints, config.block, family)
    if not kept:
        raise ValueError(f"{source}: no size of the space can be trained by a block-{config.block} bank on this "
                         f"data ({describe_drops(dropped, family)})")
    return {"points": kept, "dropped": dropped, "source": f"space {config.space}", "patch": patch}


def aux_spec(config: DistillConfig, family: Family, io: dict, teacher_spec: Any = None) -> Any:
    """The aux size without a range: explicit flags, else the weit teacher's size, else the family default."""
    return plan(replace(config, depths=None, widths=None, space=None), family, io, teacher_spec).ref


def build_elastic(family: Family, ref_spec: Any, *, n: int = 4, block: int = 16, order: str = "scaler_major",
                  width_rule: str = "nested", depth_rule: str = "nested", seed: int = 0) -> ElasticModel:
    """A fresh auxiliary model: unit-normal templates, LeCun scalers, the family's init for free tensors."""
    seed_everything(seed)
    bank = TemplateBank(family.kinds(ref_spec, n, block), order)
    return ElasticModel(family, ref_spec, bank, width_rule=width_rule, depth_rule=depth_rule)


def make_bank(
    elastic: ElasticModel, x: torch.Tensor, y: torch.Tensor, *, sizes: list[Any] | None = None,
    teacher: nn.Module | None = None, epochs: int = 1, lr: float = 1e-3, weight_decay: float = 0.05,
    warmup_epochs: float = 1.0, batch_size: int = 128, tau: float = 2.0, n_random: int = 1, seed: int = 0,
    device: str = "cpu", max_steps: int | None = None, time_budget_s: float | None = None,
    eval_data: tuple[torch.Tensor, torch.Tensor] | None = None, eval_sizes: list[Any] | None = None,
    on_epoch: Callable[[dict], None] | None = None, task: Task = CLASSIFICATION,
) -> list[dict]:
    """Train ``elastic`` in place: every size of ``sizes`` (sandwich rule) or the reference alone, AdamW
    with a linear warm-up then cosine decay.

    ``time_budget_s``: after the first epoch, as many epochs (at most ``epochs``) as that epoch's wall time
    fits in the budget, the cosine laid over them. Returns one dict per epoch: train loss/metric, and with
    ``eval_data`` the metric of each of ``eval_sizes`` (default: the smallest, the reference and the
    largest of the range)."""
    sizes = sorted(set(sizes or [elastic.ref_spec]), key=lambda s: s.num_params())
    model = range_model(elastic, sizes, n_random, seed)
    model.to(device)
    if teacher is not None:
        teacher = teacher.to(device).eval().requires_grad_(False)
    steps_per_epoch = -(-len(x) // batch_size)
    if max_steps:
        steps_per_epoch = min(steps_per_epoch, max_steps)
    opt = make_optimizer(model, lr, weight_decay)
    sched = warmup_cosine(opt, steps_per_epoch * epochs, round(steps_per_epoch * warmup_epochs))
    watch = eval_sizes or list(dict.fromkeys([sizes[0], elastic.ref_spec, sizes[-1]]))
    history: list[dict] = []
    t0 = time.perf_counter()
    planned = epochs

    def batches(epoch: int):
        return iterate_batches(x, y, batch_size, seed=seed * 1000 + epoch, drop_last=len(x) > batch_size)

    def after(epoch: int, stats: dict) -> bool:
        nonlocal planned
        row = {"epoch": epoch, **{f"train_{k}": v for k, v in stats.items() if k not in ("epoch", "train_s")}}
        if eval_data is not None:
            for s in watch:
                ev = evaluate(AtSize(elastic, s), iterate_batches(*eval_data, 512, shuffle=False), task=task,
                              device=device)
                row[f"eval_{task.metric}@{s.label}"] = ev[task.metric]
        row["wall_s"] = round(time.perf_counter() - t0, 1)
        history.append(row)
        if on_epoch is not None:
            on_epoch(row)
        if time_budget_s is not None and epoch == 1:  # re-plan the cosine over the epochs that fit
            planned = max(1, min(epochs, int(time_budget_s // max(row["wall_s"], 1e-9))))
            sched.lr_lambdas[0].total = steps_per_epoch * planned
        return epoch < planned

    fit(model, batches, opt, epochs=epochs, on_epoch=after, teacher=teacher, tau=tau, task=task, device=device,
        max_steps=steps_per_epoch, scheduler=sched)
    return history


def save_elastic(path: Any, elastic: ElasticModel, header: dict | None = None,
                 sizes: list[Any] | None = None) -> Any:
    """Write the bank: templates, reference scalers, reference free tensors (no head) and the rule."""
    from weit_core.io import save_bank

    meta = {**(header or {}), "family": elastic.family.name, "aux_spec": elastic.ref_spec.to_dict(),
            "resize": dict(elastic.rules)}
    if sizes:
        meta["size_range"] = [s.to_dict() for s in sizes]
    return save_bank(path, elastic.bank, elastic.scalers, meta, free=elastic.free_tensors())


def load_elastic(loaded: Any, family: Family) -> ElasticModel:
    """The aux model of a bank that carries free tensors (``weit_core.io.load_bank``'s result)."""
    if loaded.free is None or loaded.aux_scalers is None:
        raise ValueError("this bank carries no free tensors (made before banks did); it cannot rebuild its "
                         "auxiliary model, only its templates and scalers")
    ref = family.spec_from_dict(loaded.header["aux_spec"])
    return ElasticModel(family, ref, loaded.bank, loaded.aux_scalers, loaded.free, **loaded.resize)
