"""The one MLflow writer: where runs are stored, how weit's experiments look in the MLflow UI, how metrics
are named, the run of a Ray Train job (ancestry, distill) and the runs of a sweep. The embedded default (a
sqlite file) and a tracking server differ only by the URI."""

from __future__ import annotations

import collections
import functools
import hashlib
import json
import logging
import math
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.common import UserError


def tracking_uri(uri: str | None = None) -> str:
    """``--mlflow-uri``, else ``$MLFLOW_TRACKING_URI``, else ``./mlruns.db``; a sqlite path (or a bare path)
    is made absolute, since Ray workers run in other directories."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or "mlruns.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    elif "://" not in uri:
        uri = f"sqlite:///{Path(uri).resolve()}"
    return uri


EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_RUNS = "custom_model_development"
"""Training runs, not a GenAI app. MLflow 3.17's UI reads the kind from the browser's switch instead, so links
also say ``workflowType=machine_learning`` (:func:`mlflow_ui_path`); other versions and clients read the tag."""
NOTE_TAG = "mlflow.note.content"  # the markdown description the UI shows for an experiment or a run
SHARED_VIEW_TAG = "mlflow.sharedViewState."  # + key: a runs-table view the UI lists under "Views"
UI_PORT = 5000
SWEEP_EXPERIMENT = "weit-sweep"
EXPERIMENT_NOTES = {
    "weit-sweep": "**weit sweeps** (`weit sweep`). One parent run per sweep, `sweep-NAME`: its description "
                  "states the space, the trial counts and the `weit report` command. One child run per trial, "
                  "named `task/strategy/size/sSEED/lrLR`, tagged `weit.strategy`, `weit.size`, `weit.seed`, "
                  "`weit.lr`, with `num_params` and its task's `val_<metric>` per stage-3 epoch (`_e0`: right "
                  "after initialization). One sweep's trials side by side: the **Views** menu, `weit sweep NAME: "
                  "compare trials`. Rank a sweep with `weit report --sweep NAME`.",
    "weit-distill": "**weit stage 1** (`weit distill`). One run per distillation job: a template bank learned "
                    "from an ancestry model (or from the task alone), its loss and metrics per epoch; the "
                    "bank file is the job's output and what `weit sweep --bank` reads.",
    "weit-ancestry": "**weit ancestry models** (`weit ancestry`). One run per ViT trained on a task with the "
                     "standard recipe; the model file is what `weit distill --teacher` and `weit sweep "
                     "--ancestry` read.",
}


def experiment_note(experiment: str) -> str:
    return EXPERIMENT_NOTES.get(experiment, f"Runs recorded by **weit** (template-based initialization) in "
                                            f"experiment `{experiment}`.")


def prepare_mlflow(uri: str | None, experiment: str, description: str | None = None) -> tuple[str, str]:
    """Create the store and the experiment in the driver before any worker logs (parallel first use of a
    sqlite store races on its migrations), with its kind and description; an existing experiment gets the
    ones it lacks (a description a user wrote is kept). Returns (absolute URI, experiment id)."""
    import mlflow

    uri = tracking_uri(uri)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    try:
        exp = client.get_experiment_by_name(experiment)
    except Exception as e:  # unreachable server, bad URI
        raise UserError(f"cannot reach MLflow at {uri} ({type(e).__name__}: {e}); check --mlflow-uri") from e
    tags = {EXPERIMENT_KIND_TAG: TRAINING_RUNS, NOTE_TAG: description or experiment_note(experiment)}
    if exp is None:  # sqlite: artifacts beside the database
        where = Path(uri[len("sqlite:///"):]).parent / "mlartifacts" if uri.startswith("sqlite:") else None
        return uri, client.create_experiment(experiment, where and where.as_uri(), tags=tags)
    if exp.lifecycle_stage == "active":  # a deleted one cannot be tagged
        for key, value in tags.items():
            if not exp.tags.get(key):
                client.set_experiment_tag(exp.experiment_id, key, value)
    return uri, exp.experiment_id


def comparison_view_key(sweep: str) -> str:
    """``weit-<sweep>``; other characters than ``[A-Za-z0-9_.-]`` become ``_`` plus a short hash of the name."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", sweep)
    if safe != sweep:
        safe += "-" + hashlib.sha256(sweep.encode()).hexdigest()[:8]
    return f"weit-{safe}"


