"""``weit sweep``: stages 2+3 over a search space on Ray Tune, every trial recorded once in MLflow.

The driver expands the space, loads the bank and the ancestry once and checks them against what the
strategies declare they need, opens the parent run, and hands Tune the trials (``pipelines.trial``). Tune
ranks, and ASHA stops, by each task's ``val_<metric>`` and direction. A trial that starts again (Tune
restore after a killed driver) finds its child run by ``weit.trial_key``: a FINISHED run is replayed, a NaN
failure fails again, a half-written run is replaced (``TrialTracker.start``)."""

from __future__ import annotations

import functools
import logging
import operator
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

from pipelines import tracking
from pipelines import trial as tr
from pipelines.common import UserError, git_revision, init_ray, storage_path
from pipelines.trial import HOW_TO_GIVE, trial_config, trial_param_space
from weit_core import trials as wt
from weit_core.space import Space, load_space

EXPERIMENT = tracking.SWEEP_EXPERIMENT
PREFIX = "[weit sweep]"
_trial_dirname = operator.attrgetter("trial_id")  # Tune's default dirname repeats the whole config


@dataclass
class SweepSummary:
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
    dropped_by_task: dict[str, dict[str, int]] = field(default_factory=dict)


def _load_sources(space: Space, bank: str | None, ancestry: str | None) -> tuple[wt.TaskSources, bool]:
    """Each task's bank and ancestry (its own, else ``--bank``/``--ancestry``), every file read once, refusing at
    once what the strategies need and a task was not given; and whether any strategy uses the bank."""
    from weit_core.strategies import strategy_info

    need = {source: sorted(s for s in space.strategies if source in strategy_info(s).needs) for source in HOW_TO_GIVE}
    if need["learngene"]:
        raise UserError(f"strategies {need['learngene']} need a TLEG-trained learngene, which "
                        f"{HOW_TO_GIVE['learngene']}; drop them from the space")
    for source, given in (("bank", bank), ("ancestry", ancestry)):
        lacking = [t.name for t in space.tasks if not (given or getattr(t, source))]
        if need[source] and lacking:
            what = "a template bank" if source == "bank" else "an ancestry model"
            which = "" if len(lacking) == len(space.tasks) else f" and task(s) {lacking} have none"
            raise UserError(f"strategies {need[source]} need {what}{which}; {HOW_TO_GIVE[source]}, give the task "
                            f"`{source}: FILE` in the space, or drop them from the space")
    no_fit = [t.name for t in space.tasks if t.training["fit_examples"] == 0]
    if need["fit_data"] and no_fit:
        raise UserError(f"strategies {need['fit_data']} need a labeled subset for stage 2, but task(s) {no_fit} have "
                        f"training.fit_examples: 0; give them fit_examples > 0 or drop the strategies")
    return wt.load_task_sources(space, bank, ancestry), bool(need["bank"])


def _check_bank(loaded: Any, trials: list[dict], block: int, where: str) -> None:
    """The bank has the kinds, blocks and kernels each task's family templates its targets with."""
    from weit_core.io import WeitFileError, check_bank_kinds

    n = next(iter(loaded.bank.kinds.values())).n
    for config in {t["task"]: t for t in reversed(trials)}.values():
        try:
            check_bank_kinds(loaded.bank.kinds, wt.family_of(config).kinds(wt.spec_of(config), n, block), where)
        except WeitFileError as e:
            raise UserError(f"task {config['task']!r}: {e}") from e


def _objective(trials: list[dict], asha: bool) -> tuple[str | None, str | None]:
    """The tasks' ``val_<metric>`` and direction (None, None where tasks disagree, which ASHA cannot serve)."""
    goals = {(wt.reported(task)[0], task.mode) for task in map(wt.task_of, trials)}
    if len(goals) == 1:
        return next(iter(goals))
    if asha:
        raise UserError(f"--asha stops trials on one metric and direction; this space's tasks are judged by "
                        f"{sorted(goals)}: sweep them separately")
    return None, None


_QUIET = False


