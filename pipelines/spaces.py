"""Search spaces (``tune_spaces/*.yaml``): a typed schema whose first error is one line naming the key, and
the expansion of a valid space into trial configs.

Strict pydantic models (``"3"`` is no integer, ``true`` no number, every key known) check a whole space before
anything runs, so a typo costs a second, not a cluster hour. The ``sizes`` block is an architecture family's
(``family:``, default ``vit``): its ``size_axes``, typed and defaulted as its spec dataclass declares them.
Sizes the family cannot build or tile, or that break the space's constraints, are dropped here and counted by
reason instead of failing as trials. The keys are documented in ``tune_spaces/README.md``.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import itertools
import json
import math
import typing
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Generic, TypeVar, Union

import numpy as np
import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidationInfo,
    WrapValidator,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from pipelines.common import UserError

BUILTIN_DATA = ("fashion_mnist", "digits")
SCHEDULES = ("cosine", "constant")
INIT_MODES = ("", "jax", "moco")
DATA_KEYS = ("data", "val_fraction", "test_fraction", "data_seed", "limit", "val_limit")  # which arrays a trial sees
DEFAULT_FAMILY = "vit"


class SpaceError(UserError, ValueError):
    """A malformed search space: the message names the file and the key."""


def get_family(family: Any) -> Any:
    from weit_core.models.family import get_family as lookup

    return lookup(family) if isinstance(family, str) else family


def _show(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


class _Schema(BaseModel):
    """Strict types, every key known, every required key present; an empty block (``training:``) is ``{}``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _keys(cls, data: Any) -> Any:
        data = {} if data is None else data
        if isinstance(data, dict):
            known = list(cls.model_fields)
            for key in data:
                if key not in known:
                    raise PydanticCustomError("unknown_key", "unknown key", {"key": key, "known": known})
            for key, f in cls.model_fields.items():
                if f.is_required() and key not in data:
                    raise PydanticCustomError("missing_key", "missing key", {"key": key, "hint": f.description})
        return data


def _rule(check: Callable[[Any], bool], message: str, before: bool = False) -> Any:
    """A validator raising ``message`` (formatted with ``v`` and ``shown``) where ``check(v)`` is false."""

    def run(v: Any) -> Any:
        if not check(v):
            raise ValueError(message.format(v=v, shown=_show(v)))
        return v

    return BeforeValidator(run) if before else AfterValidator(run)


def _as_list(v: Any) -> Any:
    return v if isinstance(v, list) else [v]


def _is_name(v: Any, banned: str = "/\\ '\"@") -> bool:
    return isinstance(v, str) and bool(v.strip()) and not any(c in v for c in banned)


def _name(what: str, banned: str) -> Any:
    return _rule(lambda v: _is_name(v, banned), f"expected {what}, got {{shown}}", before=True)


def _fraction(what: str) -> Any:
    return _rule(lambda v: 0 <= v < 1, what + ", got {v:g}")


def _distinct(one: str, many: str) -> tuple:
    return (_rule(bool, f"empty list; give at least one {one}"),
            _rule(lambda v: len(set(v)) == len(v), f"repeated {many} {{v}}"))


Int1 = Annotated[int, Field(ge=1)]
Int0 = Annotated[int, Field(ge=0)]
Positive = Annotated[float, Field(gt=0)]


