"""Which initialization wins: the evaluation protocol's ranking over a tidy table of trial results, in each
task's own direction, and the leaderboard written out (markdown, plots). ``pipelines/report.py`` reads a sweep's
MLflow runs into that table and logs what this decides.

The table has one row per trial: ``task``, ``strategy``, ``size`` (the family's name for it), ``lr``,
``seed``, ``status`` (FINISHED / FAILED / ...), ``run_id``, ``num_params``, ``metric`` (the task's
``val_<metric>``) and ``mode`` (``max`` or ``min``: which way is better), ``val_e<k>`` (the metric after
``k`` stage-3 epochs, ``k = 0`` right after initialization) and ``test``. Definitions (what the tests
recompute with pandas):
- a group is (task, strategy, size); at each of its stage-3 learning rates its score at budget ``e`` is the
  mean over seeds of the metric after ``e`` epochs;
- each group is reported at its own best learning rate: the lr with the best score at the task's final
  budget (an lr none of whose trials FAILED before one that lost a trial; ties: the smaller lr), so no init is
  judged by a recipe tuned for another; its row (val per budget, test where logged) is that lr's;
- only runs that reached a budget count at it: a group none of whose runs reached the final budget (ASHA
  stopped them all) has no score and is not ranked;
- the winner of a task is the group with the best score at the task's final budget (ties: fewer
  parameters, then strategy name); it names the best strategy and the best size together;
- the strategy ranking averages each strategy's final-budget score over the sizes it ran on;
- the champion is the winner's best seed.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

GROUP = ["task", "strategy", "size"]


@dataclass
class Winner:
    task: str
    strategy: str
    size: str  # the family's name for it: depth x width x heads x mlp_ratio for a ViT
    metric: str  # what the score is: the task's val_<metric>
    mode: str  # max or min: which way is better
    budget: int  # epochs of stage 3 the score is taken at
    mean: float
    std: float
    n_seeds: int
    num_params: int
    run_id: str  # the best seed's child run (its initialized model is the champion)
    best_strategy: str  # the best of the strategy ranking (mean over sizes)
    lr: float  # the stage-3 learning rate the score is taken at (the group's best)
    n_lrs: int  # how many learning rates the group tried
    registered: str | None = None  # where the champion was registered, if it was

    def summary(self) -> dict:
        """What ``winners.json`` keeps of the winner."""
        keep = ("strategy", "size", "metric", "mode", "budget", "lr", "n_lrs", "run_id", "best_strategy", "registered")
        return {**{k: v for k, v in asdict(self).items() if k in keep}, f"{self.metric}_mean": self.mean,
                f"{self.metric}_std": self.std}

    def line(self) -> str:
        return (f"{self.metric} {self.mean:.4f} ± {self.std:.4f} after {self.budget} epochs over {self.n_seeds} "
                f"seed(s) at lr {self.lr:g}")


def parse_budget(col: str) -> tuple[str, int] | None:
    """``"val_acc_e2"`` (``val_acc`` after 2 stage-3 epochs, as a trial's run logs it) -> ``("val_acc", 2)``;
    None for other names."""
    m = re.fullmatch(r"(.+)_e(\d+)", col)
    return (m.group(1), int(m.group(2))) if m else None


def budgets(frame: Any, prefix: str = "val_e", suffix: str = "") -> list[int]:
    """The budgets (epochs) that have a column ``<prefix><e><suffix>`` with a value in ``frame``."""
    return sorted(int(c[len(prefix):len(c) - len(suffix)]) for c in frame.columns
                  if c.startswith(prefix) and c.endswith(suffix) and c[len(prefix):len(c) - len(suffix)].isdigit()
                  and frame[c].notna().any())


def _better_first(frame: Any, col: str) -> Any:
    """``col`` signed so that sorting ascending puts the better value first under each row's ``mode``."""
    return frame[col].where(frame["mode"] == "min", -frame[col])


def leaderboard_by_lr(runs: Any) -> Any:
    """Mean / std / count over seeds of the metric at every budget (``e<k>_mean`` ...), per group and stage-3
    learning rate (FINISHED runs only), with ``score`` (the mean at the task's final budget) and ``n_failed``
    (FAILED trials at that lr)."""
    import pandas as pd

    keys = [*GROUP, "lr"]
    ok = runs[runs["status"] == "FINISHED"]
    if ok.empty:
        return pd.DataFrame(columns=keys)
    g = ok.groupby(keys, sort=False)
    board = g.agg(metric=("metric", "first"), mode=("mode", "first"), num_params=("num_params", "first"),
                  n_seeds=("seed", "nunique"), init_s=("init_s", "mean"), test_mean=("test", "mean"),
                  test_std=("test", "std"))
    for e in budgets(ok):
        board[f"e{e}_mean"], board[f"e{e}_std"], board[f"e{e}_n"] = (g[f"val_e{e}"].mean(), g[f"val_e{e}"].std(),
                                                                     g[f"val_e{e}"].count())
    failed = runs[runs["status"] == "FAILED"].groupby(keys).size()
    board["n_failed"] = failed.reindex(board.index).fillna(0).astype(int)
    board = board.reset_index()
    final = {task: max(budgets(rows), default=0) for task, rows in ok.groupby("task")}
    board["final_budget"] = board["task"].map(final)
    board["score"] = [r.get(f"e{int(r['final_budget'])}_mean", float("nan")) for _, r in board.iterrows()]
    board["rank_key"] = _better_first(board, "score")
    return board


def leaderboard(runs: Any) -> Any:
    """One row per group at its best stage-3 learning rate (see the module's definitions): that lr's
    statistics (:func:`leaderboard_by_lr`), the chosen ``lr``, ``n_lrs`` (how many the group tried) and
    ``n_failed`` (its FAILED trials over all its lrs); best first within each task."""
    by_lr = leaderboard_by_lr(runs)
    if by_lr.empty:
        return by_lr.assign(n_lrs=[])
    by_lr["clean"] = by_lr["n_failed"] == 0
    best = (by_lr.sort_values(["clean", "rank_key", "lr"], ascending=[False, True, True], na_position="last")
            .groupby(GROUP, sort=False).head(1).drop(columns="clean"))
    index = best.set_index(GROUP).index
    best["n_lrs"] = runs.groupby(GROUP)["lr"].nunique().reindex(index).fillna(1).astype(int).to_numpy()
    best["n_failed"] = runs[runs["status"] == "FAILED"].groupby(GROUP).size().reindex(index).fillna(0).astype(
        int).to_numpy()
    return best.sort_values(["task", "rank_key", "num_params", "strategy"], na_position="last").reset_index(drop=True)


def strategy_ranking(board: Any) -> Any:
    """Per task and strategy: the final-budget score averaged over the sizes it ran on, and its best size's."""
    g = board.groupby(["task", "strategy"])
    r = g.agg(mode=("mode", "first"), mean_over_sizes=("score", "mean"), sizes=("score", "count"),
              best_size_key=("rank_key", "min")).reset_index()
    r["best_size_score"] = r["best_size_key"].where(r["mode"] == "min", -r["best_size_key"])
    r["rank_key"] = _better_first(r, "mean_over_sizes")
    return r.sort_values(["task", "rank_key"]).drop(columns="best_size_key").reset_index(drop=True)


def best_run(runs: Any, row: Any) -> Any:
    """The run a leaderboard row stands for: its group's best seed at its lr at the final budget (ties: the
    lower seed)."""
    mask = runs["status"] == "FINISHED"
    for k in [*GROUP, "lr"]:
        mask &= runs[k] == row[k]
    key = f"val_e{int(row['final_budget'])}"
    return runs[mask].assign(key=lambda f: _better_first(f, key)).sort_values(["key", "seed"]).iloc[0]


def best_runs_at(runs: Any, board: Any, task: str, size: str) -> list[Any]:
    """Each ranked strategy's :func:`best_run` at one size, best strategy first."""
    rows = board[(board["task"] == task) & (board["size"] == size)].dropna(subset=["score"])
    return [best_run(runs, row) for _, row in rows.iterrows()]


def pick_winners(runs: Any, board: Any, ranking: Any) -> dict[str, Winner]:
    winners = {}
    for task, rows in board.groupby("task", sort=True):
        rows = rows.dropna(subset=["score"])
        if rows.empty:
            continue
        top = rows.iloc[0]  # the board is sorted best first, then fewer params, then name
        e = int(top["final_budget"])
        std = float(top[f"e{e}_std"])
        winners[task] = Winner(
            task=task, strategy=top["strategy"], size=top["size"], metric=top["metric"], mode=top["mode"], budget=e,
            mean=float(top["score"]), std=0.0 if math.isnan(std) else std, n_seeds=int(top["n_seeds"]),
            num_params=int(top["num_params"]), run_id=best_run(runs, top)["run_id"], lr=float(top["lr"]),
            best_strategy=ranking[ranking["task"] == task].iloc[0]["strategy"], n_lrs=int(top["n_lrs"]))
    return winners


# --------------------------------------------------------------------------------------------- written out


def table(rows: Any) -> tuple[list[str], list[list[str]]]:
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


def markdown(board: Any, winners: dict[str, Winner], ranking: Any, samples: dict[str, Path] | None = None) -> str:
    """The leaderboard of every task as markdown: the winner, each group at its best lr, the strategy ranking;
    ``samples``: a task's :func:`samples_figure`, shown under its winner."""
    lines = []
    for task, rows in board.groupby("task", sort=True):
        lines.append(f"## {task}\n")
        if w := winners.get(task):
            lines.append(f"Winner: **{w.strategy}** at size **{w.size}**, {w.line()}; best strategy over all "
                         f"sizes: **{w.best_strategy}**.\n")
            if task in (samples or {}):  # ./: a name with ':' (generation:200x4) would read as a URL scheme
                lines.append(f"Samples of each strategy's best run at size {w.size}, a class per row, the same noise "
                             f"in every panel:\n\n![samples at size {w.size}](./{samples[task].name})\n")
        lines.append("Each strategy x size at its own best stage-3 learning rate (`lr`, of the `lrs` it tried), "
                     f"chosen on the final-budget val mean ({rows['mode'].iloc[0]} is better); test is that lr's.\n")
        head, cells = table(rows)
        lines += [f"| {' | '.join(row)} |" for row in [head, ["---"] * len(head), *cells]]
        lines += [f"\nStrategy ranking (final-budget {rows['metric'].iloc[0]} averaged over sizes):\n",
                  "| strategy | mean over sizes | best size | sizes |\n|---|---|---|---|"]
        lines += [f"| {r['strategy']} | {r['mean_over_sizes']:.4f} | {r['best_size_score']:.4f} | {int(r['sizes'])} |"
                  for _, r in ranking[ranking["task"] == task].iterrows()]
        lines.append("")
    return "\n".join(lines)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plots(board: Any, w: Winner, out_dir: Path) -> list[Path]:
    """Final-budget score against parameter count per strategy, and the metric per stage-3 epoch at the
    winner's size (the winner bold, scratch dashed)."""
    import matplotlib

    plt = _pyplot()

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


def samples_figure(panels: list[tuple[Any, int, Path]], w: Winner, out_dir: Path) -> Path:
    """The strategies' sample grids side by side at the winner's size: ``panels`` are (a run of
    :func:`best_runs_at`, the epoch its grid was logged at, the grid's image file), each titled with the run's
    strategy and its metric at that epoch. Same noise in every panel, so what differs is the init."""
    plt = _pyplot()
    images = [plt.imread(image) for _, _, image in panels]
    tall = max(i.shape[0] / i.shape[1] for i in images)
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 2.6 * tall + 0.8), squeeze=False)
    for ax, (run, epoch, _), image in zip(axes[0], panels, images, strict=True):
        ax.imshow(image)
        ax.set_title(f"{run['strategy']}\n{w.metric.removeprefix('val_')} {run[f'val_e{epoch}']:.4g} "
                     f"(seed {run['seed']}, epoch {epoch})", fontsize=8)
        ax.axis("off")
    fig.suptitle(f"{w.task}: samples at size {w.size} (a class per row)", fontsize=10)
    fig.tight_layout()
    path = out_dir / f"samples_{w.task}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
