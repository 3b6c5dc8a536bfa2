"""Search spaces (``tune_spaces/*.yaml``, keys in ``tune_spaces/README.md``): a strict pydantic model that is the
space, checked whole before anything runs (a typo costs a second, not a cluster hour; its first error is one line
naming the key), and its expansion into trial configs. ``sizes`` are an architecture family's axes
(``weit_core.sizes`` plans them: the sizes a family cannot build or a space's constraints drop are counted)."""

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
from typing import Annotated, Any, Generic, Literal, TypeVar, Union

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
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
from weit_core.models.family import get_family
from weit_core.sizes import Axis, TaskShape, drop_reasons, keep_sizes, points
from weit_core.sizes import check_size as check_size  # re-exported: callers judge sizes as a space does

BUILTIN_DATA = ("fashion_mnist", "digits")
DATA_KEYS = ("data", "val_fraction", "test_fraction", "data_seed", "limit", "val_limit")  # which arrays a trial sees
DEFAULT_FAMILY = "vit"
# the size axes a constraint reads: a space whose family lacks them cannot set it
CONSTRAINT_AXES = {"width_multiple": ("width",), "min_head_dim": ("width", "heads"), "max_head_dim": ("width", "heads")}


class SpaceError(UserError, ValueError):
    """A malformed search space: the message names the file and the key."""


def _show(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _at(key: str, text: str) -> PydanticCustomError:
    """A rule across keys broken at ``key`` (below the validated model's own location)."""
    return PydanticCustomError("at", "{text}", {"at": key, "text": text})


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


def _is_name(v: Any, banned: str = "/\\ '\"@") -> bool:
    return isinstance(v, str) and bool(v.strip()) and not any(c in v for c in banned)


def _name(what: str, banned: str) -> Any:
    return _rule(lambda v: _is_name(v, banned), f"expected {what}, got {{shown}}", before=True)


def _distinct(one: str, many: str) -> tuple:
    return (_rule(bool, f"empty list; give at least one {one}"),
            _rule(lambda v: len(set(v)) == len(v), f"repeated {many} {{v}}"))


AsList = BeforeValidator(lambda v: v if isinstance(v, list) else [v])
Int1 = Annotated[int, Field(ge=1)]
Int0 = Annotated[int, Field(ge=0)]
Positive = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0, lt=1)]


class Training(_Schema):
    """Stage-2 (``fit_*``) and stage-3 settings. ``lr`` is a number or a grid (one trial per value, like seeds)."""

    epochs: Int1 = 3
    batch_size: Int1 = 64
    lr: Annotated[list[Positive], *_distinct("learning rate", "learning rates")] = 1e-3  # a number stays one
    weight_decay: Annotated[float, Field(ge=0)] = 0.05
    steps_per_epoch: Int1 | None = None
    fit_steps: Int0 = 100
    fit_examples: Int0 = 512
    fit_lr: Positive = 1e-3
    fit_batch_size: Int1 = 64
    seeds: Annotated[list[Int0], AsList, *_distinct("seed", "seeds")] = [0]
    init_mode: Annotated[Literal["", "jax", "moco"], BeforeValidator(lambda v: "" if v is None else v)] = ""  # timm's
    eval_batch_size: Int1 = 512
    test_eval: bool = True
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup: Fraction = 0.1  # of the stage-3 steps

    @field_validator("lr", mode="wrap")
    @classmethod
    def _number_or_grid(cls, v: Any, handler: Callable) -> Any:
        return handler(v) if isinstance(v, list) else handler([v])[0]

    @model_validator(mode="after")
    def _fit_needs_examples(self) -> Training:
        if self.fit_steps > 0 and self.fit_examples == 0:
            raise _at("fit_examples", "is 0 but fit_steps > 0; stage 2 needs examples to fit on")
        return self


# a task's settings, resolved: the defaults, the space's ``training``, the task's own (merged before validation)
Settings = Annotated[dict[str, Any], BeforeValidator(lambda v: dict(Training.model_validate(v)))]