class Training(_Schema):
    """Stage-2 (``fit_*``) and stage-3 settings; a space's ``training`` block, then a task's, override these
    defaults. ``lr`` is a number or a grid (one trial per value, like ``seeds``)."""

    epochs: Int1 = 3
    batch_size: Int1 = 64
    lr: Annotated[list[Positive], *_distinct("learning rate", "learning rates")] = 1e-3  # a number stays one
    weight_decay: Annotated[float, Field(ge=0)] = 0.05
    steps_per_epoch: Int1 | None = None
    fit_steps: Int0 = 100
    fit_examples: Int0 = 512
    fit_lr: Positive = 1e-3
    fit_batch_size: Int1 = 64
    seeds: Annotated[list[Int0], BeforeValidator(_as_list), *_distinct("seed", "seeds")] = [0]
    init_mode: Annotated[str, _rule(lambda v: v in INIT_MODES, "timm init mode must be '' (timm default), 'jax' "
                                    "or 'moco', got {shown}", before=True),
                         BeforeValidator(lambda v: "" if v is None else v)] = ""
    eval_batch_size: Int1 = 512
    test_eval: bool = True
    schedule: Annotated[str, _rule(lambda v: v in SCHEDULES, f"expected one of {', '.join(SCHEDULES)}, got "
                                   "{shown}", before=True)] = "cosine"
    warmup: Annotated[float, _fraction("a fraction of the stage-3 steps, in [0, 1)")] = 0.1

    @field_validator("lr", mode="wrap")
    @classmethod
    def _number_or_grid(cls, v: Any, handler: Callable) -> Any:
        return handler(v) if isinstance(v, list) else handler([v])[0]


TRAINING_DEFAULTS: dict[str, Any] = dict(Training())


def _overrides(block: Any) -> dict:
    """The settings a ``training`` block gives (the others are inherited)."""
    block = Training.model_validate(block)
    return {k: getattr(block, k) for k in block.model_fields_set}


class TaskSpec(_Schema):
    """One task: data (a built-in name or an absolute parquet path), model I/O and ``training`` settings (as
    written, the overrides; in a parsed :class:`Space`, resolved)."""

    name: Annotated[str, _name("a short name without spaces, quotes, slashes or @", "/\\ '\"@")] | None = None
    data: Annotated[str, Field(description="fashion_mnist or digits, or a parquet file/folder path")]
    patch: Int1 = 4
    img_size: Int1 | None = None  # only a check: the data's image size
    val_fraction: Annotated[float, _fraction("must be in [0, 1)")] | None = None  # parquet only
    test_fraction: Annotated[float, _fraction("must be in [0, 1)")] | None = None  # parquet only
    data_seed: Int0 = 0
    limit: Int1 | None = None  # cap on training examples
    val_limit: Int1 | None = None  # cap on validation examples
    training: Annotated[dict[str, Any], BeforeValidator(_overrides)] = {}

    @property
    def is_builtin(self) -> bool:
        return self.data in BUILTIN_DATA

    def data_key(self) -> dict:
        return {k: getattr(self, k) for k in DATA_KEYS}

    @field_validator("data")
    @classmethod
    def _resolve(cls, data: str, info: ValidationInfo) -> str:
        """A built-in name (any case, ``-`` or ``_``), else a parquet path that exists, made absolute."""
        if not (key := data.strip().lower().replace("-", "_")):
            raise ValueError(f"expected a dataset name or a path, got {_show(data)}")
        if key in BUILTIN_DATA:
            return key
        p = Path(data).expanduser()
        p = p if p.is_absolute() else info.context["base_dir"] / p
        if not p.exists():
            raise ValueError(f"{data!r} is not a built-in dataset ({', '.join(BUILTIN_DATA)}) and {p} does not "
                             "exist; give a parquet file or folder with `image` and `label` columns")
        return str(p.resolve())

    @field_validator("val_fraction", "test_fraction")
    @classmethod
    def _parquet_only(cls, v: float | None, info: ValidationInfo) -> float | None:
        if v is not None and info.data.get("data") in BUILTIN_DATA:
            raise ValueError(f"applies to parquet data only; {info.data['data']} has fixed splits")
        return v

    @model_validator(mode="after")
    def _default_name(self) -> TaskSpec:
        if self.name is None:
            self.name = self.data if self.is_builtin else Path(self.data).stem
            if not _is_name(self.name):
                raise ValueError(f"the file name {self.name!r} is no task name; give the task a `name` without "
                                 "spaces, quotes, slashes or @")
        return self


