"""The ``weit`` command: a typer app whose subcommands (``<name>_command``, each in its own module) are imported
only when they run or show their ``--help``, so ``weit --help`` answers without torch, Ray and MLflow. ``main()``
is the error boundary: a user mistake is one ``error: ...`` line and exit code 2, a bug one line and a pointer to
``--debug`` (anywhere on the line: the full traceback) and exit code 1, Ctrl-C exit code 130."""

from __future__ import annotations

import importlib.metadata
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
    from typer._click.exceptions import UsageError
except ImportError:  # pragma: no cover - older typer on top of click
    from click.exceptions import UsageError  # type: ignore[no-redef]

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # Ray >= 2.59 token auth breaks local `ray job`/status
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # timm never downloads; fail fast instead of hanging offline
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# spinning OpenMP threads: torch ~7x slower per step when another process shares the cores (set before torch)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

EXIT_USER, EXIT_BUG, EXIT_INTERRUPTED = 2, 1, 130

LAZY_COMMANDS: dict[str, tuple[str, str]] = {
    "ancestry": ("pipelines.ancestry", "Train an ancestry (the teacher) of any family on a task."),
    "distill": ("pipelines.distill",
                "Stage 1: build a template bank from an ancestry (WAVE) or by pre-training (WeiT), on Ray Train."),
    "sweep": ("pipelines.sweep",
              "Stages 2+3: initialize and train many sizes x strategies on Ray Tune, logged to MLflow."),
    "report": ("pipelines.report", "Leaderboard and plots from the MLflow runs."),
    "export": ("pipelines.report", "Export a run's model as safetensors (+ header)."),
    "quickstart": ("pipelines.quickstart", "ancestry -> distill -> sweep -> report on Fashion-MNIST, sized for a laptop."),
    "submit": ("pipelines.submit", "Run a weit command as a Ray job on a cluster."),
}  # name -> (module holding ``<name>_command``, one-line help for the command list)


