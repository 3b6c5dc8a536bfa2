"""Control as a task: real gymnasium rollouts, expert transitions as parquet, a policy cloned with the one loop
and judged by its return, a bank of policies served at two sizes by ``wave``, and the bad inputs."""

from __future__ import annotations

import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from weit_core.control.envs import MUJOCO_INSTALL, env_info
from weit_core.control.experts import EVAL_EPISODES, EVAL_SEED, cartpole_expert, pendulum_expert
from weit_core.control.rollout import random_actor, run_episodes
from weit_core.control.transitions import FILE, make_expert_dataset

CARTPOLE = "CartPole-v1"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """Experts and references in a fresh cache: nothing a developer's machine already holds is relied on."""
    mp = pytest.MonkeyPatch()
    path = tmp_path_factory.mktemp("weit_cache")
    mp.setenv("WEIT_CACHE", str(path))
    yield path
    mp.undo()


@pytest.fixture(scope="module")
def cartpole_data(cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("cartpole")
    return out, make_expert_dataset(CARTPOLE, out, episodes=12, seed=0)


def _mean_return(env_id, act, episodes=5, seed=0):
    return float(np.mean([e.ret for e in run_episodes(env_id, act, episodes, seed)]))


def test_scripted_experts_are_far_above_random():
    for env_id, expert in ((CARTPOLE, cartpole_expert), ("Pendulum-v1", pendulum_expert)):
        rand = _mean_return(env_id, random_actor(env_info(env_id), 0))
        good = _mean_return(env_id, expert)
        # CartPole's returns are positive (steps survived), Pendulum's negative (cost): compare the gaps
        assert good > rand + 0.5 * abs(rand) + 50, (env_id, good, rand)


def test_vectorized_and_plain_runs_play_the_same_episodes():
    act = random_actor(env_info(CARTPOLE), 3)
    vec = [e.ret for e in run_episodes(CARTPOLE, cartpole_expert, 4, seed=7)]
    plain = [e.ret for e in run_episodes(CARTPOLE, cartpole_expert, 4, seed=7, vectorized=False)]
    assert vec == plain
    # seeds reach the environment: the random policy's episodes differ from each other
    assert len({e.length for e in run_episodes(CARTPOLE, act, 6, seed=0)}) > 1
    # MuJoCo too, with a fixed linear policy (a random one draws its actions in another order per arm)
    w = np.random.default_rng(0).normal(size=(11, 3)) * 0.3
    linear = lambda obs, first: np.tanh(obs @ w)  # noqa: E731
    runs = [[e.ret for e in run_episodes("Hopper-v5", linear, 3, seed=5, vectorized=v, max_episode_steps=30)]
            for v in (True, False)]
    assert runs[0] == pytest.approx(runs[1]) and len(set(runs[0])) == 3


def test_expert_dataset_schema_and_shapes(cartpole_data, cache):
    from weit_core.tasks import get_task

    out, meta = cartpole_data
    table = pq.read_table(out / FILE)
    assert table.column_names == ["episode", "step", "observation", "action", "reward", "terminated", "truncated"]
    assert table.schema.field("observation").type == pa.fixed_shape_tensor(pa.float32(), [4])
    assert table.schema.field("action").type == pa.int64() and len(table) == meta["rows"]
    eps = table.column("episode").to_numpy()
    assert sorted(set(eps)) == list(range(12))
    ends = np.flatnonzero(np.r_[eps[1:] != eps[:-1], True])  # the last row of each episode
    done = table.column("terminated").to_numpy(zero_copy_only=False) | table.column("truncated").to_numpy(
        zero_copy_only=False)
    assert np.flatnonzero(done).tolist() == ends.tolist()
    assert meta["return_mean"] > 5 * meta["reference"]["random_return"]

    data = get_task(f"control:{CARTPOLE}").load(str(out), seed=0)
    assert data.io == {"env_id": CARTPOLE, "obs_dim": 4, "act_dim": 2, "discrete": True, "context": 4,
                       "num_classes": 2}
    sizes = [len(data.train), len(data.val), len(data.test)]
    assert sum(sizes) == meta["rows"] and min(sizes) > 0
    assert data.train.x.shape[1:] == (4, 4) and data.train.y.dtype == torch.int64
    first = (data.train.x[:, :-1] == 0).all(dim=(1, 2))  # an episode's first step: only the current state
    assert 0 < int(first.sum()) < len(data.train)
    assert set(data.train.y.tolist()) == {0, 1}
    limited = get_task(f"control:{CARTPOLE}").load(str(out), limit=100, seed=0)
    assert len(limited.train) == 100
    made = get_task(f"control:{CARTPOLE}").load(None)  # no folder named: the expert's data, made once in the cache
    assert len(made.train) + len(made.val) + len(made.test) > sum(sizes) and len(list(cache.rglob(FILE))) == 1


def test_ray_data_reads_the_transitions(cartpole_data, ray_session):
    out, meta = cartpole_data
    ds = ray_session.data.read_parquet(str(out))
    assert ds.count() == meta["rows"]
    batch = next(iter(ds.iter_batches(batch_size=32, batch_format="numpy")))
    assert batch["observation"].shape == (32, 4) and batch["action"].shape == (32,)


def test_continuous_transitions_carry_vector_actions(cache, tmp_path):
    from weit_core.tasks import get_task

    meta = make_expert_dataset("Pendulum-v1", tmp_path, episodes=4, seed=0, max_episode_steps=40)
    assert pq.read_schema(tmp_path / FILE).field("action").type == pa.fixed_shape_tensor(pa.float32(), [1])
    data = get_task("control:Pendulum-v1").load(str(tmp_path))
    assert data.io["discrete"] is False and "num_classes" not in data.io and meta["rows"] == 160
    assert data.train.y.dtype == torch.float32 and data.train.y.shape[1:] == (1,)
    assert float(data.train.y.abs().max()) <= 1.0  # the policy's [-1, 1], not Pendulum's [-2, 2]


def test_behaviour_cloning_with_the_one_loop_reaches_far_above_random(cartpole_data):
    """A tiny policy cloned for a few hundred steps by ``weit_core.train.fit`` acts like the expert."""
    from weit_core.models import get_family
    from weit_core.tasks import get_task
    from weit_core.train import evaluate, fit, iterate_batches, make_optimizer, seed_everything

    out, _ = cartpole_data
    task = get_task(f"control:{CARTPOLE}")
    assert task.metric == "return_norm" and task.mode == "max" and task.default_family == "policy"
    data = task.load(str(out))
    seed_everything(0)
    model = get_family("policy").spec_for({"depth": 1, "width": 32, "heads": 2}, data.io)
    model = get_family("policy").build(model)
    before = evaluate(model, [], task=task)
    fit(model, lambda ep: iterate_batches(data.train.x, data.train.y, 64, seed=ep), make_optimizer(model, 3e-3),
        epochs=3, task=task, max_steps=100)
    after = evaluate(model, [], task=task)
    assert after["episodes"] == EVAL_EPISODES and set(after) >= {"return_norm", "return_norm_std", "return"}
    assert after["return_norm"] > 60 and after["return_norm"] > before["return_norm"] + 50, (before, after)


def test_a_policy_bank_serves_two_sizes_exactly(cartpole_data, tmp_path):
    """Stage 1 over a range of policy sizes, then ``wave`` at the reference and at a smaller size: each is
    that size of the aux model, output for output (the family's layout, kinds and free-tensor rule at work)."""
    from weit_core.io import load_bank
    from weit_core.models.policy import POLICY
    from weit_core.stage1 import build_elastic, make_bank, save_elastic
    from weit_core.strategies import init_model
    from weit_core.tasks import get_task

    out, _ = cartpole_data
    data = get_task(f"control:{CARTPOLE}").load(str(out))
    ref = POLICY.spec_for({"depth": 2, "width": 32, "heads": 2}, data.io)
    small = POLICY.spec_for({"depth": 1, "width": 16, "heads": 2}, data.io)
    elastic = build_elastic(POLICY, ref, n=4, block=16)
    make_bank(elastic, data.train.x, data.train.y, sizes=[small, ref], epochs=1, max_steps=20, batch_size=64)
    save_elastic(tmp_path / "bank.safetensors", elastic, {}, [small, ref])
    bank = load_bank(tmp_path / "bank.safetensors")
    x = data.val.x[:64]
    for spec in (ref, small):
        model = init_model("wave", spec, bank=bank, fit_steps=0, seed=0).model
        assert sum(p.numel() for p in model.parameters()) == spec.num_params()
        with torch.no_grad():
            torch.testing.assert_close(model.eval().forward_features(x), _aux_features(elastic, spec, x))


def _aux_features(elastic, spec, x):
    """The aux model at ``spec`` as an ordinary policy."""
    from weit_core.models.policy import create_policy

    aux = create_policy(spec)
    aux.load_state_dict({k: v.detach() for k, v in elastic.state_for(spec).items()})
    return aux.eval().forward_features(x)


def test_bad_inputs_are_one_line_errors(cartpole_data, tmp_path, monkeypatch):
    from weit_core.tasks import get_task
    from weit_core.tasks.control import make_control_task

    def one_line(exc_info) -> str:
        msg = str(exc_info.value)
        assert "\n" not in msg and msg
        return msg

    with pytest.raises(ValueError) as e:
        get_task("control:NoSuchEnv-v0")
    assert "unknown environment 'NoSuchEnv-v0'" in one_line(e)

    out, _ = cartpole_data  # CartPole's 4-wide observations offered as Pendulum's (3) in a user's own folder
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "part-0.parquet").write_bytes((out / FILE).read_bytes())
    with pytest.raises(ValueError) as e:
        get_task("control:Pendulum-v1").load(str(tmp_path / "mine"))
    assert "observations are 4 wide, Pendulum-v1 gives 3" in one_line(e)

    monkeypatch.setitem(sys.modules, "mujoco", None)  # a real failing import, as where mujoco is absent
    for call in (lambda: make_control_task("Hopper-v5"), lambda: make_expert_dataset("Walker2d-v5", tmp_path)):
        with pytest.raises(ValueError) as e:
            call()
        assert MUJOCO_INSTALL in one_line(e)


