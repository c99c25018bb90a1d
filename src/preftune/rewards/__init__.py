"""Reward sources for the online trainers: a reward model, python functions, or a weighted mix."""

from preftune.rewards.sources import (
    CombinedReward,
    FunctionReward,
    ModelReward,
    RewardSource,
    apply_penalties,
    load_function,
    parse_reward_spec,
)

__all__ = [
    "CombinedReward",
    "FunctionReward",
    "ModelReward",
    "RewardSource",
    "apply_penalties",
    "load_function",
    "parse_reward_spec",
]
