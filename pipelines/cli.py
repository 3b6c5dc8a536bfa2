"""The ``weit`` command.

Subcommands live in their own modules (``pipelines.<stage>``) as typer-annotated ``<name>_command``
functions. They are imported only when that subcommand runs or its ``--help`` is asked for, so ``weit
--help``, ``weit data`` and a mistyped flag answer in a moment instead of paying for torch + Ray +
MLflow imports; a stage module that does not exist yet is simply not listed.

``main()`` is the error boundary: a user mistake (``pipelines.common.UserError``, a ``ValueError``
raised by weit's own code such as ``WeitFileError`` / ``DataNotFoundError``, a missing file, a usage
error) is printed as one ``error: ...`` line with exit code 2; anything else as one line plus a pointer
to ``--debug`` (which prints the full traceback), exit code 1.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperCommand, TyperGroup
from typer.models import CommandInfo

from pipelines.common import UserError

try:  # typer >= 0.2x ships its own copy of click; its exceptions are the ones raised here
    from typer._click.exceptions import NoArgsIsHelpError, UsageError
except ImportError:  # pragma: no cover - older typer on top of click
    from click.exceptions import NoArgsIsHelpError, UsageError  # type: ignore[no-redef]

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # Ray >= 2.59 token auth breaks local `ray job`/status
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # timm never downloads; fail fast instead of hanging offline
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# OpenMP threads that spin while waiting make multi-threaded torch ~7x slower per step as soon as another
# process shares the cores (measured: 4x96 ViT, 2 threads: 2.4 s/step spinning vs 0.58 s passive, 0.34 s
# with 1 thread); set before torch loads. Export OMP_WAIT_POLICY=ACTIVE to override on a dedicated machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

EXIT_USER = 2
EXIT_BUG = 1
EXIT_INTERRUPTED = 130

LAZY_COMMANDS: dict[str, tuple[str, str, str]] = {
    "ancestry": ("pipelines.ancestry", "ancestry_command", "Train an ancestry ViT (the teacher) on a task."),
    "distill": ("pipelines.distill", "distill_command",
                "Stage 1: build a template bank from an ancestry (WAVE) or by pre-training (WeiT), on Ray Train."),
    "sweep": ("pipelines.sweep", "sweep_command",
              "Stages 2+3: initialize and train many sizes x strategies on Ray Tune, logged to MLflow."),
    "report": ("pipelines.report", "report_command", "Leaderboard and plots from the MLflow runs."),
    "export": ("pipelines.report", "export_command", "Export a run's model as safetensors (+ header)."),
    "quickstart": ("pipelines.quickstart", "quickstart_command",
                   "ancestry -> distill -> sweep -> report on Fashion-MNIST, sized for a laptop."),
    "submit": ("pipelines.submit", "submit_command", "Run a weit command as a Ray job on a cluster."),
}
"""name -> (module, function, one-line help for the command list). The module is imported on use."""


class LazyGroup(TyperGroup):
    """A typer group whose subcommands are imported on first use; the command list uses the static
    one-line help above, so ``weit --help`` imports nothing heavy."""

    _listing = False

    def _lazy_names(self) -> list[str]:
        return [n for n, (mod, _, _) in LAZY_COMMANDS.items()
                if n not in self.commands and importlib.util.find_spec(mod) is not None]

    def list_commands(self, ctx: typer.Context) -> list[str]:
        return [*self.commands, *self._lazy_names()]

    def get_command(self, ctx: typer.Context, cmd_name: str) -> Any:
        if cmd_name in self.commands:
            return self.commands[cmd_name]
        if cmd_name not in LAZY_COMMANDS or cmd_name not in self._lazy_names():
            return None
        module_name, attr, short = LAZY_COMMANDS[cmd_name]
        if self._listing:  # the command list only needs the name and a line of help
            return TyperCommand(cmd_name, help=short, short_help=short)
        module = importlib.import_module(module_name)
        settings = getattr(module, f"{cmd_name.upper()}_CONTEXT", None)
        info = CommandInfo(name=cmd_name, callback=getattr(module, attr), context_settings=settings)
        cmd = typer.main.get_command_from_info(info, pretty_exceptions_short=True,
                                               rich_markup_mode=self.rich_markup_mode)
        self.commands[cmd_name] = cmd
        return cmd

    def format_help(self, ctx: typer.Context, formatter: Any) -> None:
        self._listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing = False

    def resolve_command(self, ctx: typer.Context, args: list[str]):
        try:
            return super().resolve_command(ctx, args)
        except UsageError as e:
            from difflib import get_close_matches

            close = get_close_matches(args[0], self.list_commands(ctx)) if args else []
            if close and "Did you mean" not in e.message:
                e.message = f"{e.message.rstrip('.')}. Did you mean {', '.join(map(repr, close))}?"
            raise


app = typer.Typer(
    cls=LazyGroup, name="weit", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="weit: initialize ViTs of any depth and width from one pre-trained model with weight templates "
         "(WAVE / WeiT), on Ray, tracked in MLflow. Start with `weit quickstart`.",
)

_DEBUG = False


def _show_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"weit {version('weit')}")
        except PackageNotFoundError:
            typer.echo("weit (not installed: run `pip install -e .`)")
        raise typer.Exit(0)


@app.callback()
def _global(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors (works anywhere "
                                                        "on the line).")] = False,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.", is_eager=True,
                                          callback=_show_version)] = False,
) -> None:
    """Global options."""
    global _DEBUG
    _DEBUG = _DEBUG or debug


# ------------------------------------------------------------------------------------------- weit data


def data_status(name: str = "fashion_mnist", out: str | Path | None = None, limit: int | None = None,
                echo=print) -> dict:
    """Load a dataset (``fashion_mnist``, ``digits`` or a parquet path), say what and where it is, and with
    ``out`` write its splits as parquet (columns image, label, split). Returns the facts printed."""
    from weit_core import data as wdata

    facts: dict[str, Any] = {"name": name}
    if name == "fashion_mnist":
        facts["location"] = str(wdata.find_fashion_mnist())  # DataNotFoundError says how to install it
        splits = wdata.load_fashion_mnist(limit=limit)
    else:
        splits = wdata.load_dataset(name)
    facts.update(splits.describe())
    where = f" (files in {facts['location']})" if "location" in facts else ""
    c, h, w = splits.input_shape
    echo(f"{splits.name}{where}: {facts['n_train']:,} train / {facts['n_val']:,} val / {facts['n_test']:,} test "
         f"images of {c}x{h}x{w}, {splits.num_classes} classes")
    if out is not None:
        # with a `split` column, so the folder reloads (weit_core.data.load_parquet) with exactly these splits
        facts["parquet"] = {s: str(wdata.to_parquet(getattr(splits, s), Path(out) / f"{s}.parquet", split=s))
                            for s in ("train", "val", "test")}
        for split, path in facts["parquet"].items():
            echo(f"  {split:5s} -> {path}")
        echo(f"use it with e.g. `weit ancestry --dataset {Path(out)}` (the folder is one dataset, same splits)")
    return facts


@app.command("data")
def data_command(
    name: Annotated[str, typer.Argument(help="fashion_mnist, digits, or a parquet file/folder.")] = "fashion_mnist",
    out: Annotated[str | None, typer.Option(help="Write the train/val/test splits as parquet into this "
                                                 "folder (for Ray Data / a cluster).")] = None,
    limit: Annotated[int | None, typer.Option(help="Keep only this many training examples (Fashion-MNIST)."
                                              )] = None,
) -> None:
    """Show where a dataset is and what it holds; with --out, convert it to parquet."""
    data_status(name, out, limit, echo=typer.echo)


# ------------------------------------------------------------------------------------------ error boundary


def _one_line(text: str, limit: int = 400) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _raised_in_weit(exc: BaseException) -> bool:
    """True when the innermost frame of ``exc`` is weit's own code (weit_core/ or pipelines/): weit raises
    ValueError deliberately for bad input, with the fix in the message; a ValueError from inside torch
    or Ray is treated as a bug."""
    tb = exc.__traceback__
    last = None
    while tb is not None:
        last = tb
        tb = tb.tb_next
    if last is None:
        return False
    path = Path(last.tb_frame.f_code.co_filename).resolve()
    root = Path(__file__).resolve().parent.parent
    return any(path.is_relative_to(root / pkg) for pkg in ("weit_core", "pipelines"))


def is_user_error(exc: BaseException) -> bool:
    """A mistake the user can fix: our UserError, any ValueError subclass defined in weit_core
    (WeitFileError, DataNotFoundError, ...), a ValueError raised by weit's own code, a missing file."""
    if isinstance(exc, UserError | UsageError | FileNotFoundError):
        return True
    if isinstance(exc, ValueError):
        if any(c.__module__.startswith("weit_core") for c in type(exc).__mro__ if c is not ValueError):
            return True
        return _raised_in_weit(exc)
    return False


