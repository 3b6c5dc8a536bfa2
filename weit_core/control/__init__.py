"""Embodied control for weit: environments, experts, transitions as parquet, seeded rollouts.

A control task (``weit_core.tasks.control``: ``control:<env id>``) clones a policy (``weit_core.models.policy``)
from an expert's transitions and judges it by its return in the environment. Pure gymnasium / PyTorch
(stable-baselines3 only to train an expert once); nothing here imports Ray or MLflow.
"""

from weit_core.control.envs import ENV_IDS, EnvInfo, check_env_id, env_info, make_env, make_vec_env
from weit_core.control.experts import get_expert, reference, train_expert
from weit_core.control.rollout import run_episodes
from weit_core.control.transitions import make_expert_dataset, read_transitions

__all__ = ["ENV_IDS", "EnvInfo", "check_env_id", "env_info", "get_expert", "make_env", "make_expert_dataset",
           "make_vec_env", "read_transitions", "reference", "run_episodes", "train_expert"]
