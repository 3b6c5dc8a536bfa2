"""``weit report``: which initialization wins, per task. Reads a sweep back from MLflow (never from Tune's
files) into a table of trials, ranks it with ``weit_core.leaderboard`` (each task's metric and direction, as
its trials were tagged: ``weit.metric``, ``weit.mode``), writes the leaderboard and plots to the sweep's parent
run and registers each task's winning *initialized* model as ``weit-<task>@champion``. ``weit export``
writes a trial's initialized model out."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

from pipelines.common import UserError
from pipelines.tracking import SWEEP_EXPERIMENT, find_sweep, parse_budget, tracking_uri
from weit_core.leaderboard import (
    GROUP,
    Winner,
    budgets,
    leaderboard,
    leaderboard_by_lr,
    pick_winners,
    strategy_ranking,
)

EXPERIMENT = SWEEP_EXPERIMENT
MODEL_ARTIFACT = "model/model.safetensors"
CHAMPION = "champion"


@dataclass
class Report:
    sweep: str
    parent_run_id: str
    runs: Any  # pandas DataFrame: one row per child run (tidy columns)
    leaderboard: Any  # pandas DataFrame: one row per group, at its best learning rate
    strategy_ranking: Any  # pandas DataFrame: per task x strategy
    winners: dict[str, Winner]
    files: list[Path] = field(default_factory=list)
    n_failed: int = 0


# ------------------------------------------------------------------------------------------------ reading


def find_parent(client: Any, sweep: str | None = None, parent_run_id: str | None = None,
                experiment: str = EXPERIMENT) -> Any:
    """The sweep's parent run, by name (tag ``weit.sweep``) or id; a clear error when there is none."""
    if parent_run_id:
        try:
            return client.get_run(parent_run_id)
        except Exception as e:  # MlflowException: RESOURCE_DOES_NOT_EXIST
            raise UserError(f"no MLflow run {parent_run_id!r} in {client.tracking_uri}; check --parent-run / "
                            f"--mlflow-uri") from e
    if not sweep:
        raise UserError("name the sweep: --sweep NAME or --parent-run RUN_ID")
    exp = client.get_experiment_by_name(experiment)
    parent = None if exp is None else find_sweep(client, exp.experiment_id, sweep)
    if parent is None:
        raise UserError(f"no sweep named {sweep!r} in MLflow at {client.tracking_uri} (experiment {experiment!r}); "
                        f"run `weit sweep` first or pass the --mlflow-uri it used")
    return parent


def load_runs(parent: Any) -> Any:
    """Every child run of the sweep as a tidy DataFrame (``mlflow.search_runs``): group columns, lr, seed,
    status, run id, parameter count, the metric and direction it is judged by, ``val_e<k>`` (that metric
    after ``k`` epochs) and ``test`` (its test value, where logged)."""
    import mlflow
    import pandas as pd

    df = mlflow.search_runs(experiment_ids=[parent.info.experiment_id],
                            filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
                            max_results=100_000)
    if df.empty:
        return pd.DataFrame(columns=[*GROUP, "lr", "seed", "status", "run_id"])

    def col(name: str, fill: Any = float("nan")) -> Any:
        return df[name] if name in df else pd.Series(fill, index=df.index)

    def number(param: str, tag: str | None = None) -> Any:  # a trial failed in init has only its tags
        value = pd.to_numeric(col(f"params.{param}"), errors="coerce")
        return value.fillna(pd.to_numeric(col(f"tags.{tag}"), errors="coerce")) if tag else value

    out = pd.DataFrame({
        "task": df["tags.weit.task"], "strategy": df["tags.weit.strategy"], "size": df["tags.weit.size"],
        "lr": number("lr", "weit.lr"), "seed": number("seed", "weit.seed").astype(int), "status": df["status"],
        "run_id": df["run_id"], "artifact_uri": df["artifact_uri"], "num_params": number("num_params"),
        "epochs": number("epochs"), "init_s": number("init_s"), "failure": col("tags.weit.failure", None),
        "metric": col("tags.weit.metric", None).fillna("val_acc"), "mode": col("tags.weit.mode", None).fillna("max"),
    })
    out["test"] = float("nan")
    per_budget: dict[int, Any] = {}
    for metric in out["metric"].unique():
        mine = out["metric"] == metric
        out.loc[mine, "test"] = col(f"metrics.test_{metric.removeprefix('val_')}")[mine]
        for name in df.columns:
            parsed = parse_budget(name.removeprefix("metrics."))
            if name.startswith("metrics.") and parsed and parsed[0] == metric:
                per_budget.setdefault(parsed[1], pd.Series(float("nan"), index=df.index))[mine] = df[name][mine]
    for e in sorted(per_budget):
        out[f"val_e{e}"] = per_budget[e]
    return out