def publish_comparison_view(client: Any, experiment_id: str, sweep: str, metric: str, mode: str, tasks: int = 1) -> str:
    """Save the runs-table view of a sweep's trials (flat, best final ``metric`` first, the columns a user
    compares by, narrow enough to fit beside the UI's panels) as ``weit sweep NAME: compare trials``, in the
    envelope MLflow 3.17's "Share" writes (a bare view would open from the link but not be listed)."""
    columns = {  # column id (as the UI names it) -> width in pixels
        "attributes.`Run Name`": 310, **({"tags.`weit.task`": 100} if tasks > 1 else {}),
        "tags.`weit.strategy`": 150, "tags.`weit.size`": 90, f"metrics.`{metric}`": 100, f"metrics.`{metric}_e0`": 100,
        "metrics.`num_params`": 100, "tags.`weit.seed`": 80, "tags.`weit.lr`": 80, "duration": 90}
    view = {"searchFilter": f"tags.`weit.sweep` = '{sweep}' and tags.`weit.kind` = 'trial'",
            "orderByKey": f"metrics.`{metric}`", "orderByAsc": mode == "min",
            "selectedColumns": [c for c in columns if c.startswith(("tags.", "metrics."))],  # the others always show
            "columnOrder": list(columns), "columnWidths": columns, "runsHiddenMode": "SHOW_ALL"}
    key, now = comparison_view_key(sweep), int(time.time() * 1000)
    envelope = {"name": f"weit sweep {sweep}: compare trials", "createdAt": now, "updatedAt": now,
                "state": json.dumps(view)}
    client.set_experiment_tag(experiment_id, SHARED_VIEW_TAG + key, json.dumps(envelope))
    return key


def mlflow_ui_path(experiment_id: str, sweep: str | None = None) -> str:
    """The UI route of an experiment's runs table, or of a sweep's published comparison view."""
    query = f"viewStateShareKey={comparison_view_key(sweep)}&" if sweep else ""
    return f"#/experiments/{experiment_id}/runs?{query}workflowType=machine_learning"


def mlflow_ui_url(uri: str, experiment_id: str, sweep: str | None = None, *, host: str = "127.0.0.1",
                  port: int = UI_PORT) -> str:
    """:func:`mlflow_ui_path` on the tracking server, or on ``mlflow ui --host HOST --port PORT``."""
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else f"http://{host}:{port}"
    return f"{base}/{mlflow_ui_path(experiment_id, sweep)}"


def log_params(client: Any, run_id: str, params: dict, metrics: list | None = None) -> None:
    """Params as text (None as empty; ``log_batch`` splits them into the store's batches)."""
    from mlflow.entities import Param

    client.log_batch(run_id, params=[Param(k, ("" if v is None else str(v))[:6000]) for k, v in sorted(params.items())],
                     metrics=metrics or [])


def as_metrics(metrics: dict, step: int) -> list:
    """The finite numbers of ``metrics`` as MLflow metrics at ``step``."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, step) for k, v in metrics.items()
            if isinstance(v, int | float) and math.isfinite(v)]


class Tracker:
    """The MLflow run of a Ray Train job, found again by its job name on resume (a rerun logs no epoch twice)."""

    def __init__(self, uri: str | None, experiment: str, job: str, params: dict, tags: dict) -> None:
        import mlflow
        from mlflow.entities import RunTag

        logging.getLogger("mlflow").setLevel(logging.WARNING)  # no alembic chatter on the terminal
        self.uri, exp_id = prepare_mlflow(uri, experiment)
        self.client = mlflow.MlflowClient(self.uri)
        found = self.client.search_runs([exp_id], f"tags.`weit.job` = '{job}'", max_results=1,
                                        order_by=["attributes.start_time DESC"])
        if found:
            self.run_id = found[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            self.logged = {int(m.step) for m in self.client.get_metric_history(self.run_id, "loss")}
        else:
            self.run_id = self.client.create_run(exp_id, tags={"weit.job": job, **tags}, run_name=job).info.run_id
            self.logged = set()
            log_params(self.client, self.run_id, {k: str(v) for k, v in params.items()})
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, typ: type | None, *_: object) -> None:
        if typ is not None:  # a job that raised or was interrupted is FAILED, never left RUNNING
            self.finish({}, [], status="FAILED")

    def log_epoch(self, metrics: dict) -> None:
        epoch = int(metrics["epoch"])
        if epoch not in self.logged:
            self.client.log_batch(self.run_id, metrics=as_metrics({k: v for k, v in metrics.items() if k != "epoch"},
                                                                  epoch))
            self.logged.add(epoch)

    def finish(self, metrics: dict, artifacts: list[Path], status: str = "FINISHED") -> None:
        self.client.log_batch(self.run_id, metrics=as_metrics(metrics, 0))
        for a in artifacts:
            self.client.log_artifact(self.run_id, str(a))
        self.client.set_terminated(self.run_id, status)


def find_sweep(client: Any, experiment_id: str, name: str) -> Any:
    """A sweep's parent run by its name (the newest, if a name was reused), or None."""
    runs = client.search_runs([experiment_id], f"tags.`weit.sweep` = '{name}' and tags.`weit.kind` = 'sweep'",
                              max_results=1, order_by=["attributes.start_time DESC"])
    return runs[0] if runs else None


