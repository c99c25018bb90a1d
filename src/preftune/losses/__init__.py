"""Pure loss functions of log-probs, rewards and values; no models, batching or trainers.

sft (NLL), preference (DPO family + reference-free SimPO/ORPO/CPO), kto, reward
(Bradley-Terry, Plackett-Luce, centering), rl (GAE, PPO clip, GRPO/RLOO advantages, KL
estimators, aggregation). Each returns per-example (or per-token) losses and detached metrics.
"""

from preftune.losses.kto import kto_loss, kto_reference_point
from preftune.losses.preference import (
    PREFERENCE_LOSSES,
    REFERENCE_FREE,
    add_sft_term,
    check_preference_hparams,
    preference_loss,
)
from preftune.losses.reward import (
    all_pairs_loss,
    bradley_terry_loss,
    plackett_luce_loss,
    reward_centering_penalty,
)
from preftune.losses.rl import (
    AGGREGATION_MODES,
    KL_ESTIMATORS,
    aggregate,
    aggregate_sum_and_units,
    gae,
    group_advantages,
    kl_penalty,
    leave_one_out_advantages,
    ppo_policy_loss,
    ppo_value_loss,
    whiten,
)
from preftune.losses.sft import nll_loss

__all__ = [
    "AGGREGATION_MODES",
    "KL_ESTIMATORS",
    "PREFERENCE_LOSSES",
    "REFERENCE_FREE",
    "add_sft_term",
    "aggregate",
    "aggregate_sum_and_units",
    "all_pairs_loss",
    "bradley_terry_loss",
    "check_preference_hparams",
    "gae",
    "group_advantages",
    "kl_penalty",
    "kto_loss",
    "kto_reference_point",
    "leave_one_out_advantages",
    "nll_loss",
    "plackett_luce_loss",
    "ppo_policy_loss",
    "ppo_value_loss",
    "preference_loss",
    "reward_centering_penalty",
    "whiten",
]
