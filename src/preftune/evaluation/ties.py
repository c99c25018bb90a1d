"""Three-way (win / tie / lose) evaluation of a reward on pairs that include ties.

Pure numpy functions, like `evaluation.stats`. A pair is seen from its first reply: the
preferred one of an untied pair (outcome 0, "win"), either reply of a tie (outcome 1). The
probabilities P(win), P(tie), P(lose) come from
- a tie-aware reward model: Rao-Kupper or Davidson with its learned parameter
  (`model_probabilities`), or a three-way head;
- any scalar reward without a tie outcome (Bradley-Terry models, functions): the baseline
  `fit_margin_threshold` / `threshold_probabilities`, a tie probability that depends on
  whether |r_first − r_second| is below a threshold fitted on validation pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from preftune.errors import PreftuneError
from preftune.evaluation.stats import wilson_interval

CLASSES = ("win", "tie", "lose")
_EPS = 1e-12  # probabilities are clipped here before the log: a confident miss costs 27.6 nats


def model_probabilities(diff, tie_model: str, tie_parameter: float) -> np.ndarray:
    """[N, 3] P(win), P(tie), P(lose) of d = r_first − r_second under Rao-Kupper (θ) or
    Davidson (ν), the equations of `losses.reward.tie_log_probs`."""
    from preftune.losses.reward import tie_log_probs

    d = torch.as_tensor(np.asarray(diff, dtype=np.float64))
    return tie_log_probs(d, tie_model, float(np.log(tie_parameter))).exp().numpy()


@dataclass
class MarginThreshold:
    """The Bradley-Terry baseline: P(tie) = p_inside when |d| < tau, else p_outside; the rest
    split by σ(d) as Bradley-Terry would: P(win) = (1 − P(tie)) σ(d)."""

    tau: float
    p_inside: float
    p_outside: float
    n_fit: int
    fit_log_loss: float


def threshold_probabilities(diff, fit: MarginThreshold) -> np.ndarray:
    d = np.asarray(diff, dtype=np.float64)
    p_tie = np.where(np.abs(d) < fit.tau, fit.p_inside, fit.p_outside)
    p_win = (1 - p_tie) / (1 + np.exp(-d))
    return np.stack([p_win, p_tie, 1 - p_tie - p_win], axis=-1)


def fit_margin_threshold(diff, tied, max_candidates: int = 200) -> MarginThreshold:
    """The threshold tau (and the two tie rates) with the lowest three-way log loss on these
    validation pairs. Candidates: 0 and midpoints between sorted |d| (at most
    `max_candidates`, at quantiles). Tie rates are Laplace-smoothed, (ties + 1) / (n + 2), so
    no probability is 0 or 1."""
    d = np.asarray(diff, dtype=np.float64)
    t = np.asarray(tied, dtype=bool)
    if d.size < 2:
        raise PreftuneError(
            f"fitting the tie threshold needs at least 2 validation pairs, got {d.size}"
        )
    a = np.sort(np.abs(d))
    mids = (a[1:] + a[:-1]) / 2
    if mids.size > max_candidates:
        mids = np.quantile(mids, np.linspace(0, 1, max_candidates))
    best = None
    for tau in np.concatenate([[0.0], np.unique(mids), [a[-1] + 1.0]]):
        inside = np.abs(d) < tau
        p_in = (t[inside].sum() + 1) / (inside.sum() + 2)
        p_out = (t[~inside].sum() + 1) / ((~inside).sum() + 2)
        fit = MarginThreshold(float(tau), float(p_in), float(p_out), int(d.size), 0.0)
        loss = log_loss(threshold_probabilities(d, fit), t.astype(int))
        if best is None or loss < best.fit_log_loss - 1e-12:
            fit.fit_log_loss = loss
            best = fit
    return best


def log_loss(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean −log P(outcome), probabilities clipped to [1e-12, 1]."""
    p = np.clip(probs[np.arange(len(labels)), labels], _EPS, 1.0)
    return float(-np.mean(np.log(p)))


