"""The lab's statistics: paired t-intervals over seeds, verdicts, KL estimators, Gao et al. fits.

Pure functions of numbers (no models, no files), so that the report and the tests can use them
on hand-made data.

- Paired comparison (one number per seed): d_s = gold(method, seed s) - gold(base, seed s), both
  measured on the same test prompts with the same evaluation samples of the base policy. The
  unit of replication is the seed (each seed retrains base policy, data, reward model and
  method), so the interval is a t-interval over seeds with k - 1 degrees of freedom:
      mean(d) +- t_{0.975, k-1} * sd(d) / sqrt(k)      (Student 1908).
  The spread over seeds already contains the evaluation noise of the held-out prompts.
- KL(pi || pi_base) per sequence from samples y ~ pi (Schulman 2020, "Approximating KL
  divergence"): with log r = log pi(y|x) - log pi_base(y|x),
      k1 = log r                      (unbiased, high variance, can be negative),
      k3 = (1/r - 1) + log r           (unbiased, always >= 0, lower variance near pi = pi_base).
- Gao, Schulman & Hilton 2022 ("Scaling laws for reward model overoptimization", eq. 1-2), with
  d = sqrt(KL): best-of-N  R(d) = d (alpha - beta d);  RL  R(d) = d (alpha - beta ln d).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

LEVEL = 0.95


def t_quantile(df: int, level: float = LEVEL) -> float:
    """Two-sided Student-t quantile t_{(1+level)/2, df}."""
    from scipy.stats import t

    if df < 1:
        raise ValueError(f"t_quantile: df must be >= 1, got {df}")
    return float(t.ppf((1 + level) / 2, df))


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """(mean, standard error of the mean = sd / sqrt(n)); s.e. is nan for fewer than two values."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = math.fsum(values) / n
    if n < 2:
        return mean, math.nan
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


@dataclass(frozen=True)
class Interval:
    """A mean over seeds with its t-interval (ci_* are nan with fewer than two seeds)."""

    mean: float
    ci_low: float
    ci_high: float
    n_seeds: int
    df: int
    se: float
    per_seed: tuple[float, ...]

    def to_json(self) -> dict:
        d = asdict(self)
        d["per_seed"] = list(self.per_seed)
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}


def t_interval(values: Sequence[float], level: float = LEVEL) -> Interval:
    """Mean of per-seed values (already paired differences, or plain values) with a t-interval."""
    values = [float(v) for v in values]
    mean, se = mean_se(values)
    k = len(values)
    if k < 2:
        return Interval(mean, math.nan, math.nan, k, 0, math.nan, tuple(values))
    half = t_quantile(k - 1, level) * se
    return Interval(mean, mean - half, mean + half, k, k - 1, se, tuple(values))


def paired_interval(a: Sequence[float], b: Sequence[float], level: float = LEVEL) -> Interval:
    """t-interval of the per-seed differences a_s - b_s (a and b in the same seed order)."""
    if len(a) != len(b):
        raise ValueError(f"paired_interval: {len(a)} values against {len(b)}")
    return t_interval([x - y for x, y in zip(a, b)], level)


# What an interval of a difference (A - B) lets the report say.
ABOVE, BELOW, NO_DIFFERENCE, TOO_FEW = "above", "below", "no_difference", "too_few_seeds"


def verdict(iv: Interval | dict) -> str:
    """`above` / `below` when the 95% interval excludes 0, `no_difference` when it contains 0
    (the data do not show a difference; they do not show equality either), `too_few_seeds`
    with fewer than two seeds (no interval at all)."""
    lo = iv["ci_low"] if isinstance(iv, dict) else iv.ci_low
    hi = iv["ci_high"] if isinstance(iv, dict) else iv.ci_high
    if lo is None or hi is None or math.isnan(lo) or math.isnan(hi):
        return TOO_FEW
    if lo > 0:
        return ABOVE
    if hi < 0:
        return BELOW
    return NO_DIFFERENCE


# --- KL ------------------------------------------------------------------------------------------


