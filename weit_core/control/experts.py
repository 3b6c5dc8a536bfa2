"""Experts that make the demonstration data, and the reference returns a policy's return is normalized by.

A scripted controller where one solves the task (CartPole: a linear rule on angle, angular velocity,
position and velocity; Pendulum: energy pumping, then a PD stabilizer near the top), else a policy trained
once with stable-baselines3 (PPO for Acrobot; SAC for the MuJoCo tasks, under :data:`SB3_STEPS`) and kept
in ``$WEIT_CACHE`` (default ``~/.cache/weit/experts``) as safetensors: the SB3 policy's state_dict, with
env id, algorithm, steps, network and measured return in the JSON header. No offline RL data ships, so these
are the only experts; their returns are what they are on this budget and are recorded, not assumed.

References (D4RL's normalization: 0 = the uniform random policy, 100 = the expert) are measured once per
environment on :data:`EVAL_SEED`'s episodes and cached beside the expert, with the observation mean and std
of the expert's states, which the data and every rollout normalize by.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from weit_core.control.envs import MUJOCO, EnvInfo, check_env_id, env_info, make_env
from weit_core.control.rollout import Actor, random_actor, run_episodes

EXPERT_FORMAT = "weit-expert"
EVAL_SEED = 1_000_000
"""Evaluation episodes start from ``reset(seed=EVAL_SEED + j)``; data episodes from ``seed + j`` (small seeds),
so a policy is never judged on the starts it was cloned from."""
EVAL_EPISODES = 10
SB3_STEPS = {"Acrobot-v1": 100_000, **{e: 30_000 for e in MUJOCO}}
"""Environment steps an SB3 expert trains for (CPU, one thread): modest on purpose, returns reported as measured."""
NET_ARCH = {"PPO": [64, 64], "SAC": [256, 256]}


def cache_dir(env_id: str | None = None) -> Path:
    root = Path(os.environ.get("WEIT_CACHE") or Path.home() / ".cache" / "weit" / "experts")
    return root / env_id if env_id else root


# ------------------------------------------------------------------------------------- scripted experts


def cartpole_expert(obs: np.ndarray, first: np.ndarray) -> np.ndarray:
    """Push toward the side the pole falls to, damped by the cart's drift: 500/500 from every start tried."""
    x, xd, th, thd = np.asarray(obs, np.float64).T
    return (10.0 * th + 2.0 * thd + 0.1 * x + 0.5 * xd > 0).astype(np.int64)


PENDULUM_A = 15.0
"""Pendulum-v1's ``theta'' = 3g/(2l) sin(theta) + 3/(ml^2) u`` with g = 10, m = l = 1."""


def pendulum_expert(obs: np.ndarray, first: np.ndarray) -> np.ndarray:
    """Pump energy (``dE/dt = 3 u w``) toward the upright's, then a PD law once the pole is near the top."""
    c, s, w = np.asarray(obs, np.float64).T
    energy = 0.5 * w**2 + PENDULUM_A * (c - 1.0)  # 0 at rest upright
    swing = np.clip(-energy * w, -2.0, 2.0)
    stabilize = np.clip(-(20.0 * np.arctan2(s, c) + 4.0 * w), -2.0, 2.0)
    return np.where(c > 0.85, stabilize, swing)[:, None].astype(np.float32)


SCRIPTED: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "CartPole-v1": cartpole_expert, "Pendulum-v1": pendulum_expert}


# ------------------------------------------------------------------------------------- trained experts


@dataclass
class Expert:
    act: Actor
    meta: dict
    """``kind`` (scripted/sb3), ``algorithm``, ``steps``, and for a trained one ``mean_return`` at training."""


def expert_algorithm(env_id: str) -> str:
    return "scripted" if env_id in SCRIPTED else ("PPO" if env_id == "Acrobot-v1" else "SAC")


def _algo(name: str):
    from stable_baselines3 import PPO, SAC

    return {"PPO": PPO, "SAC": SAC}[name]


def train_expert(env_id: str, steps: int | None = None, seed: int = 0, out: Path | None = None) -> Path:
    """Train an SB3 expert once (CPU, one torch thread: the box is shared) and write it as safetensors."""
    from safetensors.torch import save_file
    from stable_baselines3.common.env_util import make_vec_env

    from weit_core.io import VERSION

    check_env_id(env_id)
    algo = expert_algorithm(env_id)
    if algo == "scripted" or env_id not in SB3_STEPS:
        raise ValueError(f"{env_id}: weit trains experts for {', '.join(SB3_STEPS)} only")
    steps = steps or SB3_STEPS.get(env_id, 30_000)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    try:
        kw = dict(policy_kwargs={"net_arch": NET_ARCH[algo]}, seed=seed, device="cpu", verbose=0)
        if algo == "PPO":  # rl-baselines3-zoo's Acrobot settings
            model = _algo(algo)("MlpPolicy", make_vec_env(env_id, n_envs=8, seed=seed), n_steps=256,
                                gae_lambda=0.94, gamma=0.99, n_epochs=4, ent_coef=0.0, **kw)
        else:
            model = _algo(algo)("MlpPolicy", make_env(env_id), buffer_size=steps, learning_starts=min(5000, steps // 5),
                                **kw)
        model.learn(total_timesteps=steps)
    finally:
        torch.set_num_threads(threads)
    train_s = time.perf_counter() - t0
    policy = model.policy
    act = _sb3_actor(policy)
    rets = np.array([e.ret for e in run_episodes(env_id, act, EVAL_EPISODES, EVAL_SEED)])
    meta = {"format": EXPERT_FORMAT, "version": VERSION, "env_id": env_id, "kind": "sb3", "algorithm": algo,
            "steps": steps, "seed": seed, "net_arch": NET_ARCH[algo], "train_s": round(train_s, 1),
            "mean_return": float(rets.mean()), "std_return": float(rets.std()), "episodes": EVAL_EPISODES,
            "eval_seed": EVAL_SEED}
    out = out or cache_dir(env_id) / "expert.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in policy.state_dict().items()}, str(tmp),
              metadata={"weit": json.dumps(meta)})
    tmp.replace(out)
    return out


