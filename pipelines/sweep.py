"""Stages 2+3 over a search space on Ray Tune, every trial recorded once in MLflow.

One trial = one (task, size, strategy, seed, lr): ``init_model`` (stage 2) then E epochs of the one training
loop (stage 3, the same recipe for every strategy: :func:`stage3_schedule`), val accuracy logged to MLflow each epoch (and reported to Tune each epoch when ASHA acts
on it, once at the end otherwise: each report is a blocking driver round trip). The trial body is
:func:`run_trial`, a plain function (no Ray needed) that Tune calls through :func:`_tune_trial` and that
benchmarks can call directly.

Shared inputs travel once: the bank and the ancestry are ``ray.put`` in the driver and fetched once per
worker process into a cache keyed by the file's sha256 (``reuse_actors=True`` keeps the process alive
across trials); so do the tasks' data splits as the driver loaded them (:func:`share_task_data`), so a
worker neither re-parses the files nor needs them on its node.

Exactly-once logging: a child run carries ``weit.trial_key`` (hash of the trial config). A trial that
starts again (Tune restore after a killed driver) looks its key up under the parent: a FINISHED run is
replayed to Tune from MLflow without recomputing; a deterministic NaN failure fails again at once; a
half-written run (the killed attempt) is deleted and the trial runs afresh.
"""

from __future__ import annotations

import collections
import copy
import functools
import hashlib
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

from pipelines.common import (
    EXPERIMENT_NOTES,
    NOTE_TAG,
    UserError,
    git_revision,
    init_ray,
    mlflow_ui_path,
    mlflow_ui_url,
    prepare_mlflow,
    publish_comparison_view,
    storage_path,
)
from pipelines.spaces import (
    DROP_REASONS,
    Space,
    block_of_bank,
    data_cache_key,
    data_key_of,
    expand,
    inspect_tasks,
    load_space,
    load_task_data,
    provide_task_data,
    spec_of,
    summarize_space,
)

EXPERIMENT = "weit-sweep"
METRIC = "val_acc"
PREFIX = "[weit sweep]"
HOW_TO_GIVE = {
    "bank": "pass --bank BANK.safetensors (made by `weit distill`)",
    "ancestry": "pass --ancestry MODEL.safetensors (made by `weit ancestry`)",
    "fit_data": "give the task training.fit_examples > 0 (the labeled subset stage 2 fits on)",
    "learngene": "a sweep cannot pass one (tleg_fit fits a learngene to --ancestry)",
}
"""How a sweep provides each source a strategy may declare it needs (``weit_core.strategies.SOURCES``)."""


# ------------------------------------------------------------------------------------------ sources


@dataclass
class TrialSources:
    """What strategies draw on besides the config: the loaded bank and the ancestry (model, spec)."""

    bank: Any = None  # weit_core.io.LoadedBank
    ancestry: tuple[Any, Any] | None = None  # (timm model, ViTSpec)


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


REPORTED = (METRIC, "val_loss", "train_loss", "epoch")  # what a trial reports to Tune, live or replayed
SORT_METRICS = ("num_params", "flops")  # trial params also logged as metrics (step 0), to sort the runs table by

_SOURCE_CACHE: dict[str, Any] = {}


def _cached_get(key: str | None, ref: Any) -> Any:
    """``ray.get`` a shared object once per worker process (keyed by the file's sha256)."""
    if ref is None:
        return None
    if key not in _SOURCE_CACHE:
        import ray

        _SOURCE_CACHE[key] = ray.get(ref)
    return _SOURCE_CACHE[key]


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
    from weit_core.models import vit_layout
    from weit_core.templates import grid_shape

    try:
        total = 0
        for kind, group in vit_layout(spec).items():
            p, q = grid_shape(kind, group, kinds[kind])
            total += group.depth * kinds[kind].n * p * q
        return total
    except (KeyError, ValueError):
        return None


# ------------------------------------------------------------------------------------------ MLflow child run