# ------------------------------------------------------------------------------------------------ outputs


def _cell(row: Any, stat: str) -> str:
    """``<stat>_mean ± <stat>_std`` of a leaderboard row (``-`` where nothing reached it)."""
    mean, std = row.get(f"{stat}_mean"), row.get(f"{stat}_std")
    if mean is None or math.isnan(mean):
        return "-"
    return f"{mean:.4f} ± {std:.4f}" if row["n_seeds"] > 1 and not math.isnan(std) else f"{mean:.4f}"


def _table(rows: Any) -> tuple[list[str], list[list[str]]]:
    """A task's leaderboard as a header and rows of text (every budget any group reached)."""
    m = rows["metric"].iloc[0]
    es = budgets(rows, "e", "_mean")
    head = ["strategy", "size", "params", "seeds", "lr", "lrs", *[f"{m}@{e}ep" for e in es],
            f"test {m.removeprefix('val_')}", "failed"]
    cells = [[r["strategy"], r["size"], f"{int(r['num_params']):,}", str(int(r["n_seeds"])), f"{r['lr']:g}",
              str(int(r["n_lrs"])), *[_cell(r, f"e{e}") for e in es], _cell(r, "test"), str(int(r["n_failed"]))]
             for _, r in rows.iterrows()]
    return head, cells


def leaderboard_markdown(board: Any, winners: dict[str, Winner], ranking: Any) -> str:
    lines = []
    for task, rows in board.groupby("task", sort=True):
        lines.append(f"## {task}\n")
        if w := winners.get(task):
            lines.append(f"Winner: **{w.strategy}** at size **{w.size}**, {w.line()}; best strategy over all "
                         f"sizes: **{w.best_strategy}**.\n")
        lines.append("Each strategy x size at its own best stage-3 learning rate (`lr`, of the `lrs` it tried), "
                     f"chosen on the final-budget val mean ({rows['mode'].iloc[0]} is better); test is that lr's.\n")
        head, cells = _table(rows)
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *["| " + " | ".join(c) + " |"
                                                                             for c in cells]]
        lines.append(f"\nStrategy ranking (final-budget {rows['metric'].iloc[0]} averaged over sizes):\n")
        lines.append("| strategy | mean over sizes | best size | sizes |\n|---|---|---|---|")
        for _, r in ranking[ranking["task"] == task].iterrows():
            lines.append(f"| {r['strategy']} | {r['mean_over_sizes']:.4f} | {r['best_size_score']:.4f} | "
                         f"{int(r['sizes'])} |")
        lines.append("")
    return "\n".join(lines)


def _plot(path: Path, title: str, xlabel: str, ylabel: str, draw: Any) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    draw(ax)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_score_vs_params(board: Any, task: str, path: Path) -> Path:
    """Final-budget score against parameter count, one series per strategy."""
    rows = board[board["task"] == task].dropna(subset=["score"])

    def draw(ax: Any) -> None:
        for strategy, s in rows.groupby("strategy", sort=True):
            e = int(s["final_budget"].iloc[0])
            bars = ax.errorbar(s["num_params"], s["score"], yerr=s[f"e{e}_std"].fillna(0), fmt="o", ms=4,
                               capsize=2, alpha=0.6, label=strategy)
            best = (s.groupby("num_params")["score"].min() if rows["mode"].iloc[0] == "min"
                    else s.groupby("num_params")["score"].max()).sort_index()  # shapes sharing a parameter count
            ax.plot(best.index, best.values, lw=1.2, color=bars[0].get_color())
        ax.set_xscale("log")

    return _plot(path, f"{task}: score vs size per init strategy", "parameters",
                 f"{rows['metric'].iloc[0]} after {int(rows['final_budget'].max())} epochs", draw)


