"""``weit quickstart``: ancestry -> distill -> sweep -> report on Fashion-MNIST in one command, sized for 2 CPU
cores. By default from the pair shipped in ``docs/data`` (an 89.3% ancestry and the size-aware bank made from
it); stage 1 is then shown on a slice with 2 Ray Train workers, and the sweep (``tune_spaces/quickstart.yaml``)
uses the shipped bank. ``--from-scratch`` trains both here on small budgets: a demonstration of the machinery,
not of the method (a short-trained ancestry has little to pass on).

``<out-dir>/quickstart.json`` remembers each stage's settings and the sha256 of its file, so a re-run reuses
what nothing upstream changed; ``--fresh`` starts a new generation (new files, Ray job and sweep names)."""

from __future__ import annotations

import hashlib
import json
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

from pipelines.common import UserError, storage_path
from pipelines.tracking import SWEEP_EXPERIMENT, find_sweep, mlflow_ui_url, prepare_mlflow, tracking_uri
from weit_core.trials import file_sha256

REPO = Path(__file__).resolve().parent.parent
DEFAULT_SPACE = REPO / "tune_spaces" / "quickstart.yaml"
SHIPPED_ANCESTRY = REPO / "docs" / "data" / "fmnist_ancestry.safetensors"
SHIPPED_BANK = REPO / "docs" / "data" / "fmnist_bank.safetensors"
DEFAULT_OUT = "weit_runs/quickstart"


@dataclass
class QuickstartBudget:
    """What decides how long it takes (defaults: <= 10 minutes on 2 CPU cores from the shipped pair)."""

    from_scratch: bool = False
    ancestry_depth: int = 6
    ancestry_width: int = 96
    ancestry_heads: int = 3
    ancestry_epochs: int = 4
    ancestry_limit: int = 20000  # training examples (val 5k and test 10k stay whole)
    distill_epochs: int = 3  # of the sweep's bank (from_scratch)
    distill_limit: int = 10000
    demo_limit: int = 4096  # else stage 1 is a one-epoch demonstration on this many, over demo_depths x widths
    demo_depths: tuple[int, ...] = (1, 2)
    demo_widths: tuple[int, ...] = (32, 64)
    workers: int = 2
    n_templates: int = 16
    block: int = 16
    seed: int = 0


@dataclass
class QuickstartResult:
    ancestry: Path
    bank: Path
    sweep: str
    tracking_uri: str
    leaderboard: Any = None  # pipelines.report.Report
    plots: list[Path] = field(default_factory=list)
    report_dir: Path | None = None
    mlflow_ui: str = ""
    mlflow_url: str = ""
    stage_s: dict[str, float] = field(default_factory=dict)
    reused: dict[str, bool] = field(default_factory=dict)
    wall_s: float = 0.0


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _test_metric(metrics: dict) -> str:
    """``, test_<metric> X`` from a stage's metrics (its task names the metric), or nothing."""
    name = next((k for k in metrics if k.startswith("test_") and k != "test_s"), None)
    return f", {name} {metrics[name]:.4f}" if name is not None else ""


def mlflow_ui_command(uri: str) -> str:
    """The command that opens this tracking store in the MLflow UI (loopback only)."""
    if uri.startswith(("http://", "https://")):
        return f"open {uri} in a browser (the MLflow server is already running)"
    exe = Path(sys.executable).with_name("mlflow")
    shown = "mlflow" if shutil.which("mlflow") == str(exe) else str(
        exe.relative_to(Path.cwd()) if exe.is_relative_to(Path.cwd()) else exe)
    return f"{shlex.quote(shown)} ui --backend-store-uri {shlex.quote(uri)} --host 127.0.0.1 --port 5000"