def _progress_callback_cls():
    from ray.tune import Callback

    class Progress(Callback):
        """One line per ended trial in place of Tune's tables: trials done/total and the best so far per task."""

        def __init__(self, total: int) -> None:
            self.total = total

        def _config(self, trial: Any) -> tuple[dict, Any]:
            """Each trial's config and task decoded once: every completion scans every trial (O(trials^2)
            JSON parses otherwise, ~150 s at 4,104 trials)."""
            decoded = self.__dict__.setdefault("_judged", {})  # setdefault: callbacks pickled before it
            if trial.trial_id not in decoded:
                cfg = trial_config(trial.config)
                decoded[trial.trial_id] = cfg, wt.task_of(cfg)
            return decoded[trial.trial_id]

        def _line(self, trials: list, current: Any = None, current_status: str = "") -> str:
            # the hooks run before Tune updates the trial's status: count the current trial as ended
            status = {id(t): (current_status if t is current else t.status) for t in trials}
            done, failed = (sum(s == want for s in status.values()) for want in ("TERMINATED", "ERROR"))
            best: dict[str, tuple[str, float, dict]] = {}
            for t in trials:
                if status[id(t)] == "TERMINATED" and t.last_result:
                    cfg, task = self._config(t)
                    metric = wt.reported(task)[0]
                    value = t.last_result.get(metric)
                    if value is not None and (cfg["task"] not in best or task.better(value, best[cfg["task"]][1])):
                        best[cfg["task"]] = (metric, value, cfg)
            return " | ".join([f"{PREFIX} {done + failed}/{self.total} trials done"
                               + (f" ({failed} failed)" if failed else "")] + [
                f"best {name}: {c['strategy']} {wt.family_of(c).size_name(c)} s{c['seed']} lr{c['lr']:g} {m}={v:.4f}"
                for name, (m, v, c) in sorted(best.items())])

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            if not _QUIET:  # read at call time: a restored sweep reuses the pickled callback
                print(self._line(trials, trial, "TERMINATED"), flush=True)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            if not _QUIET:
                c = trial_config(trial.config)
                print(f"{PREFIX} trial failed: {c.get('task')}/{c.get('strategy')} {wt.family_of(c).size_name(c)} "
                      f"s{c.get('seed')} (see its MLflow run's weit.failure tag)", flush=True)
                print(self._line(trials, trial, "ERROR"), flush=True)

    return Progress


def _parent_record(name: str, space: Space, sources: wt.TaskSources, expansion: Any,
                   settings: dict) -> tuple[dict, dict, dict]:
    """The parent run's tags, params and files: the space, the sources' hashes (``bank``: ``--bank``'s;
    ``bank.<task>``: each task's), the counts dropped."""
    from weit_core.strategies import CANNOT_MAKE

    rev, digest = git_revision(), space.content_hash()
    flag = {s.kind: s for s in sources.files() if s.flag}  # the command line's
    bank_path, bank_sha = (flag["bank"].path, flag["bank"].sha256) if "bank" in flag else ("", "")
    anc_path, anc_sha = (flag["ancestry"].path, flag["ancestry"].sha256) if "ancestry" in flag else ("", "")
    own = {t: s for t, s in sources.of_task.items() if s["bank"] is not None and not s["bank"].flag}
    tags = {"weit.kind": "sweep", "weit.sweep": name, "weit.space_hash": digest, "weit.bank_sha256": bank_sha,
            "weit.bank_path": bank_path, "weit.ancestry_sha256": anc_sha, "weit.family": space.family,
            "mlflow.source.git.commit": rev, **{f"weit.bank_sha256.{t}": s["bank"].sha256 for t, s in own.items()},
            **{f"weit.bank_path.{t}": s["bank"].path for t, s in own.items()}}
    params = {"space": str(space.path or space.name), "space_name": space.name, "space_hash": digest,
              "git_revision": rev, "bank": bank_path, "bank_sha256": bank_sha,
              "bank_id": f"{bank_path}@{bank_sha[:16]}" if bank_path else "", "ancestry": anc_path,
              "ancestry_sha256": anc_sha, "n_dropped": expansion.n_dropped,
              "sizes_total": expansion.sizes_total, "strategies": ",".join(space.strategies),
              "tasks": ",".join(t.name for t in space.tasks), "n_pairs_dropped": expansion.n_pairs_dropped,
              **{f"{k}.{t}": v for t in sources.of_task for k, v in sources.params(t).items()},
              **{f"dropped.{r}": expansion.dropped.get(r, 0) for r in expansion.reasons},
              **{f"dropped.{r}": expansion.pairs_dropped.get(r, 0) for r in CANNOT_MAKE}, **settings}
    files: dict[str, Any] = {"space": space.path} if space.path is not None else {"space/space.yaml": space.text}
    files["space/dropped.json"] = {
        "dropped": dict(expansion.dropped), "reasons": expansion.reasons, "sizes_total": expansion.sizes_total,
        "sizes_valid": expansion.sizes_valid, "pairs_dropped": dict(expansion.pairs_dropped),
        "pair_reasons": CANNOT_MAKE, "dropped_by_task": {t: dict(c) for t, c in expansion.dropped_by_task.items()},
        "pairs_dropped_by_task": {t: dict(c) for t, c in expansion.pairs_dropped_by_task.items()}}
    files["space/trials.json"] = {"trials": expansion.trials[: settings["n_trials"]]}
    return tags, params, files


