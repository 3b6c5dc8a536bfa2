"""The strict YAML schema a search space is written in (``weit_core.space``): models that know every key and
type, number-or-grid and sampler forms for size axes (a family's ``sizes`` block is built from its spec), and
pydantic's first error turned into one line naming the file and the key as the YAML spells it."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import typing
from collections.abc import Callable
from typing import Annotated, Any, Generic, TypeVar, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    create_model,
    model_validator,
)
from pydantic_core import PydanticCustomError

from weit_core.models.family import get_family
from weit_core.sizes import Axis


def show(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def at_key(key: str, text: str) -> PydanticCustomError:
    """A rule across keys broken at ``key`` (below the validated model's own location)."""
    return PydanticCustomError("at", "{text}", {"at": key, "text": text})


class Schema(BaseModel):
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


def rule(check: Callable[[Any], bool], message: str, before: bool = False) -> Any:
    """A validator raising ``message`` (formatted with ``v`` and ``shown``) where ``check(v)`` is false."""

    def run(v: Any) -> Any:
        if not check(v):
            raise ValueError(message.format(v=v, shown=show(v)))
        return v

    return BeforeValidator(run) if before else AfterValidator(run)


def is_name(v: Any, banned: str = "/\\ '\"@") -> bool:
    return isinstance(v, str) and bool(v.strip()) and not any(c in v for c in banned)


def name_rule(what: str, banned: str) -> Any:
    return rule(lambda v: is_name(v, banned), f"expected {what}, got {{shown}}", before=True)


def distinct(one: str, many: str) -> tuple:
    return (rule(bool, f"empty list; give at least one {one}"),
            rule(lambda v: len(set(v)) == len(v), f"repeated {many} {{v}}"))


AsList = BeforeValidator(lambda v: v if isinstance(v, list) else [v])
Int1 = Annotated[int, Field(ge=1)]
Int0 = Annotated[int, Field(ge=0)]
Positive = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0, lt=1)]


# --------------------------------------------------------------------------------------------- size axes


def _range(v: list[int]) -> list[int]:
    if not (values := list(range(v[0], v[1] + 1, v[2]))):
        raise ValueError(f"empty grid: no value from {v[0]} to {v[1]} step {v[2]}")
    return values


_low_high = rule(lambda v: v[0] <= v[1], "low {v[0]} > high {v[1]}")
T = TypeVar("T")


class _Range(Schema):
    range: Annotated[list[Int1], Field(min_length=3, max_length=3), AfterValidator(_range)]


class _Choice(Schema, Generic[T]):
    choice: Annotated[list[T], Field(min_length=1)]


class _RandInt(Schema):
    randint: Annotated[list[Int1], Field(min_length=2, max_length=2), _low_high]
    step: Int1 | None = None


class _Uniform(Schema):
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
    grid = Annotated[list[item], rule(bool, "empty grid; list at least one value"),
                     AfterValidator(lambda v: list(dict.fromkeys(v)))]
    forms = {"one": item, "grid": grid, "choice": _Choice[item],
             **({"range": _Range, "randint": _RandInt} if kind is int else {"uniform": _Uniform})}
    shapes = "{range: [start, stop, step]}, {randint: [low, high]}" if kind is int else "{uniform: [low, high]}"
    return Annotated[Union[tuple(Annotated[t, Tag(k)] for k, t in forms.items())],  # noqa: UP007
                     Discriminator(_form, custom_error_type="axis_form",
                                   custom_error_message=f"expected a number, a list, {shapes} or {{choice: [...]}}")]


def axis_of(name: str, form: Any) -> Axis:
    """An axis's parsed form as the grid or the sampler (kind, args, step) it describes."""
    if isinstance(form, _Range | list | int | float):
        values = tuple(form.range if isinstance(form, _Range) else form if isinstance(form, list) else [form])
        return Axis(name, values, kind=type(values[0]))
    (kind, args), *step = form.model_dump().items()  # choice, randint or uniform (and its step)
    return Axis(name, sampler=(kind, tuple(args), dict(step).get("step")), kind=type(args[0]))


@functools.cache
def sizes_schema(family: str) -> type[Schema]:
    """A family's ``sizes`` block: its size axes, typed and defaulted as its spec dataclass declares them."""
    fam = get_family(family)
    try:
        hints = typing.get_type_hints(fam.spec_type)
    except (NameError, TypeError):
        hints = {}
    defaults = {f.name: f.default for f in dataclasses.fields(fam.spec_type) if f.default is not dataclasses.MISSING}
    need = (f"{fam.name} sizes need {', '.join(a for a in fam.size_axes if a not in defaults)}"
            + "".join(f"; {a} defaults to {defaults[a]:g}" for a in fam.size_axes if a in defaults))
    return create_model(f"{fam.name}_sizes", __base__=Schema, **{
        a: (_axis_type(float if hints.get(a) is float else int),
            Field(defaults.get(a, ...), description=need, validate_default=True)) for a in fam.size_axes})


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


def one_line(source: str, err: Any) -> str:
    """Pydantic's error ``err`` (an item of ``ValidationError.errors()``) as one line naming file and key."""
    where, kind, ctx = _location(err["loc"]), err["type"], err.get("ctx", {})
    got = show(err.get("input"))
    if kind == "unknown_key":
        close = difflib.get_close_matches(str(ctx["key"]), ctx["known"], n=1)
        return (f"{source}: unknown key {ctx['key']!r} in {where or 'the top level'}"
                          + (f"; did you mean {close[0]!r}?" if close else "") + f" (known keys: {', '.join(ctx['known'])})")
    if kind == "missing_key":
        text = f"missing required key {ctx['key']!r}" + (f" ({ctx['hint']})" if ctx["hint"] else "")
        return f"{source}: {where + ': ' if where else ''}{text}"
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
    return f"{source}: {where or 'top level'}: {text}"