def plot_convergence(board: Any, winner: Winner, path: Path) -> Path:
    """The metric per stage-3 epoch at the winner's size: the winner against scratch (and the others)."""
    import matplotlib.ticker

    rows = board[(board["task"] == winner.task) & (board["size"] == winner.size)]

    def draw(ax: Any) -> None:
        for _, r in rows.sort_values("strategy").iterrows():
            es = [e for e in budgets(rows, "e", "_mean") if not math.isnan(r[f"e{e}_mean"])]
            mean = [r[f"e{e}_mean"] for e in es]
            std = [0.0 if math.isnan(r[f"e{e}_std"]) else r[f"e{e}_std"] for e in es]
            is_w, is_s = r["strategy"] == winner.strategy, r["strategy"] == "scratch"
            style = dict(lw=2.5, zorder=3) if is_w else dict(lw=2, ls="--") if is_s else dict(lw=1, alpha=0.6)
            ax.plot(es, mean, marker="o", ms=4, label=f"{r['strategy']} (lr {r['lr']:g})" + " (winner)" * is_w,
                    **style)
            ax.fill_between(es, [m - s for m, s in zip(mean, std, strict=True)],
                            [m + s for m, s in zip(mean, std, strict=True)], alpha=0.15)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))

    return _plot(path, f"{winner.task}: convergence at size {winner.size}",
                 "stage-3 epochs (0 = right after initialization)", winner.metric, draw)


def print_report(report: Report) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for task, rows in report.leaderboard.groupby("task", sort=True):
        head, cells = _table(rows)
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


# ------------------------------------------------------------------------------------------------ registry


def register_champion(client: Any, report: Report, winner: Winner) -> str | None:
    """Register the winner's initialized model as ``weit-<task>`` with alias ``champion`` and its
    leaderboard row as tags; re-running the report does not add a version when the champion is unchanged."""
    from mlflow.exceptions import MlflowException

    name = f"weit-{winner.task}"
    run = client.get_run(winner.run_id)
    if not any(f.path == MODEL_ARTIFACT for f in client.list_artifacts(winner.run_id, "model")):
        print(f"[weit report] {winner.task}: the winning run {winner.run_id} has no {MODEL_ARTIFACT} (sweep ran "
              f"with --no-save-models); not registered")
        return None
    try:
        client.create_registered_model(name, description=f"Best initialized model for task {winner.task} (weit).")
    except MlflowException as e:
        if "ALREADY_EXISTS" not in str(e.error_code):
            raise
    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        current = None
    if current is not None and current.run_id == winner.run_id:
        return f"{name}/{current.version}"
    tags = {"task": winner.task, "strategy": winner.strategy, "size": winner.size, "num_params": winner.num_params,
            "budget_epochs": winner.budget, "metric": winner.metric, "mode": winner.mode,
            f"{winner.metric}_mean": f"{winner.mean:.6f}", f"{winner.metric}_std": f"{winner.std:.6f}",
            "n_seeds": winner.n_seeds, "best_strategy": winner.best_strategy, "lr": f"{winner.lr:g}",
            "n_lrs": winner.n_lrs, "sweep": report.sweep, "parent_run_id": report.parent_run_id}
    mv = client.create_model_version(name, f"{run.info.artifact_uri}/model", run_id=winner.run_id,
                                     tags={k: str(v) for k, v in tags.items()},
                                     description=f"{winner.strategy} {winner.size} from sweep {report.sweep}")
    client.set_registered_model_alias(name, CHAMPION, mv.version)
    return f"{name}/{mv.version}"


# ------------------------------------------------------------------------------------------------ entry points


