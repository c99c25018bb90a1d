"""Reward-model losses: pairwise Bradley-Terry, listwise Plackett-Luce, a centering term,
and the tie-aware models: Rao-Kupper and Davidson (one tie parameter each) and a three-way
(A wins / tie / B wins) classification loss.

Inputs are scalar rewards r(x, y) from the reward model: [B] for pairs, [B, K] for K ranked
completions per prompt (with an optional validity mask [B, K] for variable K).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from preftune.errors import PreftuneError


def bradley_terry_loss(
    r_chosen: Tensor, r_rejected: Tensor, margin: Tensor | float | None = None
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-pair −log σ(r_c − r_r − m) [B] and detached metrics.

    Bradley & Terry 1952; the margin m (how much better the chosen one was rated) as in
    Touvron et al. 2023 (Llama 2), Eq. 2. Metrics [B]: accuracy (1.0 where r_c > r_r),
    margin (r_c − r_r, without m), reward/chosen, reward/rejected.
    """
    diff = r_chosen - r_rejected
    logits = diff if margin is None else diff - margin
    losses = -F.logsigmoid(logits)  # Bradley & Terry 1952; Llama 2 Eq. 2 with margin
    metrics = {
        "accuracy": (diff > 0).to(r_chosen.dtype).detach(),
        "margin": diff.detach(),
        "reward/chosen": r_chosen.detach(),
        "reward/rejected": r_rejected.detach(),
    }
    return losses, metrics


def reward_centering_penalty(r_chosen: Tensor, r_rejected: Tensor, coef: float) -> Tensor:
    """Per-pair coef · (r_c + r_r)²: keeps rewards centred on zero, which the BT loss alone
    leaves undetermined (Eisenstein et al. 2023, "Helping or Herding?", the centering
    auxiliary loss)."""
    if coef < 0:
        raise PreftuneError(f"reward centering coef={coef} must be >= 0")
    return coef * (r_chosen + r_rejected) ** 2  # Eisenstein et al. 2023


def _order(scores: Tensor, mask: Tensor) -> Tensor:
    """Indices sorting each row by score, descending, valid entries first; ties keep index order."""
    by_score = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    valid_sorted = mask.gather(-1, by_score)
    # A second stable sort on validity keeps the score order within the valid entries.
    by_valid = torch.sort(valid_sorted.to(torch.int8), dim=-1, descending=True, stable=True).indices
    return by_score.gather(-1, by_valid)


