"""Statistics of a reward evaluated on preference pairs (`preftune eval-rm`).

Pure numpy functions of per-pair scores: the scorer (reward model, DPO implicit reward, python
function) lives elsewhere and hands these functions two float arrays, `r_chosen[i]` and
`r_rejected[i]` for pair i. Nothing here knows about models, files or the CLI.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from preftune.errors import PreftuneError

TIE_MODES = ("wrong", "half")
SINGLE_EXAMPLE_WARNING = "only 1 example: interval is uninformative"


# ----------------------------------------------------------------------------------------------
# Input checks


def check_finite(name: str, values) -> np.ndarray:
    """Return `values` as a 1-D float64 array; NaN/inf or a non-1-D shape is a user error.

    The message says how many values are bad and the first offending row indices, so that the
    user can find the pairs their reward failed on.
    """
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise PreftuneError(
            f"{name}: expected one score per pair (a 1-D array), got shape {arr.shape}"
        )
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        shown = ", ".join(str(i) for i in bad[:5]) + (", ..." if bad.size > 5 else "")
        raise PreftuneError(
            f"{name}: {bad.size} of {arr.size} values are not finite (NaN or inf), at rows {shown}"
        )
    return arr


def _check_pairs(r_chosen, r_rejected) -> tuple[np.ndarray, np.ndarray]:
    c = check_finite("rewards of chosen responses", r_chosen)
    r = check_finite("rewards of rejected responses", r_rejected)
    if c.shape != r.shape:
        raise PreftuneError(
            f"got {c.size} chosen rewards but {r.size} rejected rewards: need one of each per pair"
        )
    if c.size == 0:
        raise PreftuneError("no preference pairs to evaluate (0 rewards given)")
    return c, r


def _check_outcomes(outcomes) -> np.ndarray:
    o = np.asarray(outcomes, dtype=np.float64)
    if o.ndim != 1 or o.size == 0:
        raise PreftuneError(f"outcomes: expected a non-empty 1-D array, got shape {o.shape}")
    if not np.all(np.isfinite(o)) or np.any((o < 0) | (o > 1)):
        raise PreftuneError("outcomes: every value must lie in [0, 1] (1 = chosen scored higher)")
    return o


# ----------------------------------------------------------------------------------------------
# Accuracy with confidence intervals


def pair_outcomes(r_chosen, r_rejected, *, ties: str = "wrong") -> np.ndarray:
    """Per-pair outcome: 1 if r_chosen > r_rejected, 0 if lower; exact ties score 0 ("wrong",
    the default: a reward that cannot separate the pair did not rank it) or 0.5 ("half")."""
    if ties not in TIE_MODES:
        raise PreftuneError(f"ties={ties!r} is not one of {TIE_MODES}")
    c, r = _check_pairs(r_chosen, r_rejected)
    tie_value = 0.0 if ties == "wrong" else 0.5
    return np.where(c > r, 1.0, np.where(c < r, 0.0, tie_value))


def _z(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise PreftuneError(f"confidence={confidence} must be strictly between 0 and 1")
    return NormalDist().inv_cdf(0.5 + confidence / 2.0)


def wilson_interval(successes: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (Wilson 1927, JASA 22:209).

    p̂ = s/n, z = Φ⁻¹((1+confidence)/2):
        centre = (p̂ + z²/2n) / (1 + z²/n),  half = z/(1 + z²/n) · sqrt(p̂(1−p̂)/n + z²/4n²).
    Half-credit ties make `successes` fractional: they enter as a fractional count in p̂ (the
    formula is unchanged), which is slightly conservative since a 0.5 outcome varies less than
    a Bernoulli one.
    """
    if n <= 0:
        raise PreftuneError(f"a confidence interval needs at least one example (n={n})")
    if not 0.0 <= successes <= n:
        raise PreftuneError(f"successes={successes} must lie between 0 and n={n}")
    z = _z(confidence)
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class Row:
    """One line of the accuracy table."""

    name: str  # "overall", a subset name, or "weighted"
    n: int  # pairs counted (for "weighted": pairs in the subsets with a positive weight)
    accuracy: float
    ci_low: float
    ci_high: float
    warning: str | None = None  # why the interval should not be trusted, if it should not


def _row(name: str, o: np.ndarray, confidence: float) -> Row:
    low, high = wilson_interval(float(o.sum()), o.size, confidence)
    warning = SINGLE_EXAMPLE_WARNING if o.size == 1 else None
    return Row(name, int(o.size), float(o.mean()), low, high, warning)


