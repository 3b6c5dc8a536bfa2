"""A space whose tasks each name their own bank and ancestry (a policy's serve one environment): the keys in
the schema, a missing file as one line naming the task, each task's sizes kept by its own bank's block and
judged against its own ancestry, and a sweep whose every trial draws on, and records, its own task's files."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from weit_core.space import SpaceError, load_space, parse_space

ROOT = Path(__file__).resolve().parent.parent
CARTPOLE_IO = {"obs_dim": 4, "act_dim": 2, "discrete": True, "context": 4, "num_classes": 2}


def _assets(d: Path) -> dict[str, Path]:
    """Two untrained CartPole policy banks of different blocks (16: width 24 untileable; 8: it tiles) and two
    ancestries (2x32x2 makes every size by selection; 1x16x1 none wider than 16)."""
    from weit_core.io import save_model
    from weit_core.models.policy import POLICY
    from weit_core.stage1 import build_elastic, save_elastic

    def spec(depth: int, width: int, heads: int, mlp: float = 2.0):
        return POLICY.spec_for({"depth": depth, "width": width, "heads": heads, "mlp_ratio": mlp}, CARTPOLE_IO)

    d.mkdir(parents=True, exist_ok=True)
    for name, ref, block in (("bank16", spec(1, 32, 2), 16), ("bank8", spec(1, 24, 1), 8)):
        save_elastic(d / f"{name}.safetensors", build_elastic(POLICY, ref, n=2, block=block), {}, [ref])
    for name, s in (("anc_big", spec(2, 32, 2)), ("anc_small", spec(1, 16, 1))):
        save_model(d / f"{name}.safetensors", POLICY.build(s), s, {})
    return {p.stem: p for p in d.glob("*.safetensors")}


def _space(d: Path, extra_task: str = "", **training) -> Path:
    """Two CartPole tasks (same data, so one load), each with its own files named relative to the space."""
    settings = {"epochs": 1, "batch_size": 64, "lr": 0.003, "steps_per_epoch": 3, "fit_steps": 2,
                "fit_examples": 64, "eval_batch_size": 256, "test_eval": False, **training}
    (d / "spaces").mkdir(exist_ok=True)
    path = d / "spaces" / "two.yaml"
    path.write_text(f"""