def run_quickstart(
    out_dir: str | Path = DEFAULT_OUT, *, fresh: bool = False, budget: QuickstartBudget | None = None,
    space: str | Path | None = None, mlflow_uri: str | None = None, address: str | None = None,
    storage: str | None = None, quiet: bool = False,
) -> QuickstartResult:
    """ancestry -> distill -> sweep -> report, reusing what an earlier run built with the same settings."""
    from rich.console import Console

    from weit_core.data import find_fashion_mnist

    t_start = time.perf_counter()
    b = budget or QuickstartBudget()
    console = Console(highlight=False)
    say = (lambda *_a, **_k: None) if quiet else console.print
    data_dir = find_fashion_mnist()  # DataNotFoundError (exit 2, with the install line) before any work
    import mlflow
    from ray import tune

    from pipelines.ancestry import train_ancestry
    from pipelines.distill import DistillConfig, run_distill
    from pipelines.report import build_report
    from pipelines.sweep import run_sweep
    from weit_core.io import read_header
    from weit_core.space import load_space
    space_path = Path(space) if space else DEFAULT_SPACE
    if not space_path.is_file():
        raise UserError(f"quickstart space {space_path} not found; pass --space tune_spaces/quickstart.yaml from "
                        f"a weit checkout")
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    state_file = out / "quickstart.json"
    try:
        state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    except json.JSONDecodeError:
        state = {}
    gen = state.get("generation", 0) + fresh
    state = {"generation": gen} if fresh else {"generation": gen, **state}

    def reusable(stage: str, key: str, path: Path | None = None) -> bool:
        rec = state.get(stage, {})
        return rec.get("key") == key and (bool(rec.get("done")) if path is None else
                                          path.is_file() and rec.get("sha256") == file_sha256(path))

    def record(stage: str, key: str, path: Path | None = None, **extra: Any) -> None:
        state[stage] = {"key": key, **({"sha256": file_sha256(path)} if path is not None else {}), **extra}
        state_file.write_text(json.dumps(state, indent=1, default=str))

    if fresh:
        state_file.write_text(json.dumps(state, indent=1, default=str))
    uri, store, scratch = tracking_uri(mlflow_uri), storage_path(storage), b.from_scratch
    ancestry_path = out / "ancestry.safetensors" if scratch else SHIPPED_ANCESTRY
    bank_path = out / "bank.safetensors" if scratch else SHIPPED_BANK
    stage1_path = bank_path if scratch else out / "bank_demo.safetensors"
    result = QuickstartResult(ancestry_path, bank_path, "", uri)
    generation = "" if gen == 0 else f" (generation {gen})"
    say(f"[bold]weit quickstart[/bold]: Fashion-MNIST from {data_dir}; outputs in {out}, MLflow at {uri}")
    if scratch:
        say(f"from scratch: ancestry {b.ancestry_depth}x{b.ancestry_width} for {b.ancestry_epochs} epochs on "
            f"{b.ancestry_limit:,} images, bank over the space's sizes for {b.distill_epochs} epochs on "
            f"{b.distill_limit:,} images with {b.workers} Ray Train workers, sweep {space_path.name}{generation}")
    else:
        say(f"from the shipped ancestry and bank (docs/data; --from-scratch trains both here), a stage-1 "
            f"demonstration on {b.workers} Ray Train workers, sweep {space_path.name}{generation}")
        for f in (SHIPPED_ANCESTRY, SHIPPED_BANK):
            if not f.is_file():
                raise UserError(f"{f} is missing (it ships with weit); restore it from git or pass --from-scratch")

    def stage(i: int, title: str) -> float:
        if not quiet:
            console.print("")
            console.rule(f"[bold]{i}/4  {title}")
        return time.perf_counter()

    def done(name: str, t0: float, reused: bool, what: str) -> None:
        result.stage_s[name], result.reused[name] = time.perf_counter() - t0, reused
        say(f"[green]done[/green] {name}: {what} ({result.stage_s[name]:.0f} s{', reused' if reused else ''})")

    if not scratch:
        t0 = stage(1, "ancestry: the shipped teacher ViT (docs/data)")
        info = read_header(ancestry_path).get("info", {})
        record("ancestry", "shipped", ancestry_path)
        done("ancestry", t0, True, f"{ancestry_path}{_test_metric({**info.get('metrics', {}), **info})}")
    else:
        t0 = stage(1, "ancestry: train the teacher ViT (in-process)")
        settings = {"dataset": "fashion_mnist", "depth": b.ancestry_depth, "width": b.ancestry_width,
                    "heads": b.ancestry_heads, "epochs": b.ancestry_epochs, "limit": b.ancestry_limit, "seed": b.seed}
        key = _hash({**settings, "generation": gen})
        if reusable("ancestry", key, ancestry_path):
            metrics = read_header(ancestry_path).get("info", {}).get("metrics", {})
            done("ancestry", t0, True, f"{ancestry_path} already built with these settings{_test_metric(metrics)}; "
                                       f"--fresh to retrain")
        else:
            _, m = train_ancestry(**settings, out=ancestry_path, workers=0, mlflow_uri=uri, quiet=quiet)
            record("ancestry", key, ancestry_path)
            done("ancestry", t0, False, f"{ancestry_path}{_test_metric(m)}")
    anc_sha = state["ancestry"]["sha256"]

    what = "the sweep's template bank" if scratch else "a size-aware bank on a slice (a demonstration)"
    t0 = stage(2, f"distill: stage 1, {what} ({b.workers} Ray Train workers)")
    if scratch:  # the bank the sweep uses: trained over the space's sizes
        range_args, epochs, limit = {"space": str(space_path)}, b.distill_epochs, b.distill_limit
    else:
        range_args, epochs, limit = {"depths": list(b.demo_depths), "widths": list(b.demo_widths)}, 1, b.demo_limit
    key = _hash({"epochs": epochs, "limit": limit, "workers": b.workers, "n_templates": b.n_templates,
                 "block": b.block, "seed": b.seed, "ancestry_sha256": anc_sha, "generation": gen, **range_args})
    if reusable("bank", key, stage1_path):
        done("distill", t0, True, f"{stage1_path} already built from this ancestry with these settings; --fresh "
                                  f"to rebuild")
    else:
        _, m = run_distill(DistillConfig(
            teacher=str(ancestry_path), dataset="fashion_mnist", limit=limit, epochs=epochs, workers=b.workers,
            n_templates=b.n_templates, block=b.block, seed=b.seed, out=str(stage1_path),
            name=f"quickstart-bank-{key}", storage=store, address=address, mlflow_uri=uri, quiet=quiet, **range_args))
        record("bank", key, stage1_path)
        done("distill", t0, False, f"{stage1_path} (aux model{_test_metric(m)})"
             + ("" if scratch else f" (the sweep uses the shipped {SHIPPED_BANK.name})"))

    t0 = stage(3, f"sweep: stages 2+3 over {space_path.name} (Ray Tune)")
    key = _hash({"space": load_space(space_path).content_hash(), "bank": file_sha256(bank_path), "ancestry": anc_sha,
                 "generation": gen, "uri": uri, "out": str(out)})  # another --out-dir's generation is not this one's
    result.sweep = f"quickstart-{key}"
    if reusable("sweep", key):
        done("sweep", t0, True, f"sweep {result.sweep} already finished; --fresh to run it again")
    else:
        client = mlflow.MlflowClient(uri)
        exp = client.get_experiment_by_name(SWEEP_EXPERIMENT)
        resume = (exp is not None and find_sweep(client, exp.experiment_id, result.sweep) is not None
                  ) or tune.Tuner.can_restore(f"{store.rstrip('/')}/{result.sweep}")
        if resume:
            say(f"sweep {result.sweep} was interrupted before: resuming it (finished trials are not re-run)")
        s = run_sweep(space_path, bank=str(bank_path), ancestry=str(ancestry_path), name=result.sweep,
                      resume=resume, storage=store, address=address, mlflow_uri=uri, quiet=quiet)
        record("sweep", key, done=s.n_failed == 0 and s.n_finished >= s.n_trials, name=result.sweep,
               finished=s.n_finished, failed=s.n_failed)
        done("sweep", t0, False, f"{s.n_finished}/{s.n_trials} trials finished, {s.n_failed} failed")

    t0 = stage(4, "report: leaderboard and plots from MLflow")
    result.report_dir = out / "report"
    result.leaderboard = build_report(result.sweep, out=result.report_dir, mlflow_uri=uri, show=False)
    result.plots = [Path(f) for f in result.leaderboard.files if Path(f).suffix == ".png"]
    done("report", t0, False, f"{len(result.plots)} plot(s) and the leaderboard in {result.report_dir}")
    result.mlflow_ui = mlflow_ui_command(uri)
    result.mlflow_url = mlflow_ui_url(uri, prepare_mlflow(uri, SWEEP_EXPERIMENT)[1], result.sweep)
    result.wall_s = time.perf_counter() - t_start
    if not quiet:
        _print_summary(console, result)
    return result


