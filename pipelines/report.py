"""``weit report``: which initialization wins, per task. Reads a sweep back from MLflow (never from Tune's
files), ranks it with ``weit_core.leaderboard`` in each task's own metric and direction (the trials' tags
``weit.metric``, ``weit.mode``), logs the leaderboard and plots (and, where trials logged sample grids, the
strategies' grids side by side at the winning size) to the parent run and registers each task's
winning *initialized* model as ``weit-<task>@champion``. ``weit export`` writes a trial's model out."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

from pipelines import tracking
from pipelines.common import UserError
from pipelines.tracking import SWEEP_EXPERIMENT, find_sweep, tracking_uri
from weit_core import leaderboard as lb
from weit_core.leaderboard import Winner, parse_budget

EXPERIMENT = SWEEP_EXPERIMENT


@dataclass
class Report:
    sweep: str
    parent_run_id: str
    runs: Any  # DataFrame: one row per child run (weit_core.leaderboard's table)
    leaderboard: Any  # DataFrame: one row per group, at its best learning rate
    strategy_ranking: Any  # DataFrame: per task x strategy
    winners: dict[str, Winner]
    files: list[Path] = field(default_factory=list)
    n_failed: int = 0


def find_parent(client: Any, sweep: str | None = None, parent_run_id: str | None = None,
                experiment: str = EXPERIMENT) -> Any:
    """The sweep's parent run, by name or by id."""
    if parent_run_id:
        try:
            return client.get_run(parent_run_id)
        except Exception as e:  # MlflowException: RESOURCE_DOES_NOT_EXIST
            raise UserError(f"no MLflow run {parent_run_id!r} in {client.tracking_uri}; check --parent-run / "
                            f"--mlflow-uri") from e
    if not sweep:
        raise UserError("name the sweep: --sweep NAME or --parent-run RUN_ID")
    exp = client.get_experiment_by_name(experiment)
    if (parent := exp and find_sweep(client, exp.experiment_id, sweep)) is None:
        raise UserError(f"no sweep named {sweep!r} in MLflow at {client.tracking_uri} (experiment {experiment!r}); "
                        f"run `weit sweep` first or pass the --mlflow-uri it used")
    return parent


def load_runs(parent: Any) -> Any:
    """The sweep's child runs (``mlflow.search_runs``) as ``weit_core.leaderboard``'s table: ``val_e<k>`` is
    each run's own metric after ``k`` epochs, ``test`` its test value."""
    import mlflow
    import pandas as pd

    df = mlflow.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
                            max_results=100_000)
    if df.empty:
        return pd.DataFrame(columns=[*lb.GROUP, "lr", "seed", "status", "run_id"])
    col = lambda name: df[name] if name in df else pd.Series(float("nan"), index=df.index)  # noqa: E731
    number = lambda name: pd.to_numeric(col(name), errors="coerce")  # noqa: E731
    out = pd.DataFrame({  # a trial that failed in init has only its tags
        "task": df["tags.weit.task"], "strategy": df["tags.weit.strategy"], "size": df["tags.weit.size"],
        "lr": number("params.lr").fillna(number("tags.weit.lr")),
        "seed": number("params.seed").fillna(number("tags.weit.seed")).astype(int), "status": df["status"],
        "run_id": df["run_id"], "artifact_uri": df["artifact_uri"], "num_params": number("params.num_params"),
        "epochs": number("params.epochs"), "init_s": number("params.init_s"), "failure": col("tags.weit.failure"),
        # runs from before trials were tagged with their task's metric were all classification
        "metric": col("tags.weit.metric").fillna("val_acc"), "mode": col("tags.weit.mode").fillna("max"),
        "test": float("nan")})
    per_budget: dict[int, Any] = {}
    for metric in out["metric"].unique():
        mine = out["metric"] == metric
        out.loc[mine, "test"] = col(f"metrics.test_{metric.removeprefix('val_')}")[mine]
        for name in df.columns:
            if name.startswith("metrics.") and (p := parse_budget(name[len("metrics."):])) and p[0] == metric:
                per_budget.setdefault(p[1], pd.Series(float("nan"), index=df.index))[mine] = df[name][mine]
    return out.assign(**{f"val_e{e}": per_budget[e] for e in sorted(per_budget)})


