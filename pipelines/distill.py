"""Stage 1 on Ray Train: build a template bank by distilling an ancestry model (WAVE) or by
constraint-based pre-training on the task alone (WeiT), for one size or a whole size range.

The auxiliary model is a ``weit_core.models.elastic.ElasticModel``: a fresh bank, the reference size's own
scalers and its free tensors (norms, biases, position table, class token, the aux head); any size's weights
are computed from them by the bank's resize rule. Without a range the reference alone is trained; with one
(``--depths/--widths`` or ``--space``) a ``Sandwich`` trains the largest, the smallest and ``n_random``
drawn sizes every step (WeiT's structured constraints), so every size of the range is what stage 2 will
start from. Training is ``weit_core.train.distill_epoch`` inside a ``TorchTrainer`` (DDP via
``prepare_model``, data through Ray Data). Every epoch the workers checkpoint (the whole aux model as
safetensors, optimizer state with ``torch.save``), so a crashed worker costs at most one epoch
(``FailureConfig``) and re-running the same command resumes: Ray Train V2 restores a run from its
``(storage_path, name)`` and the name here is derived from ``--out``. The driver prints progress and logs
per-epoch metrics to MLflow (the reference's test accuracy and, with a range, the smallest and the largest
size's) from what the workers report (a controller callback pushes each report into a Ray queue the driver
reads), and writes the final bank with ``weit_core.stage1.save_elastic``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import queue as queue_lib
import signal
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Annotated

import ray
import ray.data
import ray.train
import timm
import torch
import typer
from safetensors.torch import load_file, save_file
from torch import nn

from pipelines.common import UserError, git_revision, init_ray, storage_path
from pipelines.tracking import Tracker
from weit_core.io import (
    WeitFileError,
    load_bank,
    load_model,
    load_timm_checkpoint,
    read_header,
    save_model,
)
from weit_core.models import TIMM_MODEL, ViTSpec, create_vit, vit_kinds, vit_layout
from weit_core.models.elastic import AtSize, ElasticModel, Sandwich, range_model
from weit_core.models.vit import VIT
from weit_core.resize import RULES
from weit_core.stage1 import build_elastic, save_elastic
from weit_core.templates import Scalers
from weit_core.train import (
    distill_epoch,
    evaluate,
    iterate_batches,
    make_optimizer,
    seed_everything,
    warmup_cosine,
)

DEFAULT_AUX = {"depth": 6, "width": 96, "heads": 3, "mlp_ratio": 4.0, "patch": 4}
"""The auxiliary size when neither flags nor a weit teacher say otherwise (the Fashion-MNIST recipe)."""
EXPERIMENT = "weit-distill"
JOB_FILE = "weit_job.json"
EVAL_BATCH = 512
SHUFFLE_BUFFER_MAX = 32768
"""Rows each worker keeps for its local shuffle; a shard up to this size is fully shuffled every epoch."""
PREFIX = "[weit]"
MATERIALIZE_MAX_BYTES = 2 << 30


# ----------------------------------------------------------------------------------------------- config


@dataclass
class DistillConfig:
    """Everything one stage-1 job needs; every field is logged to MLflow as a param."""

    teacher: str | None = None
    """A weit model file (``weit ancestry``), a timm model name (with ``teacher_checkpoint``), or None /
    ``"none"`` for WeiT pre-training without a teacher."""
    teacher_checkpoint: str | None = None
    teacher_kwargs: dict = field(default_factory=dict)
    dataset: str = "fashion_mnist"
    limit: int | None = None
    aux: dict = field(default_factory=dict)
    """Aux ViT size overrides (depth, width, heads, mlp_ratio, patch); unset keys come from a weit teacher's
    spec, else ``DEFAULT_AUX``. Image size, channels and classes always come from the data."""
    depths: list[int] | None = None
    """Size range: the depths to train (crossed with ``widths``); None = the reference's depth only."""
    widths: list[int] | None = None
    """Size range: the widths to train; None = the reference's width only."""
    head_dim: int | None = None
    """Range: heads = width / head_dim (default: the teacher's, else ``DEFAULT_AUX``'s head dim); an explicit
    ``aux["heads"]`` fixes the heads of every size instead."""
    space: str | None = None
    """Size range: the valid sizes of a ``tune_spaces`` YAML (dropped as the sweep drops them)."""
    n_random: int = 1
    """Sandwich rule: sizes drawn per step besides the largest and the smallest of the range."""
    width_rule: str = "nested"
    depth_rule: str = "nested"
    """How a size's scalers and free tensors come from the reference's (``weit_core.resize.RULES``)."""
    n_templates: int = 16
    block: int = 16
    order: str = "scaler_major"
    epochs: int = 10
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    tau: float = 2.0
    batch_size: int = 128
    """Global batch: each of the ``workers`` sees ``batch_size // workers`` per step."""
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
    fail_at_epoch: int | None = None
    """Test hook: the last rank SIGKILLs itself a few steps into this epoch, once per job (marker file)."""

    @property
    def mode(self) -> str:
        return "weit" if _no_teacher(self.teacher) else "wave"

    @property
    def has_range(self) -> bool:
        return self.depths is not None or self.widths is not None or self.space is not None


def _no_teacher(teacher: str | None) -> bool:
    return teacher is None or str(teacher).strip().lower() in ("", "none")


def job_name(out: str | Path, prefix: str = "distill") -> str:
    """A stable Ray Train run name for an output file, so re-running the same command resumes it."""
    path = Path(out).resolve()
    return f"{prefix}-{path.stem}-{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"


# ------------------------------------------------------------------------------------------------ data


@dataclass
class PreparedData:
    """Parquet files Ray Data reads (train, test) plus what the header records about the data."""

    paths: dict[str, str]
    info: dict
    input_shape: tuple[int, ...]
    num_classes: int
    train_rows: int