def _symmetrised(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each pair from both sides: (P(win), P(tie), P(lose), y) and (P(lose), P(tie), P(win), y'),
    y' swapping win and lose. The first reply of a stored pair is always the preferred one, so
    only both sides together make P(win) take both outcomes."""
    flipped = probs[:, ::-1]
    flipped_labels = np.where(labels == 1, 1, 2 - labels)
    return np.concatenate([probs, flipped]), np.concatenate([labels, flipped_labels])


def three_way_metrics(probs, labels, *, n_bins: int = 10, confidence: float = 0.95) -> dict:
    """Log loss, accuracy (argmax, Wilson interval), tie recall/precision, mean P(tie) on tied
    and untied pairs, and per-class calibration: for each outcome c, pairs from both sides
    (`_symmetrised`) binned by P(c) into `n_bins` equal bins on [0, 1]; ECE_c =
    Σ_b (n_b / N) |freq_b(c) − mean_b P(c)| (Naeini et al. 2015). By symmetry ECE_win = ECE_lose.
    `log_loss_constant` is the log loss of always predicting these pairs' own outcome rates
    (win and lose half each of the untied rate): a reference a model should beat."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=int)
    if p.ndim != 2 or p.shape[1] != 3 or p.shape[0] != y.size or y.size == 0:
        raise PreftuneError(
            f"three_way_metrics: need probabilities [N, 3] and N labels, got {p.shape} and {y.size}"
        )
    if not np.all(np.isfinite(p)):
        raise PreftuneError("three_way_metrics: non-finite probabilities")
    predicted = p.argmax(-1)
    correct = predicted == y
    tied = y == 1
    lo, hi = wilson_interval(float(correct.sum()), int(y.size), confidence)
    rate = tied.mean()
    constant = np.tile([(1 - rate) / 2, rate, (1 - rate) / 2], (y.size, 1))
    sp, sy = _symmetrised(p, y)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    calibration = {}
    for c, name in enumerate(CLASSES):
        idx = np.clip(np.searchsorted(edges, sp[:, c], side="right") - 1, 0, n_bins - 1)
        counts = np.bincount(idx, minlength=n_bins)
        with np.errstate(invalid="ignore", divide="ignore"):
            conf = np.bincount(idx, weights=sp[:, c], minlength=n_bins) / counts
            freq = np.bincount(idx, weights=(sy == c).astype(float), minlength=n_bins) / counts
        filled = counts > 0
        ece = float(np.sum(counts[filled] / sy.size * np.abs(freq[filled] - conf[filled])))
        calibration[name] = {
            "ece": ece,
            "bins": [
                {
                    "low": float(edges[b]),
                    "high": float(edges[b + 1]),
                    "count": int(counts[b]),
                    "mean_probability": None if not filled[b] else float(conf[b]),
                    "frequency": None if not filled[b] else float(freq[b]),
                }
                for b in range(n_bins)
            ],
        }
    n_pred_tie = int((predicted == 1).sum())
    return {
        "n": int(y.size),
        "n_tied": int(tied.sum()),
        "log_loss": log_loss(p, y),
        "log_loss_constant": log_loss(constant, y),
        "accuracy": float(correct.mean()),
        "ci_low": lo,
        "ci_high": hi,
        "tie_recall": float((predicted[tied] == 1).mean()) if tied.any() else None,
        "tie_precision": float(tied[predicted == 1].mean()) if n_pred_tie else None,
        "predicted_tie_rate": n_pred_tie / y.size,
        "mean_p_tie_tied": float(p[tied, 1].mean()) if tied.any() else None,
        "mean_p_tie_untied": float(p[~tied, 1].mean()) if (~tied).any() else None,
        "ece": {name: calibration[name]["ece"] for name in CLASSES},
        "calibration": calibration,
    }


def reliability_plot(metrics: dict, path) -> None:
    """One reliability curve per outcome (mean P(c) against the observed frequency of c)."""
    from matplotlib.figure import Figure

    from preftune.evaluation.plots import _save_png

    fig = Figure(figsize=(4.8, 4.8))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], "--", color="gray", lw=0.8, label="perfect calibration")
    for name in CLASSES:
        bins = [b for b in metrics["calibration"][name]["bins"] if b["count"]]
        ax.plot(
            [b["mean_probability"] for b in bins],
            [b["frequency"] for b in bins],
            marker="o",
            label=f"P({name}), ECE {metrics['ece'][name]:.3f}",
        )
    ax.set_xlabel("predicted probability")
    ax.set_ylabel("observed frequency")
    ax.set_title(f"win / tie / lose calibration\n({metrics['n']} pairs, seen from both sides)")
    ax.legend(fontsize=8)
    _save_png(fig, path)
