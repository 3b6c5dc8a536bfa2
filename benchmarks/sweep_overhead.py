"""What does Ray Tune cost a sweep? K short fixed-work trials through the sweep's own Tune path vs the
same trials in plain loops at the same concurrency.

The work is the real trial body (``pipelines.trial.run_trial``: scratch init + a fixed number of training
steps + a small evaluation, one thread), calibrated to about ``--work-s`` seconds. The Tune arm is the
sweep's code path: ``tune.with_parameters(tune_trial)`` (wrapped to read the trial thread's schedstat) +
``with_resources``, the task data shared through the object store, the trial list as the sweep hands it to
Tune (``trial_param_space``), ``reuse_actors=True``, per-trial result files off, ``verbose=0``, one Tune
report per trial as the sweep does without ASHA (``--report-each-epoch``: a report after every epoch, as
with ``--asha``; each is a blocking round trip to the driver). The plain arm runs the same trials as
``slots`` plain loops side by side, one fresh process each: two busy processes on this 2-core VM ran 10-25%
slower each than one alone in one check (not in every run), so work timed one trial at a time (``--serial``,
reported for reference) can be a baseline no parallel runner reaches. MLflow is off in both arms
(``--mlflow`` puts it in both: it is trial work, not Tune overhead). Ray start-up is excluded; everything
inside ``Tuner.fit()`` (actor start-up and imports included) is counted.

    ratio              = wall(Tune) / (work / slots)     work = sum of the plain loops' trial times
    per_trial_overhead = (wall(Tune) - work / slots) * slots / K   (slot-seconds a trial costs beyond its work)
    steady-state overhead: the same, measured between trial completions after every slot finished one
    trial (so the one-off actor start-up and imports are left out; reported next to the totals)
    vs plain wall: wall(Tune) / wall(plain loops), both with their process start-up and imports
    vs work inside Tune: the same two figures with the work timed inside the Tune arm (Tune's time_total_s
    per trial), which a machine whose load changes between the two arms cannot skew
    trial's CPU run and run-queue wait: the trial thread's own schedstat (Linux) around each trial, in both
    arms, mean per trial: a Tune trial slower in wall time either did more CPU work (the machine got slower,
    or Tune made the work heavier) or waited longer for a CPU (other processes ran: Ray's driver and
    daemons run at nice 0, its workers at nice 15)

The plain arm runs twice, before and after the Tune arm (A-B-A), and the work is the mean of the two:
this VM's speed drifts (the same plain arm of 100-200 trials of 110 steps measured 0.81-0.95 s per trial
in four runs within half an hour), which would otherwise bias the ratio in whichever way it drifted.
``--repeats R`` runs R Tune arms between R + 1 plain arms (P T P T P ...), each Tune arm set against its
two neighbours, and takes the median repeat as the headline, every repeat printed beside it: a burst of
load on a shared VM during one Tune arm then moves one column, not the result.

    python benchmarks/sweep_overhead.py [--trials 200] [--work-s 1.0] [--slots 2] [--repeats 1] [--mlflow]
                                        [--report-each-epoch] [--serial] [--grid json|dicts]
    python benchmarks/sweep_overhead.py --variants 200,800,2000   # Tune's trial generation alone

The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from weit_core.space import parse_space  # noqa: E402
from weit_core.trials import expand, inspect_tasks  # noqa: E402

SPACE = """
name: overhead
tasks: [{data: digits, patch: 2, val_limit: 128}]
strategies: [scratch]
sizes: {depth: 2, width: 32, heads: 2, mlp_ratio: 2}
training: {epochs: EPOCHS, batch_size: 64, steps_per_epoch: 10, fit_steps: 0, fit_examples: 0, test_eval: false,
           seeds: SEEDS}