name: two_banks
family: policy
tasks:
  - {{name: cp_a, task: "control:CartPole-v1", limit: 300, val_limit: 64,
     bank: ../assets/bank16.safetensors, ancestry: ../assets/anc_big.safetensors}}
  - {{name: cp_b, task: "control:CartPole-v1", limit: 300, val_limit: 64,
     bank: ../assets/bank8.safetensors, ancestry: {d / "assets" / "anc_small.safetensors"}}}
{extra_task}strategies: [scratch, wave, weight_selection]
sizes: {{depth: [1], width: [16, 24], heads: [1], mlp_ratio: [2]}}
training: {json.dumps(settings)}
""")
    return path


# ------------------------------------------------------------------------------------------ schema


def test_bank_and_ancestry_keys_resolve_against_the_space_file_and_typos_are_still_errors(tmp_path):
    _assets(tmp_path / "assets")
    space = load_space(_space(tmp_path))
    a, b = space.tasks
    assert a.bank == str(tmp_path / "assets" / "bank16.safetensors")  # relative: to the space file's folder
    assert b.ancestry == str(tmp_path / "assets" / "anc_small.safetensors")  # absolute: as given
    assert "bank" not in a.data_key()  # a trial's key (and so resuming older sweeps) does not see it

    base = "tasks: [{data: digits, %s}]\nstrategies: [scratch]\nsizes: {depth: 1, width: 16, heads: 2}\n"
    assert parse_space(base % "bank: b.safetensors", base_dir=tmp_path).tasks[0].bank == str(tmp_path / "b.safetensors")
    for task, match in (("banks: b.safetensors", r"unknown key 'banks' in tasks\[0\]; did you mean 'bank'\?"),
                        ("ancestor: a.safetensors", r"unknown key 'ancestor' in tasks\[0\]; did you mean 'ancestry'"),
                        ("bank: 3", r"tasks\[0\]\.bank: expected text, got int 3"),
                        ("bank: ' '", r"tasks\[0\]\.bank: expected a file path")):
        with pytest.raises(SpaceError, match=match):
            parse_space(base % task, source="s.yaml")


@pytest.mark.parametrize("kind, command", [("bank", "weit distill --task control:CartPole-v1 --teacher "),
                                           ("ancestry", "weit ancestry --task control:CartPole-v1 --out ")])
def test_a_tasks_missing_file_is_one_line_naming_the_task_the_path_and_the_command(tmp_path, kind, command):
    from weit_core.trials import load_task_sources

    files = _assets(tmp_path / "assets")
    files[{"bank": "bank8", "ancestry": "anc_small"}[kind]].unlink()
    with pytest.raises(SpaceError) as e:
        load_task_sources(load_space(_space(tmp_path)))
    msg, gone = str(e.value), tmp_path / "assets" / ("bank8" if kind == "bank" else "anc_small")
    assert "\n" not in msg and f"task 'cp_b': {kind} {gone}.safetensors not found" in msg and command in msg, msg


def test_the_shipped_control_space_names_each_environments_files(tmp_path, capsys):
    """control.yaml: Acrobot and Pendulum on their shipped files, each expanded by its own; Hopper's are the
    user's to make, and until they are `weit sweep` stops in one line saying how, before any store or Ray."""
    from pipelines.cli import main
    from weit_core.trials import expand, load_task_sources

    space = load_space(ROOT / "tune_spaces" / "control.yaml")
    assert [t.task for t in space.tasks] == ["control:Acrobot-v1", "control:Pendulum-v1", "control:Hopper-v5"]
    if not Path(space.tasks[2].ancestry).is_file():  # not made on this machine yet
        assert main(["sweep", "--space", str(ROOT / "tune_spaces" / "control.yaml"), "--storage", str(tmp_path / "t"),
                     "--mlflow-uri", f"sqlite:///{tmp_path / 'db'}"]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert re.search(r"task 'hopper': ancestry .*control_hopper_ancestry\.safetensors not found; make it with "
                         r"`weit ancestry --task control:Hopper-v5", line), line
        assert not list(tmp_path.iterdir())
    head, rest = space.text.split("  - name: hopper")
    shipped = parse_space(head + rest[rest.index("strategies:"):], base_dir=ROOT / "tune_spaces")  # no Hopper
    sources = load_task_sources(shipped)
    assert {t: s["bank"].path for t, s in sources.of_task.items()} == {
        t: str(ROOT / "docs" / "data" / f"control_{t}_bank.safetensors") for t in ("acrobot", "pendulum")}
    io = {"acrobot": {"obs_dim": 6, "act_dim": 3, "discrete": True}, "pendulum": {"obs_dim": 3, "act_dim": 1,
                                                                                  "discrete": False}}
    shapes = {t: {**v, "context": 4, "num_classes": v["act_dim"]} for t, v in io.items()}
    exp = expand(shipped, shapes, sources.bank_blocks(), sources.ancestry_specs())
    assert exp.sizes_valid == {"acrobot": 12, "pendulum": 12} and not exp.pairs_dropped  # heads = width / 16
    assert len(exp.trials) == 2 * 12 * 5 * 2 * 3 == 720


# ------------------------------------------------------------------------------------------ expansion


def test_each_task_is_expanded_by_its_own_bank_and_ancestry_and_files_are_read_once(tmp_path):
    from weit_core.trials import expand, file_sha256, load_task_sources

    files = _assets(tmp_path / "assets")
    third = f"  - {{name: cp_c, task: \"control:CartPole-v1\", ancestry: {files['anc_big']}}}\n"  # --bank's
    space = load_space(_space(tmp_path, third))
    sources = load_task_sources(space, bank=str(files["bank16"]))
    of = {t: {k: s.path for k, s in own.items()} for t, own in sources.of_task.items()}
    assert of == {"cp_a": {"bank": str(files["bank16"]), "ancestry": str(files["anc_big"])},
                  "cp_b": {"bank": str(files["bank8"]), "ancestry": str(files["anc_small"])},
                  "cp_c": {"bank": str(files["bank16"]), "ancestry": str(files["anc_big"])}}
    assert len(sources.files()) == 4  # bank16 (--bank and cp_a's), bank8, anc_big (cp_a's and cp_c's), anc_small
    assert sources.get("cp_a", "bank") is sources.get("cp_c", "bank") and sources.get("cp_c", "bank").flag == "--bank"
    assert sources.params("cp_b") == {"ancestry": str(files["anc_small"]), "bank": str(files["bank8"]),
                                      "ancestry_sha256": file_sha256(files["anc_small"]),
                                      "bank_sha256": file_sha256(files["bank8"])}
    assert sources.bank_blocks() == {"cp_a": 16, "cp_b": 8, "cp_c": 16}

    exp = expand(space, dict.fromkeys(("cp_a", "cp_b", "cp_c"), CARTPOLE_IO), sources.bank_blocks(),
                 sources.ancestry_specs())
    assert exp.dropped_by_task == {"cp_a": {"not_multiple_of_block": 1}, "cp_b": {},
                                   "cp_c": {"not_multiple_of_block": 1}}
    assert exp.pairs_dropped_by_task == {"cp_a": {}, "cp_b": {"larger_than_ancestry": 1}, "cp_c": {}}
    assert exp.dropped == {"not_multiple_of_block": 2} and exp.pairs_dropped == {"larger_than_ancestry": 1}
    assert exp.sizes_valid == {"cp_a": 1, "cp_b": 2, "cp_c": 1}
    per_task = {t: sorted((c["width"], c["strategy"]) for c in exp.trials if c["task"] == t) for t in of}
    assert per_task["cp_b"] == [(16, "scratch"), (16, "wave"), (16, "weight_selection"), (24, "scratch"),
                                (24, "wave")]
    assert len(per_task["cp_a"]) == len(per_task["cp_c"]) == 3
    # one block or ancestry for every task, as the command line gives them, is what it was
    assert dict(expand(space, dict.fromkeys(of, CARTPOLE_IO), 16).dropped) == {"not_multiple_of_block": 3}


def test_a_task_without_a_bank_a_strategy_needs_is_named_before_anything_runs(tmp_path):
    from pipelines.common import UserError
    from pipelines.sweep import run_sweep

    _assets(tmp_path / "assets")
    third = "  - {name: cp_c, task: \"control:CartPole-v1\"}\n"
    db = tmp_path / "mlruns.db"
    with pytest.raises(UserError, match=r"need a template bank and task\(s\) \['cp_c'\] have none; pass --bank "
                                        r".*give the task `bank: FILE` in the space"):
        run_sweep(_space(tmp_path, third), mlflow_uri=f"sqlite:///{db}", storage=str(tmp_path / "tune"), quiet=True)
    assert not db.exists()


# ------------------------------------------------------------------------------------------ the sweep


def test_each_trial_draws_on_and_records_its_own_tasks_bank_and_ancestry(ray_session, mlflow_uri, tmp_path):
    """Two CartPole tasks, two banks of different blocks, two ancestries, on local Ray with a sqlite MLflow:
    every trial finishes (cp_b's wave at width 24 only with its own block-8 bank: cp_a's cannot tile it) and
    records its task's files, the parent records every task's, the drops are counted per task, a trial
    exports, and resuming with a task's bank changed is refused."""
    import mlflow

    from pipelines.common import UserError
    from pipelines.report import export_run
    from pipelines.sweep import run_sweep
    from weit_core.trials import file_sha256

    files = _assets(tmp_path / "assets")
    sha = {k: file_sha256(p) for k, p in files.items()}
    t0 = time.monotonic()
    summary = run_sweep(_space(tmp_path), storage=str(tmp_path / "tune"), mlflow_uri=mlflow_uri, quiet=True,
                        save_models=True)
    wall = time.monotonic() - t0
    assert summary.n_trials == 3 + 5 == summary.n_finished and summary.n_failed == 0
    assert summary.dropped_by_task == {"cp_a": {"not_multiple_of_block": 1}, "cp_b": {}}
    assert summary.pairs_dropped == {"larger_than_ancestry": 1}

    client = mlflow.MlflowClient(mlflow_uri)
    runs = client.search_runs([summary.experiment_id], f"tags.`mlflow.parentRunId` = '{summary.parent_run_id}'")
    own = {"cp_a": ("bank16", "anc_big"), "cp_b": ("bank8", "anc_small")}
    assert len(runs) == summary.n_trials
    for run in runs:
        p = run.data.params
        bank, anc = own[p["task"]]
        assert (p["bank"], p["bank_sha256"]) == (str(files[bank]), sha[bank]), p["task"]
        assert (p["ancestry"], p["ancestry_sha256"]) == (str(files[anc]), sha[anc]), p["task"]
    assert {r.data.params["width"] for r in runs if r.data.params["task"] == "cp_a"} == {"16"}

    parent = client.get_run(summary.parent_run_id).data
    for task, (bank, anc) in own.items():
        assert parent.params[f"bank.{task}"] == str(files[bank]) and parent.params[f"bank_sha256.{task}"] == sha[bank]
        assert parent.params[f"ancestry_sha256.{task}"] == sha[anc]
        assert parent.tags[f"weit.bank_sha256.{task}"] == sha[bank]
    assert parent.params["bank"] == "" and parent.params["dropped.not_multiple_of_block"] == "1"
    dropped = json.loads(Path(client.download_artifacts(summary.parent_run_id, "space/dropped.json",
                                                        str(tmp_path))).read_text())
    assert dropped["dropped_by_task"] == {"cp_a": {"not_multiple_of_block": 1}, "cp_b": {}}
    assert dropped["pairs_dropped_by_task"] == {"cp_a": {}, "cp_b": {"larger_than_ancestry": 1}}

    wave_b = next(r for r in runs if r.data.params["task"] == "cp_b" and r.data.params["strategy"] == "wave"
                  and r.data.params["width"] == "24")
    out, header = export_run(wave_b.info.run_id, tmp_path / "wave_b.safetensors", mlflow_uri=mlflow_uri)
    assert out.is_file() and header["spec"]["width"] == 24

    files["bank8"].write_bytes(files["bank16"].read_bytes())  # cp_b's bank is now another file
    with pytest.raises(UserError, match=r"task 'cp_b''s bank now differs"):
        run_sweep(_space(tmp_path), storage=str(tmp_path / "tune"), mlflow_uri=mlflow_uri, quiet=True, resume=True)
    print(f"two-bank sweep: {summary.n_trials} trials in {wall:.1f}s wall")


def test_the_shipped_dit_space_uses_the_shipped_files_and_each_baseline_where_it_applies():
    """fmnist_dit.yaml: the shipped DiT ancestry (4x64x4) and bank; weight selection keeps the sizes no larger
    than the ancestry, net2net those it can grow to (it never drops a layer), every other init every size."""
    from weit_core.trials import expand, load_task_sources

    space = load_space(ROOT / "tune_spaces" / "fmnist_dit.yaml")
    sources = load_task_sources(space)
    assert sources.of_task["fmnist_gen"]["bank"].path == str(ROOT / "docs" / "data" / "fmnist_dit_bank.safetensors")
    shapes = {"fmnist_gen": {"in_chans": 1, "img_size": 28, "num_classes": 10}}
    exp = expand(space, shapes, sources.bank_blocks(), sources.ancestry_specs())
    made: dict[str, set[str]] = {}
    for t in exp.trials:
        made.setdefault(t["strategy"], set()).add(f"{t['depth']}x{t['width']}")
    every = {f"{d}x{w}" for d in (1, 2, 3, 4) for w in (32, 64, 128)}
    assert made["wave"] == made["wave_random_bank"] == made["scratch"] == every
    assert made["weight_selection"] == {s for s in every if not s.endswith("x128")}
    assert made["net2net"] == {"4x64", "4x128"}  # it only grows: the ancestry's depth, its width or a multiple
    assert len(exp.trials) == (4 * 12 + 8 + 2) * 2 * 3 == 348
