"""KTO: Kahneman-Tversky Optimization from unpaired desirable/undesirable examples.

Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization".
Inputs are summed completion log-probs [B] and a boolean label per example (True =
desirable). The reference point z0 is estimated separately (`kto_reference_point`) from
mismatched (x, y') pairs and passed in, detached.
"""

from __future__ import annotations

import torch
from torch import Tensor

from preftune.errors import PreftuneError


def kto_reference_point(policy_kl_logps: Tensor, ref_kl_logps: Tensor) -> Tensor:
    """z0 = max(0, mean(log π(y'|x) − log π_ref(y'|x))), detached, a scalar tensor.

    (x, y') are mismatched pairs (each prompt with another example's completion), the paper's
    batch estimator of KL(π ‖ π_ref) (Ethayarajh et al. 2024, Sec. 4.2). No gradient flows
    through it. With data parallelism, all-reduce the mean across ranks *before* the clamp
    (average the unclamped means, then take max(0, ·)) so every rank uses the same z0.
    """
    kl = (policy_kl_logps - ref_kl_logps).mean()  # Sec. 4.2: biased but low-variance estimate
    return kl.clamp(min=0).detach()


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    labels: Tensor,
    kl_estimate: Tensor,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-example KTO loss [B] (Ethayarajh et al. 2024, Eq. 8).

    r = log π(y|x) − log π_ref(y|x), z0 = `kl_estimate`:
      desirable (label True):    λ_D · (1 − σ(β(r − z0)))
      undesirable (label False): λ_U · (1 − σ(β(z0 − r)))
    (the paper's L = λ_y − v(x, y); the constant λ_y is dropped: 1 − σ(u) = σ(−u)).

    A micro-batch may hold only one class, so per-class means are not computed here. Metrics
    (detached) give per-example values plus masks and local sums/counts; the trainer reduces
    the sums and counts globally and divides (rewards/chosen = rewards/chosen_sum / count/chosen):
      rewards [B] = β·r;  logps [B] = policy log-probs;  mask/chosen, mask/rejected [B] (float);
      rewards/chosen_sum, rewards/rejected_sum, logps/chosen_sum, logps/rejected_sum,
      count/chosen, count/rejected (scalars); kl = z0 (scalar).
    """
    if not beta > 0:
        raise PreftuneError(f"beta={beta} must be > 0")
    if desirable_weight <= 0 or undesirable_weight <= 0:
        raise PreftuneError(
            f"desirable_weight={desirable_weight}, undesirable_weight={undesirable_weight}: both must be > 0"
        )
    desirable = labels.bool()
    z0 = kl_estimate.detach()
    r = policy_logps - ref_logps
    # 1 − σ(u) written as σ(−u): no 1 − (≈1) cancellation when u is large.
    desirable_losses = desirable_weight * torch.sigmoid(-beta * (r - z0))  # Eq. 8, y desirable
    undesirable_losses = undesirable_weight * torch.sigmoid(
        -beta * (z0 - r)
    )  # Eq. 8, y undesirable
    losses = torch.where(desirable, desirable_losses, undesirable_losses)

    rewards = (beta * r).detach()
    chosen_mask = desirable.to(policy_logps.dtype)
    rejected_mask = 1.0 - chosen_mask
    logps = policy_logps.detach()
    metrics = {
        "rewards": rewards,
        "logps": logps,
        "mask/chosen": chosen_mask,
        "mask/rejected": rejected_mask,
        "rewards/chosen_sum": (rewards * chosen_mask).sum(),
        "rewards/rejected_sum": (rewards * rejected_mask).sum(),
        "logps/chosen_sum": (logps * chosen_mask).sum(),
        "logps/rejected_sum": (logps * rejected_mask).sum(),
        "count/chosen": chosen_mask.sum(),
        "count/rejected": rejected_mask.sum(),
        "kl": z0,
    }
    return losses, metrics