"""


def configs(trials: int, steps: int) -> list[dict]:
    """``steps`` in whole epochs of 10 (``steps_per_epoch`` only caps an epoch, and digits' train split is
    19 batches, so the work is set by the number of epochs; each epoch ends with a 128-image evaluation)."""
    epochs = max(1, round(steps / 10))
    space = parse_space(SPACE.replace("EPOCHS", str(epochs)).replace("SEEDS", str(list(range(trials)))))
    return expand(space, inspect_tasks(space)).trials


def calibrate(work_s: float) -> int:
    """Training steps whose trial takes about ``work_s`` seconds here. A trial is a fixed part (init,
    evaluation) plus a per-step part, so two step counts are timed (median of 3 each) and the line
    through them is solved for ``work_s``; dividing one timing by its steps would count the fixed part
    as steps and give trials far shorter than asked."""
    from pipelines.trial import run_trial

    def timed(steps: int) -> float:
        (cfg,) = configs(1, steps)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            run_trial(cfg, threads=1)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    run_trial(configs(1, 20)[0], threads=1)  # warm-up: imports, data cache, allocator
    lo, hi = 20, 200
    t_lo, t_hi = timed(lo), timed(hi)
    per_step = max((t_hi - t_lo) / (hi - lo), 1e-6)
    fixed = max(t_lo - lo * per_step, 0.0)
    return max(10, 10 * round((work_s - fixed) / per_step / 10))


def thread_sched() -> tuple[float, float]:
    """(seconds this thread has run on a CPU, seconds it has waited on a run queue) from Linux's schedstat;
    NaN elsewhere. A trial slower in wall time either ran longer (its work got slower per step) or waited
    longer for a CPU (something else ran): the two tell drift of the machine from contention apart."""
    try:
        run_ns, wait_ns, _ = Path("/proc/thread-self/schedstat").read_text().split()
        return int(run_ns) / 1e9, int(wait_ns) / 1e9
    except (OSError, ValueError):
        return float("nan"), float("nan")


def timed(call: Callable[[], object]) -> list[float]:
    """``call()``'s [wall, CPU run, run-queue wait] seconds, as the calling thread saw them."""
    (run0, wait0), t0 = thread_sched(), time.perf_counter()
    call()
    (run1, wait1), t1 = thread_sched(), time.perf_counter()
    return [t1 - t0, run1 - run0, wait1 - wait0]


def plain_loop(cfgs: list[dict], tracking: tuple | None) -> list[list[float]]:
    """Every trial's [wall, CPU run, run-queue wait] seconds."""
    from pipelines.tracking import TrialTracker
    from pipelines.trial import run_trial

    rows = []
    for cfg in cfgs:
        tracker = TrialTracker(*tracking) if tracking else None  # made outside the timed work, as before
        rows.append(timed(lambda: run_trial(cfg, tracker=tracker, threads=1)))  # noqa: B023 -- called at once
    return rows


def plain_side_by_side(cfgs: list[dict], slots: int, tracking: tuple | None, tmp: str
                       ) -> tuple[float, list[list[float]]]:
    """The same trials as ``slots`` plain loops running side by side, one fresh Python process each (trial
    ``i`` in process ``i % slots``), as Tune runs them: the work is then timed under the same concurrency
    (after a warm-up trial: imports and data loading are not counted as work, while Tune's wall counts
    them), and the plain wall includes process start and imports, as Tune's does. Returns (wall, every
    trial's [wall, CPU run, run-queue wait])."""
    jobs = []
    t0 = time.perf_counter()
    for i in range(slots):
        job = Path(tmp) / f"plain{i}.json"
        job.write_text(json.dumps({"cfgs": cfgs[i::slots], "tracking": tracking}))
        jobs.append((job, subprocess.Popen([sys.executable, __file__, "--plain-worker", str(job)])))
    for job, proc in jobs:
        if proc.wait() != 0:
            raise RuntimeError(f"plain worker {job.name} exited with {proc.returncode}")
    wall = time.perf_counter() - t0
    return wall, [t for job, _ in jobs for t in json.loads(job.with_suffix(".out").read_text())]


