"""Search spaces (``tune_spaces/*.yaml``): a validated space, and its expansion into trial configs.

A space is checked completely before anything runs (the schema and its one-line errors:
:mod:`pipelines.space_schema`), so a typo costs a second, not a cluster hour. Its sizes are an architecture
family's (``family:``, default ``vit``); combinations the family cannot build or tile, or that break the
space's constraints, are dropped *here* and counted by reason, instead of failing as trials. The schema is
documented in ``tune_spaces/README.md``. Nothing here imports Ray or MLflow.
"""

from __future__ import annotations

import dataclasses
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

from pipelines.space_schema import (
    BUILTIN_DATA,
    DATA_KEYS,
    DEFAULT_FAMILY,
    Axis,
    Constraints,
    SpaceError,
    TaskSpec,
    get_family,
    read_space,
)

SPACE_DROP_REASONS = {
    "width_not_multiple": "width is not a multiple of constraints.width_multiple",
    "head_dim_out_of_range": "width / heads outside [min_head_dim, max_head_dim]",
    "params_below_min": "fewer parameters than constraints.min_params",
    "params_above_max": "more parameters than constraints.max_params",
    "flops_above_max": "more FLOPs than constraints.max_flops",
}
"""The space's own reasons to drop a size (its ``constraints``), beside what its family cannot build."""


def drop_reasons(family: Any = DEFAULT_FAMILY) -> dict[str, str]:
    """Every reason a size of this family can be dropped, in words (a size counts under the first it fails,
    in :func:`check_size`'s order)."""
    return {**get_family(family).drop_reasons, **SPACE_DROP_REASONS}


def __getattr__(name: str) -> Any:
    if name == "DROP_REASONS":  # the default family's, for callers written before families
        return drop_reasons()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class Space:
    """A validated space (nothing expanded yet)."""

    path: Path | None
    name: str
    description: str
    tasks: list[TaskSpec]
    strategies: list[str]
    axes: dict[str, Axis]  # the family's size axes, in its order
    constraints: Constraints
    samples: int | None
    sample_seed: int
    text: str  # the file as written, logged as the parent run's artifact
    family: str = DEFAULT_FAMILY  # the architecture family its sizes are

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
    reasons: dict[str, str] = field(default_factory=drop_reasons)  # each ``dropped`` key in words

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
            parts = ", ".join(f"{n} {self.reasons.get(r, r)}" for r, n in self.dropped.most_common())
            text = f"dropped {self.n_dropped} of {self.sizes_total} size combinations: {parts}"
        if self.pairs_dropped:
            from weit_core.strategies import CANNOT_MAKE

            parts = ", ".join(f"{n} {r} ({CANNOT_MAKE[r]})" for r, n in self.pairs_dropped.most_common())
            text += f"; dropped {self.n_pairs_dropped} (strategy, size) pairs a strategy cannot make: {parts}"
        return text


def load_space(path: str | Path) -> Space:
    """Read and validate a space file; every problem is a :class:`SpaceError` naming the key."""
    path = Path(path)
    if not path.is_file():
        shipped = sorted(p.name for p in (Path(__file__).resolve().parent.parent / "tune_spaces").glob("*.yaml"))
        raise SpaceError(f"search space {path} not found; pass a YAML file (shipped: tune_spaces/"
                         f"{{{','.join(shipped)}}})")
    return parse_space(path.read_text(), source=str(path), base_dir=path.resolve().parent, default_name=path.stem)


