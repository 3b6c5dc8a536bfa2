"""Search spaces (``tune_spaces/*.yaml``, keys in ``tune_spaces/README.md``): a strict pydantic model that is the
space, checked whole before anything runs (a typo costs a second, not a cluster hour; its first error is one line
naming the key). ``sizes`` are an architecture family's axes; each task names its kind (``task:``, default
classification) beside its data. Expansion into trials is ``weit_core.trials``."""

from __future__ import annotations

import difflib
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    WrapValidator,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from weit_core.data import BUILTIN_DATASETS as BUILTIN_DATA
from weit_core.models.family import get_family
from weit_core.schema import (
    AsList,
    Fraction,
    Int0,
    Int1,
    Positive,
    Schema,
    at_key,
    axis_of,
    distinct,
    is_name,
    name_rule,
    one_line,
    show,
    sizes_schema,
)
from weit_core.sizes import Axis
from weit_core.train import SCHEDULES

DEFAULT_FAMILY = "vit"
DEFAULT_TASK = "classification"
IMAGE_DATA = "fashion_mnist or digits, or a parquet file/folder path"
DATA_KEYS = ("data", "val_fraction", "test_fraction", "data_seed", "limit", "val_limit")  # which arrays a trial sees
# the size axes a constraint reads: a space whose family lacks them cannot set it
CONSTRAINT_AXES = {"width_multiple": ("width",), "min_head_dim": ("width", "heads"), "max_head_dim": ("width", "heads")}
SHIPPED = Path(__file__).resolve().parent.parent / "tune_spaces"


class SpaceError(ValueError):
    """A malformed search space: the message names the file and the key (the CLI prints it as one line)."""


def _registered(kind: str) -> str:
    _own_loader(kind)  # a ValueError naming the known kinds
    return kind


def _own_loader(kind: str) -> bool:
    """Whether a task kind reads its data itself (else it is an image dataset: a built-in name or parquet)."""
    from weit_core.tasks import get_task

    return get_task(kind).load_data is not None


class Training(Schema):
    """Stage-2 (``fit_*``) and stage-3 settings. ``lr`` is a number or a grid (one trial per value, like seeds)."""

    epochs: Int1 = 3
    batch_size: Int1 = 64
    lr: Annotated[list[Positive], *distinct("learning rate", "learning rates")] = 1e-3  # a number stays one
    weight_decay: Annotated[float, Field(ge=0)] = 0.05
    steps_per_epoch: Int1 | None = None
    fit_steps: Int0 = 100
    fit_examples: Int0 = 512
    fit_lr: Positive = 1e-3
    fit_batch_size: Int1 = 64
    seeds: Annotated[list[Int0], AsList, *distinct("seed", "seeds")] = [0]
    init_mode: Annotated[Literal["", "jax", "moco"], BeforeValidator(lambda v: "" if v is None else v)] = ""  # timm's
    eval_batch_size: Int1 = 512
    test_eval: bool = True
    schedule: Literal[SCHEDULES] = "cosine"
    warmup: Fraction = 0.1  # of the stage-3 steps

    @field_validator("lr", mode="wrap")
    @classmethod
    def _number_or_grid(cls, v: Any, handler: Callable) -> Any:
        return handler(v) if isinstance(v, list) else handler([v])[0]

    @model_validator(mode="after")
    def _fit_needs_examples(self) -> Training:
        if self.fit_steps > 0 and self.fit_examples == 0:
            raise at_key("fit_examples", "is 0 but fit_steps > 0; stage 2 needs examples to fit on")
        return self


# a task's settings, resolved: the defaults, the space's ``training``, the task's own (merged before validation)
Settings = Annotated[dict[str, Any], BeforeValidator(lambda v: dict(Training.model_validate(v)))]


def learning_rates(training: dict) -> list[float]:
    """The stage-3 learning rates of resolved settings (``lr`` is a number or a grid)."""
    lr = training["lr"]
    return list(lr) if isinstance(lr, list | tuple) else [lr]


