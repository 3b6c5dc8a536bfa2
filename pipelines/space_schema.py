"""The schema of a search space file (``tune_spaces/*.yaml``), and its errors as one line naming the key.

Strict pydantic models (``"3"`` is no integer, ``true`` no number, every key known) check a space before
anything runs; the first error becomes a :class:`SpaceError` such as ``ci.yaml: sizes.width[0]: expected an
integer, got str 'x'``. The ``sizes`` block is a family's (``family:``, default ``vit``): its ``size_axes``
are the keys, typed (int or float) and defaulted as its spec dataclass declares them. The keys and their
meaning are documented in ``tune_spaces/README.md``; :mod:`pipelines.spaces` expands a space into trials.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Generic, TypeVar, Union

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
DATA_KEYS = ("data", "val_fraction", "test_fraction", "data_seed", "limit", "val_limit")
"""What decides which arrays a trial sees: the per-process data cache key."""
DEFAULT_FAMILY = "vit"
"""The family of a space without ``family:``."""


class SpaceError(UserError, ValueError):
    """A malformed search space: the message names the file and the key."""


def get_family(family: Any) -> Any:
    """A registered architecture family by name (a ValueError listing the registered ones), or ``family``."""
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
    """A validator raising ``message`` (formatted with the value ``v`` and ``shown``, its type and repr) where
    ``check(value)`` is false; ``before``: ahead of the type check."""

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
    """Stage-2 (``fit_*``) and stage-3 settings; a space's ``training`` block and a task's override these
    defaults in that order. ``lr`` is a number or a grid (one trial per value, like ``seeds``); ``schedule``
    is the stage-3 recipe every strategy gets: ``cosine`` = linear warm-up over ``warmup`` (a fraction of
    the trial's stage-3 optimizer steps) then cosine decay, ``constant`` = a fixed ``lr``."""

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
    """The settings a ``training`` block gives (validated; the others are inherited)."""
    block = Training.model_validate(block)
    return {k: getattr(block, k) for k in block.model_fields_set}


class TaskSpec(_Schema):
    """One task of a space: data (a built-in name or an absolute parquet path), its model I/O and its
    ``training`` settings (as written, the overrides; in a parsed :class:`pipelines.spaces.Space`, resolved)."""

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
        """Everything that decides which arrays a trial sees (the per-process data cache key)."""
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
    """Which sizes a space keeps (beside what the family can build); ``width_multiple: block`` (the default)
    is the bank's template block when a strategy uses the bank, ``null`` none."""

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
