"""The one MLflow writer: where runs are stored, how weit's experiments look in the MLflow UI, how metrics
are named, and the run of a Ray Train job (ancestry, distill). Every pipeline writes to MLflow through here, so
the embedded default (a sqlite file) and a tracking server differ only by the URI."""

from __future__ import annotations

import collections
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

DEFAULT_DB = "mlruns.db"
DEFAULT_ARTIFACTS = "mlartifacts"


def tracking_uri(uri: str | None = None) -> str:
    """``--mlflow-uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<abs>/mlruns.db`` in the cwd.
    Relative sqlite paths are made absolute (Ray workers run in other directories)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(DEFAULT_DB).resolve()}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    elif "://" not in uri:  # a bare path: treat as a sqlite file
        uri = f"sqlite:///{Path(uri).resolve()}"
    return uri


def artifact_location(uri: str) -> str | None:
    """For the embedded sqlite store keep artifacts beside the database (``./mlartifacts``)."""
    if uri.startswith("sqlite:"):
        return Path(uri[len("sqlite:///"):]).resolve().parent.joinpath(DEFAULT_ARTIFACTS).as_uri()
    return None


EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_RUNS = "custom_model_development"
"""The experiment kind of training runs (the value MLflow 3's UI writes itself when a user switches an
experiment to that view). MLflow 3.17.2's UI reads the kind from the browser's GenAI / Model training switch
instead (default GenAI: the overview page), so links must also say ``workflowType=machine_learning``
(:func:`mlflow_ui_path`); the tag keeps the experiment's kind where the tag is read (other MLflow versions,
API clients)."""
NOTE_TAG = "mlflow.note.content"
"""The markdown description the MLflow UI shows for an experiment or a run (and edits in place)."""
EXPERIMENT_NOTES = {
    "weit-sweep": "**weit sweeps** (`weit sweep`). One parent run per sweep, `sweep-NAME`: its description "
                  "states the space, the trial counts and the `weit report` command. One child run per trial, "
                  "named `task/strategy/size/sSEED/lrLR`, tagged `weit.strategy`, `weit.size`, `weit.seed`, "
                  "`weit.lr`, with `num_params` and `val_acc` per stage-3 epoch (`val_acc_e0`: right after "
                  "initialization). One sweep's trials side by side: the **Views** menu, `weit sweep NAME: "
                  "compare trials`. Rank a sweep with `weit report --sweep NAME`.",
    "weit-distill": "**weit stage 1** (`weit distill`). One run per distillation job: a template bank learned "
                    "from an ancestry model (or from the task alone), its loss and accuracies per epoch; the "
                    "bank file is the job's output and what `weit sweep --bank` reads.",
    "weit-ancestry": "**weit ancestry models** (`weit ancestry`). One run per ViT trained on a task with the "
                     "standard recipe; the model file is what `weit distill --teacher` and `weit sweep "
                     "--ancestry` read.",
}
"""What the runs of each experiment weit creates are: the experiment's description in the MLflow UI."""


def experiment_note(experiment: str) -> str:
    """The description an experiment gets when weit creates it (a generic one for a name given with
    ``--experiment``)."""
    return EXPERIMENT_NOTES.get(experiment, f"Runs recorded by **weit** (template-based initialization of ViTs) "
                                            f"in experiment `{experiment}`.")


def prepare_mlflow(uri: str | None, experiment: str, description: str | None = None) -> tuple[str, str]:
    """Create the store and experiment *in the driver* before any worker logs (parallel first use of a
    sqlite store races on its schema migrations). Returns (absolute tracking URI, experiment id).

    The experiment carries ``mlflow.experimentKind`` = ``custom_model_development`` (training runs, not a
    GenAI app: see :data:`TRAINING_RUNS`) and a description (``description``, else :func:`experiment_note`);
    an existing experiment that lacks either gets it, a description a user wrote is kept."""
    import mlflow

    uri = tracking_uri(uri)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    try:
        exp = client.get_experiment_by_name(experiment)
    except Exception as e:  # unreachable server, bad URI
        raise UserError(f"cannot reach MLflow at {uri} ({type(e).__name__}: {e}); check --mlflow-uri") from e
    tags = {EXPERIMENT_KIND_TAG: TRAINING_RUNS, NOTE_TAG: description or experiment_note(experiment)}
    if exp is None:
        return uri, client.create_experiment(experiment, artifact_location(uri), tags=tags)
    if exp.lifecycle_stage == "active":  # a deleted one cannot be tagged (nor logged to)
        for key, value in tags.items():
            if not exp.tags.get(key):
                client.set_experiment_tag(exp.experiment_id, key, value)
    return uri, exp.experiment_id