@dataclass
class TrialTracker:
    """The MLflow child run of one trial, found again by its trial key (exactly one per trial)."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    sweep: str
    save_models: bool = True
    run_id: str | None = None
    _client: Any = field(default=None, repr=False)

    @property
    def client(self):
        if self._client is None:
            self._client = _mlflow_client(self.tracking_uri)
        return self._client

    def find(self, key: str) -> list:
        from mlflow.entities import ViewType

        return self.client.search_runs(
            [self.experiment_id],
            f"tags.`mlflow.parentRunId` = '{self.parent_run_id}' and tags.`weit.trial_key` = '{key}'",
            run_view_type=ViewType.ACTIVE_ONLY, max_results=10)

    def start(self, config: dict) -> dict | None:
        """Open the trial's run. Returns the previous run's per-epoch metrics when the trial already
        FINISHED (replay them, do not retrain); raises NonFiniteLossError again for a trial whose loss
        went NaN before (deterministic); deletes a half-written run of a killed attempt."""
        from weit_core.train import NonFiniteLossError

        for run in self.find(config["key"]):
            status, tags = run.info.status, run.data.tags
            if status == "FINISHED":
                self.run_id = run.info.run_id
                return dict(run.data.metrics)
            if status == "FAILED" and tags.get("weit.failure_kind") == "non_finite_loss":
                self.run_id = run.info.run_id
                raise NonFiniteLossError(tags.get("weit.failure", "loss was not finite (earlier attempt)"))
            self.client.delete_run(run.info.run_id)  # an interrupted attempt: replaced, never duplicated
        size = f"{config['depth']}x{config['width']}x{config['heads']}x{config['mlp_ratio']:g}"
        tags = {"mlflow.parentRunId": self.parent_run_id, "weit.trial_key": config["key"], "weit.sweep": self.sweep,
                "weit.kind": "trial", "weit.task": config["task"], "weit.strategy": config["strategy"],
                "weit.size": size, "weit.seed": str(config["seed"]), "weit.lr": f"{config['lr']:g}"}
        name = f"{config['task']}/{config['strategy']}/{size}/s{config['seed']}/lr{config['lr']:g}"
        self.run_id = self.client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id
        return None

    def log_params(self, params: dict) -> None:
        """The trial's params, and the numbers a user sorts trials by (:data:`SORT_METRICS`) also as metrics:
        the runs table sorts params as text ("9000" after "10000"), metrics as numbers."""
        from mlflow.entities import Metric, Param

        items = [Param(k, _param_value(v)) for k, v in sorted(params.items())]
        now = int(time.time() * 1000)
        numbers = [Metric(k, float(params[k]), now, 0) for k in SORT_METRICS
                   if isinstance(params.get(k), int | float) and math.isfinite(params[k])]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100], metrics=numbers if i == 0 else [])

    def log_model(self, model: Any, spec: Any, info: dict) -> None:
        from weit_core.io import save_model

        with tempfile.TemporaryDirectory(prefix="weit-trial-") as d:
            path = save_model(Path(d) / "model.safetensors", model, spec, info)
            self.client.log_artifact(self.run_id, str(path), "model")

    def log_epoch(self, epoch: int, metrics: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = []
        for k, v in metrics.items():
            if isinstance(v, int | float) and math.isfinite(v):
                batch.append(Metric(k, float(v), now, epoch))  # a curve per metric, step = epoch
                batch.append(Metric(f"{k}_e{epoch}", float(v), now, 0))  # one column per budget for search_runs
        self.client.log_batch(self.run_id, metrics=batch)

    def finish(self, epochs_done: int, stopped_early: bool = False) -> None:
        self.client.set_tag(self.run_id, "weit.epochs_done", str(epochs_done))
        if stopped_early:
            self.client.set_tag(self.run_id, "weit.stopped_early", "true")
        self.client.set_terminated(self.run_id, "FINISHED")

    def fail(self, exc: BaseException, kind: str) -> None:
        if self.run_id is None:
            return
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:4000]
        self.client.set_tag(self.run_id, "weit.failure", reason)
        self.client.set_tag(self.run_id, "weit.failure_kind", kind)
        self.client.set_terminated(self.run_id, "FAILED")


_CLIENTS: dict[str, Any] = {}


def _mlflow_client(uri: str):
    if uri not in _CLIENTS:
        import mlflow

        _CLIENTS[uri] = mlflow.MlflowClient(uri)
    return _CLIENTS[uri]


def _param_value(v: Any) -> str:
    return ("" if v is None else str(v))[:6000]


# ------------------------------------------------------------------------------------------ the trial


@dataclass
class TrialResult:
    """What one trial produced (also what the plain-function caller gets back)."""

    config: dict
    history: list[dict]  # one dict per epoch (epoch 0 = right after init)
    info: dict
    replayed: bool = False
    model: Any = None  # the trained model (not kept for replayed trials)


def _replay(config: dict, metrics: dict, report: Callable[[dict], None] | None,
            report_each_epoch: bool = True) -> TrialResult:
    history = []
    for e in range(0, config["epochs"] + 1):
        row = {k[: -len(f"_e{e}")]: v for k, v in metrics.items() if k.endswith(f"_e{e}")}
        if not row:
            continue
        row["epoch"] = e
        history.append(row)
    if report is not None:
        trained = [row for row in history if row["epoch"] > 0]
        for row in trained if report_each_epoch else trained[-1:]:
            report({k: row[k] for k in REPORTED if k in row})
    return TrialResult(config, history, {}, replayed=True)


def run_trial(
    config: dict, sources: TrialSources | None = None, *, tracker: TrialTracker | None = None,
    report: Callable[[dict], None] | None = None, device: str = "cpu", threads: int | None = None,
    report_each_epoch: bool = True,
) -> TrialResult:
    """One trial, no Ray needed: stage 2 (``init_model``) then ``config['epochs']`` epochs of
    ``train_epoch`` (the LR following :func:`stage3_schedule`, stepped every optimizer step) + ``evaluate``. ``report`` gets ``{val_acc, val_loss, train_loss, epoch}`` after each
    epoch (Tune's ``tune.report``; anything else outside Tune), or only after the last one with
    ``report_each_epoch=False``: a Tune report blocks the trial until the driver has processed it, a round
    trip that costs more than a short epoch, so the sweep asks for every epoch only when a scheduler (ASHA)
    acts on them. With a ``tracker`` every epoch is logged to the trial's MLflow child run as it ends,
    either way; a NaN loss marks that run FAILED with the reason and re-raises."""
    import torch

    from weit_core.strategies import init_model
    from weit_core.train import (
        NonFiniteLossError,
        evaluate,
        iterate_batches,
        make_optimizer,
        seed_everything,
        train_epoch,
    )

    sources = sources or TrialSources()
    if threads:
        torch.set_num_threads(threads)
    if tracker is not None:
        previous = tracker.start(config)
        if previous is not None:
            return _replay(config, previous, report, report_each_epoch)
    epochs_done = 0
    try:
        spec = spec_of(config)
        data = load_task_data(data_key_of(config))
        kwargs: dict[str, Any] = dict(seed=config["seed"], init_mode=config["init_mode"], device=device,
                                      fit_steps=config["fit_steps"], fit_lr=config["fit_lr"],
                                      fit_batch_size=config["fit_batch_size"])
        if config["fit_examples"] > 0:
            fit = data.train.subset(config["fit_examples"], seed=1000 + config["seed"])
            kwargs["fit_data"] = (fit.x, fit.y)
        if sources.bank is not None:
            kwargs.update(bank=sources.bank)  # the whole bank: templates, aux scalers, free tensors, header
        if sources.ancestry is not None:  # strategies may change what they are given: each trial gets a copy
            kwargs.update(ancestry=copy.deepcopy(sources.ancestry[0]), ancestry_spec=sources.ancestry[1])
        missing = missing_sources(config["strategy"], set(kwargs))
        if missing:
            raise UserError(missing)

        t0 = time.perf_counter()
        res = init_model(config["strategy"], spec, **kwargs)
        init_s = time.perf_counter() - t0
        model = res.model.to(device)
        n_scalers = res.info.get("scaler_count")
        if n_scalers is None and sources.bank is not None:
            n_scalers = scaler_count(spec, sources.bank.bank.kinds)
        params = {k: v for k, v in config.items() if k != "key"}
        params.update(trial_key=config["key"], num_params=spec.num_params(), flops=spec.flops(),
                      scaler_count=n_scalers if n_scalers is not None else 0, init_s=round(init_s, 4),
                      n_train=len(data.train), n_val=len(data.val),
                      fit_examples_used=len(kwargs["fit_data"][0]) if "fit_data" in kwargs else 0)
        params.update({f"info.{k}": v for k, v in res.info.items()})
        if tracker is not None:
            tracker.log_params(params)
            if tracker.save_models:  # the *initialized* model, before stage 3 (what `weit export` recovers)
                tracker.log_model(res.model, spec, {**res.info, "trial_key": config["key"], "task": config["task"]})

        val = (data.val.x, data.val.y)
        ebs = config["eval_batch_size"]

        def _eval(x: torch.Tensor, y: torch.Tensor) -> dict:
            return evaluate(model, iterate_batches(x, y, ebs, shuffle=False), device=device)

        ev = _eval(*val)
        history = [{"epoch": 0, METRIC: ev["acc"], "val_loss": ev["loss"], "init_s": init_s}]
        if tracker is not None:
            tracker.log_epoch(0, {METRIC: ev["acc"], "val_loss": ev["loss"]})
        seed_everything(config["seed"])
        opt = make_optimizer(model, config["lr"], config["weight_decay"])
        sched = stage3_schedule(opt, config, len(data.train))
        for epoch in range(1, config["epochs"] + 1):
            t1 = time.perf_counter()
            batches = iterate_batches(data.train.x, data.train.y, config["batch_size"],
                                      seed=config["seed"] * 1000 + epoch)
            tr = train_epoch(model, batches, opt, device=device, max_steps=config["steps_per_epoch"],
                             scheduler=sched)
            ev = _eval(*val)
            row = {METRIC: ev["acc"], "val_loss": ev["loss"], "train_loss": tr["loss"], "train_acc": tr["acc"],
                   "epoch_s": time.perf_counter() - t1}
            last = epoch == config["epochs"]
            if last and config["test_eval"]:
                row["test_acc"] = _eval(data.test.x, data.test.y)["acc"]
            history.append({"epoch": epoch, **row})
            epochs_done = epoch
            if tracker is not None:
                tracker.log_epoch(epoch, row)
                if last:  # closed before the last report: Tune may stop the thread inside it
                    tracker.finish(epoch)
            if report is not None and (report_each_epoch or last):
                report({k: history[-1][k] for k in REPORTED})
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


def stage3_steps(config: dict, n_train: int) -> int:
    """The trial's stage-3 optimizer steps: epochs x steps per epoch (a full pass of ``n_train`` examples in
    batches of ``batch_size``, the last one partial, or ``steps_per_epoch`` when the space caps it lower)."""
    per_epoch = math.ceil(n_train / config["batch_size"])
    if config["steps_per_epoch"]:
        per_epoch = min(per_epoch, config["steps_per_epoch"])
    return config["epochs"] * per_epoch


def stage3_schedule(optimizer: Any, config: dict, n_train: int) -> Any:
    """The one stage-3 recipe every strategy gets: ``cosine`` = linear warm-up over ``warmup`` of the
    trial's stage-3 steps, then cosine decay (``weit_core.train.warmup_cosine``), stepped once per optimizer
    step; ``constant`` = None (a fixed ``lr``; older sweeps' configs carry no ``schedule``: constant)."""
    from weit_core.train import warmup_cosine

    schedule = config.get("schedule", "constant")
    if schedule == "constant":
        return None
    if schedule != "cosine":
        raise UserError(f"unknown stage-3 schedule {schedule!r}; use cosine or constant")
    total = stage3_steps(config, n_train)
    return warmup_cosine(optimizer, total, round(config["warmup"] * total))


def _tune_trial(config: dict, ctx: SweepContext | None = None) -> None:
    """The Tune trainable: the trial config is ``config['trial']``; shared sources come from the
    per-process cache; metrics go to ``tune.report``."""
    from ray import tune

    ctx = ctx or SweepContext(None, None, None, "adhoc")
    trial = trial_config(config)
    take_shared_data(ctx, trial)
    bank = _cached_get(ctx.bank_id, ctx.bank_ref)
    ancestry = _cached_get(ctx.ancestry_id, ctx.ancestry_ref)
    tracker = None
    if ctx.tracking_uri and ctx.parent_run_id:
        tracker = TrialTracker(ctx.tracking_uri, ctx.experiment_id, ctx.parent_run_id, ctx.sweep, ctx.save_models)
    run_trial(trial, TrialSources(bank, ancestry), tracker=tracker, report=tune.report,
              device=ctx.device, threads=ctx.threads, report_each_epoch=ctx.report_each_epoch)


def trial_param_space(trials: list[dict]) -> dict[str, Any]:
    """Tune's ``param_space`` that runs exactly these trials, each once, in order: a grid over the configs
    as JSON strings. A grid over the dicts themselves costs O(trials^2) driver CPU while the sweep runs
    (Tune's variant generator deep-copies the whole spec, the list included, for every trial it makes):
    8 s at 800 trials and 50 s at 2,000 here, 0.12 s and 0.8 s as strings
    (``benchmarks/sweep_overhead.py --variants 200,800,2000``)."""
    from ray import tune

    return {"trial": tune.grid_search([json.dumps(t, sort_keys=True) for t in trials])}


def trial_config(config: dict) -> dict:
    """The trial config inside a Tune config made by :func:`trial_param_space` (a dict from sweeps
    started before it, which ``--resume`` may still restore)."""
    trial = config.get("trial", {})
    return json.loads(trial) if isinstance(trial, str) else trial


def share_task_data(trials: list[dict]) -> dict[str, Any]:
    """Put every task's splits, as the driver loaded them, into Ray's object store once: trials then
    read them from there instead of each worker process re-reading the files, which also need not exist
    on a worker node (a user's parquet on the machine that submits the sweep is enough)."""
    import ray

    refs: dict[str, Any] = {}
    for config in trials:
        data_key = data_key_of(config)
        key = data_cache_key(data_key)
        if key not in refs:
            refs[key] = ray.put(load_task_data(data_key))
    return refs


def take_shared_data(ctx: SweepContext, config: dict) -> None:
    """In a worker: cache the driver's splits for this trial's task, if the driver shared them."""
    data_key = data_key_of(config)
    ref = ctx.data_refs.get(data_cache_key(data_key))
    if ref is not None:
        import ray

        provide_task_data(data_key, lambda: ray.get(ref))


def _trial_dirname(trial: Any) -> str:
    return trial.trial_id


# ------------------------------------------------------------------------------------------ progress


_QUIET = False


def _progress_callback_cls():
    from ray.tune import Callback

    class Progress(Callback):
        """Terminal progress in place of Tune's tables: trials done/total and the best so far per task."""

        def __init__(self, total: int) -> None:
            self.total = total

        @property
        def quiet(self) -> bool:  # read at call time: a restored sweep reuses the pickled callback
            return _QUIET

        def _config(self, trial: Any) -> dict:
            """A trial's decoded config, decoded once: every completion scans every trial, so decoding
            them each time would cost the driver O(trials^2) JSON parses (~150 s at 4,104 trials)."""
            decoded = self.__dict__.setdefault("_decoded", {})  # setdefault: callbacks pickled before it
            if trial.trial_id not in decoded:
                decoded[trial.trial_id] = trial_config(trial.config)
            return decoded[trial.trial_id]

        def _line(self, trials: list, current: Any = None, current_status: str = "") -> str:
            # the hooks run before Tune updates the trial's status: count the current trial as ended
            status = {id(t): (current_status if t is current else t.status) for t in trials}
            done = sum(s == "TERMINATED" for s in status.values())
            failed = sum(s == "ERROR" for s in status.values())
            best: dict[str, tuple[float, dict]] = {}
            for t in trials:
                acc = (t.last_result or {}).get(METRIC)
                if status[id(t)] != "TERMINATED" or acc is None:
                    continue
                cfg = self._config(t)
                if acc > best.get(cfg.get("task"), (-1, {}))[0]:
                    best[cfg["task"]] = (acc, cfg)
            parts = [f"{PREFIX} {done + failed}/{self.total} trials done"
                     + (f" ({failed} failed)" if failed else "")]
            for task, (acc, c) in sorted(best.items()):
                parts.append(f"best {task}: {c['strategy']} {c['depth']}x{c['width']}x{c['heads']} s{c['seed']} "
                             f"lr{c['lr']:g} {METRIC}={acc:.4f}")
            return " | ".join(parts)

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            if not self.quiet:
                print(self._line(trials, trial, "TERMINATED"), flush=True)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            if not self.quiet:
                c = trial_config(trial.config)
                print(f"{PREFIX} trial failed: {c.get('task')}/{c.get('strategy')} {c.get('depth')}x"
                      f"{c.get('width')}x{c.get('heads')} s{c.get('seed')} (see its MLflow run's weit.failure tag)",
                      flush=True)
                print(self._line(trials, trial, "ERROR"), flush=True)

    return Progress


# ------------------------------------------------------------------------------------------ driver


@dataclass
class SweepSummary:
    """What a sweep did: where it is recorded and how many trials ended how."""

    name: str
    parent_run_id: str
    experiment_id: str
    tracking_uri: str
    experiment_path: str
    n_trials: int
    n_dropped: int  # size combinations dropped by the constraints (summed over tasks)
    dropped: dict[str, int]
    pairs_dropped: dict[str, int]  # (task, strategy, size) a strategy cannot make, by CANNOT_MAKE reason
    n_finished: int
    n_failed: int
    resumed: bool
    wall_s: float

    def to_dict(self) -> dict:
        return asdict(self)


def _load_sources(space: Space, bank: str | None, ancestry: str | None) -> tuple[Any, Any, dict]:
    """Load the bank / ancestry the space's strategies need, once, in the driver, and check they fit."""
    from weit_core.io import WeitFileError, check_bank_kinds, load_bank, load_model
    from weit_core.models import ViTSpec, vit_kinds
    from weit_core.strategies import strategy_info

    needs = {s: strategy_info(s).needs for s in space.strategies}
    need_bank = sorted(s for s, n in needs.items() if "bank" in n)
    need_anc = sorted(s for s, n in needs.items() if "ancestry" in n)
    need_fit = sorted(s for s, n in needs.items() if "fit_data" in n)
    need_gene = sorted(s for s, n in needs.items() if "learngene" in n)
    if need_gene:
        raise UserError(f"strategies {need_gene} need a TLEG-trained learngene, which {HOW_TO_GIVE['learngene']}; "
                        f"drop them from the space")
    if need_bank and not bank:
        raise UserError(f"strategies {need_bank} need a template bank; {HOW_TO_GIVE['bank']} or drop them from the "
                        f"space")
    if need_anc and not ancestry:
        raise UserError(f"strategies {need_anc} need an ancestry model; {HOW_TO_GIVE['ancestry']} or drop them from "
                        f"the space")
    no_fit = [t.name for t in space.tasks if t.training["fit_examples"] == 0]
    if need_fit and no_fit:
        raise UserError(f"strategies {need_fit} need a labeled subset for stage 2, but task(s) {no_fit} have "
                        f"training.fit_examples: 0; give them fit_examples > 0 or drop the strategies")
    meta: dict[str, Any] = {"need_bank": bool(need_bank)}
    loaded_bank = loaded_anc = None
    if bank:
        try:
            loaded_bank = load_bank(bank)
        except WeitFileError as e:
            raise UserError(f"--bank: {e}") from e
        meta.update(bank_path=str(Path(bank).resolve()), bank_sha256=file_sha256(bank),
                    bank_block=block_of_bank(loaded_bank.bank.kinds))
        qkv = loaded_bank.bank.kinds.get("qkv")
        if need_bank and qkv is not None:
            for t in space.tasks:
                probe = ViTSpec(depth=1, width=qkv.a, heads=1, patch=t.patch, img_size=t.patch,
                                in_chans=_task_chans(t))
                try:
                    check_bank_kinds(loaded_bank.bank.kinds, vit_kinds(probe, qkv.n, qkv.a), f"--bank {bank}")
                except WeitFileError as e:
                    raise UserError(f"task {t.name!r} (patch {t.patch}): {e}") from e
    if ancestry:
        try:
            model, header = load_model(ancestry)
        except WeitFileError as e:
            raise UserError(f"--ancestry: {e}") from e
        loaded_anc = (model, ViTSpec.from_dict(header["spec"]))
        meta.update(ancestry_path=str(Path(ancestry).resolve()), ancestry_sha256=file_sha256(ancestry))
    return loaded_bank, loaded_anc, meta


def _task_chans(task: Any) -> int:
    splits = load_task_data(task.data_key())
    return int(splits.input_shape[0])


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def sweep_note(name: str, space: Space, expansion: Any, trials: list[dict], *, experiment: str, exp_id: str,
               uri: str, parent_id: str, counts: dict[str, Any] | None = None) -> str:
    """The parent run's description (``mlflow.note.content``, markdown): the space, sizes x strategies x
    seeds x lrs per task, the trials that ran (``counts``: finished, failed, tune_errors and the failed
    runs' ``failure_kinds`` once the sweep ended; None while it runs) and the ones dropped with their
    reasons, where the comparison and the leaderboard are, and the exact ``weit report`` command."""

    def fmt(values: set) -> str:
        shown = ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in sorted(values))
        return f"{len(values)} ({shown})" if len(values) <= 6 else str(len(values))

    lines = [f"### Sweep `{name}`", "",
             f"Space **{space.name}** (`{space.path or 'inline'}`, content hash `{space.content_hash()}`)"
             + (f": {space.description}" if space.description else "."), "",
             "| task | sizes | strategies | seeds | stage-3 lrs | trials |", "|---|---|---|---|---|---|"]
    for task in space.tasks:
        rows = [t for t in trials if t["task"] == task.name]
        axes = [{f"{t['depth']}x{t['width']}x{t['heads']}x{t['mlp_ratio']:g}" for t in rows},
                {t["strategy"] for t in rows}, {t["seed"] for t in rows}, {float(t["lr"]) for t in rows}]
        product = math.prod(len(a) for a in axes)
        lines.append(f"| {task.name} | " + " | ".join(fmt(a) for a in axes) + f" | {len(rows)}"
                     + (f" of the {product} combinations" if product != len(rows) else "") + " |")
    n_all = len(expansion.trials)
    lines += ["", f"**Trials:** {len(trials)}" + (f" (the first {len(trials)} of {n_all}: `--limit-trials`)"
                                                  if len(trials) < n_all else "") + "; "]
    kinds = collections.Counter(counts.get("failure_kinds", [])) if counts else collections.Counter()
    failure_kinds = ", ".join(f"{n} {k}" for k, n in kinds.most_common()) or "no kind recorded"
    if counts is None:
        lines[-1] += "running (the counts are written here when the sweep ends)."
    else:
        lines[-1] += (f"{counts['finished']} finished, {counts['failed']} failed"
                      + (f", {_plural(counts['tune_errors'], 'Tune error')}" if counts.get("tune_errors") else "")
                      + (f" ({failure_kinds}; each failed run's reason is its `weit.failure` tag)."
                         if counts["failed"] else "."))
    lines += ["", f"**Dropped before any trial:** {expansion.describe_drops()}."]
    view = mlflow_ui_path(exp_id, name)
    report = (f"weit report --sweep {name}" if experiment == EXPERIMENT else f"weit report --parent-run {parent_id}")
    lines += ["", f"**Compare the trials:** the child runs of this run, one per trial, named "
                  f"`task/strategy/size/sSEED/lrLR`; [open them side by side]({view}) (only this sweep's trials, "
                  f"best final `val_acc` first, with strategy, size, seed, lr and `num_params` columns).",
              "", f"**Leaderboard:** `{report} --mlflow-uri {uri}` ranks every init at its best lr, writes "
                  f"`reports/{name}/leaderboard.md` (with plots) and logs it to this run under `report/`."]
    return "\n".join(lines)


