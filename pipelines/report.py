"""Which initialization wins, per task: read a sweep back from MLflow (never from Tune's files), rank it,
plot it, and register each task's winning *initialized* model as ``weit-<task>@champion``.

Definitions (they are what the tests recompute with pandas):
- a group is (task, strategy, depth, width, heads, mlp_ratio); at each of its stage-3 learning rates its
  score at budget ``e`` is the mean over seeds of ``val_acc`` after ``e`` stage-3 epochs (``e = 0``: right
  after initialization);
- each group is reported at its own best learning rate: the lr with the highest score at the task's final
  budget (an lr none of whose trials FAILED before one that lost a trial; ties: the smaller lr), so no init is
  judged by a recipe tuned for another; its row (val per budget, test where logged) is that lr's;
- the winner of a task is the group with the highest score at the task's final budget (ties: fewer
  parameters, then strategy name); it names the best strategy and the best size together;
- the strategy ranking averages each strategy's final-budget score over the sizes it ran on;
- the champion model is the winner's best seed (its initialized model, logged before stage 3).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

from pipelines.common import UserError, tracking_uri

EXPERIMENT = "weit-sweep"
GROUP = ["task", "strategy", "depth", "width", "heads", "mlp_ratio"]
MODEL_ARTIFACT = "model/model.safetensors"
CHAMPION = "champion"


@dataclass
class Winner:
    task: str
    strategy: str
    depth: int
    width: int
    heads: int
    mlp_ratio: float
    budget: int  # epochs of stage 3 the score is taken at
    acc_mean: float
    acc_std: float
    n_seeds: int
    num_params: int
    run_id: str  # the best seed's child run (its initialized model is the champion)
    best_strategy: str  # argmax of the strategy ranking (mean over sizes)
    lr: float  # the stage-3 learning rate the score is taken at (the group's best)
    n_lrs: int  # how many learning rates the group tried
    registered: str | None = None  # "weit-<task>/<version>" when registered

    @property
    def size(self) -> str:
        return f"{self.depth}x{self.width}x{self.heads}x{self.mlp_ratio:g}"


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
    runs = [] if exp is None else client.search_runs(
        [exp.experiment_id], f"tags.`weit.sweep` = '{sweep}' and tags.`weit.kind` = 'sweep'", max_results=5,
        order_by=["attributes.start_time DESC"])
    if not runs:
        raise UserError(f"no sweep named {sweep!r} in MLflow at {client.tracking_uri} (experiment {experiment!r}); "
                        f"run `weit sweep` first or pass the --mlflow-uri it used")
    return runs[0]


def load_runs(parent: Any) -> Any:
    """Every child run of the sweep as a tidy DataFrame (``mlflow.search_runs``): group columns, seed,
    status, run id, parameter count and ``val_acc_e<k>`` per budget."""
    import mlflow
    import pandas as pd

    df = mlflow.search_runs(experiment_ids=[parent.info.experiment_id],
                            filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
                            max_results=100_000)
    if df.empty:
        return pd.DataFrame(columns=[*GROUP, "lr", "seed", "status", "run_id"])
    # a trial that failed before logging its params (in init) has only its tags: read the size and lr there
    size = df["tags.weit.size"].str.split("x", expand=True) if "tags.weit.size" in df else None

    def param(name: str, i: int | None = None, tag: str | None = None) -> Any:
        col = pd.to_numeric(df[f"params.{name}"], errors="coerce") if f"params.{name}" in df else \
            pd.Series(float("nan"), index=df.index)
        if i is not None and size is not None:
            col = col.fillna(pd.to_numeric(size[i], errors="coerce"))
        if tag is not None and f"tags.{tag}" in df:
            col = col.fillna(pd.to_numeric(df[f"tags.{tag}"], errors="coerce"))
        return col

    out = pd.DataFrame({
        "task": df["tags.weit.task"], "strategy": df["tags.weit.strategy"],
        "depth": param("depth", 0).astype(int), "width": param("width", 1).astype(int),
        "heads": param("heads", 2).astype(int), "mlp_ratio": param("mlp_ratio", 3).astype(float),
        "lr": param("lr", tag="weit.lr"),
        "seed": param("seed", tag="weit.seed").astype(int), "status": df["status"],
        "run_id": df["run_id"], "artifact_uri": df["artifact_uri"],
        "num_params": pd.to_numeric(df.get("params.num_params"), errors="coerce"),
        "epochs": pd.to_numeric(df.get("params.epochs"), errors="coerce"),
        "init_s": pd.to_numeric(df.get("params.init_s"), errors="coerce"),
        "test_acc": df.get("metrics.test_acc"),
        "failure": df.get("tags.weit.failure"),
    })
    for col in sorted((c for c in df.columns if re.fullmatch(r"metrics\.val_acc_e\d+", c)), key=_budget):
        out[col[len("metrics."):]] = df[col]
    return out


def _budget(col: str) -> int:
    return int(col.rsplit("_e", 1)[1])


def budgets(runs: Any) -> list[int]:
    return sorted(_budget(c) for c in runs.columns if re.fullmatch(r"val_acc_e\d+", c))


# ------------------------------------------------------------------------------------------------ ranking


def leaderboard_by_lr(runs: Any) -> Any:
    """Mean / std / count over seeds of val accuracy at every budget, per group and stage-3 learning rate
    (FINISHED runs only), with ``score`` (the mean at the task's final budget) and ``n_failed`` (FAILED
    trials at that lr)."""
    import pandas as pd

    keys = [*GROUP, "lr"]
    ok = runs[runs["status"] == "FINISHED"]
    if ok.empty:
        return pd.DataFrame(columns=keys)
    g = ok.groupby(keys, sort=False)
    board = g.agg(num_params=("num_params", "first"), n_seeds=("seed", "nunique"),
                  init_s=("init_s", "mean"), test_acc_mean=("test_acc", "mean"), test_acc_std=("test_acc", "std"))
    for e in budgets(ok):
        col = f"val_acc_e{e}"
        board[f"acc_e{e}_mean"] = g[col].mean()
        board[f"acc_e{e}_std"] = g[col].std()
        board[f"acc_e{e}_n"] = g[col].count()
    failed = runs[runs["status"] == "FAILED"].groupby(keys).size()
    board["n_failed"] = failed.reindex(board.index).fillna(0).astype(int)
    board = board.reset_index()
    board["final_budget"] = board["task"].map(_final_budgets(ok))
    board["score"] = [r[f"acc_e{int(r['final_budget'])}_mean"] for _, r in board.iterrows()]
    return board


def leaderboard(runs: Any) -> Any:
    """One row per group at its best stage-3 learning rate (see the module's definitions): that lr's
    statistics (:func:`leaderboard_by_lr`), the chosen ``lr``, ``n_lrs`` (how many the group tried) and
    ``n_failed`` (its FAILED trials over all its lrs); sorted by score within each task."""
    by_lr = leaderboard_by_lr(runs)
    if by_lr.empty:
        return by_lr.assign(n_lrs=[])
    by_lr["clean"] = by_lr["n_failed"] == 0
    best = (by_lr.sort_values(["clean", "score", "lr"], ascending=[False, False, True], na_position="last")
            .groupby(GROUP, sort=False).head(1).drop(columns="clean"))
    tried = runs.groupby(GROUP)["lr"].nunique()
    failed = runs[runs["status"] == "FAILED"].groupby(GROUP).size()
    index = best.set_index(GROUP).index
    best["n_lrs"] = tried.reindex(index).fillna(1).astype(int).to_numpy()
    best["n_failed"] = failed.reindex(index).fillna(0).astype(int).to_numpy()
    return best.sort_values(["task", "score", "num_params", "strategy"], ascending=[True, False, True, True],
                            na_position="last").reset_index(drop=True)


def _final_budgets(ok: Any) -> dict[str, int]:
    """Per task: the largest budget any finished run of it reached."""
    out = {}
    for task, rows in ok.groupby("task"):
        have = [e for e in budgets(rows) if rows[f"val_acc_e{e}"].notna().any()]
        out[task] = max(have) if have else 0
    return out


def strategy_ranking(board: Any) -> Any:
    """Per task and strategy: the final-budget score averaged over the sizes it ran on."""
    r = board.groupby(["task", "strategy"])["score"].agg(mean_over_sizes="mean", best_size_score="max",
                                                          sizes="count").reset_index()
    return r.sort_values(["task", "mean_over_sizes"], ascending=[True, False]).reset_index(drop=True)


def pick_winners(runs: Any, board: Any, ranking: Any) -> dict[str, Winner]:
    winners = {}
    for task, rows in board.groupby("task", sort=True):
        rows = rows.dropna(subset=["score"])
        if rows.empty:
            continue
        top = rows.iloc[0]  # the board is sorted by score desc, then fewer params, then name
        e = int(top["final_budget"])
        mask = (runs["status"] == "FINISHED")
        for k in [*GROUP, "lr"]:
            mask &= runs[k] == top[k]
        seeds = runs[mask].sort_values([f"val_acc_e{e}", "seed"], ascending=[False, True])
        strat = ranking[ranking["task"] == task].iloc[0]["strategy"]
        std = float(top[f"acc_e{e}_std"])
        winners[task] = Winner(
            task=task, strategy=top["strategy"], depth=int(top["depth"]), width=int(top["width"]),
            heads=int(top["heads"]), mlp_ratio=float(top["mlp_ratio"]), budget=e, acc_mean=float(top["score"]),
            acc_std=0.0 if math.isnan(std) else std, n_seeds=int(top["n_seeds"]), num_params=int(top["num_params"]),
            run_id=seeds.iloc[0]["run_id"], best_strategy=strat, lr=float(top["lr"]), n_lrs=int(top["n_lrs"]))
    return winners


# ------------------------------------------------------------------------------------------------ outputs


def _cell(mean: float, std: float, n: int) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    if n > 1 and not math.isnan(std):
        return f"{mean:.4f} ± {std:.4f}"
    return f"{mean:.4f}"


def leaderboard_markdown(board: Any, winners: dict[str, Winner], ranking: Any) -> str:
    lines = []
    for task, rows in board.groupby("task", sort=True):
        es = sorted(int(c[len("acc_e"):-len("_mean")]) for c in rows.columns
                    if re.fullmatch(r"acc_e\d+_mean", c) and rows[c].notna().any())
        w = winners.get(task)
        lines.append(f"## {task}\n")
        if w:
            lines.append(f"Winner: **{w.strategy}** at size **{w.size}** (depth x width x heads x mlp_ratio), "
                         f"val acc {w.acc_mean:.4f} ± {w.acc_std:.4f} after {w.budget} epochs over {w.n_seeds} "
                         f"seed(s) at lr {w.lr:g}; best strategy over all sizes: **{w.best_strategy}**.\n")
        lines.append("Each strategy x size at its own best stage-3 learning rate (`lr`, of the `lrs` it tried), "
                     "chosen on the final-budget val mean; test is that lr's.\n")
        head = ["strategy", "size", "params", "seeds", "lr", "lrs", *[f"acc@{e}ep" for e in es], "test acc",
                "failed"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for _, r in rows.iterrows():
            cells = [r["strategy"], f"{r['depth']}x{r['width']}x{r['heads']}x{r['mlp_ratio']:g}",
                     f"{int(r['num_params']):,}", str(int(r["n_seeds"])), f"{r['lr']:g}", str(int(r["n_lrs"]))]
            cells += [_cell(r[f"acc_e{e}_mean"], r[f"acc_e{e}_std"], int(r[f"acc_e{e}_n"])) for e in es]
            cells += [_cell(r["test_acc_mean"], r["test_acc_std"], int(r["n_seeds"])), str(int(r["n_failed"]))]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("\nStrategy ranking (final-budget val acc averaged over sizes):\n")
        lines.append("| strategy | mean over sizes | best size | sizes |\n|---|---|---|---|")
        for _, r in ranking[ranking["task"] == task].iterrows():
            lines.append(f"| {r['strategy']} | {r['mean_over_sizes']:.4f} | {r['best_size_score']:.4f} | "
                         f"{int(r['sizes'])} |")
        lines.append("")
    return "\n".join(lines)


def plot_acc_vs_params(board: Any, task: str, path: Path) -> Path:
    """Final-budget val accuracy against parameter count, one series per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = board[board["task"] == task].dropna(subset=["score"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for strategy, s in rows.groupby("strategy", sort=True):
        e = int(s["final_budget"].iloc[0])
        bars = ax.errorbar(s["num_params"], s["score"], yerr=s[f"acc_e{e}_std"].fillna(0), fmt="o", ms=4,
                           capsize=2, alpha=0.6, label=strategy)
        front = s.groupby("num_params")["score"].max().sort_index()  # several shapes share a parameter count
        ax.plot(front.index, front.values, lw=1.2, color=bars[0].get_color())
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel(f"val accuracy after {int(rows['final_budget'].max()) if len(rows) else 0} epochs")
    ax.set_title(f"{task}: accuracy vs size per init strategy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_convergence(board: Any, winner: Winner, path: Path) -> Path:
    """Val accuracy per stage-3 epoch at the winner's size: the winner against scratch (and the others)."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = board[(board["task"] == winner.task) & (board["depth"] == winner.depth) & (board["width"] == winner.width)
                 & (board["heads"] == winner.heads) & (board["mlp_ratio"] == winner.mlp_ratio)]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for _, r in rows.sort_values("strategy").iterrows():
        es = sorted(int(c[len("acc_e"):-len("_mean")]) for c in rows.columns
                    if re.fullmatch(r"acc_e\d+_mean", c) and not math.isnan(r[c]))
        mean = [r[f"acc_e{e}_mean"] for e in es]
        std = [0.0 if math.isnan(r[f"acc_e{e}_std"]) else r[f"acc_e{e}_std"] for e in es]
        is_w, is_s = r["strategy"] == winner.strategy, r["strategy"] == "scratch"
        style = dict(lw=2.5, zorder=3) if is_w else dict(lw=2, ls="--") if is_s else dict(lw=1, alpha=0.6)
        label = f"{r['strategy']} (lr {r['lr']:g})" + (" (winner)" if is_w else "")
        ax.plot(es, mean, marker="o", ms=4, label=label, **style)
        ax.fill_between(es, [m - s for m, s in zip(mean, std, strict=True)],
                        [m + s for m, s in zip(mean, std, strict=True)], alpha=0.15)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("stage-3 epochs (0 = right after initialization)")
    ax.set_ylabel("val accuracy")
    ax.set_title(f"{winner.task}: convergence at size {winner.size}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def print_report(report: Report) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    board = report.leaderboard
    for task, rows in board.groupby("task", sort=True):
        es = sorted(int(c[len("acc_e"):-len("_mean")]) for c in rows.columns
                    if re.fullmatch(r"acc_e\d+_mean", c) and rows[c].notna().any())
        table = Table(title=f"{report.sweep}: {task} (val accuracy, mean ± std over seeds)")
        for col in ["strategy", "size", "params", "lr", "lrs", *[f"@{e}ep" for e in es]]:
            table.add_column(col, justify="left" if col in ("strategy", "size") else "right")
        for _, r in rows.head(15).iterrows():
            table.add_row(r["strategy"], f"{r['depth']}x{r['width']}x{r['heads']}x{r['mlp_ratio']:g}",
                          f"{int(r['num_params']):,}", f"{r['lr']:g}", str(int(r["n_lrs"])),
                          *[_cell(r[f"acc_e{e}_mean"], r[f"acc_e{e}_std"], int(r[f"acc_e{e}_n"])) for e in es])
        console.print(table)
        if len(rows) > 15:
            console.print(f"  ... {len(rows) - 15} more rows in leaderboard.md")
        w = report.winners.get(task)
        if w:
            reg = f"; registered as {w.registered}" if w.registered else ""
            console.print(f"[bold]{task}[/bold]: winner {w.strategy} at {w.size} ({w.num_params:,} params), "
                          f"{w.acc_mean:.4f} ± {w.acc_std:.4f} after {w.budget} epochs at lr {w.lr:g} (best of "
                          f"{w.n_lrs}); best strategy over sizes: "
                          f"{w.best_strategy}{reg}")
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
    tags = {"task": winner.task, "strategy": winner.strategy, "size": winner.size, "depth": winner.depth,
            "width": winner.width, "heads": winner.heads, "mlp_ratio": winner.mlp_ratio,
            "num_params": winner.num_params, "budget_epochs": winner.budget, "val_acc_mean": f"{winner.acc_mean:.6f}",
            "val_acc_std": f"{winner.acc_std:.6f}", "n_seeds": winner.n_seeds, "best_strategy": winner.best_strategy,
            "lr": f"{winner.lr:g}", "n_lrs": winner.n_lrs,
            "sweep": report.sweep, "parent_run_id": report.parent_run_id}
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
    board.to_csv(out_dir / "leaderboard.csv", index=False)
    leaderboard_by_lr(runs).to_csv(out_dir / "leaderboard_by_lr.csv", index=False)
    ranking.to_csv(out_dir / "strategy_ranking.csv", index=False)
    (out_dir / "leaderboard.md").write_text(f"# Sweep {name}\n\n" + leaderboard_markdown(board, report.winners,
                                                                                          ranking))
    files = [out_dir / "leaderboard.csv", out_dir / "leaderboard_by_lr.csv", out_dir / "strategy_ranking.csv",
             out_dir / "leaderboard.md"]
    for task, w in report.winners.items():
        files.append(plot_acc_vs_params(board, task, out_dir / f"acc_vs_params_{task}.png"))
        files.append(plot_convergence(board, w, out_dir / f"convergence_{task}.png"))
    if register:
        for w in report.winners.values():
            w.registered = register_champion(client, report, w)
    summary = {t: {"strategy": w.strategy, "size": w.size, "val_acc_mean": w.acc_mean, "val_acc_std": w.acc_std,
                   "budget": w.budget, "lr": w.lr, "n_lrs": w.n_lrs, "run_id": w.run_id,
                   "best_strategy": w.best_strategy,
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
    spec = header.get("spec", {})
    print(f"wrote {path}: {header.get('info', {}).get('strategy', '?')} ViT depth {spec.get('depth')} width "
          f"{spec.get('width')} heads {spec.get('heads')} (timm {header.get('timm_model')}); load with "
          f"weit_core.io.load_model")


__all__ = ["Report", "Winner", "build_report", "export_run", "leaderboard"]