SAMPLES_KEY = "samples"
_SAMPLES_FILE = re.compile(rf"images/{SAMPLES_KEY}[+%]step[+%](\d+)[+%]timestamp[+%](\d+)[+%][^+%]+\.png")
"""``client.log_image(key=, step=)``'s file name (``+`` since MLflow 3.x, ``%`` before), not its thumbnail."""


def last_samples(client: Any, run_id: str) -> tuple[int, str] | None:
    """``(step, artifact path)`` of the last sample grid a trial logged, or None where it logged none."""
    found = [(int(m[1]), int(m[2]), f.path) for f in client.list_artifacts(run_id, "images")
             if (m := _SAMPLES_FILE.fullmatch(f.path))]
    if not found:
        return None
    step, _, path = max(found)  # the latest step; at a step logged twice, the later file
    return step, path


SORT_METRICS = ("num_params", "flops")  # trial params also logged as metrics: the UI sorts params as text


@dataclass
class TrialTracker:
    """The MLflow child run of one sweep trial, found again by its trial key (exactly one per trial)."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    sweep: str
    save_models: bool = True
    run_id: str | None = None

    @functools.cached_property
    def client(self) -> Any:  # MLflow caches the store per URI: a client is cheap
        import mlflow

        return mlflow.MlflowClient(self.tracking_uri)

    def start(self, config: dict, size: str, metric: str, mode: str) -> dict | None:
        """Open the run of trial ``config`` (``size``: its family's name for it), ranked by ``metric`` in
        direction ``mode``. Returns the metrics of a run of it that FINISHED before (replayed, not retrained);
        raises NonFiniteLossError again for a trial whose loss went NaN before (deterministic); deletes the
        half-written run of a killed attempt."""
        from mlflow.entities import ViewType

        from weit_core.train import NonFiniteLossError

        for run in self.client.search_runs(
                [self.experiment_id], f"tags.`mlflow.parentRunId` = '{self.parent_run_id}' and "
                                      f"tags.`weit.trial_key` = '{config['key']}'", ViewType.ACTIVE_ONLY, 10):
            status, tags = run.info.status, run.data.tags
            if status == "FINISHED":
                self.run_id = run.info.run_id
                return dict(run.data.metrics)
            if status == "FAILED" and tags.get("weit.failure_kind") == "non_finite_loss":
                self.run_id = run.info.run_id
                raise NonFiniteLossError(tags.get("weit.failure", "loss was not finite (earlier attempt)"))
            self.client.delete_run(run.info.run_id)  # an interrupted attempt: replaced, never duplicated
        tags = {"mlflow.parentRunId": self.parent_run_id, "weit.trial_key": config["key"], "weit.sweep": self.sweep,
                "weit.kind": "trial", "weit.task": config["task"], "weit.strategy": config["strategy"],
                "weit.size": size, "weit.seed": str(config["seed"]), "weit.lr": f"{config['lr']:g}",
                "weit.metric": metric, "weit.mode": mode}
        name = f"{config['task']}/{config['strategy']}/{size}/s{config['seed']}/lr{config['lr']:g}"
        self.run_id = self.client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id
        return None

    def log_params(self, params: dict) -> None:
        log_params(self.client, self.run_id, params, as_metrics({k: params[k] for k in SORT_METRICS if k in params}, 0))

    def log_model(self, model: Any, spec: Any, info: dict) -> None:
        from weit_core.io import save_model

        with tempfile.TemporaryDirectory(prefix="weit-trial-") as d:
            self.client.log_artifact(self.run_id, str(save_model(Path(d) / "model.safetensors", model, spec, info)),
                                     "model")

    def log_epoch(self, epoch: int, metrics: dict) -> None:
        """A curve per metric (step = epoch) and one column per budget, ``<metric>_e<epoch>`` (``_e0``: at init;
        ``weit_core.leaderboard.parse_budget`` reads them back)."""
        self.client.log_batch(self.run_id, metrics=as_metrics(metrics, epoch) + as_metrics(
            {f"{k}_e{epoch}": v for k, v in metrics.items()}, 0))

    def log_samples(self, epoch: int, grid: Any) -> None:
        """The task's sample grid (a [0, 1] tensor ``(C, H, W)``) as the run's ``samples`` image at step
        ``epoch``: the UI's image panel shows it with a step slider; :func:`last_samples` finds it again."""
        image = grid.detach().mul(255).round().clamp(0, 255).byte().permute(1, 2, 0).cpu().numpy()
        self.client.log_image(self.run_id, image, key=SAMPLES_KEY, step=epoch)

    def finish(self, epochs_done: int, stopped_early: bool = False) -> None:
        self.client.set_tag(self.run_id, "weit.epochs_done", str(epochs_done))
        if stopped_early:
            self.client.set_tag(self.run_id, "weit.stopped_early", "true")
        self.client.set_terminated(self.run_id, "FINISHED")

    def fail(self, exc: BaseException, kind: str) -> None:
        if self.run_id is not None:
            self.client.set_tag(self.run_id, "weit.failure", " ".join(f"{type(exc).__name__}: {exc}".split())[:4000])
            self.client.set_tag(self.run_id, "weit.failure_kind", kind)
            self.client.set_terminated(self.run_id, "FAILED")


def open_sweep(client: Any, experiment_id: str, name: str, tags: dict, params: dict, files: dict[str, Any], *,
               resume: bool, exists_in_tune: bool) -> tuple[str, bool]:
    """The sweep's parent run: created with ``tags``, ``params`` and ``files`` (artifact path -> a local file,
    a text, or a dict logged as JSON), or on ``resume`` found again by name if its space and bank are the
    ones it ran with. Returns (run id, resumed)."""
    parent = find_sweep(client, experiment_id, name)
    if not resume and (parent is not None or exists_in_tune):
        where = f"MLflow run {parent.info.run_id}" if parent is not None else "Tune storage"
        raise UserError(f"sweep {name!r} already exists ({where}); pass --resume to continue it, or --name NEW "
                        f"for a fresh sweep (see its results with `weit report --sweep {name}`)")
    if resume and parent is None:
        if exists_in_tune:
            raise UserError(f"sweep {name!r} has Tune state but no MLflow parent run in this tracking store; "
                            f"pass the --mlflow-uri it was run with")
        raise UserError(f"nothing to resume: no sweep named {name!r} in MLflow or Tune storage; run it without "
                        f"--resume first (or pass the --name/--storage/--mlflow-uri it used)")
    if parent is not None:
        had = parent.data.tags
        if had.get("weit.space_hash") != tags["weit.space_hash"]:
            raise UserError(f"sweep {name!r} was run with a different space file (content changed); resume needs "
                            f"the same file, or start a new sweep with --name")
        for key in sorted(k for k in {*had, *tags} if k.startswith("weit.bank_sha256")):  # .<task>: a task's own
            if had.get(key, "") != tags.get(key, ""):
                task = key.removeprefix("weit.bank_sha256")
                raise UserError(f"sweep {name!r} was run with bank {had.get('weit.bank_path' + task) or 'none'} "
                                f"(sha256 {had.get(key, '')[:12] or '-'}); "
                                + (f"task {task[1:]!r}'s bank now differs" if task else "--bank now differs"))
        client.update_run(parent.info.run_id, status="RUNNING")
        return parent.info.run_id, True
    run_id = client.create_run(experiment_id, run_name=f"sweep-{name}", tags=tags).info.run_id
    log_params(client, run_id, params)
    for path, what in files.items():
        if isinstance(what, dict):
            client.log_dict(run_id, what, path)
        elif isinstance(what, str):
            client.log_text(run_id, what, path)
        else:
            client.log_artifact(run_id, str(what), path)
    return run_id, False


def sweep_note(name: str, space: Any, expansion: Any, trials: list[dict], *, experiment: str, exp_id: str,
               uri: str, parent_id: str, metric: str, counts: dict[str, Any] | None = None) -> str:
    """The parent run's description (markdown): the space and its axes per task, the trials (``counts``:
    finished, failed, tune_errors, failure_kinds once it ended; None while it runs), the ones dropped and why,
    where to compare the trials, and the exact ``weit report`` command."""
    from weit_core.trials import trials_table

    lines = [f"### Sweep `{name}`", "",
             f"Space **{space.name}** (`{space.path or 'inline'}`, content hash `{space.content_hash()}`)"
             + (f": {space.description}" if space.description else "."), "", *trials_table(space, trials)]
    n_all = len(expansion.trials)
    status = "running (the counts are written here when the sweep ends)."
    if counts is not None:
        kinds = collections.Counter(counts.get("failure_kinds", []))
        errors = counts.get("tune_errors", 0)
        status = (f"{counts['finished']} finished, {counts['failed']} failed"
                  + (f", {errors} Tune error{'s' * (errors != 1)}" if errors else "")
                  + (f" ({', '.join(f'{n} {k}' for k, n in kinds.most_common()) or 'no kind recorded'}; each "
                     f"failed run's reason is its `weit.failure` tag)." if counts["failed"] else "."))
    report = "weit report " + (f"--sweep {name}" if experiment == SWEEP_EXPERIMENT else f"--parent-run {parent_id}")
    lines += ["", f"**Trials:** {len(trials)}" + (f" (the first {len(trials)} of {n_all}: `--limit-trials`)"
                                                  if len(trials) < n_all else "") + "; " + status,
              "", f"**Dropped before any trial:** {expansion.describe_drops()}.",
              "", f"**Compare the trials:** the child runs of this run, one per trial, named "
                  f"`task/strategy/size/sSEED/lrLR`; [open them side by side]({mlflow_ui_path(exp_id, name)}) (only "
                  f"this sweep's trials, best final `{metric}` first, with strategy, size, seed, lr and `num_params` "
                  f"columns).",
              "", f"**Leaderboard:** `{report} --mlflow-uri {uri}` ranks every init at its best lr, writes "
                  f"`reports/{name}/leaderboard.md` (with plots) and logs it to this run under `report/`."]
    return "\n".join(lines)


MODEL_ARTIFACT = "model/model.safetensors"
"""Where a trial logs its initialized model (what export and the registry read)."""


def has_model(client: Any, run_id: str) -> bool:
    return any(f.path == MODEL_ARTIFACT for f in client.list_artifacts(run_id, "model"))


def register_champion(client: Any, w: Any, sweep: str, parent_run_id: str) -> str | None:
    """The winner's initialized model as ``weit-<task>@champion``, its leaderboard row as tags; no new
    version while the champion is unchanged."""
    from mlflow.exceptions import MlflowException

    name = f"weit-{w.task}"
    if not has_model(client, w.run_id):
        print(f"[weit report] {w.task}: the winning run {w.run_id} has no {MODEL_ARTIFACT} (sweep ran with "
              f"--no-save-models); not registered")
        return None
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name, description=f"Best initialized model for task {w.task} (weit).")
    try:
        current = client.get_model_version_by_alias(name, "champion")
        if current.run_id == w.run_id:
            return f"{name}/{current.version}"
    except MlflowException:  # no champion yet
        pass
    tags = {"task": w.task, "strategy": w.strategy, "size": w.size, "num_params": w.num_params,
            "budget_epochs": w.budget, "metric": w.metric, "mode": w.mode, f"{w.metric}_mean": f"{w.mean:.6f}",
            f"{w.metric}_std": f"{w.std:.6f}", "n_seeds": w.n_seeds, "best_strategy": w.best_strategy,
            "lr": f"{w.lr:g}", "n_lrs": w.n_lrs, "sweep": sweep, "parent_run_id": parent_run_id}
    mv = client.create_model_version(name, f"{client.get_run(w.run_id).info.artifact_uri}/model", run_id=w.run_id,
                                     tags={k: str(v) for k, v in tags.items()},
                                     description=f"{w.strategy} {w.size} from sweep {sweep}")
    client.set_registered_model_alias(name, "champion", mv.version)
    return f"{name}/{mv.version}"

def close_sweep(client: Any, experiment_id: str, parent_id: str, tune_errors: int,
                note: Any) -> tuple[int, list[str]]:
    """Count the parent's children by status, record the counts (metrics and the description ``note(counts=)``
    writes) and end the parent run; returns (finished, failure kinds)."""
    children = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'", max_results=50000)
    failed = [r.data.tags.get("weit.failure_kind", "unknown") for r in children if r.info.status == "FAILED"]
    finished = sum(r.info.status == "FINISHED" for r in children)
    client.log_batch(parent_id, metrics=as_metrics(
        {"trials_finished": finished, "trials_failed": len(failed), "tune_errors": tune_errors}, 0))
    client.set_tag(parent_id, NOTE_TAG, note(counts={"finished": finished, "failed": len(failed),
                                                    "tune_errors": tune_errors, "failure_kinds": failed}))
    client.set_terminated(parent_id, "FINISHED")
    return finished, failed