def accuracy_table(
    outcomes,
    subsets: list[str] | None = None,
    *,
    section_weights: dict[str, float] | None = None,
    confidence: float = 0.95,
) -> list[Row]:
    """Rows: "overall", one per subset (sorted by name), then "weighted" if weights are given.

    The weighted row is Σ w_i·acc_i / Σ w_i over subsets (RewardBench's section scores, Lambert
    et al. 2024); subsets without a weight get weight 0. Its interval is the normal
    approximation acc ± z·sqrt(Σ ŵ_i² p_i(1−p_i)/n_i) with ŵ = w/Σw (subsets independent),
    clipped to [0, 1]; it collapses to a point when every weighted subset is at 0% or 100%.
    """
    o = _check_outcomes(outcomes)
    rows = [_row("overall", o, confidence)]
    if subsets is None:
        if section_weights is not None:
            raise PreftuneError("section_weights were given but the pairs have no `subset` column")
        return rows

    subsets = list(subsets)
    if len(subsets) != o.size:
        raise PreftuneError(f"got {len(subsets)} subset labels for {o.size} pairs")
    missing = [i for i, s in enumerate(subsets) if not isinstance(s, str) or not s]
    if missing:
        raise PreftuneError(
            f"subset: {len(missing)} pairs have no subset name (first rows: {missing[:5]}); "
            "give every pair a subset or drop the column"
        )
    labels = np.asarray(subsets, dtype=object)
    by_subset = {}
    for name in sorted(set(subsets)):
        by_subset[name] = _row(name, o[labels == name], confidence)
    rows.extend(by_subset.values())

    if section_weights is not None:
        rows.append(_weighted_row(by_subset, section_weights, confidence))
    return rows


def _weighted_row(by_subset: dict[str, Row], weights: dict[str, float], confidence: float) -> Row:
    unknown = sorted(set(weights) - set(by_subset))
    if unknown:
        raise PreftuneError(
            f"section_weights name subsets that are not in the data: {unknown}; "
            f"known subsets: {sorted(by_subset)}"
        )
    w = {}
    for name, value in weights.items():
        value = float(value)
        if not math.isfinite(value) or value < 0:
            raise PreftuneError(
                f"section_weights[{name!r}]={value}: weights must be finite and >= 0"
            )
        w[name] = value
    total = sum(w.values())
    if total <= 0:
        raise PreftuneError("section_weights: at least one weight must be positive")

    used = [name for name in sorted(w) if w[name] > 0]
    acc = sum(w[s] / total * by_subset[s].accuracy for s in used)
    # Var(Σ ŵ_i p̂_i) = Σ ŵ_i² p_i(1−p_i)/n_i for independent subsets (normal approximation).
    var = sum(
        (w[s] / total) ** 2 * by_subset[s].accuracy * (1 - by_subset[s].accuracy) / by_subset[s].n
        for s in used
    )
    half = _z(confidence) * math.sqrt(var)
    warning = None
    if any(by_subset[s].n == 1 for s in used):
        warning = "a weighted subset has only 1 example: interval is uninformative"
    elif var == 0.0:
        warning = (
            "every weighted subset is at 0% or 100%: the normal-approximation interval is a point"
        )
    return Row(
        "weighted",
        sum(by_subset[s].n for s in used),
        acc,
        max(0.0, acc - half),
        min(1.0, acc + half),
        warning,
    )


# ----------------------------------------------------------------------------------------------
# Calibration


@dataclass
class Calibration:
    """Reliability of σ(r_c − r_r) read as P(chosen ≻ rejected) (Bradley–Terry scale).

    Confidence-vs-correctness form for a binary classifier (Guo et al. 2017): confidence is
    max(p, 1−p) = σ(|r_c − r_r|), binned into `n_bins` equal-width bins on [0.5, 1]; a pair is
    correct (1) when the reward ranks chosen above rejected, wrong (0) when below, and 0.5 on an
    exact tie (p = 0.5, a coin flip: this makes it equal to the symmetrised form that scores
    both (p, 1) and (1−p, 0)). Bins are [edge_k, edge_k+1), the last one closed.
    """

    edges: np.ndarray  # [n_bins + 1], from 0.5 to 1.0
    confidence: np.ndarray  # [n_bins] mean confidence per bin (NaN where the bin is empty)
    accuracy: np.ndarray  # [n_bins] mean correctness per bin (NaN where empty)
    counts: np.ndarray  # [n_bins] pairs per bin
    ece: float  # Σ_b (n_b / N)·|accuracy_b − confidence_b| (Naeini et al. 2015)
    n: int


