"""The lab's statistics against numbers computed by hand (the arithmetic is in the comments)."""

import math

import pytest

from preftune.lab import stats


@pytest.mark.parametrize("df, expected", [(1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776)])
def test_t_quantiles_match_the_table(df, expected):
    # Two-sided 95% Student-t quantiles, from any printed t table.
    assert stats.t_quantile(df) == pytest.approx(expected, abs=5e-4)


def test_paired_interval_by_hand():
    # Per-seed differences d = a - b = [0.5, 1.0, 1.5]: mean 1.0, sd 0.5, s.e. 0.5/sqrt(3) =
    # 0.288675; half-width t(2) * s.e. = 4.303 * 0.288675 = 1.24218.
    iv = stats.paired_interval([1.0, 2.0, 4.0], [0.5, 1.0, 2.5])
    assert iv.mean == pytest.approx(1.0)
    assert iv.se == pytest.approx(0.288675, abs=1e-6)
    assert iv.ci_low == pytest.approx(1.0 - 1.24218, abs=5e-4)
    assert iv.ci_high == pytest.approx(1.0 + 1.24218, abs=5e-4)
    assert (iv.n_seeds, iv.df) == (3, 2)
    assert stats.verdict(iv) == stats.NO_DIFFERENCE  # the interval contains 0


def test_verdicts():
    # d = [1.0, 1.2, 1.4]: mean 1.2, sd 0.2, s.e. 0.11547, half 4.303 * 0.11547 = 0.49687.
    above = stats.t_interval([1.0, 1.2, 1.4])
    assert above.ci_low == pytest.approx(0.70313, abs=1e-4)
    assert stats.verdict(above) == stats.ABOVE
    assert stats.verdict(stats.t_interval([-1.0, -1.2, -1.4])) == stats.BELOW
    one = stats.t_interval([0.7])
    assert math.isnan(one.ci_low) and stats.verdict(one) == stats.TOO_FEW
    assert stats.verdict(one.to_json()) == stats.TOO_FEW  # as read back from results.json
    # Two seeds: t(1) = 12.706; d = [0.1, 0.3]: mean 0.2, s.e. 0.1, half 1.2706.
    two = stats.t_interval([0.1, 0.3])
    assert two.ci_high == pytest.approx(0.2 + 1.2706, abs=1e-3)


def test_kl_k1_k3_by_hand():
    # log r = [0, ln 2]: k1 = [0, 0.693147] -> mean 0.346574, sd 0.490129, s.e. 0.346574;
    # k3 = exp(-log r) - 1 + log r = [0, 0.5 - 1 + 0.693147 = 0.193147] -> mean 0.0965736.
    est = stats.kl_estimates([0.0, math.log(2)])
    assert est["kl_k1"] == pytest.approx(0.346574, abs=1e-6)
    assert est["kl_k1_se"] == pytest.approx(0.346574, abs=1e-6)
    assert est["kl_k3"] == pytest.approx(0.0965736, abs=1e-6)
    assert est["kl_k3_se"] == pytest.approx(0.0965736, abs=1e-6)
    # k3 is never negative even where k1 is.
    assert stats.kl_estimates([-0.3])["kl_k3"] == pytest.approx(math.exp(0.3) - 1 - 0.3)


def test_best_of_n_kl_bound_and_plugin():
    assert stats.bon_kl_bound(1) == 0.0
    assert stats.bon_kl_bound(4) == pytest.approx(math.log(4) - 0.75)
    # Two distinct samples, N = 2: best-of-2 picks the higher one with prob 1 - 0.5^2 = 0.75
    # and the lower with 0.25: KL = 0.25 ln(0.25/0.5) + 0.75 ln(0.75/0.5) = 0.130812.
    assert stats.bon_kl_plugin([[0.1, 0.9]], 2) == pytest.approx(0.130812, abs=1e-6)
    # All samples equal: best-of-N is the base distribution itself.
    assert stats.bon_kl_plugin([[1.0, 1.0, 1.0, 1.0]], 4) == 0.0
    # Mean over prompts.
    assert stats.bon_kl_plugin([[0.1, 0.9], [2.0, 2.0]], 2) == pytest.approx(0.130812 / 2, abs=1e-6)


def test_gao_fits_recover_their_parameters():
    ds = [0.5, 1.0, 2.0, 3.0]
    # Best-of-N: R = d (1 - 0.5 d); peak at d = alpha / (2 beta) = 1, KL = 1.
    fit = stats.gao_fit([d * d for d in ds], [d * (1 - 0.5 * d) for d in ds], "bon")
    assert fit["alpha"] == pytest.approx(1.0) and fit["beta"] == pytest.approx(0.5)
    assert fit["r2"] == pytest.approx(1.0) and fit["kl_at_gold_peak"] == pytest.approx(1.0)
    # RL: R = d (1 - 0.5 ln d); peak at d = exp(alpha / beta - 1) = e, KL = e^2 = 7.389056.
    fit = stats.gao_fit([d * d for d in ds], [d * (1 - 0.5 * math.log(d)) for d in ds], "rl")
    assert fit["alpha"] == pytest.approx(1.0) and fit["beta"] == pytest.approx(0.5)
    assert fit["kl_at_gold_peak"] == pytest.approx(7.389056, abs=1e-5)
    # Fewer than three points with KL > 0: no fit.
    assert stats.gao_fit([0.0, 1.0, 4.0], [0.0, 0.1, 0.2], "rl") is None