def sample_grids(client: Any, runs: Any, board: Any, w: Winner, out_dir: Path) -> Path | None:
    """The last sample grid of each strategy's best run at the winner's size, side by side
    (``leaderboard.samples_figure``); None where those runs logged none (tasks without a ``sample_grid``)."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with tempfile.TemporaryDirectory(prefix="weit-samples-") as d:
        panels = []
        for run in lb.best_runs_at(runs, board, w.task, w.size):
            if (last := tracking.last_samples(client, run["run_id"])) is not None:
                step, path = last
                panels.append((run, step, Path(client.download_artifacts(run["run_id"], path, d))))
        return lb.samples_figure(panels, w, out_dir) if panels else None


def print_report(report: Report) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for task, rows in report.leaderboard.groupby("task", sort=True):
        head, cells = lb.table(rows)
        keep = [i for i, h in enumerate(head) if h not in ("seeds", "failed") and not h.startswith("test")]
        table = Table(title=f"{report.sweep}: {task} ({rows['metric'].iloc[0]}, mean ± std over seeds)")
        for i in keep:
            table.add_column(head[i], justify="left" if i < 2 else "right")
        for row in cells[:15]:
            table.add_row(*[row[i] for i in keep])
        console.print(table)
        if len(rows) > 15:
            console.print(f"  ... {len(rows) - 15} more rows in leaderboard.md")
        if w := report.winners.get(task):
            reg = f"; registered as {w.registered}" if w.registered else ""
            console.print(f"[bold]{task}[/bold]: winner {w.strategy} at {w.size} ({w.num_params:,} params), "
                          f"{w.line()} (best of {w.n_lrs} lrs); best strategy over sizes: {w.best_strategy}{reg}")
    if report.n_failed:
        console.print(f"{report.n_failed} trial(s) FAILED (see their weit.failure tag); not ranked")


def build_report(
    sweep: str | None = None, *, parent_run_id: str | None = None, out: str | Path | None = None,
    mlflow_uri: str | None = None, register: bool = True, experiment: str = EXPERIMENT, show: bool = True,
) -> Report:
    """Leaderboard (CSV + Markdown), plots and winners of a sweep, logged to its parent run under
    ``report/``; with ``register`` each task's champion goes to the Model Registry."""
    import mlflow

    uri = tracking_uri(mlflow_uri)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    parent = find_parent(client, sweep, parent_run_id, experiment)
    name = parent.data.tags.get("weit.sweep", sweep or parent.info.run_id)
    runs = load_runs(parent)
    if runs.empty:
        raise UserError(f"sweep {name!r} (run {parent.info.run_id}) has no trial runs yet")
    board = lb.leaderboard(runs)
    if board.empty:
        raise UserError(f"sweep {name!r}: none of its {len(runs)} trials FINISHED; nothing to rank")
    ranking = lb.strategy_ranking(board)
    report = Report(name, parent.info.run_id, runs, board, ranking, lb.pick_winners(runs, board, ranking),
                    n_failed=int((runs["status"] == "FAILED").sum()))
    out_dir = Path(out) if out else Path("reports") / name
    out_dir.mkdir(parents=True, exist_ok=True)
    tables = {"leaderboard.csv": board, "leaderboard_by_lr.csv": lb.leaderboard_by_lr(runs),
              "strategy_ranking.csv": ranking}
    for file, table in tables.items():
        table.drop(columns="rank_key").to_csv(out_dir / file, index=False)
    report.files = [out_dir / f for f in tables]
    samples = {}
    for w in report.winners.values():
        report.files += lb.plots(board, w, out_dir)
        if (figure := sample_grids(client, runs, board, w, out_dir)) is not None:
            report.files.append(samples.setdefault(w.task, figure))
        w.registered = (tracking.register_champion(client, w, report.sweep, report.parent_run_id)
                        if register else None)
    board_md = lb.markdown(board, report.winners, ranking, samples)
    (out_dir / "leaderboard.md").write_text(f"# Sweep {name}\n\n{board_md}")
    report.files.append(out_dir / "leaderboard.md")
    (out_dir / "winners.json").write_text(json.dumps({t: w.summary() for t, w in report.winners.items()}, indent=1))
    report.files.append(out_dir / "winners.json")
    for f in report.files:
        client.log_artifact(parent.info.run_id, str(f), "report")
    if show:
        print_report(report)
        print(f"[weit report] wrote {out_dir}/ (leaderboard.csv, leaderboard.md, plots); logged to run "
              f"{parent.info.run_id}")
    return report