def _strip_debug(argv: list[str]) -> tuple[list[str], bool]:
    """``--debug`` anywhere before a literal ``--`` switches tracebacks on (it is documented as a global
    option, but users append it to a failing command)."""
    cut = argv.index("--") if "--" in argv else len(argv)
    head = [a for a in argv[:cut] if a != "--debug"]
    return head + argv[cut:], len(head) != cut


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``weit`` script; returns the exit code."""
    global _DEBUG
    argv, _DEBUG = _strip_debug(list(sys.argv[1:] if argv is None else argv))
    command = typer.main.get_command(app)
    try:
        rv = command.main(args=argv, prog_name="weit", standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except NoArgsIsHelpError as e:
        typer.echo(e.ctx.get_help() if e.ctx else e.format_message())
        return 0
    except typer.Exit as e:
        return e.exit_code
    except typer.Abort:
        print("error: aborted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except UsageError as e:
        if _DEBUG:
            traceback.print_exc()
        hint = f" (see `{e.ctx.command_path} --help`)" if e.ctx is not None else " (see `weit --help`)"
        print(f"error: {_one_line(e.format_message())}{hint}", file=sys.stderr)
        return EXIT_USER
    except BaseException as e:  # the one place every error becomes one line
        if isinstance(e, SystemExit):
            return e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_BUG)
        if _DEBUG:
            traceback.print_exc()
        if is_user_error(e):
            print(f"error: {_one_line(str(e) or type(e).__name__)}", file=sys.stderr)
            return EXIT_USER
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"error: {type(e).__name__}: {_one_line(first)}" + ("" if _DEBUG else
              " (run with --debug for the traceback)"), file=sys.stderr)
        return EXIT_BUG
    finally:
        _DEBUG = False


if __name__ == "__main__":
    sys.exit(main())
