"""Pairwise preference losses: the DPO family and its reference-free cousins.

One pure function, `preference_loss`, branches on `loss_type`; each branch names its paper
and equation. Inputs are *summed* completion log-probs per sequence, shape [B], and (for the
length-normalised losses) completion token counts [B]. Nothing here knows about models,
batches or trainers.

Notation used in comments: π_c, π_r = log π(y_c|x), log π(y_r|x) (summed over completion
tokens); ref_c, ref_r the same under the reference model; |y| the completion token count;
h = (π_c − ref_c) − (π_r − ref_r), the difference of log-ratios; σ the logistic function.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from preftune.errors import PreftuneError

PREFERENCE_LOSSES = ("dpo", "ipo", "cdpo", "robust", "hinge", "simpo", "orpo", "cpo")
REFERENCE_FREE = {"simpo", "orpo", "cpo"}
LENGTH_NORMALISED = {"simpo", "orpo", "cpo"}  # need completion token counts
LABEL_SMOOTHING_LOSSES = {"cdpo", "robust"}  # the only losses that read label_smoothing
NLL_INCLUDED = {"orpo", "cpo"}  # already add an NLL term on the chosen completion


def check_preference_hparams(
    loss_type: str,
    beta: float,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    *,
    sft_weight: float = 0.0,
) -> None:
    """Refuse invalid or silently-ignored settings before any training starts.

    Raises `PreftuneError` naming the offending field and the allowed values.
    """
    if loss_type not in PREFERENCE_LOSSES:
        raise PreftuneError(
            f"loss_type={loss_type!r} is not a preference loss; choose one of {', '.join(PREFERENCE_LOSSES)}"
        )
    try:
        beta_ok = math.isfinite(float(beta)) and float(beta) > 0
    except (TypeError, ValueError):
        beta_ok = False
    if not beta_ok:
        raise PreftuneError(f"beta={beta!r} must be a finite number > 0")
    if not (0.0 <= label_smoothing < 0.5):
        raise PreftuneError(
            f"label_smoothing={label_smoothing!r} must lie in [0, 0.5) (the assumed probability "
            "that a preference label is flipped)"
        )
    if label_smoothing > 0 and loss_type not in LABEL_SMOOTHING_LOSSES:
        raise PreftuneError(
            f"label_smoothing={label_smoothing} has no effect with loss_type={loss_type!r}; it is "
            f"used only by {', '.join(sorted(LABEL_SMOOTHING_LOSSES))} (set it to 0 or change loss_type)"
        )
    if not math.isfinite(simpo_gamma):
        raise PreftuneError(f"simpo_gamma={simpo_gamma!r} must be a finite number")
    if sft_weight < 0:
        raise PreftuneError(f"sft_weight={sft_weight} must be >= 0")
    if sft_weight > 0 and loss_type in NLL_INCLUDED:
        raise PreftuneError(
            f"sft_weight={sft_weight} with loss_type={loss_type!r}: {loss_type} already includes an "
            "NLL term on the chosen completion; set sft_weight to 0"
        )


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 − exp(x)) for x < 0, accurate at both ends (Mächler 2012, "Accurately computing
    log(1 − exp(−|a|))"): expm1 near 0, log1p far from it."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _log_odds(mean_logps: Tensor) -> Tensor:
    """log odds(y) = ℓ − log(1 − e^ℓ) for the mean per-token log-prob ℓ (Hong et al. 2024, Eq. 4).

    ℓ is clamped just below 0: a model certain of every token (ℓ = 0) has infinite odds, and
    inf − inf between chosen and rejected would turn the loss into NaN.
    """
    ell = mean_logps.clamp(max=-torch.finfo(mean_logps.dtype).eps)
    return ell - _log1mexp(ell)


def preference_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    *,
    loss_type: str,
    beta: float,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    ipo_length_normalize: bool = False,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-pair preference loss [B] and detached per-pair metrics.

    Args:
        chosen_logps, rejected_logps: summed completion log-probs under the policy, [B].
        ref_chosen_logps, ref_rejected_logps: the same under the reference model, [B];
            required unless `loss_type` is reference-free (simpo, orpo, cpo), refused otherwise
            (so the trainer skips the reference forward pass).
        loss_type: one of `PREFERENCE_LOSSES`:
          - dpo:    −log σ(βh)                                   Rafailov et al. 2023, Eq. 7
          - cdpo:   −(1−ε) log σ(βh) − ε log σ(−βh)              Mitchell 2023, conservative DPO
          - robust: [−(1−ε) log σ(βh) + ε log σ(−βh)] / (1−2ε)   Chowdhury et al. 2024, rDPO
          - hinge:  max(0, 1 − βh)                               Zhao et al. 2023, SLiC-HF
          - ipo:    (h − 1/(2β))²                                Azar et al. 2023, Eq. 17
            Here h uses *summed* log-ratios, like DPO (the paper's h is per sequence, not
            per token); 1/(2β) is therefore a target margin on summed log-ratios. With
            `ipo_length_normalize` each log-ratio is divided by its completion's length
            first (TRL's convention), so 1/(2β) is a margin per token.
          - simpo:  −log σ(β(π_c/|y_c| − π_r/|y_r|) − γ)        Meng et al. 2024, Eq. 6
            γ = `simpo_gamma` is the absolute target margin (not TRL's γ/β ratio).
          - orpo:   −ℓ_c + λ·(−log σ(log odds_c − log odds_r))   Hong et al. 2024, Eq. 6-7
            with ℓ = π/|y| the mean per-token log-prob, log odds = ℓ − log(1 − e^ℓ), and
            λ = `beta` (ORPO's weight on the odds-ratio term).
          - cpo:    −log σ(β(π_c − π_r)) − π_c/|y_c|            Xu et al. 2024, Eq. 3 + NLL
        beta: β > 0 (λ for orpo).
        label_smoothing: ε ∈ [0, 0.5), the assumed label-flip rate; only cdpo and robust.
        simpo_gamma: γ, SimPO's target reward margin.
        chosen_lengths, rejected_lengths: completion token counts [B] (positive); required
            for simpo, orpo, cpo and ipo_length_normalize. When `chosen_lengths` is given,
            "nll/chosen" is reported.
        ipo_length_normalize: ipo only; per-token log-ratios as in TRL (see ipo above).

    Metrics (detached, per pair, [B]):
        rewards/chosen, rewards/rejected: the implicit rewards whose difference the loss
            pushes up. Reference-based: β·(π − ref). simpo: β·π/|y| (its length-normalised
            reward). cpo: β·π (the summed log-prob inside its sigmoid). orpo: β·π/|y| (λ times
            the mean per-token log-prob; its odds ratio is reported as "log_odds_ratio").
        rewards/margins: chosen − rejected reward; rewards/accuracies: 1.0 where chosen > rejected.
        logps/chosen, logps/rejected: the policy's summed log-probs.
        kl/chosen: π_c − ref_c, the log-ratio on the chosen sequence (reference-based only).
        nll/chosen: −π_c/|y_c|, mean per-token NLL of the chosen completion (when lengths given).
    """
    check_preference_hparams(loss_type, beta, label_smoothing, simpo_gamma)
    reference_free = loss_type in REFERENCE_FREE
    has_ref = ref_chosen_logps is not None or ref_rejected_logps is not None
    if reference_free and has_ref:
        raise PreftuneError(
            f"loss_type={loss_type!r} is reference-free: it does not use reference log-probs "
            "(do not load or run a reference model for it)"
        )
    if not reference_free and (ref_chosen_logps is None or ref_rejected_logps is None):
        raise PreftuneError(
            f"loss_type={loss_type!r} needs reference log-probs (ref_chosen_logps and "
            f"ref_rejected_logps); reference-free losses are {', '.join(sorted(REFERENCE_FREE))}"
        )
    if ipo_length_normalize and loss_type != "ipo":
        raise PreftuneError(
            f"ipo_length_normalize applies to loss_type='ipo' only, not {loss_type!r}"
        )
    needs_lengths = loss_type in LENGTH_NORMALISED or ipo_length_normalize
    if needs_lengths and (chosen_lengths is None or rejected_lengths is None):
        raise PreftuneError(
            f"loss_type={loss_type!r} needs completion lengths (chosen_lengths and rejected_lengths)"
        )

    eps = label_smoothing
    if not reference_free:
        chosen_ratio = chosen_logps - ref_chosen_logps
        rejected_ratio = rejected_logps - ref_rejected_logps
        if ipo_length_normalize:  # TRL's IPO: mean per-token log-ratios
            chosen_ratio = chosen_ratio / chosen_lengths
            rejected_ratio = rejected_ratio / rejected_lengths
        h = chosen_ratio - rejected_ratio
        # −log σ(x) = softplus(−x): finite for any x, no exp overflow.
        if loss_type == "dpo":
            losses = -F.logsigmoid(beta * h)  # Rafailov et al. 2023, Eq. 7
        elif loss_type == "cdpo":
            # Mitchell 2023: DPO against soft labels (1−ε, ε).
            losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
        elif loss_type == "robust":
            # Chowdhury et al. 2024: unbiased under label-flip rate ε; may be negative.
            losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (
                1 - 2 * eps
            )
        elif loss_type == "hinge":
            losses = torch.relu(
                1 - beta * h
            )  # Zhao et al. 2023 (SLiC-HF), hinge on the log-ratio margin
        elif loss_type == "ipo":
            losses = (h - 1 / (2 * beta)) ** 2  # Azar et al. 2023, Eq. 17 (summed log-ratios)
        else:  # pragma: no cover - check_preference_hparams covers the list
            raise AssertionError(loss_type)
        chosen_rewards = beta * chosen_ratio
        rejected_rewards = beta * rejected_ratio
    else:
        chosen_mean = chosen_logps / chosen_lengths
        rejected_mean = rejected_logps / rejected_lengths
        if loss_type == "simpo":
            # Meng et al. 2024, Eq. 6: length-normalised reward, absolute target margin γ.
            chosen_rewards = beta * chosen_mean
            rejected_rewards = beta * rejected_mean
            losses = -F.logsigmoid(chosen_rewards - rejected_rewards - simpo_gamma)
        elif loss_type == "orpo":
            # Hong et al. 2024, Eq. 6-7: L = NLL_c + λ·(−log σ(log odds_c − log odds_r)), λ = β.
            log_odds_ratio = _log_odds(chosen_mean) - _log_odds(rejected_mean)
            losses = -chosen_mean - beta * F.logsigmoid(log_odds_ratio)
            chosen_rewards = beta * chosen_mean
            rejected_rewards = beta * rejected_mean
        elif loss_type == "cpo":
            # Xu et al. 2024, Eq. 3: reference-free DPO term plus behaviour cloning on y_c.
            chosen_rewards = beta * chosen_logps
            rejected_rewards = beta * rejected_logps
            losses = -F.logsigmoid(chosen_rewards - rejected_rewards) - chosen_mean
        else:  # pragma: no cover
            raise AssertionError(loss_type)

    metrics = {
        "rewards/chosen": chosen_rewards.detach(),
        "rewards/rejected": rejected_rewards.detach(),
        "rewards/margins": (chosen_rewards - rejected_rewards).detach(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).to(chosen_logps.dtype).detach(),
        "logps/chosen": chosen_logps.detach(),
        "logps/rejected": rejected_logps.detach(),
    }
    if not reference_free:
        metrics["kl/chosen"] = chosen_ratio.detach()
    if chosen_lengths is not None:
        metrics["nll/chosen"] = (-chosen_logps / chosen_lengths).detach()
    if loss_type == "orpo":
        metrics["log_odds_ratio"] = log_odds_ratio.detach()
    return losses, metrics


def add_sft_term(
    losses: Tensor, chosen_logps: Tensor, chosen_lengths: Tensor, weight: float
) -> Tensor:
    """losses + weight · (−π_c/|y_c|): an NLL term on the chosen completion, per pair.

    RPO (Pang et al. 2024, "Iterative Reasoning Preference Optimization", Eq. 1) and Llama 3
    (Dubey et al. 2024) add it to DPO to keep the chosen likelihood from falling. Refused with
    orpo/cpo by `check_preference_hparams`, since those losses already contain it.
    """
    if weight < 0:
        raise PreftuneError(f"sft_weight={weight} must be >= 0")
    return losses + weight * (-chosen_logps / chosen_lengths)  # mean per-token NLL of y_c