def plain_worker(job: str) -> None:
    import torch

    torch.set_num_threads(1)
    spec = json.loads(Path(job).read_text())
    from pipelines.trial import run_trial

    run_trial({**spec["cfgs"][0], "epochs": 1}, threads=1)  # warm-up (imports, data) outside the timed work
    rows = plain_loop(spec["cfgs"], tuple(spec["tracking"]) if spec["tracking"] else None)
    Path(job).with_suffix(".out").write_text(json.dumps(rows))


def _sched_tune_trial(config: dict, ctx=None, sched_dir: str = "") -> None:
    """The sweep's ``tune_trial``, with the trial thread's CPU run and run-queue wait around it appended to
    a file per worker (two reads of /proc and one small write per trial)."""
    from pipelines.trial import tune_trial

    row = timed(lambda: tune_trial(config, ctx))
    with open(Path(sched_dir) / f"{os.getpid()}.txt", "a") as f:
        f.write(" ".join(map(str, row)) + "\n")


def tune_arm(cfgs: list[dict], slots: int, tracking: tuple | None, storage: str,
             each_epoch: bool, grid: str = "json") -> tuple[float, list[float], float, float, list[list[float]]]:
    """Wall time of ``Tuner.fit()``, the driver-clock completion time of every trial (from fit start), the
    work as timed inside Tune (sum over trials of Tune's ``time_total_s``: trial start to last report), the
    driver's CPU seconds during the fit, and every trial's [wall, CPU run, run-queue wait] as its own thread
    saw them (but each worker's first, which imports torch and timm). ``grid="dicts"``: the trial list as
    the sweep handed it to Tune before 20eba1e, a grid of dicts, for comparison."""
    import resource

    from ray import tune

    from pipelines.sweep import _trial_dirname
    from pipelines.trial import SweepContext, share_task_data, trial_param_space

    done: list[float] = []
    inside: dict[str, float] = {}

    class Completions(tune.Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
            inside[trial.trial_id] = float(result["time_total_s"])

        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            done.append(time.perf_counter())

    uri, exp_id, parent, sweep = tracking if tracking else (None, None, None, "overhead")
    ctx = SweepContext(uri, exp_id, parent, sweep, save_models=False, threads=1, report_each_epoch=each_epoch,
                       data_refs=share_task_data(cfgs))
    sched_dir = Path(storage) / "schedstat"
    sched_dir.mkdir(parents=True, exist_ok=True)
    trainable = tune.with_resources(tune.with_parameters(_sched_tune_trial, ctx=ctx, sched_dir=str(sched_dir)),
                                    {"cpu": 1})
    tuner = tune.Tuner(
        trainable, param_space=trial_param_space(cfgs) if grid == "json" else {"trial": tune.grid_search(cfgs)},
        tune_config=tune.TuneConfig(metric="val_acc", mode="max", reuse_actors=True, max_concurrent_trials=slots,
                                    trial_dirname_creator=_trial_dirname),
        run_config=tune.RunConfig(name="overhead", storage_path=storage, verbose=0, callbacks=[Completions()]))
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    results = tuner.fit()
    wall = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    driver_cpu = cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime
    if results.num_errors:
        raise RuntimeError(f"{results.num_errors} trials failed: {results.errors[:1]}")
    # each worker's first trial imports torch and timm in the trial thread: start-up, not work
    sched = [[float(x) for x in line.split()]
             for f in sched_dir.glob("*.txt") for line in f.read_text().splitlines()[1:]]
    return wall, sorted(t - t0 for t in done), sum(inside.values()), driver_cpu, sched


def variant_costs(counts: list[int], steps: int) -> None:
    """Driver CPU that Tune's variant generator spends making the trials of a sweep, the configs passed
    as a grid of dicts vs the sweep's grid of JSON strings (``pipelines.sweep.trial_param_space``)."""
    from ray import tune
    from ray.tune.search.variant_generator import generate_variants

    from pipelines.trial import trial_param_space

    def timed(space: dict) -> float:
        t0 = time.perf_counter()
        n = sum(1 for _ in generate_variants(space))
        assert n == len(cfgs), (n, len(cfgs))
        return time.perf_counter() - t0

    rows = []
    for n in counts:
        cfgs = configs(n, steps)
        rows.append((n, timed({"trial": tune.grid_search(cfgs)}), timed(trial_param_space(cfgs))))
    print("\nTune variant generation: driver seconds to make every trial of a sweep")
    print(f"  {'trials':>7}  {'grid of dicts':>14}  {'grid of JSON':>13}  {'ratio':>7}")
    for n, dicts, strings in rows:
        print(f"  {n:>7}  {dicts:>13.3f}s  {strings:>12.3f}s  {dicts / strings:>7.1f}")
    n, dicts, strings = rows[-1]
    print(json.dumps({"trials": n, "dicts_s": round(dicts, 3), "json_s": round(strings, 3),
                      "ratio": round(dicts / strings, 1)}))


def arm_figures(wall: float, done: list[float], work_inside: float, driver_cpu: float, sched: list[list[float]],
                before: tuple[float, list[list[float]]], after: tuple[float, list[list[float]]], slots: int) -> dict:
    """One Tune arm's figures against the mean of the plain arms run just before and just after it."""
    (wall_before, rows_before), (wall_after, rows_after) = before, after
    times_before, times_after = [r[0] for r in rows_before], [r[0] for r in rows_after]
    trials = len(times_before)
    work = (sum(times_before) + sum(times_after)) / 2
    ideal = work / slots
    mean_work = work / trials
    # steady state: once every slot has finished a trial (actors started, imports done), each further trial
    # costs slots * (time between completions); what exceeds the work is per-trial overhead
    k = min(slots, len(done) - 1)
    steady_per_trial = slots * (done[-1] - done[k - 1]) / (len(done) - k) if len(done) > k >= 1 else float("nan")
    return {"ratio": wall / ideal, "overhead": (wall - ideal) * slots / trials, "wall": wall, "ideal": ideal,
            "work": work, "work_before": sum(times_before), "work_after": sum(times_after),
            "median_trial": statistics.median(times_before + times_after),
            "plain_wall": (wall_before + wall_after) / 2,
            "startup": done[k - 1] - mean_work if k >= 1 else float("nan"),
            "steady_overhead": steady_per_trial - mean_work,
            # against the work as timed inside the Tune arm: immune to load drifting between the two arms
            "work_inside": work_inside, "ratio_inside": wall / (work_inside / slots),
            "overhead_inside": (wall * slots - work_inside) / trials, "driver_cpu": driver_cpu,
            # a trial thread's own CPU run and run-queue wait, mean per trial: plain before / Tune / plain after
            **{key: [statistics.fmean(r[col] for r in rows) if rows else math.nan
                     for rows in (rows_before, sched, rows_after)] for col, key in ((1, "cpu"), (2, "rq_wait"))}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--work-s", type=float, default=1.0, help="target work per trial (seconds)")
    ap.add_argument("--steps", type=int, default=None,
                    help="fixed training steps per trial, a multiple of 10 (skips calibration)")
    ap.add_argument("--slots", type=int, default=None, help="concurrent trials (default: the CPUs Ray sees)")
    ap.add_argument("--num-cpus", type=int, default=None, help="CPUs for the local Ray (default: all)")
    ap.add_argument("--mlflow", action="store_true", help="log every trial to MLflow in both arms")
    ap.add_argument("--report-each-epoch", action="store_true",
                    help="a Tune report after every epoch (the sweep's path with --asha)")
    ap.add_argument("--serial", action="store_true",
                    help="also time the trials one after another in this process (work with no concurrency)")
    ap.add_argument("--variants", default=None, metavar="N,N,...",
                    help="only time Tune's trial generation for sweeps of these sizes, dicts vs JSON configs")
    ap.add_argument("--repeats", type=int, default=1,
                    help="Tune arms, each between two plain arms; the headline is the median repeat (default 1)")
    ap.add_argument("--grid", choices=("json", "dicts"), default="json",
                    help="how the Tune arm hands Tune the trial list: json (the sweep's way) or dicts (before 20eba1e)")
    ap.add_argument("--plain-worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.plain_worker:
        return plain_worker(args.plain_worker)
    if args.repeats < 1:
        ap.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.variants:
        return variant_costs([int(n) for n in args.variants.split(",")], args.steps or 110)

    import logging

    import ray
    import torch

    torch.set_num_threads(1)
    steps = args.steps or calibrate(args.work_s)
    cfgs = configs(args.trials, steps)
    slots = args.slots or args.num_cpus or os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="weit-overhead-") as tmp:
        tracking = lambda label: None  # noqa: E731 -- MLflow off: no parent run per arm
        if args.mlflow:
            import mlflow

            from pipelines.tracking import prepare_mlflow

            uri, exp_id = prepare_mlflow(f"sqlite:///{tmp}/mlruns.db", "overhead")
            client = mlflow.MlflowClient(uri)
            # a parent run per arm: under one parent a trial already logged would be replayed, not re-run
            tracking = lambda label: (uri, exp_id, client.create_run(exp_id).info.run_id, label)  # noqa: E731

        serial = [r[0] for r in plain_loop(cfgs, tracking("serial"))] if args.serial else None
        # plain, Tune, plain, Tune, ..., plain: each Tune arm is set against the plain arms on either side, so a
        # machine whose speed drifts biases no repeat either way; the headline is the median repeat
        plain = [plain_side_by_side(cfgs, slots, tracking("plain-0"), tmp)]
        figs = []
        for r in range(args.repeats):
            ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False,
                     log_to_driver=False, logging_level=logging.WARNING)
            logging.getLogger("ray.tune").setLevel(logging.WARNING)
            logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)  # no result files
            tune_out = tune_arm(cfgs, slots, tracking(f"tune-{r}"), f"{tmp}/tune{r}", args.report_each_epoch, args.grid)
            ray.shutdown()
            plain.append(plain_side_by_side(cfgs, slots, tracking(f"plain-{r + 1}"), tmp))
            figs.append(arm_figures(*tune_out, plain[r], plain[r + 1], slots))

    pick = sorted(range(len(figs)), key=lambda r: figs[r]["ratio"])[(len(figs) - 1) // 2]  # the (lower) median
    f = figs[pick]
    reports = cfgs[0]["epochs"] if args.report_each_epoch else 1
    print("\nsweep overhead: Ray Tune vs plain loops over the same trials, at the same concurrency")
    setup = [("trials", f"{len(cfgs)}"), ("training steps per trial", f"{steps}"),
             ("epochs per trial / Tune reports per trial", f"{cfgs[0]['epochs']} / {reports}"),
             ("slots (concurrent trials)", f"{slots}"), ("repeats (Tune arms, each between two plain arms)",
                                                         f"{args.repeats}"),
             ("trial list handed to Tune as a grid of", args.grid), ("MLflow logging in both arms", str(args.mlflow)),
             ("CPUs on this machine / load avg (1 min)", f"{os.cpu_count()} / {os.getloadavg()[0]:.1f}")]
    per_repeat = [
        ("plain: work per trial, side by side (median)", lambda f: f"{f['median_trial']:.3f} s"),
        ("plain: work total (1 thread each), before / after",
         lambda f: f"{f['work_before']:.1f} / {f['work_after']:.1f} s"),
        ("plain: work total, mean of the two", lambda f: f"{f['work']:.2f} s"),
        ("plain: wall, incl. process start + imports (mean)", lambda f: f"{f['plain_wall']:.2f} s"),
        ("ideal wall = work / slots", lambda f: f"{f['ideal']:.2f} s"),
        ("Tune wall (Tuner.fit)", lambda f: f"{f['wall']:.2f} s"),
        ("ratio Tune / ideal", lambda f: f"{f['ratio']:.3f}"),
        ("per-trial overhead (slot-seconds)", lambda f: f"{f['overhead']:.3f} s"),
        ("  of which start-up (first trial on every slot)", lambda f: f"{f['startup']:.2f} s"),
        ("  steady-state overhead per trial (after start-up)", lambda f: f"{f['steady_overhead']:.3f} s"),
        ("ratio Tune wall / plain wall (both incl. start-up)", lambda f: f"{f['wall'] / f['plain_wall']:.3f}"),
        ("work total as timed inside Tune (time_total_s)", lambda f: f"{f['work_inside']:.2f} s"),
        ("ratio Tune / (work inside Tune / slots)", lambda f: f"{f['ratio_inside']:.3f}"),
        ("per-trial overhead vs work inside Tune", lambda f: f"{f['overhead_inside']:.3f} s"),
        ("trial's CPU run, mean: plain before / Tune / after",
         lambda f: " / ".join(f"{1000 * x:.0f}" for x in f["cpu"]) + " ms"),
        ("trial's run-queue wait, mean: before / Tune / after",
         lambda f: " / ".join(f"{1000 * x:.1f}" for x in f["rq_wait"]) + " ms"),
        ("Tune driver CPU during the fit (total / per trial)",
         lambda f: f"{f['driver_cpu']:.2f} s / {1000 * f['driver_cpu'] / len(cfgs):.1f} ms")]
    width = max(len(k) for k, _ in setup + per_repeat)
    cols = [f"repeat {r + 1}" + (" *" if r == pick and len(figs) > 1 else "") for r in range(len(figs))]
    for k, v in setup:
        print(f"  {k:<{width}}  {v:>24}")
    print(f"  {'':<{width}}" + "".join(f"  {c:>24}" for c in cols))
    for k, fmt in per_repeat:
        print(f"  {k:<{width}}" + "".join(f"  {fmt(x):>24}" for x in figs))
    if serial is not None:
        print(f"  {'serial: work total, one trial at a time':<{width}}  {sum(serial):>22.2f} s")
        print(f"  {'ratio Tune / (serial work / slots)':<{width}}  {f['wall'] / (sum(serial) / slots):>24.3f}")
    which = f"the median of {len(figs)} repeats (*)" if len(figs) > 1 else "one repeat"
    verdict = "meets" if f["ratio"] <= 1.10 and f["overhead"] <= 0.1 else "misses"
    print(f"  goal ratio <= 1.10 and overhead <= 0.1 s, {which}: {verdict}"
          f" ({sum(x['ratio'] <= 1.10 and x['overhead'] <= 0.1 for x in figs)} of {len(figs)} repeats meet it)")
    out = {"ratio": round(f["ratio"], 4), "per_trial_overhead_s": round(f["overhead"], 4), "trials": len(cfgs),
           "slots": slots, "repeats": len(figs), "work_per_trial_s": round(f["work"] / len(cfgs), 4),
           "tune_wall_s": round(f["wall"], 2), "ideal_wall_s": round(f["ideal"], 2),
           "plain_wall_s": round(f["plain_wall"], 2), "plain_work_before_s": round(f["work_before"], 2),
           "plain_work_after_s": round(f["work_after"], 2),
           "ratio_vs_plain_wall": round(f["wall"] / f["plain_wall"], 4),
           "startup_s": round(f["startup"], 2), "steady_overhead_per_trial_s": round(f["steady_overhead"], 4),
           "ratio_vs_inside_work": round(f["ratio_inside"], 4),
           "overhead_vs_inside_work_s": round(f["overhead_inside"], 4),
           "driver_cpu_s": round(f["driver_cpu"], 2),
           "trial_cpu_s": [round(x, 4) for x in f["cpu"]], "trial_rq_wait_s": [round(x, 4) for x in f["rq_wait"]],
           "grid": args.grid, "mlflow": args.mlflow,
           "report_each_epoch": args.report_each_epoch, "load_avg_1m": round(os.getloadavg()[0], 2)}
    if len(figs) > 1:
        out["ratios"] = [round(x["ratio"], 4) for x in figs]
        out["per_trial_overheads_s"] = [round(x["overhead"], 4) for x in figs]
    if serial is not None:
        out["ratio_vs_serial_work"] = round(f["wall"] / (sum(serial) / slots), 4)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
