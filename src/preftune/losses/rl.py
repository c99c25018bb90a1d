"""Policy-gradient pieces for RLHF: advantages (GAE, GRPO groups, RLOO), KL estimators,
PPO's clipped policy and value losses, and per-token loss aggregation.

Token tensors are [B, T], right-padded; `mask` [B, T] marks response tokens (the only ones
that carry actions). Per-token losses come back with zeros off the mask; `aggregate` (or
`aggregate_sum_and_units` with a global count) turns them into a scalar.
"""

from __future__ import annotations

import torch
from torch import Tensor

from preftune.errors import PreftuneError

KL_ESTIMATORS = ("k1", "k2", "k3")
AGGREGATION_MODES = ("sequence", "token", "constant", "sequence_sum")
K3_MAX_LOG_RATIO = 20.0  # exp(20) ≈ 5e8: large, yet far from float32 overflow (exp(89))


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1)


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016, Eq. 16), per token [B, T].

        δ_t = r_t + γ V_{t+1} − V_t,    A_t = δ_t + γλ A_{t+1},    R_t = A_t + V_t.

    The episode ends after the last response token: V and A after it are 0. The response must
    be one contiguous run of mask per row (a masked prompt prefix is fine); a gap would be read
    as the end of the episode. Returns (advantages, returns), zero off the mask; no gradient.
    """
    with torch.no_grad():
        m = mask.to(values.dtype)
        values = values * m
        rewards = rewards * m
        T = rewards.shape[-1]
        advantages = torch.zeros_like(values)
        next_value = torch.zeros_like(values[:, 0])
        next_advantage = torch.zeros_like(values[:, 0])
        for t in reversed(range(T)):
            delta = rewards[:, t] + gamma * next_value - values[:, t]  # TD residual, Eq. 16
            advantage = (delta + gamma * lam * next_advantage) * m[:, t]  # A_t = δ_t + γλ A_{t+1}
            advantages[:, t] = advantage
            next_value = values[:, t]  # already 0 off the mask: episode ends there
            next_advantage = advantage
        returns = (advantages + values) * m
    return advantages, returns


def whiten(
    x: Tensor, mask: Tensor | None = None, shift_mean: bool = True, eps: float = 1e-8
) -> Tensor:
    """(x − mean) / sqrt(var + eps) over the masked entries (all entries if mask is None).

    var is the unbiased (Bessel-corrected) variance, as in common PPO implementations; with a
    single entry it falls back to dividing by 1. With shift_mean=False the mean is added back
    (only the scale changes). Entries off the mask come back as 0.
    """
    m = torch.ones_like(x) if mask is None else mask.to(x.dtype)
    n = m.sum()
    mean = (x * m).sum() / n.clamp(min=1)
    var = (((x - mean) * m) ** 2).sum() / (n - 1).clamp(min=1)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m


def kl_penalty(logps: Tensor, ref_logps: Tensor, kind: str = "k1") -> Tensor:
    """Per-token estimate of KL(π ‖ π_ref) from tokens sampled from π (Schulman 2020,
    "Approximating KL divergence"). With d = log π_ref − log π:
        k1 = −d,   k2 = ½ d²,   k3 = (e^d − 1) − d   (unbiased, always ≥ 0).
    For k3, d is clamped from above at 20 so that one extreme token cannot overflow e^d into
    inf/NaN gradients. There is no lower clamp: for d → −∞ (π ≫ π_ref) e^d underflows to 0
    harmlessly and the estimator keeps its restoring gradient ∂k3/∂log π = 1 − e^d → 1
    (Shao et al. 2024, Eq. 4); a lower clamp would zero it exactly where it is needed.
    """
    if kind not in KL_ESTIMATORS:
        raise PreftuneError(f"kl estimator kind={kind!r}; choose one of {', '.join(KL_ESTIMATORS)}")
    d = ref_logps - logps
    if kind == "k1":
        return -d  # k1 = log π − log π_ref
    if kind == "k2":
        return 0.5 * d**2  # k2 = ½ (log π − log π_ref)²
    d = d.clamp(max=K3_MAX_LOG_RATIO)  # overflow guard only, see above
    return torch.expm1(d) - d  # k3 = (r − 1) − log r, r = π_ref/π


def ppo_policy_loss(
    logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor, *, clip_eps: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate, per token [B, T] (Schulman et al. 2017, Eq. 7, negated):

        ρ = π/π_old,   loss = max(−A ρ, −A clip(ρ, 1−ε, 1+ε)).

    Zero off the mask. Where the clip binds (A > 0 and ρ > 1+ε, or A < 0 and ρ < 1−ε) the
    gradient is zero. Metrics (detached scalars, masked means over this batch): clipfrac (share
    of tokens where the clipped term is the larger), approx_kl (k3 estimate of KL(π_old ‖ π):
    (ρ − 1) − log ρ), ratio (mean ρ).
    """
    if not clip_eps > 0:
        raise PreftuneError(f"clip_eps={clip_eps} must be > 0")
    log_ratio = logps - old_logps
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_eps, 1 + clip_eps)
    losses = torch.maximum(unclipped, clipped) * mask.to(logps.dtype)  # Schulman et al. 2017, Eq. 7
    with torch.no_grad():
        metrics = {
            "clipfrac": _masked_mean((clipped > unclipped).to(logps.dtype), mask),
            "approx_kl": _masked_mean((ratio - 1) - log_ratio, mask),
            "ratio": _masked_mean(ratio, mask),
        }
    return losses, metrics