def plackett_luce_loss(
    rewards: Tensor, scores: Tensor, mask: Tensor | None = None
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-prompt Plackett-Luce negative log-likelihood of the ranking given by `scores` [B].

    Completions are ordered by `scores` descending (ties broken by lower index first, so a
    tie is treated as the order the completions were listed in), σ(i) is the i-th, and
        L = −Σ_{i=1}^{K−1} [ r_σ(i) − log Σ_{j≥i} exp r_σ(j) ]
    (Plackett 1975; Luce 1959; as used for reward models by Zhu et al. 2023 and Song et al.
    2023). With K = 2 it equals the Bradley-Terry loss. `mask` [B, K] marks real completions
    (variable K): padded entries are left out of every sum. A prompt with fewer than two
    completions has loss 0.

    Metrics (detached, [B]): "accuracy", the fraction of ordered pairs (score_i > score_j, both
    valid) with r_i > r_j; 0 where a row has no such pair.
    """
    if rewards.shape != scores.shape or rewards.dim() != 2:
        raise ValueError(
            f"rewards {tuple(rewards.shape)} and scores {tuple(scores.shape)} must both be [B, K]"
        )
    valid = torch.ones_like(rewards, dtype=torch.bool) if mask is None else mask.bool()
    order = _order(scores, valid)
    r = rewards.gather(-1, order)
    v = valid.gather(-1, order)
    k = r.shape[-1]
    # Suffix log-sum-exp over valid j ≥ i, as a [B, K, K] masked logsumexp (K is small).
    # The diagonal is always included so no row is all −inf (that would give NaN gradients).
    idx = torch.arange(k, device=r.device)
    later = idx[None, :] >= idx[:, None]  # [i, j]: j ≥ i
    keep = later[None] & (v[:, None, :] | torch.eye(k, dtype=torch.bool, device=r.device)[None])
    r_filled = torch.where(v, r, torch.zeros_like(r))
    suffix_lse = torch.logsumexp(
        r_filled[:, None, :].expand(-1, k, -1).masked_fill(~keep, float("-inf")), dim=-1
    )
    terms = torch.where(
        v, r_filled - suffix_lse, torch.zeros_like(r)
    )  # log P(σ(i) first among the rest)
    losses = -terms.sum(-1)  # the last valid term is r − r = 0, so summing to K is the sum to K−1
    _, pair_metrics = _pairs(rewards, scores, valid)
    return losses, {"accuracy": pair_metrics["accuracy"]}


def _pairs(rewards: Tensor, scores: Tensor, valid: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Bradley-Terry losses [B, K, K] for pairs (i better than j) and the pair mask."""
    better = (scores[:, :, None] > scores[:, None, :]) & valid[:, :, None] & valid[:, None, :]
    diff = rewards[:, :, None] - rewards[:, None, :]
    n_pairs = better.sum((-1, -2))
    correct = ((diff > 0) & better).sum((-1, -2))
    accuracy = correct.to(rewards.dtype) / n_pairs.clamp(min=1).to(rewards.dtype)
    losses = torch.where(better, -F.logsigmoid(diff), torch.zeros_like(diff))
    return losses, {"accuracy": accuracy.detach(), "pairs": n_pairs.detach(), "better": better}


def all_pairs_loss(
    rewards: Tensor, scores: Tensor, mask: Tensor | None = None
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-prompt mean Bradley-Terry loss over all pairs with different scores [B].

    For every pair (i, j) of valid completions with score_i > score_j, −log σ(r_i − r_j);
    averaged over those pairs (the InstructGPT recipe, Ouyang et al. 2022, Eq. 1, which
    averages over the K-choose-2 comparisons of a prompt). Tied pairs are skipped; a prompt
    without any untied pair has loss 0. Metrics [B]: "accuracy" (fraction of pairs ordered
    correctly by the rewards), "pairs" (number of pairs).
    """
    if rewards.shape != scores.shape or rewards.dim() != 2:
        raise ValueError(
            f"rewards {tuple(rewards.shape)} and scores {tuple(scores.shape)} must both be [B, K]"
        )
    valid = torch.ones_like(rewards, dtype=torch.bool) if mask is None else mask.bool()
    pair_losses, metrics = _pairs(rewards, scores, valid)
    n = metrics["pairs"].clamp(min=1).to(rewards.dtype)
    losses = pair_losses.sum((-1, -2)) / n
    return losses, {"accuracy": metrics["accuracy"], "pairs": metrics["pairs"]}


# --- ties ------------------------------------------------------------------------------------

TIE_MODELS = ("rao-kupper", "davidson")
OUTCOMES = ("win", "tie", "lose")  # of the first reply against the second


def tie_log_probs(diff: Tensor, model: str, log_param: Tensor | float) -> Tensor:
    """log P(first wins), log P(tie), log P(second wins) [..., 3] for d = r_first − r_second.

    With π = exp(r) (the Bradley-Terry strengths), `log_param` is log θ ≥ 0 for Rao-Kupper and
    log ν for Davidson:
    - Rao & Kupper 1967 (JASA 62:194): P(i≻j) = π_i / (π_i + θ π_j), P(tie) = (θ² − 1) π_i π_j
      / ((π_i + θ π_j)(θ π_i + π_j)); in logits, P(i≻j) = σ(d − log θ) and
      P(tie) = σ(log θ − d) σ(log θ + d) (1 − θ^−2).
    - Davidson 1970 (JASA 65:317): P(i≻j) = π_i / (π_i + π_j + ν √(π_i π_j)), P(tie) =
      ν √(π_i π_j) / (the same); dividing by √(π_i π_j), a softmax over (d/2, log ν, −d/2).
    Both are Bradley-Terry when the tie parameter vanishes (θ → 1, ν → 0), with P(tie) → 0.
    """
    log_param = torch.as_tensor(log_param, dtype=diff.dtype, device=diff.device)
    if model == "rao-kupper":
        if bool((log_param < 0).any()):
            raise PreftuneError(f"Rao-Kupper needs log theta >= 0, got {log_param.tolist()}")
        log_win = F.logsigmoid(diff - log_param)  # Rao & Kupper 1967: π_i / (π_i + θ π_j)
        log_lose = F.logsigmoid(-diff - log_param)
        # P(tie) = σ(η − d) σ(η + d) (1 − e^−2η), η = log θ: stable for any d (log1p form).
        log_tie = (
            F.logsigmoid(log_param - diff)
            + F.logsigmoid(log_param + diff)
            + torch.log(-torch.expm1(-2 * log_param))
        )
        return torch.stack([log_win, log_tie, log_lose], dim=-1)
    if model == "davidson":
        # Davidson 1970: (π_i, ν √(π_i π_j), π_j) / sum, i.e. softmax(d/2, log ν, −d/2).
        logits = torch.stack([diff / 2, log_param.expand_as(diff), -diff / 2], dim=-1)
        return torch.log_softmax(logits, dim=-1)
    raise PreftuneError(f"unknown tie model {model!r}; expected one of {', '.join(TIE_MODELS)}")


def tie_model_loss(
    r_first: Tensor, r_second: Tensor, tie: Tensor, model: str, log_param: Tensor | float
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-pair negative log-likelihood [B] under Rao-Kupper or Davidson (see `tie_log_probs`).

    For an untied pair `r_first` is the preferred reply's reward and the loss is −log P(win);
    for a tied pair (`tie` true) it is −log P(tie). Metrics [B] (NaN where they do not apply,
    which the metric window skips): accuracy (untied pairs: r_first > r_second),
    three_way_accuracy (the most probable of win/tie/lose is the outcome), p_tie (model's P(tie)),
    p_tie/tied and p_tie/untied (the same, split by the label), margin (r_first − r_second).
    """
    diff = r_first - r_second
    logp = tie_log_probs(diff, model, log_param)
    tie = tie.to(torch.bool)
    losses = -torch.where(tie, logp[..., 1], logp[..., 0])
    with torch.no_grad():
        nan = torch.full_like(diff, float("nan"))
        p_tie = logp[..., 1].exp()
        predicted = logp.argmax(-1)
        metrics = {
            "accuracy": torch.where(tie, nan, (diff > 0).to(diff.dtype)),
            "three_way_accuracy": (predicted == torch.where(tie, 1, 0)).to(diff.dtype),
            "p_tie": p_tie,
            "p_tie/tied": torch.where(tie, p_tie, nan),
            "p_tie/untied": torch.where(tie, nan, p_tie),
            "margin": diff.detach(),
        }
    return losses, metrics


def three_way_loss(logits: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-pair cross-entropy of a three-way head [B], logits [B, 3] over (first wins, tie,
    second wins), labels [B] in {0, 1, 2}: −log softmax(logits)[label], the multinomial
    log-loss the Chatbot Arena human-preference competition scores. Metrics [B]: accuracy
    (argmax == label), p_tie."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    losses = -logp.gather(-1, labels.long()[:, None]).squeeze(-1)
    with torch.no_grad():
        metrics = {
            "three_way_accuracy": (logp.argmax(-1) == labels).float(),
            "p_tie": logp[:, 1].exp(),
        }
    return losses, metrics