def test_a_trained_expert_round_trips_through_safetensors(cache, tmp_path):
    """A (briefly) trained SB3 expert, rebuilt from its safetensors file, plays exactly the return its header
    recorded at training time."""
    from weit_core.control.experts import load_sb3_expert, train_expert
    from weit_core.io import read_header

    path = train_expert("Acrobot-v1", steps=2048, out=tmp_path / "acrobot.safetensors")
    header = read_header(path, expect_format="weit-expert")
    assert {header["env_id"], header["algorithm"], header["steps"]} == {"Acrobot-v1", "PPO", 2048}
    expert = load_sb3_expert(path)
    rets = [e.ret for e in run_episodes("Acrobot-v1", expert.act, EVAL_EPISODES, EVAL_SEED)]
    assert float(np.mean(rets)) == pytest.approx(header["mean_return"])


def test_weight_selection_makes_policies_from_a_larger_one(cartpole_data):
    """The ViT rule on a policy: at the ancestry's own size the features are the ancestry's; a smaller
    target holds the ancestry's selected rows and columns; a bigger one or another context is refused."""
    from weit_core.models.policy import POLICY, create_policy
    from weit_core.strategies import can_make, init_model
    from weit_core.tasks import get_task

    data = get_task(f"control:{CARTPOLE}").load(str(cartpole_data[0]))
    big = POLICY.spec_for({"depth": 2, "width": 32, "heads": 2}, data.io)
    small = POLICY.spec_for({"depth": 1, "width": 16, "heads": 2}, data.io)
    torch.manual_seed(0)
    ancestry = create_policy(big)
    x = data.val.x[:32]
    same = init_model("weight_selection", big, ancestry=ancestry, ancestry_spec=big, seed=1).model
    with torch.no_grad():
        torch.testing.assert_close(same.eval().forward_features(x), ancestry.eval().forward_features(x))
    assert not torch.equal(same.head.weight, ancestry.head.weight)  # the head is new
    model = init_model("weight_selection", small, ancestry=ancestry, ancestry_spec=big, seed=0).model
    assert model(x).shape == (32, 2)
    idx = torch.arange(16) * 2  # uniform: every other channel of 32
    torch.testing.assert_close(model.state_dict()["state_embed.weight"], ancestry.state_dict()["state_embed.weight"][idx])
    assert can_make("weight_selection", big, ancestry_spec=small) == "larger_than_ancestry"
    other = POLICY.spec_for({"depth": 1, "width": 16, "heads": 2}, {**data.io, "context": 8})
    assert can_make("weight_selection", other, ancestry_spec=big) == "tokens_differ_from_ancestry"