SHARED_VIEW_TAG = "mlflow.sharedViewState."
"""Prefix of the experiment tag holding a runs-table view (filter, sort, columns) that the MLflow UI opens
from ``#/experiments/ID/runs?viewStateShareKey=KEY`` (its "Share" button writes the same tag)."""
UI_PORT = 5000


def comparison_view_key(sweep: str) -> str:
    """The share key of a sweep's comparison view: ``weit-<sweep>`` (other characters than letters, digits,
    ``-``, ``_`` and ``.`` become ``_``, with a short hash so two names never share a key)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", sweep)
    if safe != sweep:
        safe += "-" + hashlib.sha256(sweep.encode()).hexdigest()[:8]
    return f"weit-{safe}"


def comparison_view(sweep: str, tasks: int = 1, metric: str = "val_acc", mode: str = "max") -> dict:
    """The runs-table view where a sweep's trials are compared: only its trial runs (a filter, which also
    lists them flat instead of folded under the parent row), best final ``metric`` first (``mode``: max or
    min is better), and the columns a
    user compares by, narrow enough that the first ones fit beside the UI's side panels: run name, strategy,
    size, val accuracy after the last stage-3 epoch (``val_acc``) and right after initialization
    (``val_acc_e0``), parameter count, seed, lr, duration."""
    columns = {  # column id (as the UI names it) -> width in pixels
        "attributes.`Run Name`": 310, **({"tags.`weit.task`": 100} if tasks > 1 else {}),
        "tags.`weit.strategy`": 150, "tags.`weit.size`": 90, f"metrics.`{metric}`": 100, f"metrics.`{metric}_e0`": 100,
        "metrics.`num_params`": 100, "tags.`weit.seed`": 80, "tags.`weit.lr`": 80, "duration": 90}
    return {"searchFilter": f"tags.`weit.sweep` = '{sweep}' and tags.`weit.kind` = 'trial'",
            "orderByKey": f"metrics.`{metric}`", "orderByAsc": mode == "min",
            "selectedColumns": [c for c in columns if c.startswith(("tags.", "metrics."))],  # the others always show
            "columnOrder": list(columns), "columnWidths": columns, "runsHiddenMode": "SHOW_ALL"}


def publish_comparison_view(client: Any, experiment_id: str, sweep: str, tasks: int = 1, metric: str = "val_acc",
                            mode: str = "max") -> str:
    """Store a sweep's :func:`comparison_view` on its experiment as a saved view named ``weit sweep NAME:
    compare trials`` (the UI lists it under "Views" and opens it from a share link); returns its key.

    The tag's value is the UI's saved-view envelope, ``{name, createdAt, updatedAt, state}`` with the view as
    a JSON string in ``state`` (MLflow 3.17's ``mlflow.sharedViewState.`` tags; a plain view JSON would still
    open from the link but not be listed)."""
    key = comparison_view_key(sweep)
    now = int(time.time() * 1000)
    envelope = {"name": f"weit sweep {sweep}: compare trials", "createdAt": now, "updatedAt": now,
                "state": json.dumps(comparison_view(sweep, tasks, metric, mode))}
    client.set_experiment_tag(experiment_id, SHARED_VIEW_TAG + key, json.dumps(envelope))
    return key


def mlflow_ui_path(experiment_id: str, sweep: str | None = None) -> str:
    """The UI route (``#/...``, relative to the UI's address) of an experiment's runs table, or with ``sweep``
    (one that published its view, as ``weit sweep`` does) of that sweep's trials side by side: flat, sorted
    by final val accuracy, under its saved view. ``workflowType=machine_learning`` is what makes MLflow 3.17's
    UI show the runs table and its model-training navigation: it decides an experiment's kind by the
    browser's GenAI / Model training switch (default GenAI: the GenAI overview), not by the experiment's
    ``mlflow.experimentKind`` tag."""
    query = f"viewStateShareKey={comparison_view_key(sweep)}&" if sweep else ""
    return f"#/experiments/{experiment_id}/runs?{query}workflowType=machine_learning"


def mlflow_ui_url(uri: str, experiment_id: str, sweep: str | None = None, *, host: str = "127.0.0.1",
                  port: int = UI_PORT) -> str:
    """The browser address of :func:`mlflow_ui_path`: on the tracking server itself for an http(s) ``uri``,
    else on ``mlflow ui --backend-store-uri URI --host HOST --port PORT`` (default 127.0.0.1:5000)."""
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else f"http://{host}:{port}"
    return f"{base}/{mlflow_ui_path(experiment_id, sweep)}"


# ------------------------------------------------------------------------------------------- metric names

_BUDGET = re.compile(r"(.+)_e(\d+)")


def budget_metric(name: str, epoch: int) -> str:
    """A metric at a stage-3 budget, one column per budget for ``search_runs``: ``val_acc`` after 2 epochs
    is ``val_acc_e2`` (``_e0``: right after initialization)."""
    return f"{name}_e{epoch}"


def parse_budget(col: str) -> tuple[str, int] | None:
    """Inverse of :func:`budget_metric`: ``"val_acc_e2"`` -> ``("val_acc", 2)``; None for other names."""
    m = _BUDGET.fullmatch(col)
    return (m.group(1), int(m.group(2))) if m else None


# ---------------------------------------------------------------------------------------- a training job


class Tracker:
    """One MLflow run per Ray Train job, found again by its job name on resume (so a rerun continues the
    run and logs no epoch twice)."""

    def __init__(self, uri: str | None, experiment: str, job: str, params: dict, tags: dict) -> None:
        import mlflow
        from mlflow.entities import Param, RunTag

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
            run = self.client.create_run(exp_id, tags={"weit.job": job, **tags}, run_name=job)
            self.run_id, self.logged = run.info.run_id, set()
            items = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
            for i in range(0, len(items), 100):
                self.client.log_batch(self.run_id, params=items[i:i + 100])
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, typ: type | None, *_: object) -> None:
        """A job that raised (or was interrupted) leaves its run FAILED, never RUNNING."""
        if typ is not None:
            self.finish({}, [], status="FAILED")

    def log_epoch(self, metrics: dict) -> None:
        epoch = int(metrics["epoch"])
        if epoch not in self.logged:
            self._log({k: v for k, v in metrics.items() if k != "epoch"}, epoch)
            self.logged.add(epoch)

    def finish(self, metrics: dict, artifacts: list[Path], status: str = "FINISHED") -> None:
        if metrics:
            self._log(metrics, 0)
        for a in artifacts:
            self.client.log_artifact(self.run_id, str(a))
        self.client.set_terminated(self.run_id, status)

    def _log(self, metrics: dict, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[
            Metric(k, float(v), now, step) for k, v in metrics.items()
            if isinstance(v, int | float) and math.isfinite(v)])


# ------------------------------------------------------------------------------------- a sweep and its trials

_CLIENTS: dict[str, Any] = {}


def client_for(uri: str) -> Any:
    """One ``MlflowClient`` per tracking URI per process (a Tune worker reuses it across trials)."""
    if uri not in _CLIENTS:
        import mlflow

        _CLIENTS[uri] = mlflow.MlflowClient(uri)
    return _CLIENTS[uri]


def log_params(client: Any, run_id: str, params: dict, metrics: list | None = None) -> None:
    """Params as text (None as empty), in the store's batches of 100; ``metrics`` go with the first."""
    from mlflow.entities import Param

    items = [Param(k, ("" if v is None else str(v))[:6000]) for k, v in sorted(params.items())]
    for i in range(0, max(len(items), 1), 100):
        client.log_batch(run_id, params=items[i:i + 100], metrics=(metrics or []) if i == 0 else [])


def as_metrics(metrics: dict, step: int) -> list:
    """The finite numbers of ``metrics`` as MLflow metrics at ``step`` (what ``log_batch`` takes)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, step) for k, v in metrics.items()
            if isinstance(v, int | float) and math.isfinite(v)]


SORT_METRICS = ("num_params", "flops")
"""Trial params also logged as metrics (step 0): the runs table sorts params as text, metrics as numbers."""


def find_sweep(client: Any, experiment_id: str, name: str) -> Any:
    """A sweep's parent run by its name (the newest, if a name was reused), or None."""
    runs = client.search_runs([experiment_id], f"tags.`weit.sweep` = '{name}' and tags.`weit.kind` = 'sweep'",
                              max_results=5, order_by=["attributes.start_time DESC"])
    return runs[0] if runs else None


@dataclass
class TrialTracker:
    """The MLflow child run of one sweep trial, found again by its trial key (exactly one per trial)."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    sweep: str
    save_models: bool = True
    run_id: str | None = None

    @property
    def client(self) -> Any:
        return client_for(self.tracking_uri)

    def find(self, key: str) -> list:
        from mlflow.entities import ViewType

        return self.client.search_runs(
            [self.experiment_id],
            f"tags.`mlflow.parentRunId` = '{self.parent_run_id}' and tags.`weit.trial_key` = '{key}'",
            run_view_type=ViewType.ACTIVE_ONLY, max_results=10)

    def start(self, config: dict, size: str, metric: str = "val_acc", mode: str = "max") -> dict | None:
        """Open the run of trial ``config`` of size ``size`` (its family's name for it), ranked by ``metric``
        in direction ``mode``. Returns the metrics of a run of it that FINISHED before (replay them, do not
        retrain); raises NonFiniteLossError again for a trial whose loss went NaN before (deterministic);
        deletes a half-written run of a killed attempt."""
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
        tags = {"mlflow.parentRunId": self.parent_run_id, "weit.trial_key": config["key"], "weit.sweep": self.sweep,
                "weit.kind": "trial", "weit.task": config["task"], "weit.strategy": config["strategy"],
                "weit.size": size, "weit.seed": str(config["seed"]), "weit.lr": f"{config['lr']:g}",
                "weit.metric": metric, "weit.mode": mode}
        name = f"{config['task']}/{config['strategy']}/{size}/s{config['seed']}/lr{config['lr']:g}"
        self.run_id = self.client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id
        return None

    def log_params(self, params: dict) -> None:
        """The trial's params, and :data:`SORT_METRICS` also as metrics."""
        log_params(self.client, self.run_id, params, as_metrics({k: params[k] for k in SORT_METRICS if k in params}, 0))

    def log_model(self, model: Any, spec: Any, info: dict) -> None:
        from weit_core.io import save_model

        with tempfile.TemporaryDirectory(prefix="weit-trial-") as d:
            path = save_model(Path(d) / "model.safetensors", model, spec, info)
            self.client.log_artifact(self.run_id, str(path), "model")

    def log_epoch(self, epoch: int, metrics: dict) -> None:
        """A curve per metric (step = epoch) and one column per budget (:func:`budget_metric`)."""
        self.client.log_batch(self.run_id, metrics=as_metrics(metrics, epoch) + as_metrics(
            {budget_metric(k, epoch): v for k, v in metrics.items()}, 0))

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


SWEEP_EXPERIMENT = "weit-sweep"


def open_sweep(client: Any, experiment_id: str, name: str, tags: dict, params: dict, files: dict[str, Any], *,
               resume: bool, exists_in_tune: bool) -> tuple[str, bool]:
    """The sweep's parent run: created with ``tags``, ``params`` and ``files`` (artifact path -> a local
    file, a text or a dict logged as JSON), or found again by name on ``resume`` when its space and bank (the
    ``weit.space_hash`` and ``weit.bank_sha256`` of ``tags``) are the ones it ran with. Returns (run id,
    resumed)."""
    parent = find_sweep(client, experiment_id, name)
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
        had = parent.data.tags
        if had.get("weit.space_hash") != tags["weit.space_hash"]:
            raise UserError(f"sweep {name!r} was run with a different space file (content changed); resume needs "
                            f"the same file, or start a new sweep with --name")
        if had.get("weit.bank_sha256", "") != tags["weit.bank_sha256"]:
            raise UserError(f"sweep {name!r} was run with bank {had.get('weit.bank_path') or 'none'} (sha256 "
                            f"{had.get('weit.bank_sha256', '')[:12] or '-'}); --bank now differs")
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
               uri: str, parent_id: str, counts: dict[str, Any] | None = None, metric: str = "val_acc") -> str:
    """The parent run's description (``mlflow.note.content``, markdown): the space, sizes x strategies x
    seeds x lrs per task, the trials that ran (``counts``: finished, failed, tune_errors and the failed
    runs' ``failure_kinds`` once the sweep ended; None while it runs) and the ones dropped with their
    reasons, where the comparison and the leaderboard are, and the exact ``weit report`` command."""
    from weit_core.models import get_family

    size_name = get_family(space.family).size_name

    def fmt(values: set) -> str:
        shown = ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in sorted(values))
        return f"{len(values)} ({shown})" if len(values) <= 6 else str(len(values))

    lines = [f"### Sweep `{name}`", "",
             f"Space **{space.name}** (`{space.path or 'inline'}`, content hash `{space.content_hash()}`)"
             + (f": {space.description}" if space.description else "."), "",
             "| task | sizes | strategies | seeds | stage-3 lrs | trials |", "|---|---|---|---|---|---|"]
    for task in space.tasks:
        rows = [t for t in trials if t["task"] == task.name]
        axes = [{size_name(t) for t in rows}, {t["strategy"] for t in rows}, {t["seed"] for t in rows},
                {float(t["lr"]) for t in rows}]
        product = math.prod(len(a) for a in axes)
        lines.append(f"| {task.name} | " + " | ".join(fmt(a) for a in axes) + f" | {len(rows)}"
                     + (f" of the {product} combinations" if product != len(rows) else "") + " |")
    n_all = len(expansion.trials)
    lines += ["", f"**Trials:** {len(trials)}" + (f" (the first {len(trials)} of {n_all}: `--limit-trials`)"
                                                  if len(trials) < n_all else "") + "; "]
    if counts is None:
        lines[-1] += "running (the counts are written here when the sweep ends)."
    else:
        kinds = collections.Counter(counts.get("failure_kinds", []))
        errors = counts.get("tune_errors", 0)
        lines[-1] += (f"{counts['finished']} finished, {counts['failed']} failed"
                      + (f", {errors} Tune error{'s' * (errors != 1)}" if errors else "")
                      + (f" ({', '.join(f'{n} {k}' for k, n in kinds.most_common()) or 'no kind recorded'}; each "
                         f"failed run's reason is its `weit.failure` tag)." if counts["failed"] else "."))
    report = f"weit report --sweep {name}" if experiment == SWEEP_EXPERIMENT else f"weit report --parent-run {parent_id}"
    lines += ["", f"**Dropped before any trial:** {expansion.describe_drops()}.",
              "", f"**Compare the trials:** the child runs of this run, one per trial, named "
                  f"`task/strategy/size/sSEED/lrLR`; [open them side by side]({mlflow_ui_path(exp_id, name)}) (only "
                  f"this sweep's trials, best final `{metric}` first, with strategy, size, seed, lr and `num_params` "
                  f"columns).",
              "", f"**Leaderboard:** `{report} --mlflow-uri {uri}` ranks every init at its best lr, writes "
                  f"`reports/{name}/leaderboard.md` (with plots) and logs it to this run under `report/`."]
    return "\n".join(lines)