def build_report(
    sweep: str | None = None, *, parent_run_id: str | None = None, out: str | Path | None = None,
    mlflow_uri: str | None = None, register: bool = True, experiment: str = EXPERIMENT, show: bool = True,
) -> Report:
    """Leaderboard (CSV + Markdown), plots and winners of a sweep, logged as artifacts of its parent run;
    with ``register`` each task's champion goes to the Model Registry."""
    import mlflow

    uri = tracking_uri(mlflow_uri)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    parent = find_parent(client, sweep, parent_run_id, experiment)
    name = parent.data.tags.get("weit.sweep", sweep or parent.info.run_id)
    runs = load_runs(parent)
    if runs.empty:
        raise UserError(f"sweep {name!r} (run {parent.info.run_id}) has no trial runs yet")
    board = leaderboard(runs)
    if board.empty:
        raise UserError(f"sweep {name!r}: none of its {len(runs)} trials FINISHED; nothing to rank")
    ranking = strategy_ranking(board)
    report = Report(name, parent.info.run_id, runs, board, ranking, pick_winners(runs, board, ranking),
                    n_failed=int((runs["status"] == "FAILED").sum()))
    out_dir = Path(out) if out else Path("reports") / name
    out_dir.mkdir(parents=True, exist_ok=True)
    tables = {"leaderboard.csv": board, "leaderboard_by_lr.csv": leaderboard_by_lr(runs),
              "strategy_ranking.csv": ranking}
    for file, table in tables.items():
        table.drop(columns="rank_key").to_csv(out_dir / file, index=False)
    (out_dir / "leaderboard.md").write_text(f"# Sweep {name}\n\n" + leaderboard_markdown(board, report.winners,
                                                                                          ranking))
    files = [out_dir / f for f in (*tables, "leaderboard.md")]
    for task, w in report.winners.items():
        files.append(plot_score_vs_params(board, task, out_dir / f"{w.metric.removeprefix('val_')}_vs_params_{task}.png"))
        files.append(plot_convergence(board, w, out_dir / f"convergence_{task}.png"))
    if register:
        for w in report.winners.values():
            w.registered = register_champion(client, report, w)
    summary = {t: {"strategy": w.strategy, "size": w.size, "metric": w.metric, "mode": w.mode,
                   f"{w.metric}_mean": w.mean, f"{w.metric}_std": w.std, "budget": w.budget, "lr": w.lr,
                   "n_lrs": w.n_lrs, "run_id": w.run_id, "best_strategy": w.best_strategy,
                   "registered": w.registered} for t, w in report.winners.items()}
    (out_dir / "winners.json").write_text(json.dumps(summary, indent=1))
    files.append(out_dir / "winners.json")
    for f in files:
        client.log_artifact(parent.info.run_id, str(f), "report")
    report.files = files
    if show:
        print_report(report)
        print(f"[weit report] wrote {out_dir}/ (leaderboard.csv, leaderboard.md, plots); logged to run "
              f"{parent.info.run_id}")
    return report
def resolve_run(client: Any, run: str) -> str:
    """A run id, or a registry reference ``models:/weit-<task>@champion`` / ``models:/NAME/VERSION``."""
    from mlflow.exceptions import MlflowException

    if run.startswith("models:/"):
        ref = run[len("models:/"):]
        try:
            if "@" in ref:
                name, alias = ref.split("@", 1)
                return client.get_model_version_by_alias(name, alias).run_id
            name, version = ref.rsplit("/", 1)
            return client.get_model_version(name, version).run_id
        except (MlflowException, ValueError) as e:
            raise UserError(f"cannot resolve {run!r} in the Model Registry at {client.tracking_uri} ({e})") from e
    return run


def export_run(run: str, out: str | Path, *, mlflow_uri: str | None = None) -> tuple[Path, dict]:
    """Write a trial's initialized model (its ``model/model.safetensors`` artifact) to ``out``: an
    ordinary timm state_dict plus the weit header, checked by loading it back. Returns (path, header)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from weit_core.io import WeitFileError, load_model

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    uri = tracking_uri(mlflow_uri)
    client = mlflow.MlflowClient(uri)
    run_id = resolve_run(client, run)
    try:
        client.get_run(run_id)
    except MlflowException as e:
        raise UserError(f"no MLflow run {run_id!r} at {uri}; check --run / --mlflow-uri") from e
    if not any(f.path == MODEL_ARTIFACT for f in client.list_artifacts(run_id, "model")):
        raise UserError(f"run {run_id} has no {MODEL_ARTIFACT} artifact (not a sweep trial, or the sweep ran with "
                        f"--no-save-models)")
    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="weit-export-") as d:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=MODEL_ARTIFACT, dst_path=d,
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
    path, header = export_run(run, out, mlflow_uri=mlflow_uri)
    from weit_core.models import get_family

    family = get_family(header.get("family", "vit"))
    print(f"wrote {path}: {header.get('info', {}).get('strategy', '?')} {family.name} of size "
          f"{family.size_name(header.get('spec', {}))}; load with weit_core.io.load_model")


__all__ = ["Report", "Winner", "build_report", "export_run", "leaderboard"]