def export_run(run: str, out: str | Path, *, mlflow_uri: str | None = None) -> tuple[Path, dict]:
    """Write a trial's initialized model (``run``: a run id or ``models:/NAME@ALIAS`` / ``models:/NAME/VERSION``)
    to ``out``, a timm state_dict plus the weit header, checked by loading it back. Returns (path, header)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from weit_core.io import WeitFileError, load_model

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    uri = tracking_uri(mlflow_uri)
    client = mlflow.MlflowClient(uri)
    run_id = run
    try:
        if run.startswith("models:/"):
            name, _, alias = run[len("models:/"):].partition("@")
            run_id = (client.get_model_version_by_alias(name, alias) if alias
                      else client.get_model_version(*name.rsplit("/", 1))).run_id
    except (MlflowException, TypeError) as e:
        raise UserError(f"cannot resolve {run!r} in the Model Registry at {uri} ({e})") from e
    try:
        client.get_run(run_id)
    except MlflowException as e:
        raise UserError(f"no MLflow run {run_id!r} at {uri}; check --run / --mlflow-uri") from e
    if not tracking.has_model(client, run_id):
        raise UserError(f"run {run_id} has no {tracking.MODEL_ARTIFACT} artifact (not a sweep trial, or the sweep ran with "
                        f"--no-save-models)")
    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="weit-export-") as d:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=tracking.MODEL_ARTIFACT, dst_path=d,
                                                    tracking_uri=uri)
        try:
            _, header = load_model(local)
        except WeitFileError as e:
            raise UserError(f"run {run_id}: the model artifact is not a valid weit model ({e})") from e
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(local, out)
    return out, header


def report_command(
    sweep: Annotated[str | None, typer.Option(help="Sweep name (as given to `weit sweep`).")] = None,
    parent_run: Annotated[str | None, typer.Option(help="Or: the sweep's MLflow parent run id.")] = None,
    out: Annotated[str | None, typer.Option(help="Output folder (default ./reports/<sweep>).")] = None,
    mlflow_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI.")] = None,
    register: Annotated[bool, typer.Option(help="Register each task's winning initialized model as "
                                                "weit-<task>@champion.")] = True,
) -> None:
    """Leaderboard, plots and the winning init per task, from the sweep's MLflow runs."""
    build_report(sweep, parent_run_id=parent_run, out=out, mlflow_uri=mlflow_uri, register=register)


def export_command(
    run: Annotated[str, typer.Option(help="Trial run id, or models:/weit-<task>@champion.")],
    out: Annotated[str, typer.Option(help="Output .safetensors file.")] = "model.safetensors",
    mlflow_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI.")] = None,
) -> None:
    """Export a trial's initialized model as a timm-loadable safetensors file (+ weit header)."""
    from weit_core.models import get_family

    path, header = export_run(run, out, mlflow_uri=mlflow_uri)
    family = get_family(header.get("family", "vit"))
    print(f"wrote {path}: {header.get('info', {}).get('strategy', '?')} {family.name} of size "
          f"{family.size_name(header.get('spec', {}))}; load with weit_core.io.load_model")