def prepare_data(dataset: str, out_dir: Path, limit: int | None = None, seed: int = 0) -> PreparedData:
    """Parquet files for Ray Data (workers on other nodes read files, never driver memory).

    A folder already holding ``train.parquet`` + ``test.parquet`` (``weit_core.data.export_parquet``) is
    read as it is; anything else is loaded with ``weit_core.data`` and exported into ``out_dir`` once."""
    from weit_core import data as wdata

    folder = Path(dataset)
    if folder.is_dir() and (folder / "train.parquet").is_file() and (folder / "test.parquet").is_file():
        if limit:
            raise UserError(f"--limit does not apply to the ready parquet folder {folder}; export a smaller one")
        return _describe_parquet(folder, dataset)
    source = {"dataset": str(dataset), "limit": limit, "seed": seed}
    marker = out_dir / "source.json"
    if marker.is_file():  # exported by an earlier run of this job
        before = json.loads(marker.read_text())
        if {k: before.get(k) for k in source} == source:
            return _describe_parquet(out_dir, dataset, name=before.get("name"), limit=limit)
    try:
        if str(dataset).replace("-", "_").lower() == "fashion_mnist":
            splits = wdata.load_fashion_mnist(limit=limit, seed=seed)
        else:
            splits = wdata.load_dataset(dataset)
            if limit:
                splits = limit_splits(splits, limit, seed)
    except (wdata.DataNotFoundError, ValueError) as e:
        raise UserError(str(e).splitlines()[0]) from e
    wdata.export_parquet(splits, out_dir)
    marker.write_text(json.dumps({**source, "name": splits.name}))
    return _describe_parquet(out_dir, dataset, name=splits.name, limit=limit)


def limit_splits(splits, limit: int, seed: int = 0):
    """At most ``limit`` rows per split (seeded), the same rule ``load_fashion_mnist(limit=)`` applies."""
    from dataclasses import replace

    return replace(splits, train=splits.train.subset(limit, seed), val=splits.val.subset(limit, seed),
                   test=splits.test.subset(limit, seed))


def _describe_parquet(folder: Path, source: str, name: str | None = None, limit: int | None = None) -> PreparedData:
    """Rows, image shape and classes from parquet metadata and the label column (no image decoding)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = {s: str(folder / f"{s}.parquet") for s in ("train", "val", "test") if (folder / f"{s}.parquet").is_file()}
    typ = pq.read_schema(paths["train"]).field("image").type
    if not isinstance(typ, pa.FixedShapeTensorType) or len(typ.shape) != 3:
        raise UserError(f"{paths['train']}: `image` is {typ}, not a C×H×W tensor column; write the folder with "
                        f"weit_core.data.export_parquet")
    labels = {s: pq.read_table(p, columns=["label"]).column("label").to_numpy() for s, p in paths.items()}
    num_classes = int(max(int(v.max()) for v in labels.values() if len(v)) + 1)
    info = {"name": name or folder.name, "source": source, "limit": limit, "input_shape": list(typ.shape),
            "num_classes": num_classes, **{s: len(v) for s, v in labels.items()}}
    return PreparedData(paths, info, tuple(int(d) for d in typ.shape), num_classes, len(labels["train"]))


def aux_spec(config: DistillConfig, data: PreparedData, teacher_spec: ViTSpec | None) -> ViTSpec:
    """Aux size: explicit flags, else the weit teacher's size, else ``DEFAULT_AUX``; I/O from the data."""
    base = ({k: getattr(teacher_spec, k) for k in DEFAULT_AUX} if teacher_spec else dict(DEFAULT_AUX))
    unknown = set(config.aux) - set(DEFAULT_AUX)
    if unknown:
        raise UserError(f"unknown aux size key(s) {sorted(unknown)}; use {sorted(DEFAULT_AUX)}")
    base.update({k: v for k, v in config.aux.items() if v is not None})
    c, h, w = data.input_shape
    if h != w:
        raise UserError(f"images are {h}x{w}; the ViT specs here need square images")
    try:
        spec = ViTSpec(img_size=h, in_chans=c, num_classes=data.num_classes, **base)
        vit_kinds(spec, config.n_templates, config.block)
        Scalers(vit_layout(spec), vit_kinds(spec, config.n_templates, config.block))
    except ValueError as e:
        raise UserError(f"aux model: {e}") from e
    return spec


@dataclass
class SizeRange:
    """What stage 1 trains: the reference (aux) size that holds the parameters, and the range of sizes the
    sandwich rule trains (empty: the reference alone)."""

    ref: ViTSpec
    sizes: list[ViTSpec]
    """Smallest (fewest parameters) first."""
    source: str = "reference"
    dropped: dict = field(default_factory=dict)
    """Space sizes that cannot be trained, by ``pipelines.spaces.DROP_REASONS`` key."""

    @property
    def sandwich(self) -> bool:
        return bool(self.sizes) and self.sizes != [self.ref]

    @property
    def watch(self) -> list[ViTSpec]:
        """The sizes evaluated every epoch: smallest, reference, largest (the reference alone without a range)."""
        if not self.sandwich:
            return [self.ref]
        picked: dict[str, ViTSpec] = {}
        for s in (self.sizes[0], self.ref, self.sizes[-1]):  # one per label, the reference's own if shared
            if s.label not in picked or s == self.ref:
                picked[s.label] = s
        return list(picked.values())

    def draws_per_step(self, n_random: int) -> int:
        """Sizes each training step runs (``Sandwich.draw``): the largest, the smallest, ``n_random`` more."""
        if not self.sandwich:
            return 1
        return min(len(self.sizes), 2 + max(0, n_random))


def check_range_flags(config: DistillConfig) -> None:
    """Everything about a size range that needs no data: one clear line each, before anything is read or
    Ray is started."""
    if config.width_rule not in RULES or config.depth_rule not in RULES:
        raise UserError(f"--width-rule {config.width_rule} / --depth-rule {config.depth_rule}: choose from "
                        f"{', '.join(RULES)}")
    if config.n_random < 0:
        raise UserError(f"--n-random must be >= 0, got {config.n_random}")
    if config.space is not None and (config.depths, config.widths, config.head_dim) != (None, None, None):
        raise UserError("--space lists the sizes itself; drop --depths / --widths / --head-dim")
    heads = config.aux.get("heads")
    if heads is not None and config.head_dim is not None:
        raise UserError("pass --heads (the same heads for every size) or --head-dim (heads = width / head dim), "
                        "not both")
    if config.head_dim is not None and config.head_dim < 1:
        raise UserError(f"--head-dim must be >= 1, got {config.head_dim}")
    for flag, values, example in (("--depths", config.depths, "2,4,6"), ("--widths", config.widths, "64,96")):
        if values is None:
            continue
        if not values:
            raise UserError(f"{flag} is empty; give a comma-separated list such as {example}")
        if min(values) < 1:
            raise UserError(f"{flag} {','.join(map(str, values))}: every entry must be >= 1")
    for w in config.widths or []:
        if w % config.block:
            raise UserError(f"width {w} of --widths is not a multiple of the template block {config.block}; use "
                            f"multiples of --block {config.block}")
        if heads is not None and w % heads:
            raise UserError(f"--heads {heads} does not divide width {w} of --widths; pass --head-dim instead (heads = "
                            f"width / head dim) or widths that {heads} divides")
        if config.head_dim is not None and w % config.head_dim:
            raise UserError(f"--head-dim {config.head_dim} does not divide width {w} of --widths; pick a head dim "
                            f"that divides every width")