class TaskSpec(Schema):
    """One task: its kind (a registered task, ``kind:argument`` where it takes one), its data (a built-in name
    or a path, made absolute; other kinds may name what their loader reads), image settings, the bank and
    ancestry it draws on where not the sweep's (a policy's serve one environment), resolved settings."""

    name: Annotated[str, name_rule("a short name without spaces, quotes, slashes or @", "/\\ '\"@")] | None = None
    task: Annotated[str, AfterValidator(_registered)] = DEFAULT_TASK  # before data: the data's rules depend on it
    data: Annotated[str | None, Field(description=IMAGE_DATA)] = None  # a kind with its own loader may go without
    patch: Int1 = 4  # image tasks
    img_size: Int1 | None = None  # only a check: the data's image size
    val_fraction: Fraction | None = None  # parquet only
    test_fraction: Fraction | None = None  # parquet only
    data_seed: Int0 = 0
    limit: Int1 | None = None  # cap on training examples
    val_limit: Int1 | None = None  # cap on validation examples
    bank: str | None = None  # this task's template bank (else `weit sweep --bank`), made absolute
    ancestry: str | None = None  # this task's ancestry model (else `weit sweep --ancestry`), made absolute
    training: Settings = Field(default_factory=dict, validate_default=True)

    def data_key(self) -> dict:
        """What decides which arrays a trial sees (the kind only where it is not the default: older keys)."""
        return {k: getattr(self, k) for k in DATA_KEYS} | ({"kind": self.task} if self.task != DEFAULT_TASK else {})

    @model_validator(mode="before")
    @classmethod
    def _image_data_needed(cls, data: Any) -> Any:
        """``data`` is required unless the task kind loads its own (an unknown kind is reported at ``task``)."""
        if isinstance(data, dict) and "data" not in data:
            try:
                own = _own_loader(data.get("task", DEFAULT_TASK))
            except ValueError:
                own = True
            if not own:
                raise PydanticCustomError("missing_key", "missing key", {"key": "data", "hint": IMAGE_DATA})
        return data

    @field_validator("data")
    @classmethod
    def _resolve(cls, data: str | None, info: ValidationInfo) -> str | None:
        """A built-in name (any case, ``-`` or ``_``), else a path that exists, made absolute; a task kind with
        a loader of its own may name something else (its loader judges it before any trial)."""
        if data is None:
            return None
        if not (key := data.strip().lower().replace("-", "_")):
            raise ValueError(f"expected a dataset name or a path, got {show(data)}")
        if key in BUILTIN_DATA:
            return key
        p = Path(data).expanduser()
        p = p if p.is_absolute() else info.context["base_dir"] / p
        if p.exists():
            return str(p.resolve())
        if "task" in info.data and _own_loader(info.data["task"]):
            return data
        raise ValueError(f"{data!r} is not a built-in dataset ({', '.join(BUILTIN_DATA)}) and {p} does not "
                         "exist; give a parquet file or folder with `image` and `label` columns")

    @field_validator("bank", "ancestry")
    @classmethod
    def _source_path(cls, path: str | None, info: ValidationInfo) -> str | None:
        """Relative to the space file's folder, as ``data``. Whether it exists is judged when a sweep reads it
        (``weit_core.trials.load_task_sources``): ``weit distill --space`` reads the space before its bank exists."""
        if path is None:
            return None
        if not path.strip():
            raise ValueError(f"expected a file path, got {show(path)}")
        p = Path(path).expanduser()
        return str((p if p.is_absolute() else info.context["base_dir"] / p).resolve())

    @field_validator("val_fraction", "test_fraction")
    @classmethod
    def _parquet_only(cls, v: float | None, info: ValidationInfo) -> float | None:
        if v is not None and info.data.get("data") in BUILTIN_DATA:
            raise ValueError(f"applies to parquet data only; {info.data['data']} has fixed splits")
        return v

    @model_validator(mode="after")
    def _default_name(self) -> TaskSpec:
        if self.name is None:
            self.name = (self.task.replace(":", "_") if self.data is None else self.data if self.data in BUILTIN_DATA
                         else Path(self.data).stem)
            if not is_name(self.name):
                raise ValueError(f"the file name {self.name!r} is no task name; give the task a `name` without "
                                 "spaces, quotes, slashes or @")
        return self