class Constraints(_Schema):
    """Which sizes a space keeps; ``width_multiple: block`` (the default) is the bank's template block."""

    model_config = ConfigDict(frozen=True)

    width_multiple: Annotated[Int1 | None, WrapValidator(lambda v, check: v if v == "block" else check(v))] = "block"
    min_head_dim: Int1 | None = None
    max_head_dim: Int1 | None = None
    min_params: Int1 | None = None
    max_params: Int1 | None = None
    max_flops: Int1 | None = None

    @model_validator(mode="after")
    def _budget(self) -> Constraints:
        if self.min_params and self.max_params and self.min_params > self.max_params:
            raise ValueError(f"min_params {self.min_params} > max_params {self.max_params}")
        return self


# the size axes a constraint reads: a space whose family lacks them cannot set it
CONSTRAINT_AXES = {"width_multiple": ("width",), "min_head_dim": ("width", "heads"), "max_head_dim": ("width", "heads")}


# --------------------------------------------------------------------------------------------- sizes


@dataclass(frozen=True)
class Axis:
    """A size axis: a grid (``values``) or a sampler (``sampler`` = kind, args, step) drawn in the driver."""

    name: str
    values: tuple = ()
    sampler: tuple[str, tuple, float | None] | None = None
    kind: type = int

    @property
    def is_grid(self) -> bool:
        return self.sampler is None


def _range(v: list[int]) -> list[int]:
    if not (values := list(range(v[0], v[1] + 1, v[2]))):
        raise ValueError(f"empty grid: no value from {v[0]} to {v[1]} step {v[2]}")
    return values


_low_high = _rule(lambda v: v[0] <= v[1], "low {v[0]} > high {v[1]}")
T = TypeVar("T")


class _Range(_Schema):
    range: Annotated[list[Int1], Field(min_length=3, max_length=3), AfterValidator(_range)]


class _Choice(_Schema, Generic[T]):
    choice: Annotated[list[T], Field(min_length=1)]


class _RandInt(_Schema):
    randint: Annotated[list[Int1], Field(min_length=2, max_length=2), _low_high]
    step: Int1 | None = None


class _Uniform(_Schema):
    uniform: Annotated[list[Positive], Field(min_length=2, max_length=2), _low_high]
    step: Positive | None = None


def _form(v: Any) -> str | None:
    if isinstance(v, list):
        return "grid"
    if isinstance(v, dict):
        forms = [k for k in ("range", "randint", "choice", "uniform") if k in v]
        return forms[0] if len(forms) == 1 else None
    return "one" if isinstance(v, int | float) and not isinstance(v, bool) else None


@functools.cache
def _axis_type(kind: type) -> Any:
    """An integer axis is a number, a list, a range, randint or choice; a float axis a number, a list, uniform
    or choice. The form is the union's tag, which error locations leave out (``sizes.width[0]``)."""
    item = Annotated[kind, Field(ge=1) if kind is int else Field(gt=0)]
    grid = Annotated[list[item], _rule(bool, "empty grid; list at least one value"),
                     AfterValidator(lambda v: list(dict.fromkeys(v)))]
    forms = {"one": item, "grid": grid, "choice": _Choice[item],
             **({"range": _Range, "randint": _RandInt} if kind is int else {"uniform": _Uniform})}
    shapes = "{range: [start, stop, step]}, {randint: [low, high]}" if kind is int else "{uniform: [low, high]}"
    return Annotated[Union[tuple(Annotated[t, Tag(k)] for k, t in forms.items())],  # noqa: UP007
                     Discriminator(_form, custom_error_type="axis_form",
                                   custom_error_message=f"expected a number, a list, {shapes} or {{choice: [...]}}")]


