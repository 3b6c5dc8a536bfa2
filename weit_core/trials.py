"""A space's trials: each task's data read once (its ``io``: what a family sizes a model by), every valid size x
seed x lr x strategy as a trial config with a stable key, and what was dropped and why. ``weit sweep`` runs
these configs on Ray Tune; anything else (tests, benchmarks) can run one with ``weit_core.stage3.run_config``."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from weit_core.models.family import Family, get_family
from weit_core.sizes import drop_reasons, keep_sizes, points
from weit_core.space import DATA_KEYS, DEFAULT_FAMILY, DEFAULT_TASK, Space, SpaceError, learning_rates
from weit_core.tasks import Task, get_task


def family_of(config: dict) -> Family:
    return get_family(config.get("family", DEFAULT_FAMILY))


def task_of(config: dict) -> Task:
    """A trial's task kind (``kind``; configs of the default kind do not name it, so their keys stay)."""
    return get_task(config.get("kind", DEFAULT_TASK))


def reported(task: Task) -> tuple[str, ...]:
    """What a trial reports to Tune after an epoch; Tune ranks by the first."""
    return f"val_{task.metric}", "val_loss", "train_loss", "epoch"


def spec_of(config: dict) -> Any:
    """The spec a trial config describes, made by its family (``config["family"]``, else the default)."""
    fam = family_of(config)
    return fam.make_spec({a: config[a] for a in fam.size_axes}, config)


def trial_key(config: dict) -> str:
    """A trial's identity (its whole config as canonical JSON): a resumed sweep finds its MLflow run by it."""
    body = {k: v for k, v in config.items() if k != "key"}
    return hashlib.sha1(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:16]


def size_points(space: Space) -> list[dict]:
    """Every combination of the space's size axes before constraints (:func:`weit_core.sizes.points`)."""
    return points(space.sizes, space.samples, space.sample_seed)


def block_of_bank(kinds: dict) -> int:
    """The template block a bank tiles widths with (the lcm of its matrix kinds' block sides)."""
    sides = [s for k, spec in kinds.items() if k != "patch" for s in (spec.a, spec.b)]
    return math.lcm(*sides) if sides else 1


def trial_params(config: dict, spec: Any, res: Any, init_s: float, data: Any, bank: Any = None,
                 sources: dict | None = None) -> dict:
    """What a trial's run records besides its metrics: its config, size, init cost, the strategy's info
    (``scaler_count``: what wave fits at this size, 0 where the bank's blocks do not tile it) and the files it
    drew on (``sources``: :meth:`TaskSources.params` of its task)."""
    from weit_core.templates import Scalers

    n_scalers = res.info.get("scaler_count")
    if n_scalers is None and bank is not None:
        try:
            n_scalers = Scalers(family_of(config).layout(spec), bank.bank.kinds).num_numbers()
        except (KeyError, ValueError):
            pass
    return {**{k: v for k, v in config.items() if k != "key"}, "trial_key": config["key"],
            "num_params": spec.num_params(), "flops": spec.flops(), "scaler_count": n_scalers or 0,
            "init_s": round(init_s, 4), "n_train": len(data.train), "n_val": len(data.val),
            "fit_examples_used": min(config["fit_examples"], len(data.train)),
            **{f"info.{k}": v for k, v in res.info.items()}, **(sources or {})}


def history_of(metrics: dict, epochs: int) -> list[dict]:
    """The rows of a finished trial back from its per-budget metrics (``val_acc_e2`` -> epoch 2's ``val_acc``)."""
    from weit_core.leaderboard import parse_budget

    rows: dict[int, dict] = {}
    for col, value in metrics.items():
        if (parsed := parse_budget(col)) is not None and parsed[1] <= epochs:
            rows.setdefault(parsed[1], {"epoch": parsed[1]})[parsed[0]] = value
    return [rows[e] for e in sorted(rows)]


# --------------------------------------------------------------------------------------------- data

_DATA_CACHE: dict[str, Any] = {}


