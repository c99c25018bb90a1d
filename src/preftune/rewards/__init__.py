"""Reward sources for the online trainers: a reward model, python functions, or a weighted mix."""

from preftune.rewards.sources import (
    CombinedReward,
    EnsembleReward,
    FunctionReward,
    ModelReward,
    RewardSource,
    aggregate_ensemble,
    apply_penalties,
    is_ensemble,
    load_function,
    parse_reward_spec,
)

__all__ = [
    "CombinedReward",
    "EnsembleReward",
    "FunctionReward",
    "ModelReward",
    "RewardSource",
    "aggregate_ensemble",
    "apply_penalties",
    "is_ensemble",
    "load_function",
    "parse_reward_spec",
]