@functools.cache
def _sizes_schema(family: str) -> type[_Schema]:
    """A family's ``sizes`` block: its size axes, typed and defaulted as its spec dataclass declares them."""
    fam = get_family(family)
    try:
        hints = typing.get_type_hints(fam.spec_type)
    except (NameError, TypeError):
        hints = {}
    defaults = {f.name: f.default for f in dataclasses.fields(fam.spec_type) if f.default is not dataclasses.MISSING}
    need = (f"{fam.name} sizes need {', '.join(a for a in fam.size_axes if a not in defaults)}"
            + "".join(f"; {a} defaults to {defaults[a]:g}" for a in fam.size_axes if a in defaults))
    return create_model(f"{fam.name}_sizes", __base__=_Schema, **{
        a: (_axis_type(float if hints.get(a) is float else int),
            Field(defaults.get(a, ...), description=need, validate_default=True)) for a in fam.size_axes})


def _axis(name: str, form: Any) -> Axis:
    """An axis's parsed form as the grid or the sampler (kind, args, step) it describes."""
    if isinstance(form, _Range | list | int | float):
        values = tuple(form.range if isinstance(form, _Range) else form if isinstance(form, list) else [form])
        return Axis(name, values, kind=type(values[0]))
    (kind, args), *step = form.model_dump().items()  # choice, randint or uniform (and its step)
    return Axis(name, sampler=(kind, tuple(args), dict(step).get("step")), kind=type(args[0]))


# --------------------------------------------------------------------------------------------- the file


def _strategy(name: str) -> str:
    from weit_core.strategies import available

    if name not in (known := available()):
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown strategy {name!r}{hint}; available: {', '.join(known)}")
    return name


def _sweepable(name: str) -> str:
    fam = get_family(name)
    if not fam.size_axes or fam.make_spec is None:
        raise ValueError(f"family {name!r} registers no size_axes or make_spec, so a space cannot size it")
    return name


def _tasks(v: Any) -> Any:
    """A task is a mapping or just a dataset name; one task need not be a list."""
    v = [v] if isinstance(v, str | dict) else v
    return [{"data": t} if isinstance(t, str) else t for t in v] if isinstance(v, list) else v


NEEDS = "a space needs tasks, strategies and sizes"


class SpaceFile(_Schema):
    """A space as written; once validated, ``sizes`` holds the family's axes as :class:`Axis`."""

    name: Annotated[str, _name("a name without spaces, quotes or slashes", "/\\ '\"")] = "sweep"
    description: str = ""
    family: Annotated[str, AfterValidator(_sweepable)] = DEFAULT_FAMILY
    tasks: Annotated[list[TaskSpec], BeforeValidator(_tasks), Field(min_length=1, description=NEEDS)]
    strategies: Annotated[list[Annotated[str, AfterValidator(_strategy)]], BeforeValidator(_as_list),
                          *_distinct("strategy", "strategies"), Field(description=NEEDS)]
    sizes: Annotated[dict[str, Any], Field(description=NEEDS)]
    constraints: Constraints = Field(default_factory=Constraints)
    training: Annotated[dict[str, Any], BeforeValidator(_overrides)] = {}
    samples: Int1 | None = None
    sample_seed: Int0 = 0

    @field_validator("sizes")
    @classmethod
    def _family_sizes(cls, sizes: dict, info: ValidationInfo) -> dict[str, Axis]:
        if "family" not in info.data:  # its own error is reported
            return {}
        parsed = _sizes_schema(info.data["family"]).model_validate(sizes)
        return {a: _axis(a, getattr(parsed, a)) for a in type(parsed).model_fields}


# --------------------------------------------------------------------------------------------- errors

_EXPECTED = {"int_type": "an integer", "float_type": "a number", "bool_type": "true or false", "string_type": "text",
             "model_type": "a mapping (key: value lines)", "dict_type": "a mapping (key: value lines)",
             "list_type": "a list"}
_BOUNDS = {"greater_than_equal": ("ge", ">="), "greater_than": ("gt", ">")}
_VALUE_OR_LIST = ("lr", "seeds")


def _location(loc: tuple) -> str:
    """``tasks[0].training.lr``: the key as the YAML spells it, without a size axis's form (the union's tag)
    or the index into a setting that is one value or a list (the message shows the value)."""
    loc = loc[:2] + loc[3:] if loc[:1] == ("sizes",) else loc
    text = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            text += "" if i and loc[i - 1] in _VALUE_OR_LIST else f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text


