"""``weit sweep``: stages 2+3 over a search space on Ray Tune, every trial recorded once in MLflow.

The driver expands the space (``pipelines.spaces``), loads the bank and the ancestry once and checks them
against what the strategies declare they need, opens the sweep's parent run (``pipelines.tracking``), and
hands Tune the trials (``pipelines.trial``). Tune ranks, and ASHA stops, by each task's own metric and
direction (``val_<metric>``, ``max`` or ``min``).

Exactly-once logging: a child run carries ``weit.trial_key`` (hash of the trial config). A trial that
starts again (Tune restore after a killed driver) looks its key up under the parent: a FINISHED run is
replayed to Tune from MLflow without recomputing; a deterministic NaN failure fails again at once; a
half-written run (the killed attempt) is deleted and the trial runs afresh.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from pipelines.common import UserError, git_revision, init_ray, storage_path
from pipelines.spaces import (
    Space,
    block_of_bank,
    expand,
    inspect_tasks,
    load_space,
    spec_of,
    summarize_space,
)
from pipelines.tracking import (
    NOTE_TAG,
    SWEEP_EXPERIMENT,
    TrialTracker,
    as_metrics,
    client_for,
    experiment_note,
    mlflow_ui_url,
    open_sweep,
    prepare_mlflow,
    publish_comparison_view,
    sweep_note,
)
from pipelines.trial import (
    HOW_TO_GIVE,
    SweepContext,
    family_of,
    reported,
    run_trial,
    share_task_data,
    task_of,
    trial_config,
    trial_param_space,
    tune_trial,
)

EXPERIMENT = SWEEP_EXPERIMENT
PREFIX = "[weit sweep]"
__all__ = ["EXPERIMENT", "SweepContext", "SweepSummary", "TrialTracker", "run_sweep", "run_trial", "sweep_note"]


def file_sha256(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


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


# ------------------------------------------------------------------------------------------ sources


def _load_sources(space: Space, bank: str | None, ancestry: str | None) -> tuple[Any, Any, dict]:
    """Load the bank and the ancestry once, in the driver, refusing at once what the space's strategies
    declare they need and were not given."""
    from weit_core.io import WeitFileError, load_bank, load_model
    from weit_core.models import get_family
    from weit_core.strategies import strategy_info

    needs = {s: strategy_info(s).needs for s in space.strategies}
    need = {source: sorted(s for s, n in needs.items() if source in n) for source in HOW_TO_GIVE}
    if need["learngene"]:
        raise UserError(f"strategies {need['learngene']} need a TLEG-trained learngene, which "
                        f"{HOW_TO_GIVE['learngene']}; drop them from the space")
    if need["bank"] and not bank:
        raise UserError(f"strategies {need['bank']} need a template bank; {HOW_TO_GIVE['bank']} or drop them from "
                        f"the space")
    if need["ancestry"] and not ancestry:
        raise UserError(f"strategies {need['ancestry']} need an ancestry model; {HOW_TO_GIVE['ancestry']} or drop "
                        f"them from the space")
    no_fit = [t.name for t in space.tasks if t.training["fit_examples"] == 0]
    if need["fit_data"] and no_fit:
        raise UserError(f"strategies {need['fit_data']} need a labeled subset for stage 2, but task(s) {no_fit} have "
                        f"training.fit_examples: 0; give them fit_examples > 0 or drop the strategies")
    meta: dict[str, Any] = {"need_bank": bool(need["bank"])}
    loaded_bank = loaded_anc = None
    if bank:
        try:
            loaded_bank = load_bank(bank)
        except WeitFileError as e:
            raise UserError(f"--bank: {e}") from e
        meta.update(bank_path=str(Path(bank).resolve()), bank_sha256=file_sha256(bank),
                    bank_block=block_of_bank(loaded_bank.bank.kinds))
    if ancestry:
        try:
            model, header = load_model(ancestry)
        except WeitFileError as e:
            raise UserError(f"--ancestry: {e}") from e
        loaded_anc = (model, get_family(header.get("family", "vit")).spec_from_dict(header["spec"]))
        meta.update(ancestry_path=str(Path(ancestry).resolve()), ancestry_sha256=file_sha256(ancestry))
    return loaded_bank, loaded_anc, meta


def _check_bank(loaded: Any, trials: list[dict], block: int, where: str) -> None:
    """The bank has the kinds, blocks and kernels each task's targets are templated with (its family's
    ``kinds`` for the task's first trial)."""
    from weit_core.io import WeitFileError, check_bank_kinds

    n = next(iter(loaded.bank.kinds.values())).n
    for config in {t["task"]: t for t in reversed(trials)}.values():
        family = family_of(config)
        try:
            check_bank_kinds(loaded.bank.kinds, family.kinds(spec_of(config), n, block), where)
        except WeitFileError as e:
            raise UserError(f"task {config['task']!r}: {e}") from e