@pytest.mark.slow
def test_mujoco_end_to_end_with_a_briefly_trained_sac_expert(cache, tmp_path):
    """Hopper: a SAC expert trained for a few thousand steps, its transitions, a policy cloned from them and
    scored by rollouts (the numbers are whatever this budget gives; the path is what is checked)."""
    from weit_core.control.experts import cache_dir, train_expert
    from weit_core.models import get_family
    from weit_core.tasks import get_task
    from weit_core.train import evaluate, fit, iterate_batches, make_optimizer

    train_expert("Hopper-v5", steps=3000, out=cache_dir("Hopper-v5") / "expert.safetensors")
    meta = make_expert_dataset("Hopper-v5", tmp_path, episodes=6, seed=0)
    ref = meta["reference"]
    assert ref["expert"]["algorithm"] == "SAC" and ref["expert_return"] > ref["random_return"]
    task = get_task("control:Hopper-v5")
    data = task.load(str(tmp_path))
    assert data.train.x.shape[1:] == (4, 11) and data.train.y.shape[1:] == (3,)
    model = get_family("policy").build(get_family("policy").spec_for({"depth": 1, "width": 32, "heads": 2}, data.io))
    fit(model, lambda ep: iterate_batches(data.train.x, data.train.y, 64, seed=ep), make_optimizer(model, 1e-3),
        epochs=5, task=task)
    out = evaluate(model, [], task=task)
    assert np.isfinite(out["return_norm"]) and out["episodes"] == EVAL_EPISODES


