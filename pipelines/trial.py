"""One sweep trial: ``weit_core.stage3.run_config``, reported to Tune and recorded in the trial's MLflow child
run. :func:`run_trial` needs no Ray (tests and benchmarks call it); :func:`tune_trial` is the trainable. Each
bank and ancestry file (a task may name its own) and the tasks' splits are ``ray.put`` once by the driver and
fetched once per worker process (``reuse_actors=True`` keeps them across trials)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipelines.common import UserError
from pipelines.tracking import TrialTracker
from weit_core.trials import (
    TaskSources,
    data_cache_key,
    data_key_of,
    family_of,
    history_of,
    load_task_data,
    provide_task_data,
    reported,
    task_of,
    trial_params,
)

HOW_TO_GIVE = {  # how a sweep provides each source a strategy may declare it needs
    "bank": "pass --bank BANK.safetensors (made by `weit distill`)",
    "ancestry": "pass --ancestry MODEL.safetensors (made by `weit ancestry`)",
    "fit_data": "give the task training.fit_examples > 0 (the labeled subset stage 2 fits on)",
    "learngene": "a sweep cannot pass one (tleg_fit fits a learngene to --ancestry)",
}


@dataclass
class SweepContext:
    """What a Tune trial needs besides its config, passed once through ``tune.with_parameters``."""

    tracking_uri: str | None
    experiment_id: str | None
    parent_run_id: str | None
    sweep: str
    save_models: bool = True
    sources: dict[str, dict] = field(default_factory=dict)  # task -> its bank/ancestry refs and their params
    threads: int = 1
    device: str = "cpu"
    report_each_epoch: bool = True  # False: one Tune report per trial (see ``run_trial``)
    data_refs: dict[str, Any] = field(default_factory=dict)  # data cache key -> the driver's splits


_SOURCE_CACHE: dict[str, Any] = {}


def _cached_get(ref: Any) -> Any:
    if ref is not None and ref.hex() not in _SOURCE_CACHE:
        import ray

        _SOURCE_CACHE[ref.hex()] = ray.get(ref)
    return None if ref is None else _SOURCE_CACHE[ref.hex()]


def share_sources(sources: TaskSources) -> dict[str, dict]:
    """Each task's bank and ancestry as object refs, each distinct file ``ray.put`` once, with the params its
    trials record (path and sha256 of each)."""
    import ray

    refs = {id(s): ray.put(s.value) for s in sources.files()}
    return {task: {**{k: refs[id(s)] if s else None for k, s in own.items()}, "params": sources.params(task)}
            for task, own in sources.of_task.items()}


def share_task_data(trials: list[dict]) -> dict[str, Any]:
    """Every task's splits, as the driver loaded them, in Ray's object store once: a worker node needs no
    copy of the files (a user's parquet on the submitting machine)."""
    import ray

    keys = {data_cache_key(data_key_of(t)): data_key_of(t) for t in trials}
    return {key: ray.put(load_task_data(data_key)) for key, data_key in keys.items()}


def take_shared_data(ctx: SweepContext, config: dict) -> None:
    data_key = data_key_of(config)
    if (ref := ctx.data_refs.get(data_cache_key(data_key))) is not None:
        import ray

        provide_task_data(data_key, lambda: ray.get(ref))


def trial_param_space(trials: list[dict]) -> dict[str, Any]:
    """A grid over the configs as JSON strings: over dicts, Tune's variant generator deep-copies the whole spec
    per trial, O(trials^2) driver CPU (50 s at 2,000 trials, 0.8 s as strings: benchmarks/sweep_overhead.py)."""
    from ray import tune

    return {"trial": tune.grid_search([json.dumps(t, sort_keys=True) for t in trials])}


def trial_config(config: dict) -> dict:
    """The trial inside a Tune config (a dict in sweeps started before the JSON grid, which --resume restores)."""
    trial = config.get("trial", {})
    return json.loads(trial) if isinstance(trial, str) else trial


@dataclass
class TrialResult:
    config: dict
    history: list[dict]  # one dict per epoch (epoch 0 = right after init)
    info: dict
    replayed: bool = False
    model: Any = None  # the trained model (not kept for replayed trials)


def run_trial(
    config: dict, *, bank: Any = None, ancestry: tuple[Any, Any] | None = None, tracker: TrialTracker | None = None,
    report: Callable[[dict], None] | None = None, device: str = "cpu", threads: int | None = None,
    report_each_epoch: bool = True, sources: dict | None = None,
) -> TrialResult:
    """``run_config`` on the trial's task data. ``report`` (``tune.report``) gets :func:`reported` after each
    epoch, or after the last only: a Tune report costs a driver round trip longer than a short epoch, so
    every epoch is asked for only where a scheduler (ASHA) acts on them. With a ``tracker`` each epoch is
    logged as it ends, with the task's sample grid where it has one, and ``sources`` (which bank and ancestry
    files these are) among its params; a run that FINISHED before is replayed from MLflow instead of trained."""
    import torch

    from weit_core.stage3 import run_config
    from weit_core.strategies import strategy_info
    from weit_core.train import NonFiniteLossError, iterate_batches

    if threads:
        torch.set_num_threads(threads)
    keys = reported(task := task_of(config))

    def send(row: dict, last: bool) -> None:
        if report is not None and row["epoch"] > 0 and (report_each_epoch or last):
            report({k: row[k] for k in keys if k in row})

    size = family_of(config).size_name(config)
    if tracker is not None and (previous := tracker.start(config, size, keys[0], task.mode)) is not None:
        history = history_of(previous, config["epochs"])
        for row in history:
            send(row, row is history[-1])
        return TrialResult(config, history, {}, replayed=True)
    epochs_done = 0
    try:
        data = load_task_data(config)
        have = {n for n, ok in [("fit_data", config["fit_examples"] > 0), ("bank", bank is not None),
                                ("ancestry", ancestry is not None)] if ok}
        if missing := sorted(strategy_info(config["strategy"]).needs - have):
            raise UserError(f"strategy {config['strategy']!r} needs {' and '.join(missing)}: "
                            + "; ".join(HOW_TO_GIVE[m] for m in missing))

        model = None

        def on_init(spec: Any, res: Any, init_s: float) -> None:
            nonlocal model
            model = res.model  # trained in place: what each epoch's sample grid shows
            if tracker is not None:
                tracker.log_params(trial_params(config, spec, res, init_s, data, bank, sources))
                if tracker.save_models:  # the *initialized* model, before stage 3 (what `weit export` recovers)
                    tracker.log_model(res.model, spec, {**res.info, "trial_key": config["key"], "task": config["task"]})

        def on_epoch(row: dict) -> None:
            nonlocal epochs_done
            epochs_done, last = row["epoch"], row["epoch"] == config["epochs"]
            if tracker is not None:
                tracker.log_epoch(epochs_done, {k: v for k, v in row.items() if k != "epoch"})
                if task.sample_grid is not None:  # cheap beside the evaluation it follows (CPU, measured):
                    # 0.1-0.15 s grid + log after 3.6 s (2x32 DiT, generation:200x4, sqlite); the grid alone
                    # 1 s after 34 s (4x128 DiT, generation:1000x10)
                    val = iterate_batches(data.val.x, data.val.y, config["eval_batch_size"], shuffle=False)
                    tracker.log_samples(epochs_done, task.sample_grid(model, val, device))
                if last:  # closed before the last report: Tune may stop the thread inside it
                    tracker.finish(epochs_done)
            send(row, last)

        res, history, init_s = run_config(config, data, bank=bank, ancestry=ancestry, device=device,
                                          on_init=on_init, on_epoch=on_epoch)
        return TrialResult(config, history, {**res.info, "init_s": init_s}, model=res.model)
    except SystemExit:  # Tune stopped the trial inside report (ASHA): a legitimate early end
        if tracker is not None and epochs_done < config["epochs"]:
            tracker.finish(epochs_done, stopped_early=True)
        raise
    except BaseException as e:
        if tracker is not None:
            tracker.fail(e, "non_finite_loss" if isinstance(e, NonFiniteLossError) else "error")
        raise


def tune_trial(config: dict, ctx: SweepContext | None = None) -> None:
    """The Tune trainable: the trial is ``config['trial']``; its task's sources come from the per-process cache."""
    from ray import tune

    ctx = ctx or SweepContext(None, None, None, "adhoc")
    trial = trial_config(config)
    take_shared_data(ctx, trial)
    tracker = None
    if ctx.tracking_uri and ctx.parent_run_id:
        tracker = TrialTracker(ctx.tracking_uri, ctx.experiment_id, ctx.parent_run_id, ctx.sweep, ctx.save_models)
    own = ctx.sources.get(trial["task"], {})
    run_trial(trial, bank=_cached_get(own.get("bank")), ancestry=_cached_get(own.get("ancestry")), tracker=tracker,
              report=tune.report, device=ctx.device, threads=ctx.threads, report_each_epoch=ctx.report_each_epoch,
              sources=own.get("params"))
