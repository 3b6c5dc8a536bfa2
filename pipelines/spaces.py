"""Declarative search spaces (``tune_spaces/*.yaml``): parse, validate, expand into trial configs.

A space is checked completely before anything runs, so a typo costs a second, not a cluster hour: every
key is known, every value has the right type, and size combinations that cannot be built (heads not
dividing width, width off the template block, over the parameter budget, ...) are dropped *here* and
counted by reason, instead of failing as trials. The schema is documented in ``tune_spaces/README.md``.

Nothing here imports Ray or MLflow; the only heavy import (the dataset loaders, for the shape of a task's
images) happens in :func:`inspect_tasks`.
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from pipelines.common import UserError

BUILTIN_DATA = ("fashion_mnist", "digits")
SIZE_AXES = ("depth", "width", "heads", "mlp_ratio")
TOP_KEYS = ("name", "description", "tasks", "strategies", "sizes", "constraints", "training", "samples",
            "sample_seed")
TASK_KEYS = ("name", "data", "patch", "img_size", "val_fraction", "test_fraction", "data_seed", "limit",
             "val_limit", "training")
CONSTRAINT_KEYS = ("width_multiple", "min_head_dim", "max_head_dim", "min_params", "max_params", "max_flops")
TRAINING_DEFAULTS: dict[str, Any] = {
    "epochs": 3, "batch_size": 64, "lr": 1e-3, "weight_decay": 0.05, "steps_per_epoch": None,
    "fit_steps": 100, "fit_examples": 512, "fit_lr": 1e-3, "fit_batch_size": 64, "seeds": [0],
    "init_mode": "", "eval_batch_size": 512, "test_eval": True, "schedule": "cosine", "warmup": 0.1,
}
"""Stage-2 (``fit_*``) and stage-3 settings; a space's ``training`` block and a task's ``training``
block override them in that order. ``lr`` may be a list (a grid: one trial per value, like ``seeds``);
``schedule`` is the stage-3 recipe every strategy gets: ``cosine`` = linear warm-up over ``warmup`` (a
fraction of the trial's stage-3 optimizer steps) then cosine decay, ``constant`` = a fixed ``lr``."""
SCHEDULES = ("cosine", "constant")

DROP_REASONS = {
    "heads_not_dividing_width": "heads do not divide width",
    "mlp_hidden_not_integer": "width x mlp_ratio is not an integer",
    "width_not_multiple": "width is not a multiple of constraints.width_multiple",
    "not_multiple_of_block": "width or MLP hidden size is not a multiple of the bank's template block",
    "head_dim_out_of_range": "width / heads outside [min_head_dim, max_head_dim]",
    "params_below_min": "fewer parameters than constraints.min_params",
    "params_above_max": "more parameters than constraints.max_params",
    "flops_above_max": "more FLOPs than constraints.max_flops",
}
"""Why a size combination was dropped; a combination is counted once, under the first reason it fails
(checked in this order), so the counts add up to the number dropped."""


class SpaceError(UserError, ValueError):
    """A malformed search space: the message names the file and the key."""


# --------------------------------------------------------------------------------------------- model


# what decides which arrays a trial sees: the per-process data cache key
DATA_KEYS = ("data", "val_fraction", "test_fraction", "data_seed", "limit", "val_limit")


@dataclass(frozen=True)
class TaskSpec:
    """One task of a space: data (a built-in name or an absolute parquet path) and its model I/O."""

    name: str
    data: str
    patch: int = 4
    img_size: int | None = None  # None: the data's image size
    val_fraction: float | None = None  # parquet only
    test_fraction: float | None = None  # parquet only
    data_seed: int = 0
    limit: int | None = None  # cap on training examples
    val_limit: int | None = None  # cap on validation examples
    training: dict = field(default_factory=dict)  # resolved settings for this task

    @property
    def is_builtin(self) -> bool:
        return self.data in BUILTIN_DATA

    def data_key(self) -> dict:
        """Everything that decides which arrays a trial sees (the per-process data cache key)."""
        return {k: getattr(self, k) for k in DATA_KEYS}


@dataclass(frozen=True)
class Axis:
    """A size axis: a grid (``values``) or a sampler (``sampler`` = kind, args) drawn in the driver."""

    name: str
    values: tuple = ()
    sampler: tuple[str, tuple, float | None] | None = None

    @property
    def is_grid(self) -> bool:
        return self.sampler is None


@dataclass(frozen=True)
class Constraints:
    width_multiple: int | str | None = "block"
    min_head_dim: int | None = None
    max_head_dim: int | None = None
    min_params: int | None = None
    max_params: int | None = None
    max_flops: int | None = None


@dataclass
class Space:
    """A validated space (nothing expanded yet)."""

    path: Path | None
    name: str
    description: str
    tasks: list[TaskSpec]
    strategies: list[str]
    axes: dict[str, Axis]
    constraints: Constraints
    samples: int | None
    sample_seed: int
    text: str  # the file as written, logged as the parent run's artifact

    def content_hash(self) -> str:
        """Identity of the space's content (a resumed sweep must run the same space)."""
        return hashlib.sha256(self.text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class TaskShape:
    """What the model sizes of a task depend on, read from its data."""

    in_chans: int
    img_size: int
    num_classes: int


@dataclass
class Expansion:
    """The trials of a space, the size combinations dropped (by reason), the (strategy, size) pairs dropped
    because the strategy cannot make that size (by reason, a key of ``CANNOT_MAKE``) and what was looked at."""

    trials: list[dict]
    dropped: Counter
    sizes_total: int  # size combinations looked at, summed over tasks
    sizes_valid: dict[str, int]  # per task
    pairs_dropped: Counter = field(default_factory=Counter)  # (task, strategy, size) triples, by reason

    @property
    def n_dropped(self) -> int:
        return sum(self.dropped.values())

    @property
    def n_pairs_dropped(self) -> int:
        return sum(self.pairs_dropped.values())

    def describe_drops(self) -> str:
        if not self.dropped:
            text = "no size combination dropped"
        else:
            parts = ", ".join(f"{n} {DROP_REASONS[r]}" for r, n in self.dropped.most_common())
            text = f"dropped {self.n_dropped} of {self.sizes_total} size combinations: {parts}"
        if self.pairs_dropped:
            from weit_core.strategies import CANNOT_MAKE

            parts = ", ".join(f"{n} {r} ({CANNOT_MAKE[r]})" for r, n in self.pairs_dropped.most_common())
            text += f"; dropped {self.n_pairs_dropped} (strategy, size) pairs a strategy cannot make: {parts}"
        return text


# --------------------------------------------------------------------------------------------- parsing


class _Ctx:
    """Where we are in the file, so every message names the file and the key."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, problem: str) -> SpaceError:
        return SpaceError(f"{self.source}: {key}: {problem}")

    def mapping(self, value: Any, key: str) -> dict:
        if not isinstance(value, dict):
            raise self.fail(key, f"expected a mapping (key: value lines), got {_show(value)}")
        return value

    def known(self, d: dict, known: tuple[str, ...], where: str) -> None:
        for k in d:
            if k not in known:
                close = difflib.get_close_matches(str(k), known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise SpaceError(f"{self.source}: unknown key {k!r} in {where}{hint} (known keys: "
                                 f"{', '.join(known)})")

    def integer(self, value: Any, key: str, minimum: int | None = 1, allow_none: bool = False) -> int | None:
        if value is None and allow_none:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, f"expected an integer, got {_show(value)}")
        if minimum is not None and value < minimum:
            raise self.fail(key, f"must be >= {minimum}, got {value}")
        return value

    def number(self, value: Any, key: str, positive: bool = True) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(key, f"expected a number, got {_show(value)}")
        if positive and not value > 0:
            raise self.fail(key, f"must be > 0, got {value}")
        return float(value)


def _show(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def load_space(path: str | Path) -> Space:
    """Read and validate a space file; every problem is a :class:`SpaceError` naming the key."""
    path = Path(path)
    if not path.is_file():
        shipped = sorted(p.name for p in (Path(__file__).resolve().parent.parent / "tune_spaces").glob("*.yaml"))
        raise SpaceError(f"search space {path} not found; pass a YAML file (shipped: tune_spaces/"
                         f"{{{','.join(shipped)}}})")
    text = path.read_text()
    return parse_space(text, source=str(path), base_dir=path.resolve().parent, default_name=path.stem)


def parse_space(text: str, source: str = "<space>", base_dir: Path | None = None,
                default_name: str = "sweep") -> Space:
    """Validate a space given as YAML text; relative parquet paths are resolved against ``base_dir``."""
    c = _Ctx(source)
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SpaceError(f"{source}: not valid YAML ({' '.join(str(e).split())})") from e
    raw = c.mapping(raw, "top level")
    c.known(raw, TOP_KEYS, "the top level")
    for required in ("tasks", "strategies", "sizes"):
        if required not in raw:
            raise SpaceError(f"{source}: missing required key {required!r} (a space needs tasks, strategies "
                             f"and sizes)")
    name = raw.get("name", default_name)
    if not isinstance(name, str) or not name.strip() or any(ch in name for ch in "/\\ '\""):
        raise c.fail("name", f"expected a name without spaces, quotes or slashes, got {_show(name)}")
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise c.fail("description", f"expected text, got {_show(description)}")

    training = _parse_training(c, raw.get("training") or {}, "training", dict(TRAINING_DEFAULTS))
    tasks = _parse_tasks(c, raw["tasks"], training, base_dir or Path.cwd())
    strategies = _parse_strategies(c, raw["strategies"])
    sizes = c.mapping(raw["sizes"], "sizes")
    c.known(sizes, SIZE_AXES, "sizes")
    for axis in ("depth", "width", "heads"):
        if axis not in sizes:
            raise SpaceError(f"{source}: sizes: missing required axis {axis!r} (sizes need depth, width, heads; "
                             f"mlp_ratio defaults to 4)")
    axes = {a: _parse_axis(c, a, sizes.get(a, 4.0)) for a in SIZE_AXES}
    has_sampler = any(not ax.is_grid for ax in axes.values())
    samples = raw.get("samples")
    if has_sampler:
        if samples is None:
            raise c.fail("samples", "a size axis is a sampler, so the space needs `samples: N` (how many size "
                                    "points to draw)")
        samples = c.integer(samples, "samples")
    elif samples is not None:
        raise c.fail("samples", "only meaningful when a size axis is a sampler (randint/choice/uniform); remove it")
    sample_seed = c.integer(raw.get("sample_seed", 0), "sample_seed", minimum=0)
    constraints = _parse_constraints(c, raw.get("constraints") or {})
    return Space(None if source.startswith("<") else Path(source), name.strip(), description, tasks, strategies,
                 axes, constraints, samples, sample_seed, text)


def _parse_training(c: _Ctx, raw: Any, where: str, base: dict) -> dict:
    raw = c.mapping(raw, where)
    c.known(raw, tuple(TRAINING_DEFAULTS), where)
    out = dict(base)
    for k, v in raw.items():
        key = f"{where}.{k}"
        if k in ("epochs", "batch_size", "fit_batch_size", "eval_batch_size"):
            out[k] = c.integer(v, key)
        elif k in ("fit_steps", "fit_examples"):
            out[k] = c.integer(v, key, minimum=0)
        elif k == "steps_per_epoch":
            out[k] = c.integer(v, key, allow_none=True)
        elif k == "lr":
            if isinstance(v, list):
                if not v:
                    raise c.fail(key, "empty list; give at least one learning rate")
                lrs = [c.number(x, key) for x in v]
                if len(set(lrs)) != len(lrs):
                    raise c.fail(key, f"repeated learning rates {v}")
                out[k] = lrs
            else:
                out[k] = c.number(v, key)
        elif k == "fit_lr":
            out[k] = c.number(v, key)
        elif k == "schedule":
            if v not in SCHEDULES:
                raise c.fail(key, f"expected one of {', '.join(SCHEDULES)}, got {_show(v)}")
            out[k] = v
        elif k == "warmup":
            out[k] = c.number(v, key, positive=False)
            if not 0 <= out[k] < 1:
                raise c.fail(key, f"a fraction of the stage-3 steps, in [0, 1), got {v}")
        elif k == "weight_decay":
            out[k] = c.number(v, key, positive=False)
            if out[k] < 0:
                raise c.fail(key, f"must be >= 0, got {v}")
        elif k == "seeds":
            seeds = v if isinstance(v, list) else [v]
            if not seeds:
                raise c.fail(key, "empty list; give at least one seed")
            out[k] = [c.integer(s, key, minimum=0) for s in seeds]
            if len(set(out[k])) != len(out[k]):
                raise c.fail(key, f"repeated seeds {out[k]}")
        elif k == "init_mode":
            if v is None:
                v = ""
            if v not in ("", "jax", "moco"):
                raise c.fail(key, f"timm init mode must be '' (timm default), 'jax' or 'moco', got {_show(v)}")
            out[k] = v
        elif k == "test_eval":
            if not isinstance(v, bool):
                raise c.fail(key, f"expected true or false, got {_show(v)}")
            out[k] = v
    if out["fit_steps"] > 0 and out["fit_examples"] == 0:
        raise c.fail(f"{where}.fit_examples", "is 0 but fit_steps > 0; stage 2 needs examples to fit on")
    return out


def _parse_tasks(c: _Ctx, raw: Any, training: dict, base_dir: Path) -> list[TaskSpec]:
    if isinstance(raw, str | dict):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        raise c.fail("tasks", f"expected a non-empty list of tasks, got {_show(raw)}")
    tasks, names = [], set()
    for i, item in enumerate(raw):
        where = f"tasks[{i}]"
        if isinstance(item, str):
            item = {"data": item}
        item = c.mapping(item, where)
        c.known(item, TASK_KEYS, where)
        if "data" not in item:
            raise c.fail(where, f"missing `data` ({' or '.join(BUILTIN_DATA)}, or a parquet file/folder path)")
        data = item["data"]
        if not isinstance(data, str) or not data.strip():
            raise c.fail(f"{where}.data", f"expected a dataset name or a path, got {_show(data)}")
        key = data.strip().lower().replace("-", "_")
        if key in BUILTIN_DATA:
            data = key
        else:
            p = Path(data).expanduser()
            p = p if p.is_absolute() else (base_dir / p)
            if not p.exists():
                raise c.fail(f"{where}.data", f"{data!r} is not a built-in dataset ({', '.join(BUILTIN_DATA)}) and "
                                              f"{p} does not exist; give a parquet file or folder with `image` and "
                                              f"`label` columns")
            data = str(p.resolve())
        name = item.get("name", key if key in BUILTIN_DATA else Path(data).stem)
        if not isinstance(name, str) or not name or any(ch in name for ch in "/\\ '\"@"):
            raise c.fail(f"{where}.name", f"expected a short name without spaces, quotes, slashes or @, got "
                                          f"{_show(name)}")
        if name in names:
            raise c.fail(f"{where}.name", f"task name {name!r} used twice; give each task its own `name`")
        names.add(name)
        fractions = {}
        for k in ("val_fraction", "test_fraction"):
            if k in item:
                if data in BUILTIN_DATA:
                    raise c.fail(f"{where}.{k}", f"applies to parquet data only; {data} has fixed splits")
                v = c.number(item[k], f"{where}.{k}", positive=False)
                if not 0 <= v < 1:
                    raise c.fail(f"{where}.{k}", f"must be in [0, 1), got {v}")
                fractions[k] = v
        tasks.append(TaskSpec(
            name=name, data=data, patch=c.integer(item.get("patch", 4), f"{where}.patch"),
            img_size=c.integer(item.get("img_size"), f"{where}.img_size", allow_none=True),
            data_seed=c.integer(item.get("data_seed", 0), f"{where}.data_seed", minimum=0),
            limit=c.integer(item.get("limit"), f"{where}.limit", allow_none=True),
            val_limit=c.integer(item.get("val_limit"), f"{where}.val_limit", allow_none=True),
            training=_parse_training(c, item.get("training") or {}, f"{where}.training", training),
            **fractions,
        ))
    return tasks


def _parse_strategies(c: _Ctx, raw: Any) -> list[str]:
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        raise c.fail("strategies", f"expected a non-empty list of strategy names, got {_show(raw)}")
    from weit_core.strategies import available

    known = available()
    out = []
    for i, s in enumerate(raw):
        if not isinstance(s, str):
            raise c.fail(f"strategies[{i}]", f"expected a strategy name, got {_show(s)}")
        if s not in known:
            close = difflib.get_close_matches(s, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise c.fail(f"strategies[{i}]", f"unknown strategy {s!r}{hint}; available: {', '.join(known)}")
        if s in out:
            raise c.fail(f"strategies[{i}]", f"{s!r} listed twice")
        out.append(s)
    return out


def _parse_axis(c: _Ctx, name: str, raw: Any) -> Axis:
    key = f"sizes.{name}"
    is_int = name != "mlp_ratio"
    check = (lambda v, k: c.integer(v, k)) if is_int else (lambda v, k: c.number(v, k))
    if isinstance(raw, bool):
        raise c.fail(key, f"expected a list, a number, {{range: ...}} or a sampler, got {_show(raw)}")
    if isinstance(raw, int | float):
        return Axis(name, (check(raw, key),))
    if isinstance(raw, list):
        if not raw:
            raise c.fail(key, "empty grid; list at least one value")
        values = [check(v, f"{key}[{i}]") for i, v in enumerate(raw)]
        return Axis(name, tuple(dict.fromkeys(values)))
    if isinstance(raw, dict):
        kinds = [k for k in raw if k in ("range", "randint", "choice", "uniform")]
        if len(kinds) != 1:
            raise c.fail(key, f"expected exactly one of range / randint / choice / uniform, got keys {sorted(raw)}")
        kind = kinds[0]
        allowed = {"range": ("range",), "randint": ("randint", "step"), "choice": ("choice",),
                   "uniform": ("uniform", "step")}[kind]
        c.known(raw, allowed, key)
        arg = raw[kind]
        if kind == "choice":
            if not isinstance(arg, list) or not arg:
                raise c.fail(f"{key}.choice", f"expected a non-empty list, got {_show(arg)}")
            return Axis(name, sampler=("choice", tuple(check(v, f"{key}.choice") for v in arg), None))
        if not isinstance(arg, list) or len(arg) != (3 if kind == "range" else 2):
            shape = "[start, stop, step]" if kind == "range" else "[low, high]"
            raise c.fail(f"{key}.{kind}", f"expected {shape}, got {_show(arg)}")
        if kind == "range":
            if not is_int:
                raise c.fail(f"{key}.range", "mlp_ratio takes a list or a sampler, not a range")
            start, stop, step = (c.integer(v, f"{key}.range") for v in arg)
            values = tuple(range(start, stop + 1, step))
            if not values:
                raise c.fail(f"{key}.range", f"empty grid: no value from {start} to {stop} step {step}")
            return Axis(name, values)
        if kind == "randint" and not is_int:
            raise c.fail(key, "mlp_ratio takes `uniform`, not `randint`")
        if kind == "uniform" and is_int:
            raise c.fail(key, f"{name} is an integer axis; use `randint`, not `uniform`")
        low, high = (check(v, f"{key}.{kind}") for v in arg)
        if low > high:
            raise c.fail(f"{key}.{kind}", f"low {low} > high {high}")
        step = raw.get("step")
        if step is not None:
            step = check(step, f"{key}.step")
        return Axis(name, sampler=(kind, (low, high), step))
    raise c.fail(key, f"expected a list, a number, {{range: ...}} or a sampler, got {_show(raw)}")


def _parse_constraints(c: _Ctx, raw: Any) -> Constraints:
    raw = c.mapping(raw, "constraints")
    c.known(raw, CONSTRAINT_KEYS, "constraints")
    wm = raw.get("width_multiple", "block")
    if wm is not None and wm != "block":
        wm = c.integer(wm, "constraints.width_multiple")
    out = {"width_multiple": wm}
    for k in CONSTRAINT_KEYS[1:]:
        out[k] = c.integer(raw.get(k), f"constraints.{k}", allow_none=True)
    if out["min_params"] and out["max_params"] and out["min_params"] > out["max_params"]:
        raise c.fail("constraints", f"min_params {out['min_params']} > max_params {out['max_params']}")
    return Constraints(**out)


# --------------------------------------------------------------------------------------------- expansion


def inspect_tasks(space: Space) -> dict[str, TaskShape]:
    """Load each task's data once (in the driver) for the image shape and class count; a task whose data
    is missing or whose ``patch`` does not tile its images fails here, before any trial."""
    from weit_core.data import DataNotFoundError

    shapes = {}
    for t in space.tasks:
        try:
            splits = load_task_data(t.data_key())
        except DataNotFoundError as e:
            raise SpaceError(f"{_where(space)}: task {t.name!r}: {e}") from e
        except ValueError as e:
            raise SpaceError(f"{_where(space)}: task {t.name!r}: data {t.data}: {e}") from e
        c, h, w = splits.input_shape
        if h != w:
            raise SpaceError(f"{_where(space)}: task {t.name!r}: images are {h}x{w}; ViT sizes here need square "
                             f"images (resize them when writing the parquet)")
        if t.img_size is not None and t.img_size != h:
            raise SpaceError(f"{_where(space)}: task {t.name!r}: img_size {t.img_size} but the data's images are "
                             f"{h}x{w}; drop img_size or resize the data")
        if h % t.patch:
            raise SpaceError(f"{_where(space)}: task {t.name!r}: patch {t.patch} does not divide the image size {h}; "
                             f"use one of {[p for p in range(1, h + 1) if h % p == 0]}")
        shapes[t.name] = TaskShape(int(c), int(h), int(splits.num_classes))
    return shapes


def _where(space: Space) -> str:
    return str(space.path) if space.path else space.name


def _draw(axis: Axis, rng: np.random.Generator) -> int | float:
    kind, args, step = axis.sampler
    if kind == "choice":
        return args[int(rng.integers(len(args)))]
    low, high = args
    if kind == "randint":
        step = int(step or 1)
        return int(low + step * rng.integers((high - low) // step + 1))
    v = float(rng.uniform(low, high))
    return round(round(v / step) * step, 10) if step else v


def size_points(space: Space) -> list[dict]:
    """Every (depth, width, heads, mlp_ratio) combination before constraints: the grid product, or
    ``samples`` draws of the sampler axes (seeded, drawn here in the driver) crossed with the grid axes;
    duplicates removed, order kept."""
    grid_axes = [a for a in SIZE_AXES if space.axes[a].is_grid]
    sampled = [a for a in SIZE_AXES if not space.axes[a].is_grid]
    grid = [dict(zip(grid_axes, combo, strict=True))
            for combo in itertools.product(*(space.axes[a].values for a in grid_axes))]
    if not sampled:
        points = grid
    else:
        rng = np.random.default_rng(space.sample_seed)
        draws = [{a: _draw(space.axes[a], rng) for a in sampled} for _ in range(space.samples)]
        points = [{**g, **d} for d in draws for g in grid]
    seen, out = set(), []
    for p in points:
        p = {a: (float(p[a]) if a == "mlp_ratio" else int(p[a])) for a in SIZE_AXES}
        key = tuple(p[a] for a in SIZE_AXES)
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def check_size(size: dict, shape: TaskShape, patch: int, cons: Constraints, block: int | None) -> str | None:
    """The first constraint ``size`` violates (a key of DROP_REASONS), or None when it can be built."""
    from weit_core.models import VIT, ViTSpec

    d, w, h, r = size["depth"], size["width"], size["heads"], size["mlp_ratio"]
    reason = VIT.check_size(size, None)  # what the family cannot build at all, then the space's own multiple,
    if reason:  # then what the bank's blocks cannot tile: the order DROP_REASONS counts them in
        return reason
    if isinstance(cons.width_multiple, int) and w % cons.width_multiple:
        return "width_not_multiple"
    if block and (reason := VIT.check_size(size, block)):
        return reason
    hd = w // h
    if (cons.min_head_dim and hd < cons.min_head_dim) or (cons.max_head_dim and hd > cons.max_head_dim):
        return "head_dim_out_of_range"
    spec = ViTSpec(depth=d, width=w, heads=h, mlp_ratio=r, patch=patch, img_size=shape.img_size,
                   in_chans=shape.in_chans, num_classes=shape.num_classes)
    n = spec.num_params()
    if cons.min_params and n < cons.min_params:
        return "params_below_min"
    if cons.max_params and n > cons.max_params:
        return "params_above_max"
    if cons.max_flops and spec.flops() > cons.max_flops:
        return "flops_above_max"
    return None


def trial_key(config: dict) -> str:
    """Deterministic identity of a trial (its whole config, canonical JSON): the MLflow child run of a
    trial is found again by it, so a resumed sweep never logs a trial twice."""
    body = {k: v for k, v in config.items() if k != "key"}
    return hashlib.sha1(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:16]


def learning_rates(training: dict) -> list[float]:
    """The stage-3 learning rates of a resolved training block (``lr`` is a number or a grid)."""
    lr = training["lr"]
    return list(lr) if isinstance(lr, list | tuple) else [lr]


def expand(space: Space, shapes: dict[str, TaskShape], bank_block: int | None = None,
           ancestry_spec: Any = None) -> Expansion:
    """All trials: per task, every valid size x seed x lr x strategy (strategy innermost, so a truncated
    list still compares strategies on the same sizes). ``bank_block`` is the bank's template block when a
    strategy of the space uses the bank; ``width_multiple: block`` then means that block. A (strategy,
    size) pair the strategy cannot make (``can_make``, against ``ancestry_spec``, the ancestry's ViTSpec) is
    dropped and counted by reason, never a trial; without ``ancestry_spec`` the strategies that need an
    ancestry are not judged (nothing to judge them by: a sweep refuses them without ``--ancestry`` first)."""
    from weit_core.strategies import can_make, strategy_info

    judged = [s for s in space.strategies if ancestry_spec is not None or "ancestry" not in strategy_info(s).needs]

    cons = space.constraints
    block = bank_block
    if cons.width_multiple == "block" and bank_block is None:
        block = None  # no bank in play: nothing to tile
    points = size_points(space)
    dropped: Counter = Counter()
    pairs_dropped: Counter = Counter()
    trials, valid = [], {}
    for task in space.tasks:
        shape = shapes[task.name]
        tr = task.training
        n_valid = 0
        for size in points:
            reason = check_size(size, shape, task.patch, cons, block)
            if reason:
                dropped[reason] += 1
                continue
            n_valid += 1
            base = {"task": task.name, **task.data_key(), **size, "patch": task.patch, "img_size": shape.img_size,
                    "in_chans": shape.in_chans, "num_classes": shape.num_classes}
            spec = spec_of(base)
            strategies = []
            for strategy in space.strategies:
                cannot = can_make(strategy, spec, ancestry_spec=ancestry_spec) if strategy in judged else None
                if cannot:
                    pairs_dropped[cannot] += 1
                else:
                    strategies.append(strategy)
            for seed in tr["seeds"]:
                for lr in learning_rates(tr):
                    for strategy in strategies:
                        cfg = {**base, "strategy": strategy, "seed": seed,
                               **{k: v for k, v in tr.items() if k != "seeds"}, "lr": lr}
                        cfg["key"] = trial_key(cfg)
                        trials.append(cfg)
        valid[task.name] = n_valid
    return Expansion(trials, dropped, len(points) * len(space.tasks), valid, pairs_dropped)


def spec_of(config: dict):
    """The ViTSpec a trial config describes."""
    from weit_core.models import ViTSpec

    return ViTSpec(depth=config["depth"], width=config["width"], heads=config["heads"],
                   mlp_ratio=config["mlp_ratio"], patch=config["patch"], img_size=config["img_size"],
                   in_chans=config["in_chans"], num_classes=config["num_classes"])


# --------------------------------------------------------------------------------------------- data

_DATA_CACHE: dict[str, Any] = {}


def data_key_of(config: dict) -> dict:
    """The part of a trial config that decides which arrays it sees (``Task.data_key`` of its task)."""
    return {k: config[k] for k in DATA_KEYS}


def data_cache_key(data_key: dict) -> str:
    return json.dumps(data_key, sort_keys=True)


def provide_task_data(data_key: dict, fetch: Callable[[], Any]) -> None:
    """Cache splits this process does not load itself (a Tune worker fetches the driver's copy from Ray's
    object store), once, so a worker needs neither the data files nor the time to parse them."""
    key = data_cache_key(data_key)
    if key not in _DATA_CACHE:
        _DATA_CACHE[key] = fetch()


def load_task_data(data_key: dict):
    """A task's splits, loaded once per process (a Tune worker reused across trials keeps them) and
    capped by ``limit`` / ``val_limit``."""
    from weit_core.data import DatasetSplits, load_dataset

    cache_key = data_cache_key(data_key)
    if cache_key not in _DATA_CACHE:
        kwargs: dict[str, Any] = {"seed": data_key["data_seed"]}
        if data_key["data"] not in BUILTIN_DATA:
            kwargs.update({k: data_key[k] for k in ("val_fraction", "test_fraction") if data_key[k] is not None})
        splits = load_dataset(data_key["data"], **kwargs)
        if data_key["limit"] or data_key["val_limit"]:
            splits = DatasetSplits(
                splits.name, splits.train.subset(data_key["limit"] or len(splits.train), seed=0),
                splits.val.subset(data_key["val_limit"] or len(splits.val), seed=0), splits.test, splits.num_classes)
        _DATA_CACHE[cache_key] = splits
    return _DATA_CACHE[cache_key]


def summarize_space(space: Space, expansion: Expansion) -> str:
    """One paragraph for the terminal: what will run and what was dropped."""
    per_task = ", ".join(f"{t}: {n} sizes" for t, n in expansion.sizes_valid.items())
    n_seeds = {len(t.training["seeds"]) for t in space.tasks}
    seeds = next(iter(n_seeds)) if len(n_seeds) == 1 else "per-task"
    n_lrs = {len(learning_rates(t.training)) for t in space.tasks}
    lrs = "" if n_lrs == {1} else f" x {next(iter(n_lrs)) if len(n_lrs) == 1 else 'per-task'} learning rates"
    return (f"space {space.name}: {len(expansion.trials)} trials = valid sizes ({per_task}) x "
            f"{len(space.strategies)} strategies x {seeds} seeds{lrs}; {expansion.describe_drops()}")


def block_of_bank(kinds: dict) -> int:
    """The template block a bank tiles widths with (the lcm of its matrix kinds' block sides)."""
    sides = [s for k, spec in kinds.items() if k != "patch" for s in (spec.a, spec.b)]
    return math.lcm(*sides) if sides else 1