def run_sweep(
    space: str | Path, *, bank: str | None = None, ancestry: str | None = None, name: str | None = None,
    resume: bool = False, cpus_per_trial: float = 1.0, gpus_per_trial: float = 0.0,
    max_concurrent: int | None = None, asha: bool = False, storage: str | None = None, address: str | None = None,
    mlflow_uri: str | None = None, limit_trials: int | None = None, save_models: bool = True,
    experiment: str = EXPERIMENT, quiet: bool = False,
) -> SweepSummary:
    """Expand the space, open (or on ``resume`` find again) the parent run, and run every trial on Ray Tune;
    a resumed sweep does not re-run its finished trials."""
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
    sources, need_bank = _load_sources(sp, bank, ancestry)
    blocks = sources.bank_blocks() if need_bank else None
    expansion = wt.expand(sp, wt.inspect_tasks(sp), blocks, ancestry_spec=sources.ancestry_specs())
    trials = expansion.trials[:limit_trials] if limit_trials else expansion.trials
    if not trials:
        raise UserError(f"space {sp.name}: no valid trial ({expansion.describe_drops()}); relax the constraints "
                        f"or change the sizes")
    for src in (s for s in sources.files() if need_bank and s.kind == "bank"):
        _check_bank(src.value, [t for t in trials if sources.get(t["task"], "bank") is src], src.block, src.where)
    metric, mode = _objective(trials, asha)
    first = wt.task_of(trials[0])
    shown = (metric, mode) if metric else (wt.reported(first)[0], first.mode)  # the view sorts by one
    say = (lambda *_: None) if quiet else (lambda msg: print(f"{PREFIX} {msg}", flush=True))
    say(wt.summarize_space(sp, expansion) + (f"; running the first {len(trials)}" if limit_trials else ""))

    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # MLflow is the record: no per-trial files
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    import mlflow
    from ray import tune

    uri, exp_id = tracking.prepare_mlflow(mlflow_uri, experiment, tracking.experiment_note(EXPERIMENT))
    client = mlflow.MlflowClient(uri)
    store = storage_path(storage)
    exp_path = f"{store.rstrip('/')}/{name}"
    restore = tune.Tuner.can_restore(exp_path)
    settings = {"n_trials": len(trials), "cpus_per_trial": cpus_per_trial, "gpus_per_trial": gpus_per_trial,
                "max_concurrent": max_concurrent, "asha": asha, "tune_path": exp_path, "limit_trials": limit_trials,
                "save_models": save_models}
    record = _parent_record(name, sp, sources, expansion, settings)
    parent_id, resumed = tracking.open_sweep(client, exp_id, name, *record, resume=resume, exists_in_tune=restore)
    note = functools.partial(tracking.sweep_note, name, sp, expansion, trials, experiment=experiment, exp_id=exp_id,
                             uri=uri, parent_id=parent_id, metric=shown[0])
    client.set_tag(parent_id, tracking.NOTE_TAG, note())
    tracking.publish_comparison_view(client, exp_id, name, *shown, tasks=len({t["task"] for t in trials}))
    say(f"MLflow parent run {parent_id} (experiment {experiment!r} at {uri})")

    init_ray(address)

    ctx = tr.SweepContext(
        tracking_uri=uri, experiment_id=exp_id, parent_run_id=parent_id, sweep=name, save_models=save_models,
        sources=tr.share_sources(sources),
        threads=max(1, int(cpus_per_trial)), device="cuda" if gpus_per_trial > 0 else "cpu",
        report_each_epoch=asha or restore,  # a restored scheduler may be ASHA (restore implies resume here)
        data_refs=tr.share_task_data(trials))
    resources = {"cpu": cpus_per_trial, **({"gpu": gpus_per_trial} if gpus_per_trial else {})}
    trainable = tune.with_resources(tune.with_parameters(tr.tune_trial, ctx=ctx), resources)
    if restore:
        say(f"resuming Tune experiment {exp_path}")
        tuner = tune.Tuner.restore(exp_path, trainable, resume_unfinished=True, resume_errored=True)
    else:
        if resume:
            say("no Tune state to restore; re-running the trial list (finished trials replay from MLflow)")
        from ray.tune.schedulers import ASHAScheduler

        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=max(t["epochs"] for t in trials),
                                  grace_period=1, reduction_factor=2) if asha else None
        tuner = tune.Tuner(
            trainable, param_space=trial_param_space(trials),
            tune_config=tune.TuneConfig(metric=metric, mode=mode, scheduler=scheduler, reuse_actors=True,
                                        max_concurrent_trials=max_concurrent, trial_dirname_creator=_trial_dirname),
            run_config=tune.RunConfig(name=name, storage_path=store, verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=0),
                                      callbacks=[_progress_callback_cls()(len(trials))]))
    # per-trial result files are off, so the result grid's metric fetch is expected to miss
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    logging.getLogger("ray.tune").setLevel(logging.WARNING)
    n_errors = tuner.fit().num_errors
    n_finished, failed = tracking.close_sweep(client, exp_id, parent_id, n_errors, note)
    summary = SweepSummary(name, parent_id, exp_id, uri, exp_path, len(trials), expansion.n_dropped,
                           dict(expansion.dropped), dict(expansion.pairs_dropped), n_finished, len(failed), resumed,
                           time.perf_counter() - t_start, {t: dict(c) for t, c in expansion.dropped_by_task.items()})
    say(f"done: {n_finished}/{len(trials)} trials finished, {len(failed)} failed, in {summary.wall_s:.1f}s; "
        f"report with `weit report --sweep {name}`")
    serve = "" if uri.startswith(("http://", "https://")) else f" (after `mlflow ui --backend-store-uri {uri}`)"
    say(f"compare the trials in the MLflow UI: {tracking.mlflow_ui_url(uri, exp_id, name)}{serve}")
    return summary


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
    asha: Annotated[bool, typer.Option("--asha", help="ASHA early stopping on each task's val metric.")] = False,
    limit_trials: Annotated[int | None, typer.Option(help="Run only the first N trials (smoke runs).")] = None,
    save_models: Annotated[bool, typer.Option(help="Log each trial's initialized model as an artifact.")] = True,
    storage: Annotated[str | None, typer.Option(help="Tune storage (run state); default ./weit_runs.")] = None,
    address: Annotated[str | None, typer.Option(
        help="Ray cluster address (default: start a local Ray; 'auto': the head `ray start` runs here).")] = None,
    mlflow_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI.")] = None,
) -> None:
    """Stages 2+3: initialize and train every size x strategy x seed of a space on Ray Tune, logged to MLflow."""
    run_sweep(**locals())
