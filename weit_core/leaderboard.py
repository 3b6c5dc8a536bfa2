"""Which initialization wins: the evaluation protocol's ranking over a tidy table of trial results, in each
task's own direction. ``pipelines/report.py`` reads a sweep's MLflow runs into that table and writes what this
decides.

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
from dataclasses import dataclass
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

    def line(self) -> str:
        return (f"{self.metric} {self.mean:.4f} ± {self.std:.4f} after {self.budget} epochs over {self.n_seeds} "
                f"seed(s) at lr {self.lr:g}")


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


def pick_winners(runs: Any, board: Any, ranking: Any) -> dict[str, Winner]:
    winners = {}
    for task, rows in board.groupby("task", sort=True):
        rows = rows.dropna(subset=["score"])
        if rows.empty:
            continue
        top = rows.iloc[0]  # the board is sorted best first, then fewer params, then name
        e = int(top["final_budget"])
        mask = runs["status"] == "FINISHED"
        for k in [*GROUP, "lr"]:
            mask &= runs[k] == top[k]
        seeds = runs[mask].assign(key=lambda f: _better_first(f, f"val_e{e}")).sort_values(["key", "seed"])
        std = float(top[f"e{e}_std"])
        winners[task] = Winner(
            task=task, strategy=top["strategy"], size=top["size"], metric=top["metric"], mode=top["mode"], budget=e,
            mean=float(top["score"]), std=0.0 if math.isnan(std) else std, n_seeds=int(top["n_seeds"]),
            num_params=int(top["num_params"]), run_id=seeds.iloc[0]["run_id"], lr=float(top["lr"]),
            best_strategy=ranking[ranking["task"] == task].iloc[0]["strategy"], n_lrs=int(top["n_lrs"]))
    return winners
