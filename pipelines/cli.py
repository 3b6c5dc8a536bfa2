"""The ``weit`` command.

Each subcommand is a typer-annotated ``<name>_command`` in its own module, imported only when it runs or its
``--help`` is asked for, so ``weit --help`` and a mistyped flag answer without loading torch, Ray and MLflow.
``main()`` is the error boundary: a user mistake is one ``error: ...`` line and exit code 2, anything else one
line and a pointer to ``--debug`` (the full traceback), exit code 1.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from difflib import get_close_matches
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
# Spinning OpenMP threads make torch ~7x slower per step once another process shares the cores (4x96 ViT,
# 2 threads: 2.4 s/step vs 0.58 s passive); must be set before torch loads. OMP_WAIT_POLICY=ACTIVE overrides.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

EXIT_USER, EXIT_BUG, EXIT_INTERRUPTED = 2, 1, 130

LAZY_COMMANDS: dict[str, tuple[str, str]] = {
    "ancestry": ("pipelines.ancestry", "Train an ancestry ViT (the teacher) on a task."),
    "distill": ("pipelines.distill",
                "Stage 1: build a template bank from an ancestry (WAVE) or by pre-training (WeiT), on Ray Train."),
    "sweep": ("pipelines.sweep",
              "Stages 2+3: initialize and train many sizes x strategies on Ray Tune, logged to MLflow."),
    "report": ("pipelines.report", "Leaderboard and plots from the MLflow runs."),
    "export": ("pipelines.report", "Export a run's model as safetensors (+ header)."),
    "quickstart": ("pipelines.quickstart", "ancestry -> distill -> sweep -> report on Fashion-MNIST, sized for a laptop."),
    "submit": ("pipelines.submit", "Run a weit command as a Ray job on a cluster."),
}
"""name -> (module holding ``<name>_command``, one-line help for the command list)."""


class LazyGroup(TyperGroup):
    """Subcommands imported on first use; the command list shows the static help above."""

    _listing = False

    def list_commands(self, ctx: typer.Context) -> list[str]:
        return [*self.commands, *(n for n in LAZY_COMMANDS if n not in self.commands)]

    def get_command(self, ctx: typer.Context, cmd_name: str) -> Any:
        if cmd_name in self.commands or cmd_name not in LAZY_COMMANDS:
            return self.commands.get(cmd_name)
        module_name, short = LAZY_COMMANDS[cmd_name]
        if self._listing:
            return TyperCommand(cmd_name, help=short, short_help=short)
        module = importlib.import_module(module_name)
        info = CommandInfo(name=cmd_name, callback=getattr(module, f"{cmd_name}_command"),
                           context_settings=getattr(module, f"{cmd_name.upper()}_CONTEXT", None))
        self.commands[cmd_name] = typer.main.get_command_from_info(
            info, pretty_exceptions_short=True, rich_markup_mode=self.rich_markup_mode)
        return self.commands[cmd_name]

    def format_help(self, ctx: typer.Context, formatter: Any) -> None:
        self._listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing = False

    def resolve_command(self, ctx: typer.Context, args: list[str]):
        try:
            return super().resolve_command(ctx, args)
        except UsageError as e:  # typer's own suggestion only knows the commands already imported
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
    """Global options (``main`` reads ``--debug`` itself, wherever it stands)."""


@app.command("data")
def data_command(
    name: Annotated[str, typer.Argument(help="fashion_mnist, digits, or a parquet file/folder.")] = "fashion_mnist",
    out: Annotated[str | None, typer.Option(help="Write the train/val/test splits as parquet into this "
                                                 "folder (for Ray Data / a cluster).")] = None,
    limit: Annotated[int | None, typer.Option(help="Keep only this many training examples (Fashion-MNIST)."
                                              )] = None,
) -> None:
    """Show where a dataset is and what it holds; with --out, convert it to parquet."""
    from weit_core import data as wdata

    where = ""
    if name == "fashion_mnist":
        where = f" (files in {wdata.find_fashion_mnist()})"  # DataNotFoundError says how to install it
        splits = wdata.load_fashion_mnist(limit=limit)
    else:
        splits = wdata.load_dataset(name)
    facts, (c, h, w) = splits.describe(), splits.input_shape
    typer.echo(f"{splits.name}{where}: {facts['n_train']:,} train / {facts['n_val']:,} val / {facts['n_test']:,} "
               f"test images of {c}x{h}x{w}, {splits.num_classes} classes")
    if out is not None:
        for s in ("train", "val", "test"):  # with a `split` column: the folder reloads with exactly these splits
            typer.echo(f"  {s:5s} -> {wdata.to_parquet(getattr(splits, s), Path(out) / f'{s}.parquet', split=s)}")
        typer.echo(f"use it with e.g. `weit ancestry --dataset {Path(out)}` (the folder is one dataset, same splits)")


# ------------------------------------------------------------------------------------------ error boundary


def _one_line(text: str, limit: int = 400) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def is_user_error(exc: BaseException) -> bool:
    """A mistake the user can fix: a UserError, a usage error, a missing file, a ValueError subclass of
    weit_core's, or a ValueError raised in weit's own code (one from inside torch or Ray is a bug)."""
    if isinstance(exc, UserError | UsageError | FileNotFoundError):
        return True
    if not isinstance(exc, ValueError):
        return False
    if any(c.__module__.startswith("weit_core") for c in type(exc).__mro__ if c is not ValueError):
        return True
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    root = Path(__file__).resolve().parent.parent
    return tb is not None and any(Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(root / pkg)
                                  for pkg in ("weit_core", "pipelines"))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``weit`` script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)  # --debug anywhere before a literal --
    head = [a for a in argv[:cut] if a != "--debug"]
    argv, debug = head + argv[cut:], len(head) != cut
    try:
        rv = typer.main.get_command(app).main(args=argv, prog_name="weit", standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except NoArgsIsHelpError as e:
        typer.echo(e.ctx.get_help() if e.ctx else e.format_message())
        return 0
    except typer.Exit as e:
        return e.exit_code
    except (typer.Abort, KeyboardInterrupt) as e:
        print(f"error: {'aborted' if isinstance(e, typer.Abort) else 'interrupted'}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except UsageError as e:
        if debug:
            traceback.print_exc()
        hint = f" (see `{e.ctx.command_path} --help`)" if e.ctx is not None else " (see `weit --help`)"
        print(f"error: {_one_line(e.format_message())}{hint}", file=sys.stderr)
        return EXIT_USER
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_BUG)
    except BaseException as e:  # the one place every error becomes one line
        if debug:
            traceback.print_exc()
        if is_user_error(e):
            print(f"error: {_one_line(str(e) or type(e).__name__)}", file=sys.stderr)
            return EXIT_USER
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"error: {type(e).__name__}: {_one_line(first)}"
              + ("" if debug else " (run with --debug for the traceback)"), file=sys.stderr)
        return EXIT_BUG


if __name__ == "__main__":
    sys.exit(main())