def one_line(source: str, err: Any) -> SpaceError:
    """Pydantic's error ``err`` (an item of ``ValidationError.errors()``) as one line naming file and key."""
    where, kind, ctx = _location(err["loc"]), err["type"], err.get("ctx", {})
    got = _show(err.get("input"))
    if kind == "unknown_key":
        close = difflib.get_close_matches(str(ctx["key"]), ctx["known"], n=1)
        return SpaceError(f"{source}: unknown key {ctx['key']!r} in {where or 'the top level'}"
                          + (f"; did you mean {close[0]!r}?" if close else "") + f" (known keys: {', '.join(ctx['known'])})")
    if kind == "missing_key":
        text = f"missing required key {ctx['key']!r}" + (f" ({ctx['hint']})" if ctx["hint"] else "")
        return SpaceError(f"{source}: {where + ': ' if where else ''}{text}")
    if kind in _EXPECTED:
        text = f"expected {_EXPECTED[kind]}, got {got}"
    elif kind in _BOUNDS:
        text = f"must be {_BOUNDS[kind][1]} {ctx[_BOUNDS[kind][0]]:g}, got {err['input']}"
    elif kind in ("too_short", "too_long"):
        n = ctx.get("min_length", ctx.get("max_length"))
        text = f"expected {'a non-empty list' if n == 1 and kind == 'too_short' else f'{n} values'}, got {got}"
    elif kind == "value_error":
        text = str(ctx["error"])
    else:  # an axis in no known form, or anything else in pydantic's words
        text = f"{err['msg']}, got {got}"
    return SpaceError(f"{source}: {where or 'top level'}: {text}")


def read_space(raw: Any, source: str, base_dir: Path, default_name: str) -> SpaceFile:
    """Validate a space as loaded from YAML, each task's settings resolved (the defaults, the space's
    ``training``, the task's); rules across keys are checked here too, each one line."""
    try:
        doc = SpaceFile.model_validate({"name": default_name, **raw} if isinstance(raw, dict) else raw,
                                       context={"base_dir": base_dir})
    except ValidationError as e:
        raise one_line(source, e.errors(include_url=False)[0]) from None
    fam, sampled = get_family(doc.family), any(not ax.is_grid for ax in doc.sizes.values())
    if sampled != (doc.samples is not None):
        raise SpaceError(f"{source}: samples: " + ("a size axis is a sampler, so the space needs `samples: N` (how "
                                                   "many size points to draw)" if sampled else
                                                   "only meaningful when a size axis is a sampler (randint/choice/"
                                                   "uniform); remove it"))
    for key, needed in CONSTRAINT_AXES.items():
        if getattr(doc.constraints, key) not in (None, "block") and not set(needed) <= set(fam.size_axes):
            raise SpaceError(f"{source}: constraints.{key}: reads {' and '.join(needed)}, which {fam.name} sizes "
                             f"do not have (their axes: {', '.join(fam.size_axes)})")
    for i, t in enumerate(doc.tasks):
        if t.name in [u.name for u in doc.tasks[:i]]:
            raise SpaceError(f"{source}: tasks[{i}].name: task name {t.name!r} used twice; give each task its own "
                             "`name`")
    top = _settings(TRAINING_DEFAULTS, doc.training, "training", source)
    doc.tasks = [t.model_copy(update={"training": _settings(top, t.training, f"tasks[{i}].training", source)})
                 for i, t in enumerate(doc.tasks)]
    return doc


def _settings(base: dict, given: dict, where: str, source: str) -> dict:
    """``base`` with the ``given`` settings; stage 2 needs examples wherever it takes steps."""
    out = {**base, **given}
    if out["fit_steps"] > 0 and out["fit_examples"] == 0:
        raise SpaceError(f"{source}: {where}.fit_examples: is 0 but fit_steps > 0; stage 2 needs examples to fit on")
    return out


# --------------------------------------------------------------------------------------------- expansion


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