def _objective(trials: list[dict], asha: bool) -> tuple[str | None, str | None]:
    """What Tune ranks by, and ASHA stops on: the tasks' ``val_<metric>`` and direction (None, None for
    tasks that disagree, which ASHA cannot serve)."""
    goals = {(reported(task)[0], task.mode) for task in map(task_of, trials)}
    if len(goals) == 1:
        return next(iter(goals))
    if asha:
        raise UserError(f"--asha stops trials on one metric and direction; this space's tasks are judged by "
                        f"{sorted(goals)}: sweep them separately")
    return None, None


# ------------------------------------------------------------------------------------------ progress


def _trial_dirname(trial: Any) -> str:
    return trial.trial_id


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

        def _config(self, trial: Any) -> tuple[dict, Any]:
            """A trial's decoded config and its task, once: every completion scans every trial, so decoding
            them each time would cost the driver O(trials^2) JSON parses (~150 s at 4,104 trials)."""
            decoded = self.__dict__.setdefault("_judged", {})  # setdefault: callbacks pickled before it
            if trial.trial_id not in decoded:
                cfg = trial_config(trial.config)
                decoded[trial.trial_id] = cfg, task_of(cfg)
            return decoded[trial.trial_id]

        def _line(self, trials: list, current: Any = None, current_status: str = "") -> str:
            # the hooks run before Tune updates the trial's status: count the current trial as ended
            status = {id(t): (current_status if t is current else t.status) for t in trials}
            done = sum(s == "TERMINATED" for s in status.values())
            failed = sum(s == "ERROR" for s in status.values())
            best: dict[str, tuple[str, float, dict]] = {}
            for t in trials:
                if status[id(t)] != "TERMINATED" or not t.last_result:
                    continue
                cfg, task = self._config(t)
                metric = reported(task)[0]
                value = t.last_result.get(metric)
                if value is not None and (cfg["task"] not in best or task.better(value, best[cfg["task"]][1])):
                    best[cfg["task"]] = (metric, value, cfg)
            parts = [f"{PREFIX} {done + failed}/{self.total} trials done" + (f" ({failed} failed)" if failed else "")]
            for name, (metric, value, c) in sorted(best.items()):
                parts.append(f"best {name}: {c['strategy']} {family_of(c).size_name(c)} s{c['seed']} lr{c['lr']:g} "
                             f"{metric}={value:.4f}")
            return " | ".join(parts)

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            if not self.quiet:
                print(self._line(trials, trial, "TERMINATED"), flush=True)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            if not self.quiet:
                c = trial_config(trial.config)
                print(f"{PREFIX} trial failed: {c.get('task')}/{c.get('strategy')} {family_of(c).size_name(c)} "
                      f"s{c.get('seed')} (see its MLflow run's weit.failure tag)", flush=True)
                print(self._line(trials, trial, "ERROR"), flush=True)

    return Progress


# ------------------------------------------------------------------------------------------ driver