def _find_parent(client: Any, exp_id: str, name: str) -> Any:
    runs = client.search_runs([exp_id], f"tags.`weit.sweep` = '{name}' and tags.`weit.kind` = 'sweep'",
                              max_results=5, order_by=["attributes.start_time DESC"])
    return runs[0] if runs else None


def _open_parent(client: Any, exp_id: str, name: str, space: Space, meta: dict, expansion: Any,
                 settings: dict, resume: bool, exists_in_tune: bool) -> tuple[str, bool]:
    """The sweep's parent run: created fresh, or found again by name on --resume (same space, same bank)."""
    from mlflow.entities import Param, RunTag

    from weit_core.strategies import CANNOT_MAKE

    parent = _find_parent(client, exp_id, name)
    if not resume:
        if parent is not None or exists_in_tune:
            where = f"MLflow run {parent.info.run_id}" if parent is not None else "Tune storage"
            raise UserError(f"sweep {name!r} already exists ({where}); pass --resume to continue it, or --name NEW "
                            f"for a fresh sweep (see its results with `weit report --sweep {name}`)")
    elif parent is None:
        if exists_in_tune:
            raise UserError(f"sweep {name!r} has Tune state but no MLflow parent run in this tracking store; "
                            f"pass the --mlflow-uri it was run with")
        raise UserError(f"nothing to resume: no sweep named {name!r} in MLflow or Tune storage; run it without "
                        f"--resume first (or pass the --name/--storage/--mlflow-uri it used)")
    if parent is not None:
        tags = parent.data.tags
        if tags.get("weit.space_hash") != space.content_hash():
            raise UserError(f"sweep {name!r} was run with a different space file (content changed); resume needs "
                            f"the same file, or start a new sweep with --name")
        if tags.get("weit.bank_sha256", "") != meta.get("bank_sha256", ""):
            raise UserError(f"sweep {name!r} was run with bank {tags.get('weit.bank_path') or 'none'} (sha256 "
                            f"{tags.get('weit.bank_sha256', '')[:12] or '-'}); --bank now differs")
        client.update_run(parent.info.run_id, status="RUNNING")
        return parent.info.run_id, True
    rev = git_revision()
    tags = {"weit.kind": "sweep", "weit.sweep": name, "weit.space_hash": space.content_hash(),
            "weit.bank_sha256": meta.get("bank_sha256", ""), "weit.bank_path": meta.get("bank_path", ""),
            "weit.ancestry_sha256": meta.get("ancestry_sha256", ""), "mlflow.source.git.commit": rev}
    run_id = client.create_run(exp_id, run_name=f"sweep-{name}", tags=tags).info.run_id
    params = {"space": str(space.path or space.name), "space_name": space.name, "space_hash": space.content_hash(),
              "git_revision": rev, "bank": meta.get("bank_path", ""), "bank_sha256": meta.get("bank_sha256", ""),
              "bank_id": f"{meta.get('bank_path', '')}@{meta.get('bank_sha256', '')[:16]}" if meta.get("bank_path")
              else "", "ancestry": meta.get("ancestry_path", ""), "ancestry_sha256": meta.get("ancestry_sha256", ""),
              "n_trials": settings["n_trials"], "n_dropped": expansion.n_dropped, "sizes_total": expansion.sizes_total,
              "strategies": ",".join(space.strategies), "tasks": ",".join(t.name for t in space.tasks),
              **{f"dropped.{r}": expansion.dropped.get(r, 0) for r in DROP_REASONS},
              "n_pairs_dropped": expansion.n_pairs_dropped,
              **{f"dropped.{r}": expansion.pairs_dropped.get(r, 0) for r in CANNOT_MAKE},
              **{k: v for k, v in settings.items() if k != "n_trials"}}
    client.log_batch(run_id, params=[Param(k, _param_value(v)) for k, v in sorted(params.items())],
                     tags=[RunTag(k, v) for k, v in tags.items()])
    if space.path is not None:
        client.log_artifact(run_id, str(space.path), "space")
    else:
        client.log_text(run_id, space.text, "space/space.yaml")
    client.log_dict(run_id, {"dropped": dict(expansion.dropped), "reasons": DROP_REASONS,
                             "sizes_total": expansion.sizes_total, "sizes_valid": expansion.sizes_valid,
                             "pairs_dropped": dict(expansion.pairs_dropped), "pair_reasons": CANNOT_MAKE},
                    "space/dropped.json")
    client.log_dict(run_id, {"trials": expansion.trials[: settings["n_trials"]]}, "space/trials.json")
    return run_id, False


