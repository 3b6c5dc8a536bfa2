"""Transitions as parquet: what an expert (or a user) did, one row per environment step, readable by Ray Data.

Columns: ``episode`` and ``step`` (int64), ``observation`` (a fixed-shape float32 tensor, obs_dim), ``action``
(int64 for a discrete space, else a fixed-shape float32 tensor in the environment's own units), ``reward``
(float32), ``terminated`` and ``truncated`` (bool). A folder of such files (any names ending ``.parquet``) is a
control task's data; :func:`make_expert_dataset` also writes ``meta.json`` (the expert, its return and the
environment's reference returns), which a user's own folder may lack. Training rows are state contexts: the
last K normalized observations, zeros before the episode's first (:func:`contexts`), as a rollout builds them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from weit_core.control.envs import EnvInfo, env_info, from_env_action
from weit_core.control.experts import get_expert, reference
from weit_core.control.rollout import run_episodes

META_FILE = "meta.json"
FILE = "transitions.parquet"
COLUMNS = ("episode", "step", "observation", "action", "reward", "terminated", "truncated")


def _tensor_column(a: np.ndarray) -> pa.Array:
    """N x ... float32 -> a fixed-shape tensor column (Ray Data reads it as one N x ... array)."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    storage = pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1), type=pa.float32()), int(np.prod(a.shape[1:])))
    return pa.ExtensionArray.from_storage(pa.fixed_shape_tensor(pa.float32(), a.shape[1:]), storage)


def make_expert_dataset(env_id: str, out: str | Path, episodes: int = 50, seed: int = 0,
                        max_episode_steps: int | None = None) -> dict:
    """Play ``episodes`` seeded episodes of the environment's expert and write them to ``out`` (a folder):
    ``transitions.parquet`` and ``meta.json``. Returns the metadata (expert, mean return, reference)."""
    info = env_info(env_id)
    expert = get_expert(env_id)
    ref = reference(env_id, expert=expert)
    eps = run_episodes(env_id, expert.act, episodes, seed, record=True, max_episode_steps=max_episode_steps)
    lengths = np.array([e.length for e in eps])
    obs = np.concatenate([np.stack(e.observations) for e in eps]).astype(np.float32)
    act = np.concatenate([np.stack(e.actions) for e in eps])
    cols = {
        "episode": pa.array(np.repeat(np.arange(episodes, dtype=np.int64), lengths)),
        "step": pa.array(np.concatenate([np.arange(n, dtype=np.int64) for n in lengths])),
        "observation": _tensor_column(obs),
        "action": pa.array(act.astype(np.int64).reshape(-1)) if info.discrete else _tensor_column(act.reshape(len(act), -1)),
        "reward": pa.array(np.concatenate([np.asarray(e.rewards, np.float32) for e in eps])),
        "terminated": pa.array(np.concatenate([np.arange(n) == n - 1 for n in lengths]) & np.repeat(
            [e.terminated for e in eps], lengths)),
        "truncated": pa.array(np.concatenate([np.arange(n) == n - 1 for n in lengths]) & np.repeat(
            [e.truncated for e in eps], lengths)),
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols), out / FILE, row_group_size=8192)
    rets = np.array([e.ret for e in eps])
    meta = {"env_id": env_id, "episodes": episodes, "seed": seed, "rows": int(lengths.sum()),
            "max_episode_steps": max_episode_steps, "return_mean": float(rets.mean()),
            "return_std": float(rets.std()), "expert": ref["expert"], "reference": ref,
            "obs_dim": info.obs_dim, "act_dim": info.act_dim, "discrete": info.discrete}
    (out / META_FILE).write_text(json.dumps(meta, indent=1))
    return meta


def read_meta(folder: str | Path) -> dict:
    path = Path(folder) / META_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def read_transitions(folder: str | Path, info: EnvInfo) -> dict[str, np.ndarray]:
    """The folder's transitions sorted by (episode, step), checked against the environment: observation
    width, action kind and width; a mismatch is a one-line ValueError naming both."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*.parquet") if not p.name.startswith(("_", "."))) if folder.is_dir() \
        else [folder] if folder.is_file() else []
    if not files:
        raise ValueError(f"{folder}: no parquet transitions there; make some with "
                         f"weit_core.control.make_expert_dataset({info.env_id!r}, {str(folder)!r})")
    table = pa.concat_tables([pq.read_table(p) for p in files])
    missing = [c for c in ("episode", "step", "observation", "action") if c not in table.column_names]
    if missing:
        raise ValueError(f"{folder}: transitions need columns {', '.join(COLUMNS)}; {missing} missing")
    table = table.sort_by([("episode", "ascending"), ("step", "ascending")])
    obs = _matrix(table.column("observation"), "observation")
    if obs.shape[1] != info.obs_dim:
        raise ValueError(f"{folder}: observations are {obs.shape[1]} wide, {info.env_id} gives {info.obs_dim}; "
                         "is this data from another environment?")
    action = table.column("action")
    if info.discrete:
        if not pa.types.is_integer(action.type):
            raise ValueError(f"{folder}: {info.env_id} has discrete actions, the `action` column is {action.type}")
        act = action.to_numpy().astype(np.int64)
        if len(act) and (act.min() < 0 or act.max() >= info.act_dim):
            raise ValueError(f"{folder}: actions run {act.min()}..{act.max()}, {info.env_id} has {info.act_dim}")
    else:
        act = _matrix(action, "action")
        if act.shape[1] != info.act_dim:
            raise ValueError(f"{folder}: actions are {act.shape[1]} wide, {info.env_id} takes {info.act_dim}")
    return {"episode": table.column("episode").to_numpy().astype(np.int64),
            "step": table.column("step").to_numpy().astype(np.int64), "observation": obs, "action": act}


def _matrix(col: pa.ChunkedArray, name: str) -> np.ndarray:
    """A tensor or list column as N x width float32 (a scalar column is width 1)."""
    col = col.combine_chunks()
    if isinstance(col.type, pa.FixedShapeTensorType):
        col = col.storage
    if pa.types.is_list(col.type) or pa.types.is_fixed_size_list(col.type) or pa.types.is_large_list(col.type):
        lengths = set(pc.list_value_length(col).to_numpy().tolist()) if len(col) else {0}
        if len(lengths) > 1:
            raise ValueError(f"`{name}` rows have different widths {sorted(lengths)[:4]}")
        return np.asarray(col.flatten().to_numpy(zero_copy_only=False), np.float32).reshape(len(col), -1)
    if pa.types.is_floating(col.type) or pa.types.is_integer(col.type):
        return col.to_numpy(zero_copy_only=False).astype(np.float32)[:, None]
    raise ValueError(f"`{name}` is {col.type}; expected a float vector per row")


def contexts(obs: np.ndarray, episode: np.ndarray, step: np.ndarray, k: int) -> np.ndarray:
    """N x k x obs_dim: row i holds the states at steps ``step[i]-k+1 .. step[i]`` of its episode (rows sorted
    by episode and step), zeros before the episode's first state."""
    n, d = obs.shape
    out = np.zeros((n, k, d), np.float32)
    for back in range(k):
        ok = step >= back
        src = np.arange(n) - back
        ok &= (src >= 0) & (episode[np.clip(src, 0, None)] == episode)
        out[ok, k - 1 - back] = obs[src[ok]]
    return out


def policy_targets(action: np.ndarray, info: EnvInfo) -> np.ndarray:
    """Discrete actions as they are; continuous ones in the policy's ``[-1, 1]``."""
    return action if info.discrete else from_env_action(info, action)
