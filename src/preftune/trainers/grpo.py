"""`preftune grpo`: group-relative policy optimisation (Shao et al. 2024, "DeepSeekMath").

The step is `trainers/policy_gradient.py` with the group-relative baseline: within each
prompt's group, A_i = (r_i − mean r) / std r (Sec. 4.1.2), or r_i − mean r without
`--scale-rewards` (Dr. GRPO, Liu et al. 2025); β·KL(π‖π_ref) per token as a loss term when
kl_coef > 0 (k3 by default, as in the paper's Eq. 4). Per-token losses are aggregated per
sequence (GRPO), over all tokens (DAPO, Yu et al. 2025) or over a constant (Dr. GRPO).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from preftune.config import arg
from preftune.losses.rl import AGGREGATION_MODES, KL_ESTIMATORS
from preftune.trainers.policy_gradient import PolicyGradientConfig, run_policy_gradient


@dataclass
class GRPOConfig(PolicyGradientConfig):
    BASELINE: ClassVar[str] = "group"

    num_generations: int = arg(8, "G: completions sampled per prompt (the group); >= 2.")
    kl_coef: float = arg(
        0.0,
        "β of the per-token KL loss to the reference (0: no KL term; "
        "the KL is still measured and logged).",
    )
    kl_estimator: str = arg(
        "k3",
        "Per-token KL estimator of the KL loss (Schulman 2020); k3 as in Shao et al. 2024, Eq. 4.",
        choices=KL_ESTIMATORS,
    )
    scale_rewards: bool = arg(
        True,
        "Divide group-centred rewards by the group's std (GRPO); "
        "--no-scale-rewards keeps only the centring (Dr. GRPO).",
    )
    loss_aggregation: str = arg(
        "sequence",
        "How per-token losses become the loss: `sequence` "
        "(mean per completion, then over completions: GRPO), `token` "
        "(over all tokens: DAPO), `constant` (sum / (rows x "
        "max_new_tokens): Dr. GRPO), `sequence_sum` (sum per "
        "completion, mean over completions).",
        choices=AGGREGATION_MODES,
    )
    ppo_epochs: int = arg(1, "μ: passes over each rollout (Shao et al. 2024, Alg. 1).")


def run_grpo(cfg: GRPOConfig) -> dict:
    return run_policy_gradient(cfg, "grpo")