@pytest.mark.parametrize("space, n", [("ci_control.yaml", 16), ("control.yaml", 1080)])
def test_shipped_control_spaces_expand(space, n):
    """The control spaces parse in the current schema and expand, with the io their task's data gives."""
    from pathlib import Path

    from weit_core.space import load_space
    from weit_core.tasks.control import CONTEXT
    from weit_core.trials import expand

    loaded = load_space(Path(__file__).resolve().parents[1] / "tune_spaces" / space)
    assert loaded.family == "policy"
    shapes = {}
    for t in loaded.tasks:
        info = env_info(t.task.split(":", 1)[1])
        shapes[t.name] = {"obs_dim": info.obs_dim, "act_dim": info.act_dim, "discrete": info.discrete,
                          "context": CONTEXT, "num_classes": info.act_dim}
    assert len(expand(loaded, shapes, bank_block=16).trials) == n


def test_rollout_throughput_benchmark_runs_and_checks_its_arms(cache):
    """The benchmark's smoke run: both arms play the same episodes, and stepping environments together is
    faster than one at a time (the policy's forward, not the environment, dominates a CartPole step)."""
    import json
    import os
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "benchmarks/rollout_throughput.py", "--episodes", "8", "--n-envs", "8",
                          "--repeats", "1", "--bc-steps", "100", "--size", "1x32x2"], cwd=root, capture_output=True,
                         text=True, timeout=300, env={**os.environ})
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["same_returns"] and out["arms"][1]["speedup"] > 1.5, out


def test_wave_fits_a_continuous_policy_with_the_tasks_loss(cache, tmp_path):
    """Pendulum's bank serves a smaller size, and stage 2 (the head alone, through its tanh) lowers the
    task's own loss, MSE on actions in [-1, 1], below the unfitted init's."""
    from weit_core.io import load_bank
    from weit_core.models.policy import POLICY
    from weit_core.stage1 import build_elastic, make_bank, save_elastic
    from weit_core.strategies import init_model
    from weit_core.tasks import get_task

    make_expert_dataset("Pendulum-v1", tmp_path / "data", episodes=8, seed=0, max_episode_steps=60)
    task = get_task("control:Pendulum-v1")
    data = task.load(str(tmp_path / "data"))
    ref = POLICY.spec_for({"depth": 2, "width": 32, "heads": 2}, data.io)
    small = POLICY.spec_for({"depth": 1, "width": 16, "heads": 2}, data.io)
    elastic = build_elastic(POLICY, ref, n=4, block=16)
    make_bank(elastic, data.train.x, data.train.y, sizes=[small, ref], epochs=2, batch_size=64, lr=3e-3, task=task)
    save_elastic(tmp_path / "bank.safetensors", elastic, {}, [small, ref])
    bank = load_bank(tmp_path / "bank.safetensors")
    fit = (data.train.x[:256], data.train.y[:256])
    mse = {}
    for steps in (0, 60):
        model = init_model("wave", small, bank=bank, fit_data=fit, fit_steps=steps, fit_lr=3e-3, seed=0, task=task).model
        with torch.no_grad():
            out = model.eval()(data.val.x)
        assert out.abs().max() < 1
        mse[steps] = float(((out - data.val.y) ** 2).mean())
    assert mse[60] < 0.8 * mse[0], mse