def data_key_of(config: dict) -> dict:
    """The part of a trial config that decides which arrays it sees (``TaskSpec.data_key`` of its task)."""
    return {k: config[k] for k in (*DATA_KEYS, "kind") if k in config}


def data_cache_key(data_key: dict) -> str:
    return json.dumps(data_key, sort_keys=True)


def provide_task_data(data_key: dict, fetch: Callable[[], Any]) -> None:
    """Cache splits this process does not load itself (a Tune worker fetches the driver's copy from Ray's
    object store), once, so a worker needs neither the data files nor the time to parse them."""
    if (key := data_cache_key(data_key)) not in _DATA_CACHE:
        _DATA_CACHE[key] = fetch()


def load_task_data(data_key: dict) -> Any:
    """A task's splits by its kind's loader, once per process (a Tune worker keeps them across trials),
    capped by ``limit`` / ``val_limit``."""
    from dataclasses import replace

    if (key := data_cache_key(data_key := data_key_of(data_key))) not in _DATA_CACHE:
        task, seed = task_of(data_key), data_key["data_seed"]
        fractions = {k: data_key[k] for k in ("val_fraction", "test_fraction") if data_key[k] is not None}
        if task.load_data is None:  # the image datasets, split as the space says (Task.load takes no fractions)
            from weit_core.data import load_dataset

            splits = load_dataset(data_key["data"], seed=seed, **fractions)
        elif fractions:
            raise ValueError(f"val_fraction / test_fraction split parquet images; {task.name} splits its own data, "
                             "drop them")
        else:
            splits = task.load(data_key["data"], seed=seed)
        if data_key["limit"] or data_key["val_limit"]:
            splits = replace(splits, train=splits.train.subset(data_key["limit"] or len(splits.train), seed=0),
                             val=splits.val.subset(data_key["val_limit"] or len(splits.val), seed=0))
        _DATA_CACHE[key] = splits
    return _DATA_CACHE[key]


def inspect_tasks(space: Space) -> dict[str, dict]:
    """Each task's ``io`` (``DatasetSplits.io``), its data loaded once in the driver:
    a task whose data is missing, or whose ``patch`` does not tile its images, fails here, before any trial."""
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
        shapes[t.name] = io = dict(splits.io)
        if "img_size" not in io:
            if {"patch", "img_size"} & t.model_fields_set:
                raise SpaceError(f"{where}: patch and img_size apply to image tasks; {t.task} data has no images, "
                                 "drop them")
            continue
        h, w = splits.train.x.shape[-2:]
        if h != w:
            raise SpaceError(f"{where}: images are {h}x{w}; sizes here need square images (resize them when "
                             f"writing the parquet)")
        if t.img_size is not None and t.img_size != h:
            raise SpaceError(f"{where}: img_size {t.img_size} but the data's images are {h}x{w}; drop img_size or "
                             f"resize the data")
        if h % t.patch:
            raise SpaceError(f"{where}: patch {t.patch} does not divide the image size {h}; use one of "
                             f"{[p for p in range(1, h + 1) if h % p == 0]}")
    return shapes


# --------------------------------------------------------------------------------------------- sources


