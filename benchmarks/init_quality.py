"""Does a WAVE init beat honest controls and the inheritance baselines? docs/design.md "The evaluation protocol".

For every (size, strategy, seed) job: build the init once (stage 2 for wave-like strategies and scratch_fit,
all on the same subset and step budget), then train a copy of it for each stage-3 budget and learning rate
with the one recipe every strategy gets (AdamW, warm-up then cosine over that budget), scoring a fixed
validation and test subset at the end of each run. The summary picks each strategy's learning rate per
(size, budget) on validation and reports test for that choice, so no init is judged by a recipe that suits
another. Results are appended to a JSONL file, one line per finished job: the benchmark runs in parts
(``--part 2/5``), survives interruption and resumes by skipping finished jobs.

    python benchmarks/init_quality.py --bank BANK --ancestry ANCESTRY --out results.jsonl [--part i/k]
    python benchmarks/init_quality.py --out results.jsonl --summarize      # tables + JSON only

Strategies are labels: a registered name, optionally with options, ``wave{head_steps=50;fit_teacher=ancestry}``;
``bank=NAME`` picks a bank given as ``--extra-bank NAME=PATH``. The summary ranks every label; the shares in
the last JSON line compare ``--wave`` (default ``wave``) with each baseline and control.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # parts run side by side: no spinning OpenMP threads

import torch  # noqa: E402

from weit_core.data import load_dataset  # noqa: E402
from weit_core.io import load_bank, load_model  # noqa: E402
from weit_core.models import ViTSpec, get_family  # noqa: E402
from weit_core.stage3 import Recipe, init_target, score, train_target  # noqa: E402
from weit_core.strategies import available, can_make, strategy_info  # noqa: E402
from weit_core.train import cycle_batches  # noqa: E402

# 12 sizes: depth 2-12 at widths 64 / 96 / 128; 8x96x3, 12x96x3, 2x128x4 and 4x128x4 are deeper or wider
# than the 6x96x3 ancestry.
SIZES = [(2, 64, 2), (2, 128, 4), (4, 64, 2), (4, 96, 3), (4, 128, 4), (6, 64, 2), (6, 96, 3), (8, 64, 2),
         (8, 96, 3), (10, 64, 2), (12, 64, 2), (12, 96, 3)]
CONTROLS = ("scratch", "scratch_fit", "wave_random_bank")
BASELINES = ("weight_selection", "net2net", "tleg_fit")


def parse_sizes(text: str) -> list[tuple[int, int, int]]:
    return [tuple(int(v) for v in s.split("x")) for s in text.split(",")] if text else SIZES


def parse_part(text: str) -> tuple[int, int]:
    """``i/k``: run the jobs whose index is i-1 modulo k, so k processes side by side split the list."""
    try:
        i, k = (int(v) for v in text.split("/"))
    except ValueError:
        i = k = 0
    if not 1 <= i <= k:
        raise SystemExit(f"--part must be i/k with 1 <= i <= k (e.g. --part 2/3), got {text!r}")
    return i, k


def parse_label(label: str) -> tuple[str, dict]:
    """``name{k=v;k2=v2}`` -> (name, options); numbers and true/false are converted."""
    name, _, rest = label.partition("{")
    opts: dict = {}
    for item in filter(None, rest.rstrip("}").split(";")):
        k, _, v = item.partition("=")
        for conv in (int, float):
            try:
                v = conv(v)
                break
            except ValueError:
                continue
        opts[k.strip()] = {"true": True, "false": False}.get(v, v) if isinstance(v, str) else v
    return name, opts


def base_name(label: str) -> str:
    return parse_label(label)[0]


def run_job(size, label, seed, *, data, banks, ancestry, args) -> dict:
    """One (size, strategy, seed): the init once (``weit_core.stage3.init_target``, as a sweep trial makes
    it), then a copy of it trained by ``train_target`` for each lr x budget (``budget`` steps over an endless
    shuffled stream, the schedule over exactly those steps) and scored on the fixed val and test subsets."""
    depth, width, heads = size
    c, h, _ = data.input_shape
    spec = ViTSpec(depth=depth, width=width, heads=heads, patch=args.patch, img_size=h, in_chans=c,
                   num_classes=data.num_classes)
    name, opts = parse_label(label)
    bank_name = opts.pop("bank", "default")
    if banks and bank_name not in banks:
        raise SystemExit(f"{label}: no bank {bank_name!r}; give it with --extra-bank {bank_name}=PATH")
    res = init_target(name, spec, data.train, seed=seed, fit_examples=args.fit_examples,
                      bank=banks.get(bank_name), ancestry=ancestry,
                      **{"fit_steps": args.fit_steps, "fit_lr": args.fit_lr, "device": args.device, **opts})
    vs = data.val.subset(args.val_examples, seed=54321)  # the same images for every job
    ts = data.test.subset(args.test_examples, seed=12345)
    model0 = res.model.to(args.device)
    init = {split: score(model0, d, device=args.device)["acc"] for split, d in (("val", vs), ("test", ts))}
    runs = []
    for lr in args.lrs:
        for budget in args.budgets:
            recipe = Recipe(lr, batch_size=args.batch_size, weight_decay=args.weight_decay, schedule=args.schedule,
                            warmup=args.warmup, seed=seed)
            stream = cycle_batches(data.train.x, data.train.y, args.batch_size, seed=seed * 1000)
            (last,) = train_target(copy.deepcopy(model0), data.train, vs, recipe, test=ts, device=args.device,
                                   score_init=False, batches=lambda _epoch, s=stream: s, steps_per_epoch=budget)
            runs.append({"lr": lr, "budget": budget, "val": last["val_acc"], "test": last["test_acc"]})
    return {"size": f"{depth}x{width}x{heads}", "strategy": label, "seed": seed, "data": data.name,
            "init": init, "runs": runs, "init_seconds": round(res.info["init_seconds"], 2), "params": spec.num_params(),
            "info": {k: v for k, v in res.info.items() if isinstance(v, str | int | float | bool)},
            "steps_per_epoch": len(data.train) // args.batch_size, "recipe": {
                "schedule": args.schedule, "warmup": args.warmup, "batch_size": args.batch_size,
                "weight_decay": args.weight_decay, "fit_steps": args.fit_steps, "fit_lr": args.fit_lr,
                "fit_examples": args.fit_examples}}


# ------------------------------------------------------------------------------------------ summary


def load_ancestry(path: str | None) -> tuple | None:
    """``(model, spec)`` of an ancestry file, its spec read by the family the file names."""
    if not path:
        return None
    model, header = load_model(path)
    return model, get_family(header.get("family", "vit")).spec_from_dict(header["spec"])


def done_jobs(path: Path) -> set[tuple]:
    """``(size, strategy, seed)`` of the rows a results file already holds (a rerun skips them)."""
    if not path.exists():
        return set()
    rows = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return {(r["size"], r["strategy"], r["seed"]) for r in rows}


def add_recipe_args(ap: argparse.ArgumentParser, *, batch_size: int, fit_examples: int) -> None:
    """The stage-2 and stage-3 settings of the per-family protocols (``convnext_protocol.py``,
    ``task_protocol.py``): one stage-3 peak learning rate for every strategy, warm-up then cosine."""
    ap.add_argument("--batch-size", type=int, default=batch_size)
    ap.add_argument("--lr", type=float, default=1e-3, help="the one stage-3 peak learning rate")
    ap.add_argument("--warmup", type=float, default=0.1)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--fit-steps", type=int, default=100)
    ap.add_argument("--fit-lr", type=float, default=1e-3)
    ap.add_argument("--fit-examples", type=int, default=fit_examples)


def run_jobs(out: Path, jobs: list[tuple], part: str, ancestry: tuple | None, run, show) -> None:
    """Run ``jobs`` (``(name, spec, label, seed, size)``) of part ``i/k`` that ``out`` does not hold yet: a row
    per job (``run(size, label, seed)``, or why the strategy cannot make the size) appended as it finishes,
    ``show(row)`` printed."""
    i, k = parse_part(part)
    done = done_jobs(out)
    for name, spec, lab, seed, size in jobs[i - 1::k]:
        if (name, lab, seed) in done:
            continue
        why = can_make(base_name(lab), spec, ancestry_spec=ancestry[1] if ancestry else None)
        t0 = time.perf_counter()
        row = {"size": name, "strategy": lab, "seed": seed, "skipped": why} if why else run(size, lab, seed)
        row["wall_seconds"] = round(time.perf_counter() - t0, 1)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{name} {lab} {seed}: {row.get('skipped', '')} {show(row)} ({row['wall_seconds']} s)", flush=True)


def _rows(path: Path) -> tuple[list[dict], list[tuple]]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    skipped = sorted({(r["size"], r["strategy"], r["skipped"]) for r in rows if "skipped" in r})
    rows = [r for r in rows if "skipped" not in r]
    for r in rows:  # the first protocol's rows: one fixed LR, test accuracy at checkpoints of one run
        if "curve" in r and "runs" not in r:
            r["runs"] = [{"lr": None, "budget": int(k), "test": v} for k, v in r["curve"].items() if int(k) > 0]
    return rows, skipped


def cell_stats(rows: list[dict], budgets: list[int]) -> dict:
    """(size, label, budget) -> {lr, mean, std, n, val, lrs}: test at the LR with the best mean val."""
    by: dict[tuple, dict] = {}
    for r in rows:
        if "init" in r:  # budget 0: right after initialization (stage 2 included), no stage-3 step
            by.setdefault((r["size"], r["strategy"], 0), {}).setdefault(None, []).append(r["init"])
        for run in r["runs"]:
            by.setdefault((r["size"], r["strategy"], run["budget"]), {}).setdefault(run["lr"], []).append(run)
    out = {}
    for (size, label, budget), per_lr in by.items():
        if budget not in budgets:
            continue

        def val_of(runs: list[dict]) -> float:
            vals = [x["val"] for x in runs if "val" in x]
            return statistics.mean(vals) if vals else statistics.mean(x["test"] for x in runs)

        lr = max(per_lr, key=lambda k: val_of(per_lr[k]))
        tests = [x["test"] for x in per_lr[lr]]
        out[(size, label, budget)] = {
            "lr": lr, "mean": statistics.mean(tests), "std": statistics.stdev(tests) if len(tests) > 1 else 0.0,
            "n": len(tests), "val": val_of(per_lr[lr]), "lrs": len(per_lr)}
    return out


def summarize(path: Path, budgets: list[int], wave: str = "wave", epoch_budget: int | None = None) -> dict:
    rows, skipped = _rows(path)
    cells = cell_stats(rows, [0, *budgets])
    sizes = sorted({s for s, _, _ in cells}, key=lambda s: tuple(int(v) for v in s.split("x")))
    labels = sorted({lab for _, lab, _ in cells}, key=lambda s: (s != wave, not s.startswith("wave"), s))
    spe = rows[0].get("steps_per_epoch", 1) if rows else 1
    epoch_budget = epoch_budget or min(budgets, key=lambda b: abs(b - spe))
    print(f"\nstage-3 test accuracy (%), mean ± std over seeds at each strategy's best LR on val (lr); "
          f"steps/epoch = {spe}")
    print(f"{'size':<10}{'steps':>6} " + "".join(f"{lab[:24]:>26}" for lab in labels) + f"{'match x':>9}")
    share = {f"vs_{b}": [0, 0] for b in BASELINES}
    share.update(leads_controls=[0, 0], random_bank_plus2_at_epoch=[0, 0])
    for size in sizes:
        for b in [0, *budgets]:
            if not any((size, lab, b) in cells for lab in labels):  # a budget (or the init) this size lacks
                continue
            row, means = [], {}
            for lab in labels:
                v = cells.get((size, lab, b))
                if v is None:
                    row.append(f"{'-':>26}")
                    continue
                means[lab] = v["mean"]
                lr = "" if v["lr"] is None else f" {v['lr']:.0e}"
                row.append(f"{100 * v['mean']:>11.2f} ± {100 * v['std']:4.2f}{lr:>7}")
            match = ""
            if wave in means and b > 0:
                for base in BASELINES:
                    if base in means:
                        share[f"vs_{base}"][1] += 1
                        share[f"vs_{base}"][0] += means[wave] >= means[base]
                controls = [c for c in CONTROLS if c in means]
                if controls:
                    share["leads_controls"][1] += 1
                    share["leads_controls"][0] += all(means[wave] > means[c] for c in controls)
                    best = max(controls, key=lambda c: means[c])
                    match = budgets_to_match(cells, size, best, means[wave], b, budgets)
                if b == epoch_budget and "wave_random_bank" in means:
                    share["random_bank_plus2_at_epoch"][1] += 1
                    share["random_bank_plus2_at_epoch"][0] += means[wave] >= means["wave_random_bank"] + 0.02
            print(f"{size:<10}{b:>6} " + "".join(row) + f"{match:>9}")
    for size, strat, why in skipped:
        print(f"n/a: {strat} at {size}: {why}")
    print()
    for k, (won, n) in share.items():
        print(f"{wave} {k.replace('_', ' ')}: {won}/{n} cells")
    result = {k: (round(won / n, 3) if n else None) for k, (won, n) in share.items()}
    result.update(cells={k: n for k, (_, n) in share.items()}, jobs=len(rows), sizes=len(sizes), wave=wave,
                  epoch_budget=epoch_budget)
    return result


def budgets_to_match(cells: dict, size: str, label: str, target: float, budget: int, budgets: list[int]) -> str:
    """Smallest budget at which ``label`` reaches ``target``, as a multiple of ``budget``."""
    for b in sorted(budgets):
        v = cells.get((size, label, b))
        if v is not None and v["mean"] >= target:
            return f"{b / budget:.1f}"
    return f">{max(budgets) / budget:.1f}"


# ------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bank", help="weit bank (safetensors) made from a well-trained ancestry")
    ap.add_argument("--extra-bank", action="append", default=[], metavar="NAME=PATH",
                    help="another bank, used by labels with bank=NAME")
    ap.add_argument("--ancestry", help="the ancestry model (weit model safetensors), for the baselines")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--data", default="fashion_mnist", help="fashion_mnist, digits28, or a parquet path")
    ap.add_argument("--patch", type=int, default=4)
    ap.add_argument("--sizes", default="", help="e.g. 2x64x2,4x96x3 (default: 12 sizes, depth 2-12)")
    ap.add_argument("--strategies", default="wave,wave_random_bank,scratch_fit,scratch,weight_selection,net2net,"
                    "tleg_fit", help="labels; pairs a strategy cannot make are recorded as n/a")
    ap.add_argument("--val-examples", type=int, default=2000)
    ap.add_argument("--test-examples", type=int, default=2000)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--budgets", default="100,430,860", help="stage-3 steps; each budget is its own run")
    ap.add_argument("--lrs", default="1e-3", help="stage-3 peak learning rates to choose from on val")
    ap.add_argument("--schedule", default="cosine", choices=("cosine", "constant"))
    ap.add_argument("--warmup", type=float, default=0.1, help="warm-up, a fraction of each run's steps")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--fit-steps", type=int, default=100)
    ap.add_argument("--fit-lr", type=float, default=1e-3)
    ap.add_argument("--fit-examples", type=int, default=2000)
    ap.add_argument("--part", default="1/1", help="run only every k-th job, offset i (i/k)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--wave", default="wave", help="the label the summary's shares are about")
    ap.add_argument("--summarize", action="store_true")
    args = ap.parse_args(argv)
    args.budgets = [int(b) for b in args.budgets.split(",")]
    args.lrs = [float(v) for v in args.lrs.split(",")]
    i, k = parse_part(args.part)
    if not args.summarize:
        torch.set_num_threads(args.threads)
        labels = args.strategies.split(",")
        unknown = {base_name(lab) for lab in labels} - set(available())
        if unknown:
            raise SystemExit(f"unknown strategies {sorted(unknown)}; available: {available()}")
        needs = {n for lab in labels for n in strategy_info(base_name(lab)).needs}
        if "bank" in needs and not args.bank:
            raise SystemExit("--bank is required for wave / wave_random_bank")
        if "ancestry" in needs and not args.ancestry:
            raise SystemExit("--ancestry is required for the ancestry-based baselines (or drop them)")
        data = load_dataset(args.data)
        banks = {}
        if args.bank:
            banks["default"] = load_bank(args.bank)
        for item in args.extra_bank:
            name, _, path = item.partition("=")
            banks[name] = load_bank(path)
        ancestry = load_ancestry(args.ancestry)
        done = done_jobs(args.out)
        # seed-major: a run cut short has every size and strategy at the first seeds
        jobs = [(size, lab, int(seed)) for seed in args.seeds.split(",") for size in parse_sizes(args.sizes)
                for lab in labels]
        jobs = [j for n, j in enumerate(jobs) if n % k == i - 1]
        c, h, _ = data.input_shape
        for size, lab, seed in jobs:
            key = ("x".join(map(str, size)), lab, seed)
            if key in done:
                continue
            spec = ViTSpec(depth=size[0], width=size[1], heads=size[2], patch=args.patch, img_size=h, in_chans=c,
                           num_classes=data.num_classes)
            why = can_make(base_name(lab), spec, ancestry_spec=ancestry[1] if ancestry else None)
            if why is not None:
                row = {"size": key[0], "strategy": lab, "seed": seed, "skipped": why}
                with args.out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(f"{key}: n/a ({why})", flush=True)
                continue
            t0 = time.perf_counter()
            row = run_job(size, lab, seed, data=data, banks=banks, ancestry=ancestry, args=args)
            row["wall_seconds"] = round(time.perf_counter() - t0, 1)
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            best = " ".join(f"{r['budget']}@{r['lr']:.0e}:{100 * r['test']:.1f}" for r in row["runs"])
            print(f"{key}: init {100 * row['init']['test']:.1f} {best}  ({row['wall_seconds']} s)", flush=True)
    print(json.dumps(summarize(args.out, args.budgets, args.wave)))


if __name__ == "__main__":
    main()
