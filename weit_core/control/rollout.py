"""Running a policy in its environment: seeded episodes, vectorized or one environment at a time.

Episode ``j`` of a run with ``seed`` always starts from ``reset(seed=seed + j)``, whichever way it is run, so a
vectorized run and the plain loop play the very same episodes (the benchmark checks it) and a policy's return
is a reproducible number. An actor sees a batch of raw observations and which of them start an episode (so a
policy with a context of past states can clear it) and answers with environment actions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from weit_core.control.envs import EnvInfo, env_info, make_env, make_vec_env, to_env_action

Actor = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""``act(observations B×obs_dim, first B bool) -> environment actions (B,) or B×A``."""


@dataclass
class Episode:
    ret: float = 0.0
    length: int = 0
    terminated: bool = False
    truncated: bool = False
    observations: list = field(default_factory=list)
    actions: list = field(default_factory=list)
    rewards: list = field(default_factory=list)


def _record(ep: Episode, obs: np.ndarray, action: np.ndarray, reward: float, keep: bool) -> None:
    ep.ret += float(reward)
    ep.length += 1
    if keep:
        ep.observations.append(np.asarray(obs, np.float32))
        ep.actions.append(np.asarray(action))
        ep.rewards.append(float(reward))


def run_episodes(env_id: str, act: Actor, episodes: int, seed: int = 0, *, n_envs: int | None = None,
                 vectorized: bool = True, record: bool = False, max_episode_steps: int | None = None) -> list[Episode]:
    """``episodes`` seeded episodes of ``act`` (in episode order). Vectorized: ``n_envs`` environments
    (default: all episodes at once) step together and the actor sees their observations as one batch;
    otherwise one environment plays the episodes one after another. ``record`` keeps every step."""
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    if not vectorized:
        return [_one(env_id, act, seed + j, record, max_episode_steps) for j in range(episodes)]
    n = min(episodes, n_envs or episodes)
    envs = make_vec_env(env_id, n, max_episode_steps)
    out: list[Episode] = []
    try:
        for start in range(0, episodes, n):
            out += _chunk(envs, act, min(n, episodes - start), seed + start, record)
    finally:
        envs.close()
    return out


def _one(env_id: str, act: Actor, seed: int, record: bool, max_episode_steps: int | None) -> Episode:
    env = make_env(env_id, max_episode_steps)
    try:
        obs, _ = env.reset(seed=seed)
        ep, first = Episode(), True
        while True:
            a = act(obs[None], np.array([first]))[0]
            nxt, r, term, trunc, _ = env.step(a)
            _record(ep, obs, a, r, record)
            obs, first = nxt, False
            if term or trunc:
                ep.terminated, ep.truncated = bool(term), bool(trunc)
                return ep
    finally:
        env.close()


def _chunk(envs, act: Actor, k: int, seed: int, record: bool) -> list[Episode]:
    """One episode in each of the first ``k`` environments (the rest of a last, partial chunk idle along)."""
    obs, _ = envs.reset(seed=seed)
    n = envs.num_envs
    eps = [Episode() for _ in range(k)]
    live = np.arange(n) < k
    first = np.ones(n, dtype=bool)
    while live.any():
        a = act(obs, first)
        nxt, r, term, trunc, _ = envs.step(a)
        for i in np.flatnonzero(live):
            _record(eps[i], obs[i], a[i], r[i], record)
            if term[i] or trunc[i]:
                eps[i].terminated, eps[i].truncated = bool(term[i]), bool(trunc[i])
                live[i] = False
        obs, first = nxt, np.zeros(n, dtype=bool)
    return eps


def random_actor(info: EnvInfo, seed: int) -> Actor:
    """The uniform random policy (D4RL's 0 on the normalized scale), seeded."""
    rng = np.random.default_rng(seed)

    def act(obs: np.ndarray, first: np.ndarray) -> np.ndarray:
        if info.discrete:
            return rng.integers(info.act_dim, size=len(obs))
        return to_env_action(info, rng.uniform(-1.0, 1.0, size=(len(obs), info.act_dim)))

    return act


class PolicyActor:
    """A context policy (``weit_core.models.policy``) as an actor: the last ``context`` normalized
    observations per environment, zeros before an episode's first state (as :mod:`transitions` builds the
    training contexts), argmax of the logits or the tanh action mapped to the environment's bounds."""

    def __init__(self, model: nn.Module, info: EnvInfo, context: int, obs_mean: np.ndarray, obs_std: np.ndarray,
                 device: torch.device | str = "cpu") -> None:
        self.model, self.info, self.context, self.device = model, info, context, torch.device(device)
        self.mean, self.std = np.asarray(obs_mean, np.float32), np.asarray(obs_std, np.float32)
        self.buf: np.ndarray | None = None

    @torch.no_grad()
    def __call__(self, obs: np.ndarray, first: np.ndarray) -> np.ndarray:
        if self.buf is None or len(self.buf) != len(obs):
            self.buf = np.zeros((len(obs), self.context, self.info.obs_dim), np.float32)
        self.buf[first] = 0.0
        self.buf = np.roll(self.buf, -1, axis=1)
        self.buf[:, -1] = (np.asarray(obs, np.float32) - self.mean) / self.std
        out = self.model(torch.from_numpy(self.buf).to(self.device)).float().cpu().numpy()
        return out.argmax(-1) if self.info.discrete else to_env_action(self.info, out)


def policy_returns(model: nn.Module, env_id: str, *, context: int, obs_mean: np.ndarray, obs_std: np.ndarray,
                   episodes: int, seed: int, device: torch.device | str = "cpu", vectorized: bool = True,
                   max_episode_steps: int | None = None) -> np.ndarray:
    """Raw returns of ``model`` over ``episodes`` seeded episodes (model left in eval mode)."""
    model.eval()
    actor = PolicyActor(model, env_info(env_id), context, obs_mean, obs_std, device)
    eps = run_episodes(env_id, actor, episodes, seed, vectorized=vectorized, max_episode_steps=max_episode_steps)
    return np.array([e.ret for e in eps])
