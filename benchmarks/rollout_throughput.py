"""How much do vectorized environments buy a control task's evaluation? Episodes per second of one policy
over the same seeded episodes, played by ``gymnasium.vector.SyncVectorEnv`` (all environments step together
and the policy sees them as one batch: ``weit_core.control.rollout.run_episodes``) against a plain loop of
one environment, one episode after another (a batch of one per step).

The policy is a policy transformer of ``--size`` cloned from the expert's transitions for ``--bc-steps``
steps (so episodes are as long as a useful policy's; ``--bc-steps 0`` keeps the untrained one, whose CartPole
episodes end in ~10 steps). Both arms play episode ``j`` from ``reset(seed=seed + j)``, so they play the very
same episodes: the returns are checked equal. Each arm runs ``--repeats`` times, alternating (a shared VM's
speed drifts); the median time is reported. One torch thread by default (``--threads``).

    python benchmarks/rollout_throughput.py [--env CartPole-v1] [--episodes 32] [--n-envs 8,32]
                                            [--size 2x64x2] [--bc-steps 300] [--repeats 3]

The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from weit_core.control.envs import env_info  # noqa: E402
from weit_core.control.experts import reference  # noqa: E402
from weit_core.control.rollout import PolicyActor, run_episodes  # noqa: E402
from weit_core.models import get_family  # noqa: E402
from weit_core.tasks import get_task  # noqa: E402
from weit_core.train import fit, iterate_batches, make_optimizer, seed_everything  # noqa: E402


def cloned_policy(env_id: str, size: dict, bc_steps: int, seed: int) -> torch.nn.Module:
    task = get_task(f"control:{env_id}")
    with tempfile.TemporaryDirectory() as d:
        from weit_core.control.transitions import make_expert_dataset

        make_expert_dataset(env_id, d, episodes=20, seed=seed)
        data = task.load(d, seed=seed)
    family = get_family("policy")
    seed_everything(seed)
    model = family.build(family.spec_for(size, data.io))
    if bc_steps > 0:
        per_epoch = max(1, len(data.train) // 64)
        fit(model, lambda ep: iterate_batches(data.train.x, data.train.y, 64, seed=ep), make_optimizer(model, 3e-3),
            epochs=-(-bc_steps // per_epoch), task=task, max_steps=min(per_epoch, bc_steps))
    return model.eval()


def play(model: torch.nn.Module, env_id: str, episodes: int, seed: int, n_envs: int | None) -> tuple[float, list]:
    ref = reference(env_id)
    actor = PolicyActor(model, env_info(env_id), model.spec.context, np.array(ref["obs_mean"]),
                        np.array(ref["obs_std"]))
    t0 = time.perf_counter()
    eps = run_episodes(env_id, actor, episodes, seed, n_envs=n_envs, vectorized=n_envs is not None)
    return time.perf_counter() - t0, eps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--env", default="CartPole-v1")
    ap.add_argument("--episodes", type=int, default=32)
    ap.add_argument("--n-envs", default="8,32", help="vectorized arms: environments stepped together")
    ap.add_argument("--size", default="2x64x2", help="depth x width x heads of the policy")
    ap.add_argument("--bc-steps", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    depth, width, heads = (int(v) for v in args.size.split("x"))
    model = cloned_policy(args.env, {"depth": depth, "width": width, "heads": heads}, args.bc_steps, args.seed)
    arms: list[int | None] = [None] + [int(n) for n in args.n_envs.split(",")]
    times: dict[int | None, list[float]] = {a: [] for a in arms}
    returns: dict[int | None, list[float]] = {}
    steps = 0
    play(model, args.env, min(2, args.episodes), args.seed, 2)  # warm-up: imports, first environments
    for _ in range(args.repeats):
        for arm in arms:
            wall, eps = play(model, args.env, args.episodes, args.seed, arm)
            times[arm].append(wall)
            returns[arm] = [e.ret for e in eps]
            steps = sum(e.length for e in eps)
    same = all(np.allclose(returns[a], returns[None], rtol=1e-5, atol=1e-4) for a in arms)
    base = statistics.median(times[None])
    rows = []
    print(f"{args.env}: {args.episodes} episodes, {steps} steps, policy {args.size} "
          f"(mean return {np.mean(returns[None]):.1f}), {args.threads} torch thread(s), median of {args.repeats}")
    print(f"{'arm':>16} {'wall_s':>8} {'episodes/s':>11} {'steps/s':>9} {'vs plain':>9}")
    for arm in arms:
        t = statistics.median(times[arm])
        name = "plain (1 env)" if arm is None else f"vector ({arm} envs)"
        rows.append({"arm": name, "n_envs": arm or 1, "wall_s": round(t, 3), "episodes_per_s": round(args.episodes / t, 2),
                     "steps_per_s": round(steps / t, 1), "speedup": round(base / t, 2)})
        r = rows[-1]
        print(f"{name:>16} {t:8.2f} {r['episodes_per_s']:11.2f} {r['steps_per_s']:9.0f} {r['speedup']:8.2f}x")
    print(f"same returns in every arm: {same}")
    print(json.dumps({"env": args.env, "episodes": args.episodes, "steps": steps, "size": args.size,
                      "bc_steps": args.bc_steps, "threads": args.threads, "repeats": args.repeats,
                      "same_returns": same, "arms": rows,
                      "best_speedup": max(r["speedup"] for r in rows[1:]) if len(rows) > 1 else None}))


if __name__ == "__main__":
    main()
