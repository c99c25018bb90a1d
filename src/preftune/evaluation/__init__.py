"""Reward-model evaluation: pure statistics (`stats`), figures (`plots`), writers (`report`),
and the `preftune eval-rm` command (`eval_rm`)."""

from preftune.evaluation.stats import (
    Calibration,
    Row,
    accuracy_table,
    calibration,
    check_finite,
    length_bias,
    pair_outcomes,
    reward_summary,
    wilson_interval,
)

__all__ = [
    "Calibration",
    "Row",
    "accuracy_table",
    "calibration",
    "check_finite",
    "length_bias",
    "pair_outcomes",
    "reward_summary",
    "wilson_interval",
]