def learning_rates(training: dict) -> list[float]:
    """The stage-3 learning rates of resolved settings (``lr`` is a number or a grid)."""
    lr = training["lr"]
    return list(lr) if isinstance(lr, list | tuple) else [lr]


class TaskSpec(_Schema):
    """One task: data (a built-in name or a parquet path, made absolute), model I/O and resolved settings."""

    name: Annotated[str, _name("a short name without spaces, quotes, slashes or @", "/\\ '\"@")] | None = None
    data: Annotated[str, Field(description="fashion_mnist or digits, or a parquet file/folder path")]
    patch: Int1 = 4
    img_size: Int1 | None = None  # only a check: the data's image size
    val_fraction: Fraction | None = None  # parquet only
    test_fraction: Fraction | None = None  # parquet only
    data_seed: Int0 = 0
    limit: Int1 | None = None  # cap on training examples
    val_limit: Int1 | None = None  # cap on validation examples
    training: Settings = Field(default_factory=dict, validate_default=True)

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
            self.name = self.data if self.data in BUILTIN_DATA else Path(self.data).stem
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


# --------------------------------------------------------------------------------------------- sizes


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


def _axis(name: str, form: Any) -> Axis:
    """An axis's parsed form as the grid or the sampler (kind, args, step) it describes."""
    if isinstance(form, _Range | list | int | float):
        values = tuple(form.range if isinstance(form, _Range) else form if isinstance(form, list) else [form])
        return Axis(name, values, kind=type(values[0]))
    (kind, args), *step = form.model_dump().items()  # choice, randint or uniform (and its step)
    return Axis(name, sampler=(kind, tuple(args), dict(step).get("step")), kind=type(args[0]))


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


# --------------------------------------------------------------------------------------------- the space


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


NEEDS = "a space needs tasks, strategies and sizes"


class Space(_Schema):
    """A validated space (nothing expanded yet): ``sizes`` are its family's size axes (:class:`Axis`, in the
    family's order), and each task's ``training`` is resolved (the defaults, the space's, the task's own)."""

    name: Annotated[str, _name("a name without spaces, quotes or slashes", "/\\ '\"")] = "sweep"
    description: str = ""
    family: Annotated[str, AfterValidator(_sweepable)] = DEFAULT_FAMILY
    training: Training = Field(default_factory=Training)  # before tasks: an error here is reported as its own
    tasks: Annotated[list[TaskSpec], Field(min_length=1, description=NEEDS)]
    strategies: Annotated[list[Annotated[str, AfterValidator(_strategy)]], AsList,
                          *_distinct("strategy", "strategies"), Field(description=NEEDS)]
    sizes: Annotated[dict[str, Any], Field(description=NEEDS)]
    constraints: Constraints = Field(default_factory=Constraints)
    samples: Int1 | None = None
    sample_seed: Int0 = 0
    _path: Path | None = PrivateAttr(None)
    _text: str = PrivateAttr("")  # the file as written, logged as the parent run's artifact

    @property
    def path(self) -> Path | None:
        return self._path

    @property
    def text(self) -> str:
        return self._text

    def content_hash(self) -> str:
        """Identity of the space's content (a resumed sweep must run the same space)."""
        return hashlib.sha256(self._text.encode()).hexdigest()[:16]

    @model_validator(mode="before")
    @classmethod
    def _merge_settings(cls, data: Any) -> Any:
        """A task is a mapping or a dataset name (one task need not be a list); its settings are the space's
        ``training`` updated by its own, merged here and validated as one block."""
        tasks = data.get("tasks") if isinstance(data, dict) else None
        tasks = [tasks] if isinstance(tasks, str | dict) else tasks
        if not isinstance(tasks, list):
            return data
        tasks = [{"data": t} if isinstance(t, str) else t for t in tasks]
        top = data.get("training") or {}
        return {**data, "tasks": [{**t, "training": {**top, **(t.get("training") or {})}}
                                  if isinstance(top, dict) and isinstance(t, dict)
                                  and isinstance(t.get("training") or {}, dict) else t for t in tasks]}

    @field_validator("sizes")
    @classmethod
    def _family_sizes(cls, sizes: dict, info: ValidationInfo) -> dict[str, Axis]:
        if "family" not in info.data:  # its own error is reported
            return {}
        parsed = _sizes_schema(info.data["family"]).model_validate(sizes)
        return {a: _axis(a, getattr(parsed, a)) for a in type(parsed).model_fields}

    @model_validator(mode="after")
    def _across_keys(self) -> Space:
        fam, sampled = get_family(self.family), any(not ax.is_grid for ax in self.sizes.values())
        if sampled != (self.samples is not None):
            raise _at("samples", "a size axis is a sampler, so the space needs `samples: N` (how many size points "
                      "to draw)" if sampled else "only meaningful when a size axis is a sampler (randint/choice/"
                      "uniform); remove it")
        for key, needed in CONSTRAINT_AXES.items():
            if getattr(self.constraints, key) not in (None, "block") and not set(needed) <= set(fam.size_axes):
                raise _at(f"constraints.{key}", f"reads {' and '.join(needed)}, which {fam.name} sizes do not have "
                          f"(their axes: {', '.join(fam.size_axes)})")
        names = [t.name for t in self.tasks]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise _at(f"tasks[{i}].name", f"task name {name!r} used twice; give each task its own `name`")
        return self