def parse_space(text: str, source: str = "<space>", base_dir: Path | None = None,
                default_name: str = "sweep") -> Space:
    """Validate a space given as YAML text; relative parquet paths are resolved against ``base_dir``."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SpaceError(f"{source}: not valid YAML ({' '.join(str(e).split())})") from e
    doc = read_space(raw, source, base_dir or Path.cwd(), default_name)
    return Space(None if source.startswith("<") else Path(source), doc.name.strip(), doc.description, doc.tasks,
                 doc.strategies, doc.sizes, doc.constraints, doc.samples, doc.sample_seed, text, doc.family)


# --------------------------------------------------------------------------------------------- expansion


def inspect_tasks(space: Space) -> dict[str, TaskShape]:
    """Load each task's data once (in the driver) for the image shape and class count; a task whose data
    is missing or whose ``patch`` does not tile its images fails here, before any trial."""
    from weit_core.data import DataNotFoundError

    shapes = {}
    for t in space.tasks:
        where = f"{space.path or space.name}: task {t.name!r}"
        try:
            splits = load_task_data(t.data_key())
        except DataNotFoundError as e:
            raise SpaceError(f"{where}: {e}") from e
        except ValueError as e:
            raise SpaceError(f"{where}: data {t.data}: {e}") from e
        c, h, w = splits.input_shape
        if h != w:
            raise SpaceError(f"{where}: images are {h}x{w}; sizes here need square images (resize them when "
                             f"writing the parquet)")
        if t.img_size is not None and t.img_size != h:
            raise SpaceError(f"{where}: img_size {t.img_size} but the data's images are {h}x{w}; drop img_size or "
                             f"resize the data")
        if h % t.patch:
            raise SpaceError(f"{where}: patch {t.patch} does not divide the image size {h}; use one of "
                             f"{[p for p in range(1, h + 1) if h % p == 0]}")
        shapes[t.name] = TaskShape(int(c), int(h), int(splits.num_classes))
    return shapes


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
    """Every combination of the size axes before constraints: the grid product, or ``samples`` seeded draws of
    the sampler axes crossed with the grid axes; duplicates removed, order kept."""
    axes = space.axes
    grid_axes = [a for a in axes if axes[a].is_grid]
    grid = [dict(zip(grid_axes, combo, strict=True)) for combo in itertools.product(*(axes[a].values for a in grid_axes))]
    rng = np.random.default_rng(space.sample_seed)
    draws = [{a: _draw(axes[a], rng) for a in axes if not axes[a].is_grid} for _ in range(space.samples or 0)]
    points = [{**g, **d} for d in draws for g in grid] if draws else grid
    seen, out = set(), []
    for p in points:
        p = {a: axes[a].kind(p[a]) for a in axes}
        if (key := tuple(p.values())) not in seen:
            seen.add(key)
            out.append(p)
    return out


def check_size(size: dict, shape: TaskShape, patch: int, cons: Constraints, block: int | None,
               family: Any = DEFAULT_FAMILY) -> str | None:
    """The first reason ``size`` is dropped (a key of :func:`drop_reasons`; None: it is kept): what the family
    cannot build, the width multiple, what the bank's blocks cannot tile, the head width, then the budgets."""
    fam, io = get_family(family), {"patch": patch, **dataclasses.asdict(shape)}
    can_build = fam.check_size or (lambda size, block: None)
    if reason := can_build({**io, **size}, None):  # a family may test the size against the task's images
        return reason
    if isinstance(cons.width_multiple, int) and size["width"] % cons.width_multiple:
        return "width_not_multiple"
    if block and (reason := can_build(size, block)):
        return reason
    if cons.min_head_dim or cons.max_head_dim:
        hd = size["width"] // size["heads"]
        if (cons.min_head_dim and hd < cons.min_head_dim) or (cons.max_head_dim and hd > cons.max_head_dim):
            return "head_dim_out_of_range"
    spec = fam.make_spec(size, io)
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
    size) pair the strategy cannot make (``can_make``, against ``ancestry_spec``, the ancestry's spec) is
    dropped and counted by reason, never a trial; without ``ancestry_spec`` the strategies that need an
    ancestry are not judged (nothing to judge them by: a sweep refuses them without ``--ancestry`` first).
    A config names its ``family`` unless it is the default, so ViT trial keys are those of older sweeps."""
    from weit_core.strategies import can_make, strategy_info

    judged = [s for s in space.strategies if ancestry_spec is not None or "ancestry" not in strategy_info(s).needs]
    fam = get_family(space.family)
    named = {} if space.family == DEFAULT_FAMILY else {"family": space.family}
    points = size_points(space)
    dropped: Counter = Counter()
    pairs_dropped: Counter = Counter()
    trials, valid = [], {}
    for task in space.tasks:
        shape, tr = shapes[task.name], task.training
        valid[task.name] = 0
        for size in points:
            if reason := check_size(size, shape, task.patch, space.constraints, bank_block, fam):
                dropped[reason] += 1
                continue
            valid[task.name] += 1
            base = {"task": task.name, **named, **task.data_key(), **size, "patch": task.patch,
                    "img_size": shape.img_size, "in_chans": shape.in_chans, "num_classes": shape.num_classes}
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
    return Expansion(trials, dropped, len(points) * len(space.tasks), valid, pairs_dropped, drop_reasons(fam))


def spec_of(config: dict, family: Any = None) -> Any:
    """The spec a trial config describes, made by its family (``config["family"]``, else the default)."""
    fam = get_family(family or config.get("family", DEFAULT_FAMILY))
    return fam.make_spec({a: config[a] for a in fam.size_axes}, config)


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