def run_sweep(
    space: str | Path, *, bank: str | None = None, ancestry: str | None = None, name: str | None = None,
    resume: bool = False, cpus_per_trial: float = 1.0, gpus_per_trial: float = 0.0,
    max_concurrent: int | None = None, asha: bool = False, storage: str | None = None, address: str | None = None,
    mlflow_uri: str | None = None, limit_trials: int | None = None, save_models: bool = True,
    experiment: str = EXPERIMENT, quiet: bool = False,
) -> SweepSummary:
    """Expand the space, open (or find again) the parent MLflow run, and run every trial on Ray Tune.
    ``resume=True`` continues an interrupted sweep of the same name without re-running finished trials."""
    global _QUIET
    _QUIET = quiet
    t_start = time.perf_counter()
    sp = load_space(space)
    name = name or sp.name
    if cpus_per_trial <= 0 or gpus_per_trial < 0:
        raise UserError(f"--cpus-per-trial must be > 0 and --gpus-per-trial >= 0, got {cpus_per_trial}, "
                        f"{gpus_per_trial}")
    if limit_trials is not None and limit_trials < 1:
        raise UserError(f"--limit-trials must be >= 1, got {limit_trials}")
    if gpus_per_trial > 0 and not (address or os.environ.get("RAY_ADDRESS")):
        import torch

        if torch.cuda.device_count() == 0:  # a local Ray would queue the trials forever
            raise UserError(f"--gpus-per-trial {gpus_per_trial:g} but this machine has no GPU; drop the flag, or "
                            f"pass --address of a Ray cluster with GPU workers")
    loaded_bank, loaded_anc, meta = _load_sources(sp, bank, ancestry)
    shapes = inspect_tasks(sp)
    expansion = expand(sp, shapes, meta.get("bank_block") if meta["need_bank"] else None,
                       ancestry_spec=loaded_anc[1] if loaded_anc is not None else None)
    trials = expansion.trials[:limit_trials] if limit_trials else expansion.trials
    if not trials:
        raise UserError(f"space {sp.name}: no valid trial ({expansion.describe_drops()}); relax the constraints "
                        f"or change the sizes")
    say = (lambda *_: None) if quiet else (lambda msg: print(f"{PREFIX} {msg}", flush=True))
    say(summarize_space(sp, expansion) + (f"; running the first {len(trials)}" if limit_trials else ""))

    uri, exp_id = prepare_mlflow(mlflow_uri, experiment, EXPERIMENT_NOTES[EXPERIMENT])
    client = _mlflow_client(uri)
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # no per-trial json/csv/tensorboard files
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    from ray import tune

    store = storage_path(storage)
    exp_path = f"{store.rstrip('/')}/{name}"
    exists_in_tune = tune.Tuner.can_restore(exp_path)
    settings = {"n_trials": len(trials), "cpus_per_trial": cpus_per_trial, "gpus_per_trial": gpus_per_trial,
                "max_concurrent": max_concurrent, "asha": asha, "tune_path": exp_path, "limit_trials": limit_trials,
                "save_models": save_models}
    parent_id, resumed = _open_parent(client, exp_id, name, sp, meta, expansion, settings, resume, exists_in_tune)
    note = functools.partial(sweep_note, name, sp, expansion, trials, experiment=experiment, exp_id=exp_id, uri=uri,
                             parent_id=parent_id)
    client.set_tag(parent_id, NOTE_TAG, note())
    publish_comparison_view(client, exp_id, name, tasks=len({t["task"] for t in trials}))
    say(f"MLflow parent run {parent_id} (experiment {experiment!r} at {uri})")

    init_ray(address)
    import ray

    ctx = SweepContext(
        tracking_uri=uri, experiment_id=exp_id, parent_run_id=parent_id, sweep=name, save_models=save_models,
        bank_ref=ray.put(loaded_bank) if loaded_bank is not None else None, bank_id=meta.get("bank_sha256"),
        ancestry_ref=ray.put(loaded_anc) if loaded_anc is not None else None, ancestry_id=meta.get("ancestry_sha256"),
        threads=max(1, int(cpus_per_trial)), device="cuda" if gpus_per_trial > 0 else "cpu",
        report_each_epoch=asha or (exists_in_tune and resume),  # a restored scheduler may be ASHA
        data_refs=share_task_data(trials))
    resources = {"cpu": cpus_per_trial, **({"gpu": gpus_per_trial} if gpus_per_trial else {})}
    trainable = tune.with_resources(tune.with_parameters(_tune_trial, ctx=ctx), resources)
    if exists_in_tune and resume:
        say(f"resuming Tune experiment {exp_path}")
        tuner = tune.Tuner.restore(exp_path, trainable, resume_unfinished=True, resume_errored=True)
    else:
        if resume:
            say("no Tune state to restore; re-running the trial list (finished trials replay from MLflow)")
        scheduler = None
        if asha:
            from ray.tune.schedulers import ASHAScheduler

            max_t = max(t["epochs"] for t in trials)
            scheduler = ASHAScheduler(time_attr="training_iteration", max_t=max_t, grace_period=1,
                                      reduction_factor=2)
        tuner = tune.Tuner(
            trainable,
            param_space=trial_param_space(trials),
            tune_config=tune.TuneConfig(metric=METRIC, mode="max", scheduler=scheduler, reuse_actors=True,
                                        max_concurrent_trials=max_concurrent, trial_dirname_creator=_trial_dirname),
            run_config=tune.RunConfig(
                name=name, storage_path=store, verbose=0, failure_config=tune.FailureConfig(max_failures=0),
                callbacks=[_progress_callback_cls()(len(trials))]),
        )
    # per-trial result files are off (MLflow is the record), so the result grid's metric fetch is expected to miss
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    logging.getLogger("ray.tune").setLevel(logging.WARNING)
    results = tuner.fit()
    n_errors = results.num_errors
    children = client.search_runs([exp_id], f"tags.`mlflow.parentRunId` = '{parent_id}'", max_results=50000)
    n_finished = sum(r.info.status == "FINISHED" for r in children)
    n_failed = sum(r.info.status == "FAILED" for r in children)
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client.log_batch(parent_id, metrics=[Metric("trials_finished", n_finished, now, 0),
                                         Metric("trials_failed", n_failed, now, 0),
                                         Metric("tune_errors", n_errors, now, 0)])
    client.set_tag(parent_id, NOTE_TAG, note(counts={
        "finished": n_finished, "failed": n_failed, "tune_errors": n_errors,
        "failure_kinds": [r.data.tags.get("weit.failure_kind", "unknown") for r in children
                          if r.info.status == "FAILED"]}))
    client.set_terminated(parent_id, "FINISHED")
    summary = SweepSummary(name, parent_id, exp_id, uri, exp_path, len(trials), expansion.n_dropped,
                           dict(expansion.dropped), dict(expansion.pairs_dropped), n_finished, n_failed, resumed,
                           time.perf_counter() - t_start)
    say(f"done: {n_finished}/{len(trials)} trials finished, {n_failed} failed, in {summary.wall_s:.1f}s; "
        f"report with `weit report --sweep {name}`")
    serve = "" if uri.startswith(("http://", "https://")) else f" (after `mlflow ui --backend-store-uri {uri}`)"
    say(f"compare the trials in the MLflow UI: {mlflow_ui_url(uri, exp_id, name)}{serve}")
    return summary