# --------------------------------------------------------------------------------------------- errors

_EXPECTED = {"int_type": "an integer", "float_type": "a number", "bool_type": "true or false", "string_type": "text",
             "model_type": "a mapping (key: value lines)", "dict_type": "a mapping (key: value lines)",
             "list_type": "a list"}
_BOUNDS = {"greater_than_equal": ("ge", ">="), "greater_than": ("gt", ">"), "less_than": ("lt", "<")}
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
    if kind == "at":
        where, text = ".".join(filter(None, (where, ctx["at"]))), ctx["text"]
    elif kind in _EXPECTED:
        text = f"expected {_EXPECTED[kind]}, got {got}"
    elif kind in _BOUNDS:
        text = f"must be {_BOUNDS[kind][1]} {ctx[_BOUNDS[kind][0]]:g}, got {err['input']}"
    elif kind in ("too_short", "too_long"):
        n = ctx.get("min_length", ctx.get("max_length"))
        text = f"expected {'a non-empty list' if n == 1 and kind == 'too_short' else f'{n} values'}, got {got}"
    elif kind == "literal_error":
        text = f"expected one of {ctx['expected']}, got {got}"
    elif kind == "value_error":
        text = str(ctx["error"])
    else:  # an axis in no known form, or anything else in pydantic's words
        text = f"{err['msg']}, got {got}"
    return SpaceError(f"{source}: {where or 'top level'}: {text}")


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
    try:
        space = Space.model_validate({"name": default_name, **raw} if isinstance(raw, dict) else raw,
                                     context={"base_dir": base_dir or Path.cwd()})
    except ValidationError as e:
        raise one_line(source, e.errors(include_url=False)[0]) from None
    space._path, space._text = None if source.startswith("<") else Path(source), text
    return space


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


def size_points(space: Space) -> list[dict]:
    """Every combination of the space's size axes before constraints (:func:`weit_core.sizes.points`)."""
    return points(space.sizes, space.samples, space.sample_seed)


def trial_key(config: dict) -> str:
    """A trial's identity (its whole config as canonical JSON): a resumed sweep finds its MLflow run by it."""
    body = {k: v for k, v in config.items() if k != "key"}
    return hashlib.sha1(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:16]


def spec_of(config: dict, family: Any = None) -> Any:
    """The spec a trial config describes, made by its family (``config["family"]``, else the default)."""
    fam = get_family(family or config.get("family", DEFAULT_FAMILY))
    return fam.make_spec({a: config[a] for a in fam.size_axes}, config)