def _sb3_actor(policy) -> Actor:
    policy.set_training_mode(False)

    def act(obs: np.ndarray, first: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return policy.predict(np.asarray(obs, np.float32), deterministic=True)[0]

    return act


def load_sb3_expert(path: Path) -> Expert:
    """An SB3 policy rebuilt from its safetensors file (no pickle, no SB3 zip)."""
    from safetensors.torch import load_file

    from weit_core.io import read_header

    meta = read_header(path, expect_format=EXPERT_FORMAT)
    env = make_env(meta["env_id"])
    try:
        cls = _algo(meta["algorithm"]).policy_aliases["MlpPolicy"]
        policy = cls(env.observation_space, env.action_space, lambda _: 0.0, net_arch=meta["net_arch"])
    finally:
        env.close()
    policy.load_state_dict(load_file(str(path)))
    return Expert(_sb3_actor(policy), meta)


def get_expert(env_id: str, *, train: bool = True, steps: int | None = None) -> Expert:
    """The environment's expert: scripted, or the cached SB3 policy (trained now when missing and ``train``)."""
    check_env_id(env_id)
    if env_id in SCRIPTED:
        return Expert(SCRIPTED[env_id], {"env_id": env_id, "kind": "scripted", "algorithm": "scripted",
                                         "rule": SCRIPTED[env_id].__name__, "steps": 0})
    if env_id not in SB3_STEPS:
        raise ValueError(f"weit has no expert for {env_id}; bring your own transitions (parquet) for it")
    path = cache_dir(env_id) / "expert.safetensors"
    if not path.is_file():
        if not train:
            raise ValueError(f"no cached expert for {env_id} at {path}; make one with "
                             f"weit_core.control.experts.train_expert({env_id!r})")
        train_expert(env_id, steps, out=path)
    return load_sb3_expert(path)


# ------------------------------------------------------------------------------------- reference returns


def reference(env_id: str, *, expert: Expert | None = None, recompute: bool = False) -> dict:
    """Random and expert returns on the evaluation episodes, and the expert states' observation mean/std;
    computed once per environment and cached beside the expert (``reference.json``)."""
    path = cache_dir(env_id) / "reference.json"
    if path.is_file() and not recompute:
        return json.loads(path.read_text())
    info = env_info(env_id)
    expert = expert or get_expert(env_id)
    eps = run_episodes(env_id, expert.act, EVAL_EPISODES, EVAL_SEED, record=True)
    obs = np.concatenate([np.stack(e.observations) for e in eps])
    rand = [e.ret for e in run_episodes(env_id, random_actor(info, EVAL_SEED), EVAL_EPISODES, EVAL_SEED)]
    ref = {"env_id": env_id, "episodes": EVAL_EPISODES, "eval_seed": EVAL_SEED,
           "random_return": float(np.mean(rand)), "expert_return": float(np.mean([e.ret for e in eps])),
           "expert_return_std": float(np.std([e.ret for e in eps])),
           "expert": {k: v for k, v in expert.meta.items() if k not in ("format", "version")},
           "obs_mean": obs.mean(0).tolist(), "obs_std": np.maximum(obs.std(0), 1e-3).tolist()}
    if ref["expert_return"] <= ref["random_return"]:
        raise ValueError(f"{env_id}: the expert's return {ref['expert_return']:.1f} is not above the random "
                         f"policy's {ref['random_return']:.1f}; train it longer (train_expert(steps=...))")
    install_reference(ref)
    return ref


def install_reference(ref: dict) -> None:
    """Cache a reference (from a data folder's metadata) where evaluation looks, unless one is there."""
    path = cache_dir(ref["env_id"]) / "reference.json"
    if path.is_file():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(ref, indent=1))
    tmp.replace(path)


def normalized(ret: np.ndarray | float, ref: dict) -> np.ndarray | float:
    """D4RL's score: 0 = random, 100 = expert."""
    return 100.0 * (np.asarray(ret) - ref["random_return"]) / (ref["expert_return"] - ref["random_return"])


def describe(info: EnvInfo) -> dict:
    return {"obs_dim": info.obs_dim, "act_dim": info.act_dim, "discrete": info.discrete}