class Constraints(Schema):
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


class Space(Schema):
    """A validated space (nothing expanded yet): ``sizes`` are its family's size axes (:class:`Axis`, in the
    family's order), and each task's ``training`` is resolved (the defaults, the space's, the task's own)."""

    name: Annotated[str, name_rule("a name without spaces, quotes or slashes", "/\\ '\"")] = "sweep"
    description: str = ""
    family: Annotated[str, AfterValidator(_sweepable)] = DEFAULT_FAMILY
    training: Training = Field(default_factory=Training)  # before tasks: an error here is reported as its own
    tasks: Annotated[list[TaskSpec], Field(min_length=1, description=NEEDS)]
    strategies: Annotated[list[Annotated[str, AfterValidator(_strategy)]], AsList,
                          *distinct("strategy", "strategies"), Field(description=NEEDS)]
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
        ``training`` updated by its own, merged here and validated as one block; the family defaults to the
        tasks' own."""
        tasks = data.get("tasks") if isinstance(data, dict) else None
        tasks = [tasks] if isinstance(tasks, str | dict) else tasks
        if not isinstance(tasks, list):
            return data
        tasks = [{"data": t} if isinstance(t, str) else t for t in tasks]
        if "family" not in data:  # the tasks' own architecture (their kinds' default_family), where they agree
            from weit_core.tasks import get_task

            try:
                own = {get_task(t.get("task", DEFAULT_TASK)).default_family for t in tasks if isinstance(t, dict)}
            except ValueError:  # an unknown task: its own error
                own = set()
            data = {**data, "family": own.pop()} if len(own) == 1 else data
        top = data.get("training") or {}
        return {**data, "tasks": [{**t, "training": {**top, **(t.get("training") or {})}}
                                  if isinstance(top, dict) and isinstance(t, dict)
                                  and isinstance(t.get("training") or {}, dict) else t for t in tasks]}

    @field_validator("sizes")
    @classmethod
    def _family_sizes(cls, sizes: dict, info: ValidationInfo) -> dict[str, Axis]:
        if "family" not in info.data:  # its own error is reported
            return {}
        parsed = sizes_schema(info.data["family"]).model_validate(sizes)
        return {a: axis_of(a, getattr(parsed, a)) for a in type(parsed).model_fields}

    @model_validator(mode="after")
    def _across_keys(self) -> Space:
        fam, sampled = get_family(self.family), any(not ax.is_grid for ax in self.sizes.values())
        if sampled != (self.samples is not None):
            raise at_key("samples", "a size axis is a sampler, so the space needs `samples: N` (how many size points "
                      "to draw)" if sampled else "only meaningful when a size axis is a sampler (randint/choice/"
                      "uniform); remove it")
        for key, needed in CONSTRAINT_AXES.items():
            if getattr(self.constraints, key) not in (None, "block") and not set(needed) <= set(fam.size_axes):
                raise at_key(f"constraints.{key}", f"reads {' and '.join(needed)}, which {fam.name} sizes do not have "
                          f"(their axes: {', '.join(fam.size_axes)})")
        names = [t.name for t in self.tasks]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise at_key(f"tasks[{i}].name", f"task name {name!r} used twice; give each task its own `name`")
        return self


def load_space(path: str | Path) -> Space:
    """Read and validate a space file; every problem is a :class:`SpaceError` naming the key."""
    path = Path(path)
    if not path.is_file():
        shipped = sorted(p.name for p in SHIPPED.glob("*.yaml"))
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
        raise SpaceError(one_line(source, e.errors(include_url=False)[0])) from None
    space._path, space._text = None if source.startswith("<") else Path(source), text
    return space