def file_sha256(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@dataclass(frozen=True, eq=False)
class Source:
    """A bank or ancestry file, read once however many tasks draw on it: ``value`` is what a strategy takes (a
    ``LoadedBank``, or (model, spec)); ``flag`` the option that gave it (``--bank``), "" when a task named it."""

    kind: str
    path: str
    sha256: str
    value: Any
    flag: str = ""

    @property
    def block(self) -> int:
        return block_of_bank(self.value.bank.kinds)

    @property
    def where(self) -> str:
        return f"{self.flag or self.kind} {self.path}"


def _how_to_make(kind: str, task: Any, path: str) -> str:
    data = f" --dataset {task.data}" if task.data else ""
    if kind == "bank":
        return f"weit distill --task {task.task}{data} --teacher {task.ancestry or 'ANCESTRY.safetensors'} --out {path}"
    return f"weit ancestry --task {task.task}{data} --out {path}"


@dataclass
class TaskSources:
    """Which bank and ancestry each task draws on: its own (``bank:`` / ``ancestry:`` in the space, one file per
    environment for a policy), else the sweep's (``--bank`` / ``--ancestry``), else none (None)."""

    of_task: dict[str, dict[str, Source | None]]

    def get(self, task: str, kind: str) -> Source | None:
        return self.of_task[task][kind]

    def files(self) -> list[Source]:
        """Every distinct file, in the order first used."""
        return list({id(s): s for own in self.of_task.values() for s in own.values() if s is not None}.values())

    def bank_blocks(self) -> dict[str, int | None]:
        return {t: s["bank"].block if s["bank"] else None for t, s in self.of_task.items()}

    def ancestry_specs(self) -> dict[str, Any]:
        return {t: s["ancestry"].value[1] if s["ancestry"] else None for t, s in self.of_task.items()}

    def params(self, task: str) -> dict[str, str]:
        """What a trial of ``task`` records of its sources: ``bank``, ``bank_sha256``, ``ancestry``, ..."""
        return {k: v for kind, s in self.of_task[task].items() if s is not None
                for k, v in ((kind, s.path), (f"{kind}_sha256", s.sha256))}


def load_task_sources(space: Space, bank: str | None = None, ancestry: str | None = None) -> TaskSources:
    """Each task's sources (:class:`TaskSources`; ``bank``/``ancestry``: for the tasks that name none), every
    distinct file read once. A task's own file that is missing or unreadable is one line naming the task, the
    path and the command that makes it; a default's error names its flag."""
    from weit_core.io import WeitFileError, load_bank, load_model

    read: dict[tuple[str, str], Source] = {}

    def source(kind: str, path: str | None, task: Any = None) -> Source | None:
        if path is None:
            return None
        if (key := (kind, str(Path(path).resolve()))) not in read:
            where = f"{space.path or space.name}: task {task.name!r}: {kind} {key[1]}" if task is not None else ""
            if task is not None and not Path(path).is_file():
                raise SpaceError(f"{where} not found; make it with `{_how_to_make(kind, task, key[1])}` (a relative "
                                 "path is relative to the space file)")
            try:
                if kind == "bank":
                    value = load_bank(path)
                else:
                    model, header = load_model(path)
                    value = (model, get_family(header.get("family", "vit")).spec_from_dict(header["spec"]))
            except WeitFileError as e:
                raise (SpaceError(f"{where}: {e}") if task is not None else WeitFileError(f"--{kind}: {e}")) from e
            read[key] = Source(kind, key[1], file_sha256(path), value, "" if task is not None else f"--{kind}")
        return read[key]

    default = {"ancestry": source("ancestry", ancestry), "bank": source("bank", bank)}  # an ancestry makes a bank
    return TaskSources({t.name: {k: source(k, getattr(t, k), t) if getattr(t, k) else default[k] for k in default}
                        for t in space.tasks})


# --------------------------------------------------------------------------------------------- expansion


@dataclass
class Expansion:
    """The trials of a space, the size combinations dropped and the (strategy, size) pairs a strategy cannot
    make (each by reason; a pair's is a key of ``CANNOT_MAKE``), and what was looked at."""

    trials: list[dict]
    dropped: Counter
    sizes_total: int  # size combinations looked at, summed over tasks
    sizes_valid: dict[str, int]  # per task
    pairs_dropped: Counter = field(default_factory=Counter)
    reasons: dict[str, str] = field(default_factory=drop_reasons)  # each ``dropped`` key in words
    dropped_by_task: dict[str, Counter] = field(default_factory=dict)  # ``dropped`` before the sum over tasks
    pairs_dropped_by_task: dict[str, Counter] = field(default_factory=dict)

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


def expand(space: Space, shapes: dict[str, dict], bank_block: int | None | Mapping[str, int | None] = None,
           ancestry_spec: Any = None) -> Expansion:
    """All trials: per task (``shapes``: its io, :func:`inspect_tasks`), every valid size x seed x lr x strategy
    (strategy innermost, so a truncated list still compares strategies on the same sizes). ``width_multiple:
    block`` means ``bank_block``. A (strategy, size) pair the strategy cannot make against ``ancestry_spec`` is
    counted by reason, never a trial (without it, strategies needing an ancestry are not judged). Either may be
    a mapping from task name to the task's own (:class:`TaskSources`: each task its bank and ancestry). A config
    names its ``family`` and ``kind`` unless they are the defaults, so older trial keys stay."""
    from weit_core.strategies import can_make, strategy_info

    fam, sizes = get_family(space.family), size_points(space)
    named = {} if space.family == DEFAULT_FAMILY else {"family": space.family}
    exp = Expansion([], Counter(), len(sizes) * len(space.tasks), {}, Counter(), drop_reasons(fam))
    for task in space.tasks:
        io, tr = shapes[task.name], task.training
        block, anc = (v.get(task.name) if isinstance(v, Mapping) else v for v in (bank_block, ancestry_spec))
        io = {**io, "patch": task.patch} if "img_size" in io else io  # an image task's tokens are the space's
        kept, dropped = keep_sizes(sizes, io, None, space.constraints, block, fam)
        exp.dropped.update(dropped)
        exp.dropped_by_task[task.name], pairs = Counter(dropped), Counter()
        exp.sizes_valid[task.name] = len(kept)
        for size in kept:
            base = {"task": task.name, **named, **task.data_key(), **size, **io}
            spec = spec_of(base)
            cannot = {s: can_make(s, spec, ancestry_spec=anc)
                      if anc is not None or "ancestry" not in strategy_info(s).needs else None
                      for s in space.strategies}
            pairs.update(c for c in cannot.values() if c)
            settings = {k: v for k, v in tr.items() if k != "seeds"}
            for seed, lr, strategy in itertools.product(tr["seeds"], learning_rates(tr),
                                                        [s for s, c in cannot.items() if not c]):
                cfg = {**base, "strategy": strategy, "seed": seed, **settings, "lr": lr}
                exp.trials.append({**cfg, "key": trial_key(cfg)})
        exp.pairs_dropped.update(pairs)
        exp.pairs_dropped_by_task[task.name] = pairs
    return exp


def summarize_space(space: Space, expansion: Expansion) -> str:
    """One paragraph for the terminal: what will run and what was dropped."""
    per_task = ", ".join(f"{t}: {n} sizes" for t, n in expansion.sizes_valid.items())
    n_seeds = {len(t.training["seeds"]) for t in space.tasks}
    seeds = next(iter(n_seeds)) if len(n_seeds) == 1 else "per-task"
    n_lrs = {len(learning_rates(t.training)) for t in space.tasks}
    lrs = "" if n_lrs == {1} else f" x {next(iter(n_lrs)) if len(n_lrs) == 1 else 'per-task'} learning rates"
    return (f"space {space.name}: {len(expansion.trials)} trials = valid sizes ({per_task}) x "
            f"{len(space.strategies)} strategies x {seeds} seeds{lrs}; {expansion.describe_drops()}")


def trials_table(space: Space, trials: list[dict]) -> list[str]:
    """Markdown rows per task: how many sizes, strategies, seeds and lrs its trials take (each listed when
    few) and whether they are every combination of those."""
    def fmt(values: set) -> str:
        shown = ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in sorted(values))
        return f"{len(values)} ({shown})" if len(values) <= 6 else str(len(values))

    lines = ["| task | sizes | strategies | seeds | stage-3 lrs | trials |", "|---|---|---|---|---|---|"]
    for task in space.tasks:
        rows = [t for t in trials if t["task"] == task.name]
        axes = [{family_of(t).size_name(t) for t in rows}, {t["strategy"] for t in rows}, {t["seed"] for t in rows},
                {float(t["lr"]) for t in rows}]
        product = math.prod(len(a) for a in axes)
        lines.append(f"| {task.name} | " + " | ".join(fmt(a) for a in axes) + f" | {len(rows)}"
                     + (f" of the {product} combinations" if product != len(rows) else "") + " |")
    return lines