def ppo_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, *, clip_eps: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss, per token [B, T]:

        ½ · max((V − R)², (V_old + clip(V − V_old, −ε, ε) − R)²)

    (Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO", value clipping).
    Zero off the mask. Metrics: vf_clipfrac (share of tokens where the clipped error is larger).
    """
    if not clip_eps > 0:
        raise PreftuneError(f"value clip_eps={clip_eps} must be > 0")
    clipped_values = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
    unclipped_err = (values - returns) ** 2
    clipped_err = (clipped_values - returns) ** 2
    losses = (
        0.5 * torch.maximum(unclipped_err, clipped_err) * mask.to(values.dtype)
    )  # Huang et al. 2024
    with torch.no_grad():
        metrics = {
            "vf_clipfrac": _masked_mean((clipped_err > unclipped_err).to(values.dtype), mask)
        }
    return losses, metrics


def _check_groups(rewards: Tensor, group_size: int, name: str) -> None:
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if group_size < 2:
        raise PreftuneError(
            f"{name}={group_size} must be >= 2 (advantages compare completions of one prompt)"
        )
    if rewards.shape[0] % group_size != 0:
        raise PreftuneError(
            f"{rewards.shape[0]} rewards cannot be split into groups of {name}={group_size}; "
            "the number of completions must be a multiple of it"
        )


def group_advantages(
    rewards: Tensor, group_size: int, *, normalize_std: bool = True, eps: float = 1e-4
) -> Tensor:
    """GRPO outcome-supervision advantages [N] (Shao et al. 2024, Sec. 4.1.2, used in Eq. 3).

    `rewards` lists consecutive groups of `group_size` completions of one prompt. Within a
    group: A_i = (r_i − mean(r)) / (std(r) + eps), std the unbiased sample std (as in the
    reference implementations); with normalize_std=False, A_i = r_i − mean(r) (Dr. GRPO,
    Liu et al. 2025, which drops the std to remove a difficulty bias).
    """
    _check_groups(rewards, group_size, "group_size")
    grouped = rewards.reshape(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if normalize_std:
        centred = centred / (
            grouped.std(dim=1, keepdim=True) + eps
        )  # Shao et al. 2024: r̃ = (r − mean)/std
    return centred.reshape(-1)


def leave_one_out_advantages(rewards: Tensor, k: int) -> Tensor:
    """RLOO advantages [N]: A_i = r_i − mean_{j≠i} r_j within each group of k completions of one
    prompt (Ahmadian et al. 2024, "Back to Basics", Eq. 8; Kool et al. 2019)."""
    _check_groups(rewards, k, "k")
    grouped = rewards.reshape(-1, k)
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (k - 1)  # mean of the other k−1
    return (grouped - baseline).reshape(-1)


def aggregate_sum_and_units(
    per_token_losses: Tensor, mask: Tensor, mode: str, max_len: int | None = None
) -> tuple[Tensor, Tensor]:
    """(sum, units) such that aggregate = sum / units, for global normalisation.

    The engine sums `sum` and `units` over gradient-accumulation steps and data-parallel ranks
    and divides once, so sharding does not change the loss:
      sequence: sum = Σ_b mean_t(loss_bt) over rows with ≥ 1 token; units = number of such rows.
      token:    sum = Σ_bt loss_bt;                              units = number of tokens.
      constant: sum = Σ_bt loss_bt;                              units = B · max_len.
      sequence_sum: sum = Σ_bt loss_bt;          units = number of rows with ≥ 1 token.
    `max_len` (the generation budget, e.g. max_completion_length) is used only by "constant";
    if None, the padded width T is used, which varies between batches.
    """
    if mode not in AGGREGATION_MODES:
        raise PreftuneError(
            f"loss aggregation mode={mode!r}; choose one of {', '.join(AGGREGATION_MODES)}"
        )
    m = mask.to(per_token_losses.dtype)
    masked = per_token_losses * m
    if mode == "sequence":
        n_tokens = m.sum(-1)
        per_seq = masked.sum(-1) / n_tokens.clamp(
            min=1
        )  # GRPO (Shao et al. 2024, Eq. 3): 1/|o_i| Σ_t
        return per_seq.sum(), (n_tokens > 0).sum().to(per_token_losses.dtype)
    if mode == "token":
        return masked.sum(), m.sum()  # DAPO (Yu et al. 2025): token-level average
    if (
        mode == "sequence_sum"
    ):  # REINFORCE on log π(y|x) = Σ_t log π(y_t|…), Ahmadian et al. 2024, Eq. 8
        return masked.sum(), (m.sum(-1) > 0).sum().to(per_token_losses.dtype)
    width = per_token_losses.shape[-1] if max_len is None else max_len
    units = per_token_losses.new_tensor(float(per_token_losses.shape[0] * width))
    return masked.sum(), units  # Dr. GRPO (Liu et al. 2025): a constant, length-independent divisor


def aggregate(
    per_token_losses: Tensor, mask: Tensor, mode: str, max_len: int | None = None
) -> Tensor:
    """Scalar loss from per-token losses [B, T] over this batch alone; see
    `aggregate_sum_and_units` for the modes and for normalising by a global count."""
    total, units = aggregate_sum_and_units(per_token_losses, mask, mode, max_len)
    return total / units.clamp(min=1)
