"""The environments control tasks run in, and the checks that turn a bad id or a missing MuJoCo into one line.

Classic control ships with gymnasium; the MuJoCo locomotion tasks need ``gymnasium[mujoco]``. Policies act in
a normalized action space (``[-1, 1]`` per dimension for continuous actions), so one tanh head serves every
environment and :func:`to_env_action` is the only place that knows an environment's bounds.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import gymnasium as gym
import numpy as np

CLASSIC = ("CartPole-v1", "Acrobot-v1", "Pendulum-v1")
MUJOCO = ("Hopper-v5", "HalfCheetah-v5", "Walker2d-v5")
ENV_IDS = CLASSIC + MUJOCO
"""The environments weit makes experts for; any other id gymnasium knows may still carry a user's own data."""
MUJOCO_INSTALL = 'pip install "gymnasium[mujoco]" "mujoco<4"'


@dataclass(frozen=True)
class EnvInfo:
    """What a policy and its data must agree on about an environment."""

    env_id: str
    obs_dim: int
    act_dim: int
    """Actions for a discrete space (the head's logits), action dimensions for a continuous one."""
    discrete: bool
    low: tuple[float, ...] = ()
    high: tuple[float, ...] = ()


def _is_mujoco(env_id: str) -> bool:
    spec = gym.envs.registry.get(env_id)
    entry = str(getattr(spec, "entry_point", ""))
    return env_id in MUJOCO or "gymnasium.envs.mujoco" in entry


def require_mujoco(env_id: str) -> None:
    """A MuJoCo task where ``mujoco`` is not importable is a one-line error with the install command."""
    try:
        importlib.import_module("mujoco")
    except ImportError as e:
        raise ValueError(f"{env_id} needs MuJoCo, which is not importable here ({e}); install it: "
                         f"{MUJOCO_INSTALL}") from None


def check_env_id(env_id: str) -> None:
    """Unknown ids and MuJoCo tasks without MuJoCo fail here, before any environment or data is made."""
    if env_id not in gym.envs.registry:
        raise ValueError(f"unknown environment {env_id!r}; weit's control tasks: {', '.join(ENV_IDS)} "
                         "(or any id gymnasium registers)")
    if _is_mujoco(env_id):
        require_mujoco(env_id)


def make_env(env_id: str, max_episode_steps: int | None = None) -> gym.Env:
    check_env_id(env_id)
    kw = {} if max_episode_steps is None else {"max_episode_steps": max_episode_steps}
    return gym.make(env_id, **kw)


def make_vec_env(env_id: str, n: int, max_episode_steps: int | None = None) -> gym.vector.SyncVectorEnv:
    """``n`` copies stepped together in one process (no worker processes: the box is shared, the policy
    batch is what gains)."""
    check_env_id(env_id)
    return gym.vector.SyncVectorEnv([lambda: make_env(env_id, max_episode_steps) for _ in range(n)])


_INFO: dict[str, EnvInfo] = {}


def env_info(env_id: str) -> EnvInfo:
    """Observation width, action count or width, bounds; one environment made once per id."""
    if env_id not in _INFO:
        env = make_env(env_id)
        obs, act = env.observation_space, env.action_space
        env.close()
        if not isinstance(obs, gym.spaces.Box) or len(obs.shape) != 1:
            raise ValueError(f"{env_id}: observations are {obs}, a policy here reads flat vectors")
        if isinstance(act, gym.spaces.Discrete):
            info = EnvInfo(env_id, int(obs.shape[0]), int(act.n), True)
        elif isinstance(act, gym.spaces.Box) and len(act.shape) == 1:
            info = EnvInfo(env_id, int(obs.shape[0]), int(act.shape[0]), False,
                           tuple(float(v) for v in act.low), tuple(float(v) for v in act.high))
        else:
            raise ValueError(f"{env_id}: actions are {act}; a policy here acts in Discrete or flat Box spaces")
        _INFO[env_id] = info
    return _INFO[env_id]


def to_env_action(info: EnvInfo, a: np.ndarray) -> np.ndarray:
    """A normalized action (``[-1, 1]``) in the environment's bounds; discrete actions pass as integers."""
    if info.discrete:
        return np.asarray(a, dtype=np.int64)
    low, high = np.asarray(info.low, np.float32), np.asarray(info.high, np.float32)
    return (low + (np.clip(a, -1.0, 1.0) + 1.0) * 0.5 * (high - low)).astype(np.float32)


def from_env_action(info: EnvInfo, a: np.ndarray) -> np.ndarray:
    """The inverse of :func:`to_env_action`, clipped to ``[-1, 1]`` (an expert's actions outside the bounds
    are what the environment clips them to)."""
    if info.discrete:
        return np.asarray(a, dtype=np.int64)
    low, high = np.asarray(info.low, np.float32), np.asarray(info.high, np.float32)
    return np.clip(2.0 * (np.asarray(a, np.float32) - low) / (high - low) - 1.0, -1.0, 1.0).astype(np.float32)