def size_range(config: DistillConfig, data: PreparedData, teacher_spec: ViTSpec | None) -> SizeRange:
    """The reference size and the range of a job. Without ``depths/widths/space``: ``aux_spec`` alone.

    With a range the reference defaults to its largest size (max depth, max width, max MLP ratio; heads =
    width / head dim), so every size is a sub-model of it; explicit ``aux`` keys (``--depth/--width/--heads``)
    still set it. Every size shares the reference's patch and the data's image size, channels and classes."""
    check_range_flags(config)
    if not config.has_range:
        return SizeRange(aux_spec(config, data, teacher_spec), [])
    base = ({k: getattr(teacher_spec, k) for k in DEFAULT_AUX} if teacher_spec else dict(DEFAULT_AUX))
    given = {k: v for k, v in config.aux.items() if v is not None}
    if config.space is not None:
        points, dropped, patch = _space_sizes(config, data, given.get("patch"), base["patch"])
        source = f"space {config.space}"
        at_max = [p["width"] // p["heads"] for p in points if p["width"] == max(q["width"] for q in points)]
        head_dim = max(set(at_max), key=lambda d: (at_max.count(d), d))  # the most common; ties: fewer heads
    else:
        head_dim = config.head_dim or base["width"] // base["heads"]
        patch, dropped, source = given.get("patch", base["patch"]), {}, "--depths/--widths"
        mlp = given.get("mlp_ratio", base["mlp_ratio"])
        points = []
        for d in config.depths or [given.get("depth", base["depth"])]:
            for w in config.widths or [given.get("width", base["width"])]:
                if "heads" not in given and w % head_dim:
                    raise UserError(f"width {w} is not a multiple of the head dim {head_dim} (the teacher's, else "
                                    f"the default's); pass --head-dim or --heads")
                points.append({"depth": d, "width": w, "heads": given.get("heads", w // max(head_dim, 1)),
                               "mlp_ratio": mlp})
    width = given.get("width", max(p["width"] for p in points))
    if "heads" not in given and width % head_dim:
        raise UserError(f"the reference width {width} is not a multiple of the head dim {head_dim}; pass --heads")
    ref_size = {"depth": given.get("depth", max(p["depth"] for p in points)), "width": width,
                "heads": given.get("heads", width // head_dim),
                "mlp_ratio": given.get("mlp_ratio", max(p["mlp_ratio"] for p in points)), "patch": patch}
    ref = aux_spec(replace(config, aux=ref_size), data, None)
    sizes = []
    for p in points:
        try:
            spec = replace(ref, **p)
            VIT.size_maps(ref, spec, config.block, config.width_rule, config.depth_rule)
        except ValueError as e:
            raise UserError(f"size {p['depth']}x{p['width']}x{p['heads']} of the range: {e}") from e
        if spec not in sizes:
            sizes.append(spec)
    return SizeRange(ref, sorted(sizes, key=lambda s: s.num_params()), source, dropped)


def _space_sizes(config: DistillConfig, data: PreparedData, patch: int | None,
                 default_patch: int) -> tuple[list[dict], dict, int]:
    """The sizes of a search space this bank can serve: each combination the sweep would keep for the data's
    shape and this bank's block (``pipelines.spaces.check_size``), the drops counted by reason."""
    from collections import Counter

    from pipelines.spaces import TaskShape, check_size, load_space, size_points

    space = load_space(config.space)
    patches = sorted({t.patch for t in space.tasks})
    if patch is None:
        if len(patches) > 1:
            raise UserError(f"{config.space}: its tasks use patches {patches}; pass --patch for this bank")
        patch = patches[0] if patches else default_patch
    c, h, _ = data.input_shape
    shape = TaskShape(int(c), int(h), data.num_classes)
    kept, dropped = [], Counter()
    for p in size_points(space):
        try:
            reason = check_size(p, shape, patch, space.constraints, config.block)
        except ValueError as e:
            raise UserError(f"{config.space}: size {p}: {e}") from e
        if reason:
            dropped[reason] += 1
        else:
            kept.append(p)
    if not kept:
        raise UserError(f"{config.space}: no size of the space can be trained by a block-{config.block} bank on "
                        f"this data ({_describe_drops(dropped)})")
    return kept, dict(dropped), patch


# --------------------------------------------------------------------------------------------- teacher


@dataclass
class Teacher:
    model: nn.Module
    timm_name: str
    kwargs: dict
    info: dict
    spec: ViTSpec | None = None


def load_teacher(teacher: str, checkpoint: str | None = None, kwargs: dict | None = None) -> Teacher:
    """A weit model file (``weit ancestry``), or a timm model name + the user's safetensors checkpoint."""
    kwargs = dict(kwargs or {})
    path = Path(teacher)
    if path.suffix == ".safetensors" or path.is_file():
        if not path.is_file():
            raise UserError(f"teacher file {path} not found; train one with `weit ancestry --out {path}`")
        try:
            header = read_header(path)
        except WeitFileError as e:
            if "without a weit header" in str(e):
                raise UserError(f"{path} is a plain safetensors checkpoint; pass its timm model name as "
                                f"--teacher and the file as --teacher-checkpoint") from e
            raise UserError(str(e)) from e
        if header.get("format") != "weit-model":
            raise UserError(f"{path} is a {header.get('format')!r} file, not a model; pass an ancestry model")
        try:
            model, header = load_model(path)
        except WeitFileError as e:
            raise UserError(str(e)) from e
        spec = ViTSpec.from_dict(header["spec"])
        info = {"kind": "weit-model", "path": str(path.resolve()), "timm_model": header.get("timm_model"),
                "spec": spec.to_dict(), "ancestry": header.get("info", {})}
        return Teacher(model, header.get("timm_model", TIMM_MODEL), spec.timm_kwargs(), info, spec)
    if not timm.is_model(teacher):
        close = timm.list_models(f"*{teacher}*")[:5]
        raise UserError(f"--teacher {teacher!r} is neither a file nor a timm model name"
                        + (f" (did you mean {', '.join(close)}?)" if close else ""))
    if not checkpoint:
        raise UserError(f"--teacher {teacher} needs --teacher-checkpoint (a safetensors state_dict); "
                        f"no pretrained weights are downloaded")
    try:
        model = timm.create_model(teacher, pretrained=False, **kwargs)
    except TypeError as e:
        raise UserError(f"timm.create_model({teacher!r}, **{kwargs}) failed ({e}); fix --teacher-kwargs") from e
    try:
        load_timm_checkpoint(model, checkpoint)
    except WeitFileError as e:
        raise UserError(str(e)) from e
    info = {"kind": "timm", "timm_model": teacher, "kwargs": kwargs, "checkpoint": str(Path(checkpoint).resolve())}
    return Teacher(model.eval(), teacher, kwargs, info)


def _check_teacher(teacher: Teacher, data: PreparedData) -> None:
    """One forward on a dummy batch of the data's shape: the teacher must output one logit per class."""
    try:
        with torch.no_grad():
            out = teacher.model(torch.zeros(2, *data.input_shape))
    except Exception as e:  # shape mismatches surface as RuntimeError/ValueError/AssertionError in timm
        raise UserError(f"teacher cannot read inputs of shape {data.input_shape} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:160]}); build it for this data (--teacher-kwargs)") from e
    if tuple(out.shape) != (2, data.num_classes):
        raise UserError(f"teacher outputs {tuple(out.shape[1:])} per example but the data has "
                        f"{data.num_classes} classes")


def _rebuild_teacher(src: dict, device: torch.device) -> nn.Module:
    model = timm.create_model(src["timm_name"], pretrained=False, **src["kwargs"])
    model.load_state_dict(src["state"], strict=True)
    return model.to(device).eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------- worker side


def build_model(cfg: dict) -> nn.Module:
    """The model a worker trains. ``elastic``: the aux model (``ElasticModel``: templates + the reference's
    scalers and free tensors, seeded by ``cfg["seed"]``), wrapped in a ``Sandwich`` over ``cfg["sizes"]``
    when a range is given; ``plain``: an ordinary timm ViT (the ancestry)."""
    spec = ViTSpec.from_dict(cfg["spec"])
    if cfg["kind"] == "plain":
        return create_vit(spec)
    elastic = build_elastic(VIT, spec, n=cfg["n_templates"], block=cfg["block"], order=cfg["order"],
                            width_rule=cfg.get("width_rule", "nested"), depth_rule=cfg.get("depth_rule", "nested"),
                            seed=cfg.get("seed", 0))
    # Every DDP rank must run the same sizes at every step: Sandwich draws them from its own random.Random(seed),
    # the same seed on every rank, one draw per training forward (and every rank takes the same number of
    # steps); train_worker reseeds it from (seed, epoch) at each epoch start, so a resumed epoch draws the
    # sizes the lost one drew.
    return range_model(elastic, [ViTSpec.from_dict(d) for d in cfg.get("sizes") or []], cfg.get("n_random", 1),
                       seed=cfg.get("seed", 0))


def reseed_draws(model: nn.Module, seed: int, epoch: int) -> None:
    """Restart a Sandwich's size draws from ``(seed, epoch)``: every rank then draws the same sizes at every
    step of the epoch, and a resumed epoch draws what the lost one drew (the draws are not checkpointed)."""
    if isinstance(model, Sandwich):
        model.reseed(seed * 100_003 + epoch)


def aux_of(model: nn.Module) -> ElasticModel:
    """The ``ElasticModel`` inside what ``build_model`` made (itself, or a Sandwich's)."""
    return model.elastic if isinstance(model, Sandwich) else model


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def save_train_state(d: Path, cfg: dict, model: nn.Module, optimizer: torch.optim.Optimizer,
                     scheduler: torch.optim.lr_scheduler.LRScheduler, state: dict) -> None:
    """One epoch's checkpoint directory: weights as safetensors (the aux model whole: templates, reference
    scalers, every free tensor including the aux head), optimizer/scheduler state, progress."""
    if cfg["kind"] == "plain":
        save_model(d / "model.safetensors", model, ViTSpec.from_dict(cfg["spec"]), {"epoch": state["epoch"]})
    else:
        save_file(_tensors(aux_of(model)), str(d / "elastic.safetensors"))
    # Our own file, read back only by us with weights_only=True: plain tensors and numbers, no pickled code.
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, d / "optimizer.pt")
    (d / "state.json").write_text(json.dumps(state, indent=1))


def load_train_state(d: Path, cfg: dict, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                     scheduler: torch.optim.lr_scheduler.LRScheduler | None = None) -> dict:
    """Inverse of ``save_train_state``; weights are copied into ``model`` in place (any device)."""
    device = next(model.parameters()).device
    if cfg["kind"] == "plain":
        model.load_state_dict(load_file(str(d / "model.safetensors"), device=str(device)), strict=True)
    else:
        aux_of(model).load_state_dict(load_file(str(d / "elastic.safetensors"), device=str(device)), strict=True)
    if optimizer is not None:
        saved = torch.load(d / "optimizer.pt", map_location=device, weights_only=True)
        optimizer.load_state_dict(saved["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(saved["scheduler"])
    return json.loads((d / "state.json").read_text())


def _crash_after(batches: Iterator, steps: int, marker: Path) -> Iterator:
    """Fault-injection hook for tests: SIGKILL this worker process after ``steps`` batches, once.

    It waits two health-check intervals first: Ray Train V2's controller collects ``report()``s by polling
    the workers (``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, 2 s), so a worker lost within one poll of a report
    can take that epoch's checkpoint with it (the restart then redoes one more epoch; never wrong, but not
    the case this hook is meant to show)."""
    for i, b in enumerate(batches):
        if i == steps and not marker.exists():
            time.sleep(2 * float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", 2.0)) + 1)
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(f"killed pid {os.getpid()}\n")
            os.kill(os.getpid(), signal.SIGKILL)
        yield b


@torch.no_grad()
def _predict(model: nn.Module, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    return torch.cat([model(x[i:i + EVAL_BATCH].to(device)).argmax(-1).cpu() for i in range(0, len(x), EVAL_BATCH)])


def _all_reduce(values: list[float], device: torch.device) -> list[float]:
    """Sums over workers (the metrics are sums, so uneven shards still average exactly)."""
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def _eval_models(cfg: dict, model: nn.Module) -> dict[str, nn.Module]:
    """What a worker evaluates each epoch: the model itself (``plain``), else each watched size of the aux
    model by label (smallest, reference, largest)."""
    if cfg["kind"] == "plain":
        return {"": model}
    aux = aux_of(model)
    return {s.label: AtSize(aux, s) for s in map(ViTSpec.from_dict, cfg.get("watch") or [cfg["spec"]])}


def train_worker(cfg: dict) -> None:
    """Per-worker body: build, maybe resume, then epochs of ``distill_epoch`` + evaluation + checkpoint."""
    import ray.train.torch

    from weit_core.data import batch_to_tensors

    t_setup = time.perf_counter()
    torch.set_num_threads(cfg["threads"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    seed_everything(cfg["seed"])
    model = build_model(cfg)
    ddp = ray.train.torch.prepare_model(model)  # moves to the device; DDP when world > 1
    optimizer = make_optimizer(ddp, cfg["lr"], cfg["weight_decay"])
    scheduler = warmup_cosine(optimizer, cfg["total_steps"], cfg["warmup_steps"])
    state = {"epoch": 0, "global_step": 0, "history": [], "starts": []}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = load_train_state(Path(d), cfg, model, optimizer, scheduler)
    state["starts"].append(state["epoch"] + 1)
    if state["epoch"] >= cfg["epochs"]:
        return  # a finished job run again: nothing to redo
    teacher = _rebuild_teacher(ray.get(cfg["teacher"][0]), device) if cfg["teacher"] else None
    evals = _eval_models(cfg, model)
    ref_label = "" if cfg["kind"] == "plain" else ViTSpec.from_dict(cfg["spec"]).label
    ref_eval = evals[ref_label]
    per_size = cfg.get("sizes") is not None and cfg["kind"] != "plain"
    copies = cfg.get("draws_per_step", 1)  # a Sandwich stacks this many sizes' outputs per batch

    # The test split goes whole to every worker (not split); each evaluates its own slice rank::world and
    # the sums are all-reduced, so the accuracy is over every test example exactly once.
    xs, ys = zip(*(batch_to_tensors(b) for b in ray.train.get_dataset_shard("test").iter_batches(
        batch_size=4096, batch_format="numpy")), strict=True)
    tx, ty = torch.cat(xs)[rank::world], torch.cat(ys)[rank::world]
    t_labels = _predict(teacher, tx, device) if teacher is not None else None
    teacher_correct = float((t_labels == ty).sum()) if teacher is not None else 0.0
    train_shard = ray.train.get_dataset_shard("train")

    for epoch in range(state["epoch"] + 1, cfg["epochs"] + 1):
        t0 = time.perf_counter()
        reseed_draws(model, cfg["seed"], epoch)
        # Data order is a function of (seed, epoch) only: blocks arrive in a fixed order (preserve_order)
        # and the local shuffle is seeded, so a resumed epoch sees the batches the lost one saw.
        raw = train_shard.iter_batches(batch_size=cfg["batch_size"], batch_format="numpy", prefetch_batches=2,
                                       local_shuffle_buffer_size=cfg["shuffle_buffer"],
                                       local_shuffle_seed=cfg["seed"] * 100_003 + epoch)
        batches = (batch_to_tensors(b) for b in raw)
        if cfg.get("fail_at_epoch") == epoch and rank == world - 1:
            batches = _crash_after(batches, 2, Path(cfg["fail_marker"]))
        st = distill_epoch(ddp, batches, optimizer, teacher=teacher, tau=cfg["tau"], device=device,
                           scheduler=scheduler)
        t_train = time.perf_counter() - t0
        t1 = time.perf_counter()
        accs = [evaluate(m, iterate_batches(tx, ty, EVAL_BATCH, shuffle=False), device=device)["acc"]
                for m in evals.values()]
        ag = (evaluate(ref_eval, iterate_batches(tx, t_labels, EVAL_BATCH, shuffle=False), device=device)
              if teacher is not None else {"acc": 0.0})
        n, m = st["examples"], len(ty)
        s = _all_reduce([st["loss"] * n, st["acc"] * n, st.get("agreement", 0.0) * n, n, st["steps"],
                         ag["acc"] * m, teacher_correct, m, *(a * m for a in accs)], device)
        sized = {label: v / s[7] for label, v in zip(evals, s[8:], strict=True)}
        state["epoch"], state["global_step"] = epoch, state["global_step"] + st["steps"]
        metrics = {"epoch": epoch, "loss": s[0] / s[3], "train_acc": s[1] / s[3],
                   "test_acc": sized[ref_label],
                   "lr": optimizer.param_groups[0]["lr"], "steps": state["global_step"],
                   "train_s": t_train, "eval_s": time.perf_counter() - t1, "epoch_s": time.perf_counter() - t0,
                   "examples": int(s[3]) // copies}
        if per_size:
            metrics.update({f"test_acc/{label}": v for label, v in sized.items()})
        if epoch == state["starts"][-1]:
            metrics["setup_s"] = t0 - t_setup  # worker start to first step: build, resume, teacher, test data
        if teacher is not None:
            metrics.update(train_agreement=s[2] / s[3], test_agreement=s[5] / s[7], teacher_test_acc=s[6] / s[7])
        state["history"].append(metrics)
        if rank == 0:
            with tempfile.TemporaryDirectory(prefix="weit-ckpt-") as d:
                save_train_state(Path(d), cfg, model, optimizer, scheduler, state)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                                 checkpoint_dir_name=f"epoch_{epoch:04d}")
        else:
            ray.train.report(metrics)


# ---------------------------------------------------------------------------------------- driver side


class _ReportQueue(ray.train.UserCallback):
    """Runs in the Ray Train controller: forwards rank 0's per-epoch metrics to the driver's queue."""

    def __init__(self, q) -> None:
        self.q = q

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        if metrics and metrics[0]:
            self.q.put(dict(metrics[0]))


def _print_epoch(stage: str, epochs: int, m: dict) -> None:
    parts = [f"{PREFIX} {stage} epoch {int(m['epoch'])}/{epochs}", f"loss {m['loss']:.4f}",
             f"train_acc {m['train_acc']:.4f}", f"test_acc {m['test_acc']:.4f}"]
    if "test_agreement" in m:
        parts.append(f"agreement {m['test_agreement']:.4f}")
    sized = [f"{k.split('/', 1)[1]} {v:.4f}" for k, v in m.items() if k.startswith("test_acc/")]
    if sized:
        parts.append(f"test_acc by size: {', '.join(sized)}")
    parts.append(f"{m['epoch_s']:.1f}s")
    print("  ".join(parts), flush=True)


@dataclass
class RayRun:
    """What a Ray Train job left behind: the latest checkpoint's directory and what ran this time."""

    checkpoint_dir: Path | None
    state: dict | None
    epochs_now: list[int]
    fit_s: float


def scaling_config(workers: int, cpus_per_worker: float, use_gpu: bool) -> ray.train.ScalingConfig:
    """``workers`` DDP workers of ``cpus_per_worker`` CPUs each; ``use_gpu`` adds one GPU per worker (and
    TorchTrainer then picks NCCL and ``get_device`` a CUDA device)."""
    return ray.train.ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                   resources_per_worker={"CPU": cpus_per_worker})


def run_on_ray(cfg: dict, datasets: dict, *, name: str, storage: str, workers: int, cpus_per_worker: float,
               use_gpu: bool, max_failures: int, on_epoch: Callable[[dict], None]) -> RayRun:
    """Run ``train_worker`` under a ``TorchTrainer``; ``on_epoch`` sees rank 0's metrics as they come."""
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
    _quiet_ray_data()
    trainer = TorchTrainer(train_worker, train_loop_config=cfg,
                           scaling_config=scaling_config(workers, cpus_per_worker, use_gpu), run_config=run_config,
                           datasets=datasets, dataset_config=DataConfig(datasets_to_split=["train"],
                                                                        execution_options=ingest,
                                                                        enable_shard_locality=False))
    epochs_now: list[int] = []
    stop = threading.Event()

    def pump() -> None:
        while True:
            try:
                m = q.get(timeout=0.5)
            except queue_lib.Empty:
                if stop.is_set():
                    return
                continue
            epochs_now.append(int(m["epoch"]))
            on_epoch(m)

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
    ckpt_dir, state = None, None
    if result.checkpoint is not None:
        ckpt_dir = Path(result.checkpoint.path)
        state = json.loads((ckpt_dir / "state.json").read_text())
    return RayRun(ckpt_dir, state, epochs_now, fit_s)


def _job_guard(job_dir: Path, settings: dict) -> bool:
    """Refuse to resume a job directory made with different settings; returns True when resuming."""
    f = job_dir / JOB_FILE
    if f.is_file():
        before = json.loads(f.read_text())
        diff = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
        if diff:
            raise UserError(f"{job_dir} holds a job with different settings ({', '.join(diff[:6])}); rerun with "
                            f"the same flags to resume, or pass another --out / --name to start a new job")
        return True
    job_dir.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps(settings, indent=1, sort_keys=True, default=str))
    return False


def worker_config(kind: str, spec: ViTSpec, *, epochs: int, lr: float, weight_decay: float, warmup_epochs: float,
                  batch_size: int, workers: int, train_rows: int, seed: int, threads: int, **extra) -> dict:
    """``train_loop_config`` for ``train_worker``: the global batch is split over workers and the LR
    schedule is laid out over the steps each worker will take (equal shards, so equal step counts)."""
    per_worker = max(1, batch_size // workers)
    rows_per_worker = train_rows // workers
    steps_per_epoch = max(1, math.ceil(rows_per_worker / per_worker))
    return {"kind": kind, "spec": spec.to_dict(), "epochs": epochs, "lr": lr, "weight_decay": weight_decay,
            "batch_size": per_worker, "steps_per_epoch": steps_per_epoch, "total_steps": steps_per_epoch * epochs,
            "warmup_steps": round(steps_per_epoch * warmup_epochs), "seed": seed, "threads": threads,
            "shuffle_buffer": max(1, min(rows_per_worker, SHUFFLE_BUFFER_MAX)), "teacher": None, "tau": 2.0,
            "fail_at_epoch": None, **extra}


def _quiet_ray_data() -> None:
    """Ray Data's per-execution INFO lines and progress bars would drown the epoch lines."""
    import logging

    from ray.data import DataContext

    logging.getLogger("ray.data").setLevel(logging.ERROR)
    DataContext.get_current().enable_progress_bars = False


def ray_datasets(data: PreparedData, materialize: bool | None = None) -> dict:
    """Ray Datasets over the parquet files. Small data (the default: below ``MATERIALIZE_MAX_BYTES`` on
    disk) is materialized once into the object store: re-reading parquet every epoch costs 5-20 s of task
    start-up per epoch here, iterating materialized blocks ~0.2 s. Big data streams from the files."""
    _quiet_ray_data()
    if materialize is None:
        materialize = sum(Path(p).stat().st_size for p in data.paths.values()) <= MATERIALIZE_MAX_BYTES
    out = {}
    for split in ("train", "test"):
        ds = ray.data.read_parquet(data.paths[split])
        out[split] = ds.materialize() if materialize else ds
    return out


def _threads(cpus_per_worker: float, threads: int | None) -> int:
    return threads or max(1, math.floor(cpus_per_worker + 0.5))


def range_config(config: DistillConfig, plan: SizeRange) -> dict:
    """The ``train_loop_config`` keys of a size range (``build_model``'s Sandwich, the watched sizes)."""
    return {"sizes": [s.to_dict() for s in plan.sizes] if plan.sizes else None, "n_random": config.n_random,
            "width_rule": config.width_rule, "depth_rule": config.depth_rule,
            "watch": [s.to_dict() for s in plan.watch], "draws_per_step": plan.draws_per_step(config.n_random)}


def _describe_drops(dropped: dict) -> str:
    from pipelines.spaces import DROP_REASONS

    return ", ".join(f"{n} {DROP_REASONS.get(r, r)}" for r, n in sorted(dropped.items(), key=lambda kv: -kv[1]))


def run_distill(config: DistillConfig) -> tuple[Path, dict]:
    """Stage 1 end to end; returns (bank path, metrics of the final epoch + job facts)."""
    if config.epochs < 1 or config.workers < 1 or config.batch_size < config.workers:
        raise UserError("need --epochs >= 1, --workers >= 1 and --batch-size >= --workers")
    check_range_flags(config)  # before the data is read or Ray started
    out = Path(config.out).resolve()
    name = config.name or job_name(out)
    storage = storage_path(config.storage)
    job_dir = Path(storage) / name if "://" not in storage else Path(tempfile.gettempdir()) / name
    teacher = None if _no_teacher(config.teacher) else load_teacher(
        config.teacher, config.teacher_checkpoint, config.teacher_kwargs)
    data = prepare_data(config.dataset, job_dir / "data", config.limit, config.seed)
    plan = size_range(config, data, teacher.spec if teacher else None)
    spec = plan.ref
    if teacher is not None:
        _check_teacher(teacher, data)
    kinds = vit_kinds(spec, config.n_templates, config.block)
    settings = {k: v for k, v in asdict(config).items()
                if k not in ("out", "storage", "name", "address", "mlflow_uri", "quiet", "fail_at_epoch")}
    settings["aux_spec"] = spec.to_dict()
    settings["size_range"] = [s.label for s in plan.sizes] or None
    resumed = _job_guard(job_dir, json.loads(json.dumps(settings, default=str)))

    init_ray(config.address)
    # only a local Ray is known to be all there is; a cluster (--address, or $RAY_ADDRESS inside a Ray job)
    # may autoscale GPU workers in after the job starts
    local = not (config.address or os.environ.get("RAY_ADDRESS"))
    if config.use_gpu and local and ray.cluster_resources().get("GPU", 0) < config.workers:
        raise UserError(f"--use-gpu needs {config.workers} GPU(s) but this machine's Ray sees "
                        f"{ray.cluster_resources().get('GPU', 0):g}; drop --use-gpu or pass --address of a GPU cluster")
    teacher_ref = None
    if teacher is not None:  # through the object store: workers on other nodes need no access to the file
        teacher_ref = [ray.put({"timm_name": teacher.timm_name, "kwargs": teacher.kwargs,
                                "state": {k: v.detach().cpu() for k, v in teacher.model.state_dict().items()}})]
    cfg = worker_config(
        "elastic", spec, epochs=config.epochs, lr=config.lr, weight_decay=config.weight_decay,
        warmup_epochs=config.warmup_epochs, batch_size=config.batch_size, workers=config.workers,
        train_rows=data.train_rows, seed=config.seed, threads=_threads(config.cpus_per_worker, config.threads),
        n_templates=config.n_templates, block=config.block, order=config.order, teacher=teacher_ref, tau=config.tau,
        fail_at_epoch=config.fail_at_epoch, fail_marker=str(job_dir / f"fail_at_epoch_{config.fail_at_epoch}"),
        **range_config(config, plan))
    steps_per_epoch, per_worker = cfg["steps_per_epoch"], cfg["batch_size"]
    datasets = ray_datasets(data)
    template_numbers = sum(math.prod(k.template_shape) for k in kinds.values())
    scaler_numbers = Scalers(vit_layout(spec), kinds).num_numbers()
    params = {**{k: v for k, v in settings.items() if k not in ("aux", "aux_spec", "teacher_kwargs")},
              **{f"aux.{k}": v for k, v in spec.to_dict().items()}, "teacher_kwargs": json.dumps(config.teacher_kwargs),
              "mode": config.mode, "job": name, "out": str(out), "storage": storage, "git": git_revision(),
              "template_numbers": template_numbers, "aux_scalers": scaler_numbers,
              "steps_per_epoch": steps_per_epoch, "per_worker_batch": per_worker, "free_params": "timm_init+trained",
              "size_range": " ".join(s.label for s in plan.sizes) or "reference", "range_source": plan.source,
              "draws_per_step": cfg["draws_per_step"]}
    tags = {"weit.stage": "distill", "weit.mode": config.mode, "weit.task": data.info["name"],
            "weit.task_type": "classification"}
    tracker = Tracker(config.mlflow_uri, config.experiment, name, params, tags)
    if not config.quiet:
        print(f"{PREFIX} distill {name}: mode {config.mode}, aux {spec.depth}x{spec.width} from "
              f"{template_numbers:,} template + {scaler_numbers:,} scaler numbers, {data.info['train']:,} train "
              f"examples, {config.workers} worker(s) x {config.cpus_per_worker} CPU"
              f"{', GPU' if config.use_gpu else ''}{', resuming' if resumed else ''}", flush=True)
        if plan.sizes:
            print(f"{PREFIX} size range ({plan.source}): {len(plan.sizes)} size(s) {plan.sizes[0].label} .. "
                  f"{plan.sizes[-1].label}, reference {spec.label}, rule {config.width_rule}/"
                  f"{config.depth_rule}, {cfg['draws_per_step']} size(s) per step"
                  + (f"; dropped {sum(plan.dropped.values())} space size(s): {_describe_drops(plan.dropped)}"
                     if plan.dropped else ""), flush=True)

    def on_epoch(m: dict) -> None:
        tracker.log_epoch(m)
        if not config.quiet:
            _print_epoch("distill", config.epochs, m)

    try:
        run = run_on_ray(cfg, datasets, name=name, storage=storage, workers=config.workers,
                         cpus_per_worker=config.cpus_per_worker, use_gpu=config.use_gpu,
                         max_failures=config.max_failures, on_epoch=on_epoch)
        if run.state is None or run.checkpoint_dir is None:
            raise RuntimeError(f"Ray Train job {name} ended without a checkpoint")
        for m in run.state["history"]:  # epochs whose report the driver missed (e.g. a driver restart)
            tracker.log_epoch(m)
        final = dict(run.state["history"][-1])
        model = build_model(cfg)
        load_train_state(run.checkpoint_dir, cfg, model)
        header = {
            "mode": config.mode, "N": config.n_templates, "a": config.block, "b": config.block,
            "source_model": teacher.info if teacher else None, "data": data.info,
            "epochs": run.state["epoch"], "metrics": final, "aux_spec": spec.to_dict(), "job": name,
            "seed": config.seed, "tau": config.tau if teacher else None, "lr": config.lr,
            "batch_size": config.batch_size, "workers": config.workers, "attempt_starts": run.state["starts"],
            "git": git_revision(), "mlflow_run_id": tracker.run_id, "n_random": config.n_random if plan.sandwich else None,
            "draws_per_step": cfg["draws_per_step"], "range_source": plan.source,
            "space_dropped": plan.dropped or None,
        }
        # templates, aux scalers, free tensors (not the aux head), the resize rule, the size range, aux_spec
        save_elastic(out, aux_of(model), header, plan.sizes or None)
        header_json = out.with_suffix(".json")
        header_json.write_text(json.dumps(load_bank(out).header, indent=1, default=str))
        metrics = {**final, "fit_s": run.fit_s, "epochs_now": len(run.epochs_now),
                   "resumed_from_epoch": run.state["starts"][-1] - 1 if run.epochs_now else run.state["epoch"]}
        tracker.finish({"final_test_acc": final["test_acc"], "fit_s": run.fit_s,
                        **({"final_test_agreement": final["test_agreement"]} if teacher else {})},
                       [out, header_json])
    except BaseException:
        tracker.finish({}, [], status="FAILED")
        raise
    if not config.quiet:
        agree = f", agreement {final['test_agreement']:.4f}" if teacher else ""
        print(f"{PREFIX} bank written to {out} (test_acc {final['test_acc']:.4f}{agree}; {run.fit_s:.0f}s in fit, "
              f"{len(run.epochs_now)} epoch(s) trained now"
              + (f"; {len(plan.sizes)} sizes, rule {config.width_rule}/{config.depth_rule}" if plan.sizes else "")
              + ")", flush=True)
    return out, {**metrics, "run_id": tracker.run_id, "job": name, "checkpoint": str(run.checkpoint_dir),
                 "aux_spec": spec.to_dict()}


# ------------------------------------------------------------------------------------------------ CLI


def _parse_kwargs(text: str | None) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"--teacher-kwargs is not JSON ({e}); e.g. '{{\"num_classes\": 10}}'") from e
    if not isinstance(value, dict):
        raise UserError("--teacher-kwargs must be a JSON object, e.g. '{\"num_classes\": 10}'")
    return value


def parse_sizes(text: str | None, flag: str) -> list[int] | None:
    """``"2,4,6"`` -> ``[2, 4, 6]`` (None stays None; an empty list is refused by ``check_range_flags``)."""
    if text is None:
        return None
    try:
        return [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError as e:
        raise UserError(f"{flag} {text!r}: expected whole numbers separated by commas, e.g. 2,4,6") from e


def distill_command(
    teacher: Annotated[str, typer.Option(help="Ancestry: a weit model file, a timm model name (with "
                                              "--teacher-checkpoint), or 'none' for WeiT pre-training.")] = "none",
    teacher_checkpoint: Annotated[str | None, typer.Option(help="Safetensors state_dict for a timm --teacher.")] = None,
    teacher_kwargs: Annotated[str | None, typer.Option(help="JSON kwargs for timm.create_model(--teacher).")] = None,
    dataset: Annotated[str, typer.Option(help="fashion_mnist, digits, or a parquet path.")] = "fashion_mnist",
    limit: Annotated[int | None, typer.Option(help="At most this many examples per split (smoke runs).")] = None,
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
    width_rule: Annotated[str, typer.Option(help="How a size's channels come from the reference's: nested | "
                                                 "spread | interp.")] = "nested",
    depth_rule: Annotated[str, typer.Option(help="How a size's layers come from the reference's: nested | "
                                                 "spread | interp.")] = "nested",
    n_templates: Annotated[int, typer.Option(help="Templates per kind (N); 16 measured best of 4, 8, 16.")] = 16,
    block: Annotated[int, typer.Option(help="Template block size a = b.")] = 16,
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 10,
    lr: Annotated[float, typer.Option(help="Peak AdamW learning rate (warm-up then cosine).")] = 1e-3,
    tau: Annotated[float, typer.Option(help="Distillation temperature.")] = 2.0,
    batch_size: Annotated[int, typer.Option(help="Global batch size (split over workers).")] = 128,
    workers: Annotated[int, typer.Option(help="Ray Train workers.")] = 2,
    cpus_per_worker: Annotated[float, typer.Option(help="CPUs per worker (fractional leaves room for Ray "
                                                        "Data).")] = 0.5,
    threads: Annotated[int | None, typer.Option(help="Torch threads per worker (default: round(cpus)).")] = None,
    use_gpu: Annotated[bool, typer.Option("--use-gpu", help="One GPU per worker (NCCL).")] = False,
    max_failures: Annotated[int, typer.Option(help="Worker-group restarts from the last checkpoint.")] = 1,
    out: Annotated[str, typer.Option(help="Bank file to write (safetensors); also names the job for "
                                          "resume.")] = "bank.safetensors",
    storage: Annotated[str | None, typer.Option(help="Ray Train storage (checkpoints); default ./weit_runs.")] = None,
    name: Annotated[str | None, typer.Option(help="Job name (default: derived from --out).")] = None,
    address: Annotated[str | None, typer.Option(
        help="Ray cluster address (default: start a local Ray; 'auto': the head `ray start` runs here).")] = None,
    mlflow_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI.")] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Stage 1: build a template bank by distilling an ancestry (WAVE) or pre-training (WeiT) on Ray Train,
    for one size or a size range (--depths/--widths or --space)."""
    aux = {"depth": depth, "width": width, "heads": heads, "patch": patch, "mlp_ratio": mlp_ratio}
    config = DistillConfig(
        teacher=teacher, teacher_checkpoint=teacher_checkpoint, teacher_kwargs=_parse_kwargs(teacher_kwargs),
        dataset=dataset, limit=limit, aux={k: v for k, v in aux.items() if v is not None},
        depths=parse_sizes(depths, "--depths"), widths=parse_sizes(widths, "--widths"), head_dim=head_dim,
        space=space, n_random=n_random, width_rule=width_rule, depth_rule=depth_rule, n_templates=n_templates,
        block=block, epochs=epochs, lr=lr, tau=tau, batch_size=batch_size, workers=workers,
        cpus_per_worker=cpus_per_worker, threads=threads, use_gpu=use_gpu, max_failures=max_failures, out=out,
        storage=storage, name=name, address=address, mlflow_uri=mlflow_uri, seed=seed,
    )
    run_distill(config)