def expand(space: Space, shapes: dict[str, TaskShape], bank_block: int | None = None,
           ancestry_spec: Any = None) -> Expansion:
    """All trials: per task, every valid size x seed x lr x strategy (strategy innermost, so a truncated list
    still compares strategies on the same sizes). ``width_multiple: block`` means ``bank_block``. A (strategy,
    size) pair the strategy cannot make against ``ancestry_spec`` is counted by reason, never a trial (without
    it, strategies needing an ancestry are not judged). A config names its ``family`` unless it is the default,
    so ViT trial keys are those of older sweeps."""
    from weit_core.strategies import can_make, strategy_info

    judged = [s for s in space.strategies if ancestry_spec is not None or "ancestry" not in strategy_info(s).needs]
    fam, sizes = get_family(space.family), size_points(space)
    named = {} if space.family == DEFAULT_FAMILY else {"family": space.family}
    exp = Expansion([], Counter(), len(sizes) * len(space.tasks), {}, Counter(), drop_reasons(fam))
    for task in space.tasks:
        shape, tr = shapes[task.name], task.training
        kept, dropped = keep_sizes(sizes, shape, task.patch, space.constraints, bank_block, fam)
        exp.dropped.update(dropped)
        exp.sizes_valid[task.name] = len(kept)
        for size in kept:
            base = {"task": task.name, **named, **task.data_key(), **size, "patch": task.patch,
                    "img_size": shape.img_size, "in_chans": shape.in_chans, "num_classes": shape.num_classes}
            spec = spec_of(base)
            cannot = {s: can_make(s, spec, ancestry_spec=ancestry_spec) if s in judged else None
                      for s in space.strategies}
            exp.pairs_dropped.update(c for c in cannot.values() if c)
            settings = {k: v for k, v in tr.items() if k != "seeds"}
            for seed, lr, strategy in itertools.product(tr["seeds"], learning_rates(tr),
                                                        [s for s, c in cannot.items() if not c]):
                cfg = {**base, "strategy": strategy, "seed": seed, **settings, "lr": lr}
                exp.trials.append({**cfg, "key": trial_key(cfg)})
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


def block_of_bank(kinds: dict) -> int:
    """The template block a bank tiles widths with (the lcm of its matrix kinds' block sides)."""
    sides = [s for k, spec in kinds.items() if k != "patch" for s in (spec.a, spec.b)]
    return math.lcm(*sides) if sides else 1


# --------------------------------------------------------------------------------------------- data

_DATA_CACHE: dict[str, Any] = {}


def data_key_of(config: dict) -> dict:
    """The part of a trial config that decides which arrays it sees (``TaskSpec.data_key`` of its task)."""
    return {k: config[k] for k in DATA_KEYS}


def data_cache_key(data_key: dict) -> str:
    return json.dumps(data_key, sort_keys=True)


def provide_task_data(data_key: dict, fetch: Callable[[], Any]) -> None:
    """Cache splits this process does not load itself (a Tune worker fetches the driver's copy from Ray's
    object store), once, so a worker needs neither the data files nor the time to parse them."""
    if (key := data_cache_key(data_key)) not in _DATA_CACHE:
        _DATA_CACHE[key] = fetch()


def load_task_data(data_key: dict):
    """A task's splits, loaded once per process (a Tune worker keeps them across trials), capped by ``limit`` /
    ``val_limit``."""
    from weit_core.data import DatasetSplits, load_dataset

    if (key := data_cache_key(data_key)) not in _DATA_CACHE:
        kwargs: dict[str, Any] = {"seed": data_key["data_seed"]}
        if data_key["data"] not in BUILTIN_DATA:
            kwargs.update({k: data_key[k] for k in ("val_fraction", "test_fraction") if data_key[k] is not None})
        splits = load_dataset(data_key["data"], **kwargs)
        if data_key["limit"] or data_key["val_limit"]:
            splits = DatasetSplits(
                splits.name, splits.train.subset(data_key["limit"] or len(splits.train), seed=0),
                splits.val.subset(data_key["val_limit"] or len(splits.val), seed=0), splits.test, splits.num_classes)
        _DATA_CACHE[key] = splits
    return _DATA_CACHE[key]