def _print_summary(console: Any, result: QuickstartResult) -> None:
    from rich.table import Table

    from pipelines.report import print_report

    console.print("")
    console.rule("[bold]leaderboard")
    print_report(result.leaderboard)
    table = Table(title="time per stage", header_style="bold")
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    for name, s in result.stage_s.items():
        table.add_row(name + (" (reused)" if result.reused.get(name) else ""), f"{s:.0f}")
    table.add_row("[bold]total", f"[bold]{result.wall_s:.0f}")
    console.print(table)
    console.print(f"leaderboard: {result.report_dir / 'leaderboard.md'} (all rows; also leaderboard.csv)\nplots:")
    for p in result.plots:
        console.print(f"  {p}", soft_wrap=True)
    console.print(f"ancestry: {result.ancestry}\nbank:     {result.bank}\nsweep:    {result.sweep}  "
                  f"(weit report --sweep {result.sweep})", soft_wrap=True)
    console.print("open the comparison in the MLflow UI (experiment weit-sweep, then compare the runs):")
    console.print(f"  {result.mlflow_ui}", soft_wrap=True)
    console.print(f"  then open {result.mlflow_url}  (this sweep's trials side by side)", soft_wrap=True)


def quickstart_command(
    out_dir: Annotated[str, typer.Option(help="Where the ancestry, bank, report and state file go.")] = DEFAULT_OUT,
    fresh: Annotated[bool, typer.Option("--fresh", help="Rebuild everything instead of reusing earlier "
                                                        "outputs.")] = False,
    from_scratch: Annotated[bool, typer.Option("--from-scratch", help="Train the ancestry and the sweep's bank "
                                                                      "here instead of starting from the shipped "
                                                                      "pair in docs/data.")] = False,
    ancestry_epochs: Annotated[int, typer.Option(help="Ancestry training epochs.")] = QuickstartBudget.ancestry_epochs,
    ancestry_limit: Annotated[int, typer.Option(help="Ancestry training examples.")] = QuickstartBudget.ancestry_limit,
    distill_epochs: Annotated[int, typer.Option(help="Distillation (stage 1) epochs.")] = QuickstartBudget.distill_epochs,
    distill_limit: Annotated[int, typer.Option(help="Distillation training examples.")] = QuickstartBudget.distill_limit,
    workers: Annotated[int, typer.Option(help="Ray Train workers for distillation.")] = QuickstartBudget.workers,
    space: Annotated[str, typer.Option(help="Search space of the sweep.")] = str(DEFAULT_SPACE.relative_to(REPO)),
    storage: Annotated[str | None, typer.Option(help="Ray Train/Tune run state; default ./weit_runs.")] = None,
    address: Annotated[str | None, typer.Option(
        help="Ray cluster address (default: start a local Ray; 'auto': the head `ray start` runs here).")] = None,
    mlflow_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI (default: sqlite ./mlruns.db).")] = None,
) -> None:
    """ancestry -> distill -> sweep -> report on Fashion-MNIST, sized for a laptop (<= 10 min on 2 CPU cores)."""
    if min(ancestry_limit, distill_limit) < 0 or ancestry_epochs < 1 or distill_epochs < 1 or workers < 1:
        raise UserError("--ancestry-epochs, --distill-epochs and --workers must be >= 1")
    space_path = Path(space)
    if not space_path.is_absolute() and not space_path.is_file():
        space_path = REPO / space  # the shipped space, from any working directory
    budget = QuickstartBudget(from_scratch=from_scratch, ancestry_epochs=ancestry_epochs, ancestry_limit=ancestry_limit,
                              distill_epochs=distill_epochs, distill_limit=distill_limit, workers=workers)
    run_quickstart(out_dir, fresh=fresh, budget=budget, space=space_path, mlflow_uri=mlflow_uri, address=address,
                   storage=storage)