def calibration(r_chosen, r_rejected, *, n_bins: int = 10) -> Calibration:
    """Expected calibration error of p = σ(r_c − r_r); see `Calibration` for the exact form.

    Only meaningful when the reward's scale is a Bradley–Terry logit (a BT-trained reward model,
    or β·log-ratio for a DPO policy); an arbitrary scale shows up as a large ECE.
    """
    if not isinstance(n_bins, int) or n_bins < 1:
        raise PreftuneError(f"n_bins={n_bins!r} must be a positive integer")
    c, r = _check_pairs(r_chosen, r_rejected)
    margin = c - r
    conf = 1.0 / (1.0 + np.exp(-np.abs(margin)))  # σ(|m|): exp of a non-positive, never overflows
    correct = np.where(margin > 0, 1.0, np.where(margin < 0, 0.0, 0.5))

    edges = np.linspace(0.5, 1.0, n_bins + 1)
    idx = np.clip(np.searchsorted(edges, conf, side="right") - 1, 0, n_bins - 1)
    counts = np.bincount(idx, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(idx, weights=conf, minlength=n_bins) / counts
        mean_acc = np.bincount(idx, weights=correct, minlength=n_bins) / counts
    filled = counts > 0
    ece = float(np.sum(counts[filled] / margin.size * np.abs(mean_acc[filled] - mean_conf[filled])))
    return Calibration(edges, mean_conf, mean_acc, counts, ece, int(margin.size))


# ----------------------------------------------------------------------------------------------
# Length bias and summaries


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks; tied values share the mean of the ranks they span (Spearman's convention)."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    first = np.cumsum(counts) - counts  # 0-based rank of the first member of each tie group
    return (first + (counts + 1) / 2.0)[inverse.reshape(-1)]


def _pearson(x: np.ndarray, y: np.ndarray) -> float | None:
    """Pearson's r; None when either side is constant (undefined)."""
    dx, dy = x - x.mean(), y - y.mean()
    denom = math.sqrt(float(np.dot(dx, dx)) * float(np.dot(dy, dy)))
    return float(np.dot(dx, dy) / denom) if denom > 0 else None


def _split_stats(o: np.ndarray, confidence: float) -> dict:
    if o.size == 0:
        return {"n": 0, "accuracy": None, "ci_low": None, "ci_high": None}
    low, high = wilson_interval(float(o.sum()), o.size, confidence)
    return {"n": int(o.size), "accuracy": float(o.mean()), "ci_low": low, "ci_high": high}


def length_bias(
    r_chosen, r_rejected, len_chosen, len_rejected, outcomes, *, confidence: float = 0.95
) -> dict:
    """Does the reward prefer longer responses?

    Accuracy (with n and Wilson interval) split by whether chosen is longer, shorter or as long
    as rejected: a length-biased reward scores high on the first and low on the second. Then
    Pearson and Spearman correlation of reward with length over all 2N responses. Lengths are
    in whatever unit the caller measured (tokens, characters).
    """
    c, r = _check_pairs(r_chosen, r_rejected)
    lc = check_finite("lengths of chosen responses", len_chosen)
    lr = check_finite("lengths of rejected responses", len_rejected)
    o = _check_outcomes(outcomes)
    if not (lc.size == lr.size == o.size == c.size):
        raise PreftuneError(
            f"length_bias: {c.size} pairs but {lc.size} chosen lengths, {lr.size} rejected lengths "
            f"and {o.size} outcomes"
        )
    rewards = np.concatenate([c, r])
    lengths = np.concatenate([lc, lr])
    pearson = _pearson(rewards, lengths)
    # Spearman's ρ = Pearson's r of the (average-tie) ranks.
    spearman = _pearson(_average_ranks(rewards), _average_ranks(lengths))
    return {
        "chosen_longer": _split_stats(o[lc > lr], confidence),
        "chosen_shorter": _split_stats(o[lc < lr], confidence),
        "equal_length": _split_stats(o[lc == lr], confidence),
        "fraction_chosen_longer": float(np.mean(lc > lr)),
        "pearson_reward_length": pearson,
        "spearman_reward_length": spearman,
        "n_responses": int(rewards.size),
    }


def reward_summary(r_chosen, r_rejected) -> dict:
    """Mean and (population, ddof=0) std of chosen and rejected rewards, and of the margin."""
    c, r = _check_pairs(r_chosen, r_rejected)
    margin = c - r
    return {
        "n": int(c.size),
        "mean_chosen": float(c.mean()),
        "std_chosen": float(c.std()),
        "mean_rejected": float(r.mean()),
        "std_rejected": float(r.std()),
        "mean_margin": float(margin.mean()),
        "std_margin": float(margin.std()),
    }