class LazyGroup(TyperGroup):
    """Every command is listed (and suggested for typos) from a placeholder carrying its one-line help; its
    module is imported when the command is resolved to run or show its own ``--help``."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name, (_, short) in LAZY_COMMANDS.items():
            self.commands.setdefault(name, TyperCommand(name, help=short, short_help=short))

    def resolve_command(self, ctx: typer.Context, args: list[str]):
        name, cmd, rest = super().resolve_command(ctx, args)
        if name in LAZY_COMMANDS and cmd is not None and cmd.callback is None:
            module = importlib.import_module(LAZY_COMMANDS[name][0])
            info = CommandInfo(name=name, callback=getattr(module, f"{name}_command"),
                               context_settings=getattr(module, f"{name.upper()}_CONTEXT", None))
            cmd = self.commands[name] = typer.main.get_command_from_info(
                info, pretty_exceptions_short=True, rich_markup_mode=self.rich_markup_mode)
        return name, cmd, rest


app = typer.Typer(
    cls=LazyGroup, name="weit", add_completion=False, pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="weit: initialize networks of any family, depth and width from one pre-trained model with weight templates "
         "(WAVE / WeiT), on Ray, tracked in MLflow. Start with `weit quickstart`.",
)


@app.callback(invoke_without_command=True)
def _global(
    ctx: typer.Context,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors (works anywhere "
                                                        "on the line).")] = False,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    """Global options (``main`` reads ``--debug`` itself, wherever it stands); no command: the help."""
    if version or ctx.invoked_subcommand is None:
        typer.echo(f"weit {importlib.metadata.version('weit')}" if version else ctx.get_help())
        raise typer.Exit(0)


@app.command("data")
def data_command(
    name: Annotated[str, typer.Argument(help="fashion_mnist, digits, a parquet path, or kind:arg "
                                             "(control:CartPole-v1).")] = "fashion_mnist",
    out: Annotated[str | None, typer.Option(help="Write it as parquet (splits, or kind:arg's data) here.")] = None,
    limit: Annotated[int | None, typer.Option(help="Keep only this many training examples (Fashion-MNIST).")] = None,
    episodes: Annotated[int | None, typer.Option(help="kind:arg only: episodes to record.")] = None,
    seed: Annotated[int, typer.Option(help="kind:arg only: random seed.")] = 0,
) -> None:
    """Show where a dataset is and what it holds; with --out, convert it to parquet (kind:arg: make it)."""
    from weit_core import data as wdata
    from weit_core.parquet import to_parquet

    if ":" in name and not Path(name).exists():
        from weit_core.tasks import get_data_maker

        if out is None:
            raise UserError(f"`weit data {name}` writes data: give --out DIR")
        more = {} if episodes is None else {"episodes": episodes}  # else the kind's own default
        wrote = get_data_maker(name)(name.partition(":")[2], out=out, seed=seed, **more)
        facts = [f"{k} {v}" for k, v in (wrote if isinstance(wrote, dict) else {}).items()
                 if isinstance(v, int | float | str) and not isinstance(v, bool)]
        typer.echo(f"{name}: wrote {out}" + (f" ({', '.join(facts)})" if facts else ""))
        return
    fmnist = name == "fashion_mnist"  # find_fashion_mnist's DataNotFoundError says how to install it
    where = f" (files in {wdata.find_fashion_mnist()})" if fmnist else ""
    splits = wdata.load_fashion_mnist(limit=limit) if fmnist else wdata.load_dataset(name)
    facts, shape = splits.describe(), "x".join(map(str, splits.input_shape))
    typer.echo(f"{splits.name}{where}: {facts['n_train']:,} train / {facts['n_val']:,} val / {facts['n_test']:,} "
               f"test images of {shape}, {splits.num_classes} classes")
    if out is not None:
        for s in ("train", "val", "test"):  # with a `split` column: the folder reloads with exactly these splits
            typer.echo(f"  {s:5s} -> {to_parquet(getattr(splits, s), Path(out) / f'{s}.parquet', split=s)}")
        typer.echo(f"use it with e.g. `weit ancestry --dataset {Path(out)}` (the folder is one dataset, same splits)")


def is_user_error(exc: BaseException) -> bool:
    """A mistake the user can fix: a UserError, a usage error, a missing file, a ValueError subclass of
    weit_core's, or a ValueError raised in weit's own code (one from inside torch or Ray is a bug)."""
    if not isinstance(exc, ValueError):
        return isinstance(exc, UserError | UsageError | FileNotFoundError)
    weit = Path(__file__).resolve().parents[1]
    raised_in = Path(traceback.extract_tb(exc.__traceback__)[-1].filename).resolve()
    return any(c.__module__.startswith("weit_core") for c in type(exc).__mro__) or any(
        raised_in.is_relative_to(weit / pkg) for pkg in ("weit_core", "pipelines"))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``weit`` script; returns the exit code (typer's own for ``Exit`` and Ctrl-C, 130)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)  # --debug anywhere before a literal --
    head = [a for a in argv[:cut] if a != "--debug"]
    argv, debug = head + argv[cut:], len(head) != cut
    try:
        rv = typer.main.get_command(app).main(args=argv, prog_name="weit", standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except (typer.Abort, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    except SystemExit as e:  # typer's own, e.g. on a closed pipe
        return e.code if isinstance(e.code, int) else int(e.code is not None)
    except BaseException as e:  # the one place every error becomes one line
        if debug:
            traceback.print_exc()
        if isinstance(e, UsageError):
            hint = f" (see `{e.ctx.command_path if e.ctx else 'weit'} --help`)"
            line, code = e.format_message(), EXIT_USER
        elif is_user_error(e):
            line, hint, code = str(e) or type(e).__name__, "", EXIT_USER
        else:
            line, code = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}", EXIT_BUG
            hint = "" if debug else " (run with --debug for the traceback)"
        line = " ".join(line.split())
        print(f"error: {line if len(line) <= 400 else line[:397] + '...'}{hint}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