def _parent_record(name: str, space: Space, meta: dict, expansion: Any, settings: dict) -> tuple[dict, dict, dict]:
    """The parent run's tags, params and files: the space, the sources' hashes, the counts dropped."""
    from weit_core.strategies import CANNOT_MAKE

    rev, digest = git_revision(), space.content_hash()
    bank_path, bank_sha = meta.get("bank_path", ""), meta.get("bank_sha256", "")
    tags = {"weit.kind": "sweep", "weit.sweep": name, "weit.space_hash": digest, "weit.bank_sha256": bank_sha,
            "weit.bank_path": bank_path, "weit.ancestry_sha256": meta.get("ancestry_sha256", ""),
            "weit.family": space.family, "mlflow.source.git.commit": rev}
    params = {"space": str(space.path or space.name), "space_name": space.name, "space_hash": digest,
              "git_revision": rev, "bank": bank_path, "bank_sha256": bank_sha,
              "bank_id": f"{bank_path}@{bank_sha[:16]}" if bank_path else "", "ancestry": meta.get("ancestry_path", ""),
              "ancestry_sha256": meta.get("ancestry_sha256", ""), "n_trials": settings["n_trials"],
              "n_dropped": expansion.n_dropped, "sizes_total": expansion.sizes_total,
              "strategies": ",".join(space.strategies), "tasks": ",".join(t.name for t in space.tasks),
              **{f"dropped.{r}": expansion.dropped.get(r, 0) for r in expansion.reasons},
              "n_pairs_dropped": expansion.n_pairs_dropped,
              **{f"dropped.{r}": expansion.pairs_dropped.get(r, 0) for r in CANNOT_MAKE},
              **{k: v for k, v in settings.items() if k != "n_trials"}}
    files: dict[str, Any] = {"space": space.path} if space.path is not None else {"space/space.yaml": space.text}
    files["space/dropped.json"] = {
        "dropped": dict(expansion.dropped), "reasons": expansion.reasons, "sizes_total": expansion.sizes_total,
        "sizes_valid": expansion.sizes_valid, "pairs_dropped": dict(expansion.pairs_dropped), "pair_reasons": CANNOT_MAKE}
    files["space/trials.json"] = {"trials": expansion.trials[: settings["n_trials"]]}
    return tags, params, files


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
    block = meta.get("bank_block") if meta["need_bank"] else None
    expansion = expand(sp, inspect_tasks(sp), block, ancestry_spec=loaded_anc[1] if loaded_anc is not None else None)
    trials = expansion.trials[:limit_trials] if limit_trials else expansion.trials
    if not trials:
        raise UserError(f"space {sp.name}: no valid trial ({expansion.describe_drops()}); relax the constraints "
                        f"or change the sizes")
    if block:
        _check_bank(loaded_bank, trials, block, f"--bank {bank}")
    metric, mode = _objective(trials, asha)
    shown = (metric, mode) if metric else (reported(task_of(trials[0]))[0], task_of(trials[0]).mode)  # views sort by one
    say = (lambda *_: None) if quiet else (lambda msg: print(f"{PREFIX} {msg}", flush=True))
    say(summarize_space(sp, expansion) + (f"; running the first {len(trials)}" if limit_trials else ""))

    uri, exp_id = prepare_mlflow(mlflow_uri, experiment, experiment_note(EXPERIMENT))
    client = client_for(uri)
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # no per-trial json/csv/tensorboard files
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    from ray import tune

    store = storage_path(storage)
    exp_path = f"{store.rstrip('/')}/{name}"
    exists_in_tune = tune.Tuner.can_restore(exp_path)
    settings = {"n_trials": len(trials), "cpus_per_trial": cpus_per_trial, "gpus_per_trial": gpus_per_trial,
                "max_concurrent": max_concurrent, "asha": asha, "tune_path": exp_path, "limit_trials": limit_trials,
                "save_models": save_models}
    parent_id, resumed = open_sweep(client, exp_id, name, *_parent_record(name, sp, meta, expansion, settings),
                                    resume=resume, exists_in_tune=exists_in_tune)
    note = functools.partial(sweep_note, name, sp, expansion, trials, experiment=experiment, exp_id=exp_id, uri=uri,
                             parent_id=parent_id, metric=shown[0])
    client.set_tag(parent_id, NOTE_TAG, note())
    publish_comparison_view(client, exp_id, name, len({t["task"] for t in trials}), *shown)
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
    trainable = tune.with_resources(tune.with_parameters(tune_trial, ctx=ctx), resources)
    if exists_in_tune and resume:
        say(f"resuming Tune experiment {exp_path}")
        tuner = tune.Tuner.restore(exp_path, trainable, resume_unfinished=True, resume_errored=True)
    else:
        if resume:
            say("no Tune state to restore; re-running the trial list (finished trials replay from MLflow)")
        scheduler = None
        if asha:
            from ray.tune.schedulers import ASHAScheduler

            scheduler = ASHAScheduler(time_attr="training_iteration", max_t=max(t["epochs"] for t in trials),
                                      grace_period=1, reduction_factor=2)
        tuner = tune.Tuner(
            trainable,
            param_space=trial_param_space(trials),
            tune_config=tune.TuneConfig(metric=metric, mode=mode, scheduler=scheduler, reuse_actors=True,
                                        max_concurrent_trials=max_concurrent,
                                        trial_dirname_creator=_trial_dirname),
            run_config=tune.RunConfig(
                name=name, storage_path=store, verbose=0, failure_config=tune.FailureConfig(max_failures=0),
                callbacks=[_progress_callback_cls()(len(trials))]),
        )
    # per-trial result files are off (MLflow is the record), so the result grid's metric fetch is expected to miss
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    logging.getLogger("ray.tune").setLevel(logging.WARNING)
    n_errors = tuner.fit().num_errors
    children = client.search_runs([exp_id], f"tags.`mlflow.parentRunId` = '{parent_id}'", max_results=50000)
    n_finished = sum(r.info.status == "FINISHED" for r in children)
    n_failed = sum(r.info.status == "FAILED" for r in children)
    client.log_batch(parent_id, metrics=as_metrics(
        {"trials_finished": n_finished, "trials_failed": n_failed, "tune_errors": n_errors}, 0))
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
    asha: Annotated[bool, typer.Option("--asha", help="ASHA early stopping on each task's val metric.")] = False,
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
