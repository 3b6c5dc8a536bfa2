"""``weit report``: which initialization wins, per task. Reads a sweep back from MLflow (never from Tune's
files), ranks it with ``weit_core.leaderboard`` in each task's own metric and direction (the trials' tags
``weit.metric``, ``weit.mode``), logs the leaderboard and plots to the parent run and registers each task's
winning *initialized* model as ``weit-<task>@champion``. ``weit export`` writes a trial's model out."""

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

from pipelines import tracking
from pipelines.common import UserError
from pipelines.tracking import SWEEP_EXPERIMENT, find_sweep, parse_budget, tracking_uri
from weit_core import leaderboard as lb
from weit_core.leaderboard import Winner, budgets

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


def _table(rows: Any) -> tuple[list[str], list[list[str]]]:
    """A task's leaderboard as text: every budget any group reached, ``mean ± std`` over seeds."""
    def cell(r: Any, stat: str) -> str:
        mean, std = r.get(f"{stat}_mean"), r.get(f"{stat}_std")
        if mean is None or math.isnan(mean):
            return "-"
        return f"{mean:.4f} ± {std:.4f}" if r["n_seeds"] > 1 and not math.isnan(std) else f"{mean:.4f}"

    m, es = rows["metric"].iloc[0], budgets(rows, "e", "_mean")
    head = ["strategy", "size", "params", "seeds", "lr", "lrs", *[f"{m}@{e}ep" for e in es],
            f"test {m.removeprefix('val_')}", "failed"]
    return head, [[r["strategy"], r["size"], f"{int(r['num_params']):,}", str(int(r["n_seeds"])), f"{r['lr']:g}",
                   str(int(r["n_lrs"])), *[cell(r, f"e{e}") for e in es], cell(r, "test"), str(int(r["n_failed"]))]
                  for _, r in rows.iterrows()]


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
        lines += [f"| {' | '.join(row)} |" for row in [head, ["---"] * len(head), *cells]]
        lines += [f"\nStrategy ranking (final-budget {rows['metric'].iloc[0]} averaged over sizes):\n",
                  "| strategy | mean over sizes | best size | sizes |\n|---|---|---|---|"]
        lines += [f"| {r['strategy']} | {r['mean_over_sizes']:.4f} | {r['best_size_score']:.4f} | {int(r['sizes'])} |"
                  for _, r in ranking[ranking["task"] == task].iterrows()]
        lines.append("")
    return "\n".join(lines)


def _plots(board: Any, w: Winner, out_dir: Path) -> list[Path]:
    """Final-budget score against parameter count per strategy, and the metric per stage-3 epoch at the
    winner's size (the winner bold, scratch dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = board[board["task"] == w.task]
    ranked, at = rows.dropna(subset=["score"]), rows[rows["size"] == w.size]

    def score_vs_params(ax: Any) -> None:
        for strategy, s in ranked.groupby("strategy", sort=True):
            e = int(s["final_budget"].iloc[0])
            bars = ax.errorbar(s["num_params"], s["score"], yerr=s[f"e{e}_std"].fillna(0), fmt="o", ms=4,
                               capsize=2, alpha=0.6, label=strategy)
            best = s.groupby("num_params")["score"].agg("min" if w.mode == "min" else "max")  # shapes sharing it
            ax.plot(best.index, best.values, lw=1.2, color=bars[0].get_color())
        ax.set(xscale="log", title=f"{w.task}: score vs size per init strategy", xlabel="parameters",
               ylabel=f"{w.metric} after {int(ranked['final_budget'].max())} epochs")

    def convergence(ax: Any) -> None:
        for _, r in at.sort_values("strategy").iterrows():
            es = [e for e in budgets(at, "e", "_mean") if not math.isnan(r[f"e{e}_mean"])]
            mean = [r[f"e{e}_mean"] for e in es]
            std = [0.0 if math.isnan(r[f"e{e}_std"]) else r[f"e{e}_std"] for e in es]
            won, scratch = r["strategy"] == w.strategy, r["strategy"] == "scratch"
            style = dict(lw=2.5, zorder=3) if won else dict(lw=2, ls="--") if scratch else dict(lw=1, alpha=0.6)
            ax.plot(es, mean, marker="o", ms=4, label=f"{r['strategy']} (lr {r['lr']:g})" + " (winner)" * won, **style)
            ax.fill_between(es, [a - b for a, b in zip(mean, std, strict=True)],
                            [a + b for a, b in zip(mean, std, strict=True)], alpha=0.15)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set(title=f"{w.task}: convergence at size {w.size}", ylabel=w.metric,
               xlabel="stage-3 epochs (0 = right after initialization)")

    paths = [out_dir / f"{w.metric.removeprefix('val_')}_vs_params_{w.task}.png", out_dir / f"convergence_{w.task}.png"]
    for path, draw in zip(paths, (score_vs_params, convergence), strict=True):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        draw(ax)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return paths


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
    markdown = leaderboard_markdown(board, report.winners, ranking)
    (out_dir / "leaderboard.md").write_text(f"# Sweep {name}\n\n{markdown}")
    report.files = [out_dir / f for f in (*tables, "leaderboard.md")]
    for w in report.winners.values():
        report.files += _plots(board, w, out_dir)
        w.registered = (tracking.register_champion(client, w, report.sweep, report.parent_run_id)
                        if register else None)
    (out_dir / "winners.json").write_text(json.dumps({t: {
        "strategy": w.strategy, "size": w.size, "metric": w.metric, "mode": w.mode, f"{w.metric}_mean": w.mean,
        f"{w.metric}_std": w.std, "budget": w.budget, "lr": w.lr, "n_lrs": w.n_lrs, "run_id": w.run_id,
        "best_strategy": w.best_strategy, "registered": w.registered} for t, w in report.winners.items()}, indent=1))
    report.files.append(out_dir / "winners.json")
    tracking.log_files(client, parent.info.run_id, report.files, "report")
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
