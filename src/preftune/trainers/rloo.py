"""`preftune rloo`: REINFORCE with the leave-one-out baseline (Ahmadian et al. 2024, "Back to
Basics: Revisiting REINFORCE Style Optimization for Learning from Human Feedback in LLMs").

The step is `trainers/policy_gradient.py` with the leave-one-out baseline: the whole
completion is one action whose reward is the score minus the KL penalty of the sequence,
r(x, y) − β·Σ_t KL_t (Sec. 2: the KL enters the reward), and A_i = r_i − mean_{j≠i} r_j within
each prompt's k samples (Eq. 8). The loss is REINFORCE's −A_i · log π(y_i|x) =
−A_i · Σ_t log π(y_t|…), averaged over completions (`sequence_sum`, the paper's sequence-level
form); `--loss-aggregation constant` divides by rows × max_new_tokens instead (a token-level
form whose gradient is the paper's divided by max_new_tokens). `ppo_epochs`/`num_minibatches`
> 1 reuse the rollout with PPO's clipped ratio (as TRL's RLOO does); with the defaults (1, 1)
the ratio is exactly 1 and the loss is REINFORCE.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from preftune.config import arg
from preftune.losses.rl import AGGREGATION_MODES, KL_ESTIMATORS
from preftune.trainers.policy_gradient import PolicyGradientConfig, run_policy_gradient


@dataclass
class RLOOConfig(PolicyGradientConfig):
    BASELINE: ClassVar[str] = "leave_one_out"

    num_generations: int = arg(
        4,
        "k: completions sampled per prompt; >= 2 (each one's "
        "baseline is the mean reward of the other k − 1).",
    )
    kl_coef: float = arg(0.05, "β of the sequence KL penalty subtracted from the reward.")
    kl_estimator: str = arg(
        "k1",
        "Per-token KL estimator summed into the sequence penalty "
        "(k1: the log-ratio, as in Ahmadian et al. 2024).",
        choices=KL_ESTIMATORS,
    )
    normalize_advantages: bool = arg(
        False, "Whiten the advantages over the rollout (mean 0, std 1) before the update."
    )
    loss_aggregation: str = arg(
        "sequence_sum",
        "How per-token losses become the loss: "
        "`sequence_sum` (Σ over each completion, mean over completions: "
        "REINFORCE's sequence log-prob, Ahmadian et al. 2024), "
        "`constant` (Σ / (rows x max_new_tokens): the same direction, "
        "max_new_tokens times smaller), `sequence` (mean per "
        "completion), `token`.",
        choices=AGGREGATION_MODES,
    )
    clip_eps: float = arg(0.2, "ε of the clipped ratio when a rollout is reused.")
    ppo_epochs: int = arg(1, "Passes over each rollout (1: plain REINFORCE).")


def run_rloo(cfg: RLOOConfig) -> dict:
    return run_policy_gradient(cfg, "rloo")
