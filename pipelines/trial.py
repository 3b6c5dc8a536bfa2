"""One sweep trial on Ray Tune: a strategy's init and stage 3 (``weit_core.stage3``), reported to Tune and
recorded in the trial's MLflow child run (``pipelines.tracking.TrialTracker``).

:func:`run_trial` needs no Ray (tests and benchmarks call it as a plain function); :func:`tune_trial` is
the trainable Tune calls. The bank, the ancestry and the tasks' data splits are ``ray.put`` once by the
driver and fetched once per worker process (``reuse_actors=True`` keeps it across trials), so a worker
neither re-reads the files nor needs them on its node. What a trial reports and ranks by is its task's:
``val_<metric>`` and the task's direction.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipelines.common import UserError
from pipelines.spaces import data_cache_key, data_key_of, load_task_data, provide_task_data, spec_of
from pipelines.tracking import TrialTracker, parse_budget

HOW_TO_GIVE = {
    "bank": "pass --bank BANK.safetensors (made by `weit distill`)",
    "ancestry": "pass --ancestry MODEL.safetensors (made by `weit ancestry`)",
    "fit_data": "give the task training.fit_examples > 0 (the labeled subset stage 2 fits on)",
    "learngene": "a sweep cannot pass one (tleg_fit fits a learngene to --ancestry)",
}
"""How a sweep provides each source a strategy may declare it needs (``weit_core.strategies.SOURCES``)."""


def family_of(config: dict) -> Any:
    """The architecture family of a trial (its space's ``family``; ViT where a space names none)."""
    from weit_core.models import get_family

    return get_family(config.get("family", "vit"))


def task_of(config: dict) -> Any:
    """The ``weit_core.tasks.Task`` a trial is trained and judged on (classification where none is named)."""
    from weit_core.tasks import get_task

    return get_task(config.get("kind", "classification"))


def reported(task: Any) -> tuple[str, ...]:
    """What a trial reports to Tune after an epoch, live or replayed; the first is what Tune ranks by."""
    return f"val_{task.metric}", "val_loss", "train_loss", "epoch"


def missing_sources(strategy: str, have: set[str]) -> str | None:
    """One line saying what ``strategy`` declares it needs and ``have`` lacks, and how to give it (None:
    nothing is missing)."""
    from weit_core.strategies import strategy_info

    missing = sorted(strategy_info(strategy).needs - have)
    if not missing:
        return None
    return f"strategy {strategy!r} needs {' and '.join(missing)}: " + "; ".join(HOW_TO_GIVE[m] for m in missing)


def scaler_count(spec: Any, kinds: dict) -> int | None:
    """How many scalers this size needs under the bank's kinds (None when its sizes do not tile)."""
    from weit_core.models import family_of as family_of_spec
    from weit_core.templates import grid_shape

    try:
        return sum(group.depth * kinds[kind].n * p * q for kind, group in family_of_spec(spec).layout(spec).items()
                   for p, q in [grid_shape(kind, group, kinds[kind])])
    except (KeyError, ValueError):
        return None


# ------------------------------------------------------------------------------------------ sources


@dataclass
class TrialSources:
    """What strategies draw on besides the config: the loaded bank and the ancestry (model, spec)."""

    bank: Any = None  # weit_core.io.LoadedBank
    ancestry: tuple[Any, Any] | None = None


@dataclass
class SweepContext:
    """Everything a Tune trial needs that is not its config; passed once via ``tune.with_parameters``."""

    tracking_uri: str | None
    experiment_id: str | None
    parent_run_id: str | None
    sweep: str
    save_models: bool = True
    bank_ref: Any = None
    bank_id: str | None = None
    ancestry_ref: Any = None
    ancestry_id: str | None = None
    threads: int = 1
    device: str = "cpu"
    report_each_epoch: bool = True  # False: one Tune report per trial (see ``run_trial``)
    data_refs: dict[str, Any] = field(default_factory=dict)  # data cache key -> the driver's splits


_SOURCE_CACHE: dict[str, Any] = {}


def _cached_get(key: str | None, ref: Any) -> Any:
    """``ray.get`` a shared object once per worker process (keyed by the file's sha256)."""
    if ref is None:
        return None
    if key not in _SOURCE_CACHE:
        import ray

        _SOURCE_CACHE[key] = ray.get(ref)
    return _SOURCE_CACHE[key]


def share_task_data(trials: list[dict]) -> dict[str, Any]:
    """Put every task's splits, as the driver loaded them, into Ray's object store once: trials read them
    from there, so the files need not exist on a worker node (a user's parquet on the submitting machine)."""
    import ray

    refs: dict[str, Any] = {}
    for config in trials:
        key = data_cache_key(data_key_of(config))
        if key not in refs:
            refs[key] = ray.put(load_task_data(data_key_of(config)))
    return refs


def take_shared_data(ctx: SweepContext, config: dict) -> None:
    """In a worker: cache the driver's splits for this trial's task, if the driver shared them."""
    data_key = data_key_of(config)
    ref = ctx.data_refs.get(data_cache_key(data_key))
    if ref is not None:
        import ray

        provide_task_data(data_key, lambda: ray.get(ref))


def trial_param_space(trials: list[dict]) -> dict[str, Any]:
    """Tune's ``param_space`` that runs exactly these trials, each once, in order: a grid over the configs
    as JSON strings. A grid over the dicts costs O(trials^2) driver CPU while the sweep runs (Tune's variant
    generator deep-copies the whole spec for every trial): 50 s at 2,000 trials here, 0.8 s as strings
    (``benchmarks/sweep_overhead.py --variants 200,800,2000``)."""
    from ray import tune

    return {"trial": tune.grid_search([json.dumps(t, sort_keys=True) for t in trials])}


def trial_config(config: dict) -> dict:
    """The trial config inside a Tune config made by :func:`trial_param_space` (a dict from sweeps
    started before it, which ``--resume`` may still restore)."""
    trial = config.get("trial", {})
    return json.loads(trial) if isinstance(trial, str) else trial


# ------------------------------------------------------------------------------------------ the trial


@dataclass
class TrialResult:
    """What one trial produced (also what the plain-function caller gets back)."""

    config: dict
    history: list[dict]  # one dict per epoch (epoch 0 = right after init)
    info: dict
    replayed: bool = False
    model: Any = None  # the trained model (not kept for replayed trials)


def _replay(config: dict, metrics: dict, report: Callable[[dict], None] | None, report_each_epoch: bool,
            keys: tuple[str, ...]) -> TrialResult:
    """A trial that FINISHED before (a restored sweep): its epochs read back from MLflow, reported again."""
    rows: dict[int, dict] = {}
    for col, value in metrics.items():
        if (parsed := parse_budget(col)) is not None and parsed[1] <= config["epochs"]:
            rows.setdefault(parsed[1], {"epoch": parsed[1]})[parsed[0]] = value
    history = [rows[e] for e in sorted(rows)]
    trained = [row for row in history if row["epoch"] > 0]
    for row in (trained if report_each_epoch else trained[-1:]) if report is not None else []:
        report({k: row[k] for k in keys if k in row})
    return TrialResult(config, history, {}, replayed=True)


def run_trial(
    config: dict, sources: TrialSources | None = None, *, tracker: TrialTracker | None = None,
    report: Callable[[dict], None] | None = None, device: str = "cpu", threads: int | None = None,
    report_each_epoch: bool = True,
) -> TrialResult:
    """One trial, no Ray needed: ``weit_core.stage3.init_target`` then ``train_target``. ``report`` gets
    :func:`reported` after each epoch (Tune's ``tune.report``), or only after the last one with
    ``report_each_epoch=False``: a Tune report blocks the trial for a driver round trip that costs more
    than a short epoch, so the sweep asks for every epoch only when a scheduler (ASHA) acts on them. With a
    ``tracker`` every epoch is logged to the trial's MLflow run as it ends; a NaN loss marks the run FAILED
    with the reason and re-raises."""
    import torch

    from weit_core.stage3 import Recipe, init_target, train_target
    from weit_core.train import NonFiniteLossError

    sources = sources or TrialSources()
    if threads:
        torch.set_num_threads(threads)
    task = task_of(config)
    keys = reported(task)
    if tracker is not None:
        previous = tracker.start(config, family_of(config).size_name(config), keys[0], task.mode)
        if previous is not None:
            return _replay(config, previous, report, report_each_epoch, keys)
    epochs_done = 0
    try:
        spec = spec_of(config)
        data = load_task_data(data_key_of(config))
        have = {"fit_data"} if config["fit_examples"] > 0 else set()
        have |= {"bank"} if sources.bank is not None else set()
        have |= {"ancestry"} if sources.ancestry is not None else set()
        if missing := missing_sources(config["strategy"], have):
            raise UserError(missing)
        t0 = time.perf_counter()
        res = init_target(config["strategy"], spec, data.train, seed=config["seed"], bank=sources.bank,
                          ancestry=sources.ancestry, fit_examples=config["fit_examples"], device=device,
                          init_mode=config["init_mode"], fit_steps=config["fit_steps"], fit_lr=config["fit_lr"],
                          fit_batch_size=config["fit_batch_size"])
        init_s = time.perf_counter() - t0
        n_scalers = res.info.get("scaler_count")
        if n_scalers is None and sources.bank is not None:
            n_scalers = scaler_count(spec, sources.bank.bank.kinds)
        if tracker is not None:
            params = {k: v for k, v in config.items() if k != "key"}
            params.update(trial_key=config["key"], num_params=spec.num_params(), flops=spec.flops(),
                          scaler_count=n_scalers or 0, init_s=round(init_s, 4), n_train=len(data.train),
                          n_val=len(data.val), fit_examples_used=min(config["fit_examples"], len(data.train)),
                          **{f"info.{k}": v for k, v in res.info.items()})
            tracker.log_params(params)
            if tracker.save_models:  # the *initialized* model, before stage 3 (what `weit export` recovers)
                tracker.log_model(res.model, spec, {**res.info, "trial_key": config["key"], "task": config["task"]})

        def on_epoch(row: dict) -> None:
            nonlocal epochs_done
            epoch, last = row["epoch"], row["epoch"] == config["epochs"]
            epochs_done = epoch
            if tracker is not None:
                tracker.log_epoch(epoch, {k: v for k, v in row.items() if k != "epoch"})
                if last:  # closed before the last report: Tune may stop the thread inside it
                    tracker.finish(epoch)
            if report is not None and epoch > 0 and (report_each_epoch or last):
                report({k: row[k] for k in keys})

        model = res.model.to(device)
        history = train_target(model, data.train, data.val, Recipe.of(config), task=task, device=device,
                               test=data.test if config["test_eval"] else None,
                               eval_batch_size=config["eval_batch_size"], on_epoch=on_epoch)
        return TrialResult(config, history, {**res.info, "init_s": init_s}, model=model)
    except NonFiniteLossError as e:
        if tracker is not None:
            tracker.fail(e, "non_finite_loss")
        raise
    except SystemExit:  # Tune stopped the trial inside report (ASHA): a legitimate early end
        if tracker is not None and epochs_done < config["epochs"]:
            tracker.finish(epochs_done, stopped_early=True)
        raise
    except BaseException as e:
        if tracker is not None:
            tracker.fail(e, "error")
        raise


def tune_trial(config: dict, ctx: SweepContext | None = None) -> None:
    """The Tune trainable: the trial config is ``config['trial']``; shared sources come from the
    per-process cache; metrics go to ``tune.report``."""
    from ray import tune

    ctx = ctx or SweepContext(None, None, None, "adhoc")
    trial = trial_config(config)
    take_shared_data(ctx, trial)
    sources = TrialSources(_cached_get(ctx.bank_id, ctx.bank_ref), _cached_get(ctx.ancestry_id, ctx.ancestry_ref))
    tracker = None
    if ctx.tracking_uri and ctx.parent_run_id:
        tracker = TrialTracker(ctx.tracking_uri, ctx.experiment_id, ctx.parent_run_id, ctx.sweep, ctx.save_models)
    run_trial(trial, sources, tracker=tracker, report=tune.report, device=ctx.device, threads=ctx.threads,
              report_each_epoch=ctx.report_each_epoch)