# ------------------------------------------------------------------------------------------ command


def sweep_command(
    space: Annotated[str, typer.Option(help="Search space YAML (see tune_spaces/README.md).")] = "tune_spaces/ci.yaml",
    bank: Annotated[str | None, typer.Option(help="Template bank (safetensors) for wave / wave_random_bank.")] = None,
    ancestry: Annotated[str | None, typer.Option(help="Ancestry model (weit safetensors) for strategies that "
                                                      "inherit from it.")] = None,
    name: Annotated[str | None, typer.Option(help="Sweep name (default: the space's name); names the Tune "
                                                  "experiment and the MLflow parent run.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted sweep of this name; finished "
                                                          "trials are not re-run.")] = False,
    cpus_per_trial: Annotated[float, typer.Option(help="CPUs per trial (fractional allowed).")] = 1.0,
    gpus_per_trial: Annotated[float, typer.Option(help="GPUs per trial (fractional allowed).")] = 0.0,
    max_concurrent: Annotated[int | None, typer.Option(help="At most this many trials at once.")] = None,
    asha: Annotated[bool, typer.Option("--asha", help="ASHA early stopping on val accuracy.")] = False,
    limit_trials: Annotated[int | None, typer.Option(help="Run only the first N trials (smoke runs).")] = None,
    save_models: Annotated[bool, typer.Option(help="Log each trial's initialized model as an artifact.")] = True,
    storage: Annotated[str | None, typer.Option(help="Tune storage (run state); default ./weit_runs.")] = None,
    address: Annotated[str | None, typer.Option(
        help="Ray cluster address (default: start a local Ray; 'auto': the head `ray start` runs here).")] = None,
    mlflow_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI.")] = None,
) -> None:
    """Stages 2+3: initialize and train every size x strategy x seed of a space on Ray Tune, logged to MLflow."""
    run_sweep(space, bank=bank, ancestry=ancestry, name=name, resume=resume, cpus_per_trial=cpus_per_trial,
              gpus_per_trial=gpus_per_trial, max_concurrent=max_concurrent, asha=asha, storage=storage,
              address=address, mlflow_uri=mlflow_uri, limit_trials=limit_trials, save_models=save_models)


if __name__ == "__main__":  # python -m pipelines.sweep --space ...
    sys.exit(typer.run(sweep_command))