def kl_estimates(log_ratios: Sequence[float]) -> dict:
    """k1 and k3 (module docstring) from per-sequence log r = log pi - log pi_base, y ~ pi:
    means over sequences with their standard errors."""
    k1 = [float(x) for x in log_ratios]
    # exp(-log r) overflows only for log r < -700, which a sample of pi cannot reach in practice;
    # clamp so that one absurd value cannot crash a report.
    k3 = [math.exp(min(-x, 50.0)) - 1.0 + x for x in k1]
    m1, s1 = mean_se(k1)
    m3, s3 = mean_se(k3)
    return {"kl_k1": m1, "kl_k1_se": s1, "kl_k3": m3, "kl_k3_se": s3}


def bon_kl_bound(n: int) -> float:
    """Analytic KL(best-of-N || base) for distinct outcomes, an upper bound in general:
    log N - (N - 1)/N (Stiennon et al. 2020; Beirami et al. 2024, Thm. 1)."""
    return math.log(n) - (n - 1) / n


def bon_kl_plugin(scores: Sequence[Sequence[float]], n: int) -> float:
    """Plug-in KL(best-of-N || base), mean over prompts.

    `scores[i]`: the proxy scores of prompt i's M base samples. The base distribution is
    estimated by their empirical distribution (equal scores, in practice equal texts, are one
    outcome). With outcomes sorted by score and empirical CDF F,
    best-of-N picks outcome y with probability F(y)^N - F(y-)^N, exactly; the KL of that
    distribution to the empirical one is the estimate. Tight where outcomes are distinct, it
    shows how far below the bound KL is when many samples coincide (arithmetic: few answers).
    Needs N <= M; biased low for N close to M (the empirical tail is short)."""
    total = 0.0
    for row in scores:
        m = len(row)
        if n > m:
            raise ValueError(f"bon_kl_plugin: N={n} but only {m} samples")
        counts: dict[float, int] = {}
        for s in row:
            counts[s] = counts.get(s, 0) + 1
        cdf = 0.0
        kl = 0.0
        for s in sorted(counts):
            p = counts[s] / m
            lower, cdf = cdf, cdf + p
            q = min(cdf, 1.0) ** n - lower**n
            if q > 0:
                kl += q * math.log(q / p)
        total += kl
    return total / len(scores) if scores else math.nan


# --- Gao et al. 2022 fits --------------------------------------------------------------------------


def gao_fit(kl: Sequence[float], gold_gain: Sequence[float], form: str) -> dict | None:
    """Least-squares fit of gold gain R(d), d = sqrt(KL), to Gao et al.'s form (no intercept:
    R(0) = 0 is the base policy): `bon` d (alpha - beta d), `rl` d (alpha - beta ln d).

    Returns alpha, beta, R^2 (1 - SS_res / SS_tot around the mean), the number of points, and
    the KL at the fitted gold peak (None when the fit has no interior maximum)."""
    import numpy as np

    pts = [
        (math.sqrt(max(k, 0.0)), g)
        for k, g in zip(kl, gold_gain)
        if k is not None and g is not None and math.isfinite(k) and math.isfinite(g)
    ]
    pts = [(d, g) for d, g in pts if d > 0]
    if len(pts) < 3:
        return None
    d = np.array([p[0] for p in pts])
    y = np.array([p[1] for p in pts])
    second = d * d if form == "bon" else d * np.log(d)
    design = np.stack([d, -second], axis=1)
    (alpha, beta), *_ = np.linalg.lstsq(design, y, rcond=None)
    pred = design @ np.array([alpha, beta])
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float(((y - pred) ** 2).sum()) / ss_tot if ss_tot > 0 else math.nan
    peak = None
    if beta > 0:
        # d/dd [d(a - b d)] = a - 2 b d = 0;  d/dd [d(a - b ln d)] = a - b (ln d + 1) = 0
        d_star = alpha / (2 * beta) if form == "bon" else math.exp(alpha / beta - 1)
        if d_star > 0:
            peak = d_star**2
    return {
        "form": form,
        "alpha": float(alpha),
        "beta": float(beta),
        "r2": r2,
        "n_points": len(pts),
        "kl_at_gold_peak": peak,
    }
