"""Control: a policy cloned from expert transitions and judged by running it in its environment.

``get_task("control:CartPole-v1")`` is one task per environment. Training is behaviour cloning (cross-entropy
on discrete actions, MSE on continuous ones in ``[-1, 1]``), distillation matches a teacher policy (KL·τ² /
MSE). The metric is not a batch sum: :func:`evaluate` ignores the batches and plays :data:`EVAL_EPISODES`
seeded episodes in a vectorized environment, scoring ``return_norm`` as D4RL does (0 = the uniform random
policy, 100 = the expert, both measured once per environment on the same episodes). The per-batch ``score``
the loop averages during training is action agreement with the data (discrete) or minus the squared error
(continuous): the only thing a batch can say.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from weit_core.control.envs import EnvInfo, check_env_id, env_info
from weit_core.control.experts import (
    EVAL_EPISODES,
    EVAL_SEED,
    cache_dir,
    install_reference,
    normalized,
    reference,
)
from weit_core.control.rollout import policy_returns
from weit_core.control.transitions import (
    contexts,
    make_expert_dataset,
    policy_targets,
    read_meta,
    read_transitions,
)
from weit_core.tasks import Task, register_kind
from weit_core.tasks.classification import _agree, _correct, _kl

CONTEXT = 4
"""States per policy input (the current one and three before it)."""
DEFAULT_EPISODES = 50
"""Expert episodes made when a control task names no data folder."""
SPLIT = (0.8, 0.1, 0.1)


def _neg_sq_error(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return -((out - y) ** 2).flatten(1).mean(1).sum()


def _mse_distill(out: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    return F.mse_loss(out, teacher)


def default_data(env_id: str) -> Path:
    """The expert data a task without a data folder trains on, made once in the cache."""
    folder = cache_dir(env_id) / "data"
    if not read_meta(folder):  # made aside and renamed: trials starting together must not write one folder
        tmp = folder.with_name(f"data.{os.getpid()}.tmp")
        make_expert_dataset(env_id, tmp, episodes=DEFAULT_EPISODES, seed=0)
        try:
            tmp.rename(folder)
        except OSError:  # another process was first
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_control_data(info: EnvInfo, dataset: str | None, limit: int | None = None, seed: int = 0):
    """A transitions folder as splits of state contexts (N x CONTEXT x obs_dim, observations normalized by the
    environment's reference) and policy targets, split by episode so no episode straddles two splits."""
    from weit_core.data import ArrayDataset, DatasetSplits

    folder = Path(dataset) if dataset else default_data(info.env_id)
    meta = read_meta(folder)
    if meta.get("env_id") not in (None, info.env_id):
        raise ValueError(f"{folder} holds {meta['env_id']} transitions, the task is {info.env_id}")
    if meta.get("reference", {}).get("env_id") == info.env_id:
        install_reference(meta["reference"])
    t = read_transitions(folder, info)
    ref = reference(info.env_id)
    obs = (t["observation"] - np.asarray(ref["obs_mean"], np.float32)) / np.asarray(ref["obs_std"], np.float32)
    x = contexts(obs, t["episode"], t["step"], CONTEXT)
    y = policy_targets(t["action"], info)
    episodes = np.unique(t["episode"])
    if len(episodes) < 3:
        raise ValueError(f"{folder}: {len(episodes)} episode(s); splitting by episode needs at least 3")
    order = np.random.default_rng(seed).permutation(episodes)
    n_val = n_test = max(1, round(SPLIT[1] * len(order)))
    parts = {"val": order[:n_val], "test": order[n_val:n_val + n_test], "train": order[n_val + n_test:]}
    splits = {}
    for name, eps in parts.items():
        rows = torch.from_numpy(np.flatnonzero(np.isin(t["episode"], eps)))
        ds = ArrayDataset(torch.from_numpy(x)[rows], torch.from_numpy(y)[rows])
        splits[name] = ds.subset(limit, seed) if limit else ds
    io = {"env_id": info.env_id, "obs_dim": info.obs_dim, "act_dim": info.act_dim, "discrete": info.discrete,
          "context": CONTEXT, **({"num_classes": info.act_dim} if info.discrete else {})}
    return DatasetSplits(f"control:{info.env_id}", splits["train"], splits["val"], splits["test"],
                         num_classes=info.act_dim if info.discrete else 0, io=io)


def evaluate_policy(model: torch.nn.Module, env_id: str, device: torch.device | str = "cpu",
                    episodes: int = EVAL_EPISODES) -> dict[str, float]:
    """Normalized and raw return of ``model`` over the evaluation episodes (vectorized)."""
    ref = reference(env_id)
    spec = getattr(model, "spec", None)
    rets = policy_returns(model, env_id, context=getattr(spec, "context", CONTEXT), obs_mean=np.array(ref["obs_mean"]),
                          obs_std=np.array(ref["obs_std"]), episodes=episodes, seed=EVAL_SEED, device=device)
    norm = normalized(rets, ref)
    return {"return_norm": float(norm.mean()), "return_norm_std": float(norm.std()), "return": float(rets.mean()),
            "episodes": len(rets)}


def make_control_task(env_id: str) -> Task:
    """The task of one environment; an unknown id or a MuJoCo task without MuJoCo is a one-line error."""
    check_env_id(env_id)
    info = env_info(env_id)
    discrete = info.discrete
    return Task(
        f"control:{env_id}", loss=F.cross_entropy if discrete else F.mse_loss,
        score=_correct if discrete else _neg_sq_error, metric="return_norm", mode="max",
        score_name="action_acc" if discrete else "action_neg_mse",
        distill_loss=_kl if discrete else _mse_distill, agreement=_agree if discrete else None,
        evaluate=lambda model, batches, device: evaluate_policy(model, env_id, device),
        load_data=lambda dataset, limit, seed: load_control_data(info, dataset, limit, seed),
        default_family="policy")


def make_control_data(env_id: str, out: str | Path, episodes: int = DEFAULT_EPISODES, seed: int = 0) -> dict:
    """``weit data control:<env>``: the expert's transitions in ``out``."""
    return make_expert_dataset(env_id, out, episodes=episodes, seed=seed)


register_kind("control", make_control_task, make_data=make_control_data)
