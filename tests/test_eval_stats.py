"""eval-rm statistics, plots and report writers, against numbers worked out by hand here."""

import json
import math

import numpy as np
import pytest

from preftune.errors import PreftuneError
from preftune.evaluation.plots import reliability_diagram, reward_distributions
from preftune.evaluation.report import format_table
from preftune.evaluation.stats import (
    Row,
    accuracy_table,
    calibration,
    check_finite,
    length_bias,
    pair_outcomes,
    reward_summary,
    wilson_interval,
)
from preftune.utils import atomic_write_json

Z95 = 1.959964


def wilson_by_hand(s, n, z=Z95):
    p = s / n
    centre = (p + z**2 / (2 * n)) / (1 + z**2 / n)
    half = z / (1 + z**2 / n) * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))
    return centre - half, centre + half


# ---------------------------------------------------------------------------------------------
# outcomes, accuracy, Wilson


def test_pair_outcomes_ties_both_modes():
    chosen = [2.0, 1.0, 0.5, 3.0, -1.0]
    rejected = [1.0, 1.0, 0.7, 3.0, -2.0]
    # pair 0 win, 1 tie, 2 loss, 3 tie, 4 win
    wrong = pair_outcomes(chosen, rejected)
    half = pair_outcomes(chosen, rejected, ties="half")
    np.testing.assert_array_equal(wrong, [1, 0, 0, 0, 1])
    np.testing.assert_array_equal(half, [1, 0.5, 0, 0.5, 1])
    assert accuracy_table(wrong)[0].accuracy == pytest.approx(2 / 5)
    assert accuracy_table(half)[0].accuracy == pytest.approx(3 / 5)  # (2 + 0.5 + 0.5) / 5
    with pytest.raises(PreftuneError, match="ties"):
        pair_outcomes(chosen, rejected, ties="ignore")
    with pytest.raises(PreftuneError, match="3 chosen rewards but 2 rejected"):
        pair_outcomes([1, 2, 3], [1, 2])


def test_wilson_8_of_10_by_hand():
    # p = 0.8, z² = 3.841459: centre = (0.8 + 0.192073)/1.384146 = 0.716740,
    # half = 1.959964·sqrt(0.016 + 0.009604)/1.384146 = 0.226579 -> [0.4902, 0.9433]
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.490161, abs=1e-5)
    assert high == pytest.approx(0.943318, abs=1e-5)
    assert (low, high) == pytest.approx(wilson_by_hand(8, 10), abs=1e-6)
    # Half-credit ties: 7.5 successes enter p̂ = 0.75 unchanged.
    assert wilson_interval(7.5, 10) == pytest.approx(wilson_by_hand(7.5, 10), abs=1e-6)
    # All correct: the upper end is 1, the lower end n/(n + z²) = 10/13.841459.
    assert wilson_interval(10, 10) == pytest.approx((10 / (10 + Z95**2), 1.0), abs=1e-6)
    # 90% uses z = 1.644854.
    assert wilson_interval(8, 10, 0.90) == pytest.approx(wilson_by_hand(8, 10, 1.644854), abs=1e-6)
    with pytest.raises(PreftuneError):
        wilson_interval(3, 0)
    with pytest.raises(PreftuneError):
        wilson_interval(11, 10)


def test_accuracy_table_subsets_and_single_example_flag():
    outcomes = [1, 1, 0, 1, 0, 1]
    subsets = ["math", "chat", "chat", "math", "code", "chat"]
    rows = accuracy_table(outcomes, subsets)
    assert [r.name for r in rows] == ["overall", "chat", "code", "math"]
    overall, chat, code, math_ = rows
    assert (overall.n, overall.accuracy) == (6, pytest.approx(4 / 6))
    assert (chat.n, chat.accuracy) == (3, pytest.approx(2 / 3))
    assert (math_.n, math_.accuracy) == (2, 1.0)
    assert (chat.ci_low, chat.ci_high) == pytest.approx(wilson_by_hand(2, 3), abs=1e-6)
    assert code.n == 1 and code.warning and "only 1 example" in code.warning
    assert overall.warning is None and chat.warning is None
    with pytest.raises(PreftuneError, match="subset"):
        accuracy_table(outcomes, ["math", None, "chat", "math", "code", "chat"])
    with pytest.raises(PreftuneError, match="5 subset labels for 6 pairs"):
        accuracy_table(outcomes, subsets[:5])


def test_weighted_sections_by_hand():
    # a: 3/4 correct, b: 1/2 correct, c: 0/1 (no weight -> excluded from the weighted row)
    outcomes = [1, 1, 1, 0, 1, 0, 0]
    subsets = ["a", "a", "a", "a", "b", "b", "c"]
    rows = accuracy_table(outcomes, subsets, section_weights={"a": 3.0, "b": 1.0})
    weighted = rows[-1]
    assert weighted.name == "weighted"
    # ŵ = (0.75, 0.25): acc = 0.75·0.75 + 0.25·0.5 = 0.6875
    assert weighted.accuracy == pytest.approx(0.6875)
    assert weighted.n == 6
    # var = 0.75²·0.75·0.25/4 + 0.25²·0.5·0.5/2 = 0.0263671875 + 0.0078125 = 0.0341796875
    half = Z95 * math.sqrt(0.0341796875)
    assert weighted.ci_low == pytest.approx(0.6875 - half, abs=1e-5)
    assert weighted.ci_high == pytest.approx(min(1.0, 0.6875 + half), abs=1e-5)
    assert weighted.warning is None
    with pytest.raises(PreftuneError, match="'d'"):
        accuracy_table(outcomes, subsets, section_weights={"a": 1.0, "d": 1.0})
    with pytest.raises(PreftuneError, match=">= 0"):
        accuracy_table(outcomes, subsets, section_weights={"a": -1.0})
    with pytest.raises(PreftuneError, match="no `subset` column"):
        accuracy_table(outcomes, None, section_weights={"a": 1.0})


# ---------------------------------------------------------------------------------------------
# calibration


def test_ece_by_hand():
    ln3, ln19 = math.log(3), math.log(19)
    # margins ±ln3 -> confidence σ(ln3) = 0.75 (bin [0.7, 0.8)), two right and two wrong;
    # margin ln19 -> confidence 0.95 (bin [0.9, 1.0]), both right.
    chosen = [ln3, ln3, 0.0, 0.0, ln19, ln19]
    rejected = [0.0, 0.0, ln3, ln3, 0.0, 0.0]
    cal = calibration(chosen, rejected, n_bins=5)
    np.testing.assert_allclose(cal.edges, [0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    np.testing.assert_array_equal(cal.counts, [0, 0, 4, 0, 2])
    np.testing.assert_allclose(cal.confidence[[2, 4]], [0.75, 0.95])
    np.testing.assert_allclose(cal.accuracy[[2, 4]], [0.5, 1.0])
    assert np.isnan(cal.accuracy[0])
    # ECE = 4/6·|0.5 − 0.75| + 2/6·|1 − 0.95| = 1/6 + 1/60 = 11/60
    assert cal.ece == pytest.approx(11 / 60)

    # All margins equal: one bin, accuracy 1, ECE = 1 − σ(ln3) = 0.25.
    assert calibration([ln3] * 3, [0.0] * 3).ece == pytest.approx(0.25)
    # Exact ties: confidence 0.5 with half credit -> perfectly calibrated.
    assert calibration([1.0, 2.0], [1.0, 2.0]).ece == pytest.approx(0.0)


def test_ece_near_zero_when_labels_drawn_from_the_model():
    rng = np.random.default_rng(0)
    n = 200_000
    score_a = rng.normal(0.0, 1.5, n)
    score_b = rng.normal(0.0, 1.5, n)
    # Bradley–Terry: a is preferred with probability σ(score_a − score_b).
    a_wins = rng.random(n) < 1.0 / (1.0 + np.exp(-(score_a - score_b)))
    chosen = np.where(a_wins, score_a, score_b)
    rejected = np.where(a_wins, score_b, score_a)
    assert calibration(chosen, rejected).ece < 0.01
    # The same rewards scaled by 3 are over-confident: ECE must be clearly larger.
    assert calibration(3 * chosen, 3 * rejected).ece > 0.08


# ---------------------------------------------------------------------------------------------
# length bias, summaries, bad input


def test_length_bias_split_and_correlations():
    r_c = np.array([3.0, 2.0, 1.0, 0.0])
    r_r = np.array([1.0, 1.0, 2.0, 0.5])
    l_c = np.array([10, 10, 5, 7])
    l_r = np.array([5, 5, 10, 7])
    outcomes = pair_outcomes(r_c, r_r)  # [1, 1, 0, 0]
    lb = length_bias(r_c, r_r, l_c, l_r, outcomes)
    assert lb["chosen_longer"]["n"] == 2 and lb["chosen_longer"]["accuracy"] == 1.0
    assert lb["chosen_shorter"]["n"] == 1 and lb["chosen_shorter"]["accuracy"] == 0.0
    assert lb["equal_length"]["n"] == 1 and lb["equal_length"]["accuracy"] == 0.0
    assert (lb["chosen_longer"]["ci_low"], lb["chosen_longer"]["ci_high"]) == pytest.approx(
        wilson_by_hand(2, 2), abs=1e-6
    )
    assert lb["fraction_chosen_longer"] == 0.5
    assert lb["n_responses"] == 8

    # rewards x = [3,2,1,0,1,1,2,0.5], lengths y = [10,10,5,7,5,5,10,7]; x̄ = 1.3125, ȳ = 7.375
    # Σdx·dy = 11.0625, Σdx² = 6.46875, Σdy² = 37.875 -> r = 11.0625/sqrt(245.00390625) = 0.70675
    assert lb["pearson_reward_length"] == pytest.approx(11.0625 / math.sqrt(6.46875 * 37.875))
    # average-tie ranks: x -> [8, 6.5, 4, 1, 4, 4, 6.5, 2], y -> [7, 7, 2, 4.5, 2, 2, 7, 4.5]
    rx = np.array([8, 6.5, 4, 1, 4, 4, 6.5, 2])
    ry = np.array([7, 7, 2, 4.5, 2, 2, 7, 4.5])
    expected = np.sum((rx - 4.5) * (ry - 4.5)) / math.sqrt(
        np.sum((rx - 4.5) ** 2) * np.sum((ry - 4.5) ** 2)
    )
    assert lb["spearman_reward_length"] == pytest.approx(expected)
    # mean rank 4.5: Σdx·dy = 22.5, Σdx² = 39.5, Σdy² = 37.5 -> ρ = 22.5/sqrt(1481.25) = 0.58461
    assert expected == pytest.approx(22.5 / math.sqrt(39.5 * 37.5))

    with pytest.raises(PreftuneError, match="3 chosen lengths"):
        length_bias(r_c, r_r, l_c[:3], l_r, outcomes)


def test_reward_summary():
    s = reward_summary([1.0, 3.0], [0.0, 2.0])
    assert s["mean_chosen"] == 2.0 and s["std_chosen"] == 1.0
    assert s["mean_rejected"] == 1.0 and s["std_rejected"] == 1.0
    assert s["mean_margin"] == 1.0 and s["std_margin"] == 0.0


def test_non_finite_rewards_rejected_with_rows():
    values = [0.1, float("nan"), 2.0, float("inf"), -float("inf")]
    with pytest.raises(PreftuneError, match=r"scores: 3 of 5 .* rows 1, 3, 4$"):
        check_finite("scores", values)
    with pytest.raises(PreftuneError, match="rejected.*rows 0"):
        pair_outcomes([1.0], [float("nan")])
    with pytest.raises(PreftuneError, match="chosen"):
        calibration([float("nan"), 1.0], [0.0, 0.0])
    np.testing.assert_array_equal(check_finite("ok", [1, 2]), [1.0, 2.0])


# ---------------------------------------------------------------------------------------------
# plots and report writers


def test_plots_write_png(tmp_path):
    rng = np.random.default_rng(1)
    chosen, rejected = rng.normal(1, 1, 500), rng.normal(0, 1, 500)
    rel, dist = tmp_path / "reliability.png", tmp_path / "sub" / "rewards.png"
    reliability_diagram(calibration(chosen, rejected), rel)
    reward_distributions(chosen, rejected, dist)
    for p in (rel, dist):
        data = p.read_bytes()
        assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(x.name for x in tmp_path.iterdir()) == [
        "reliability.png",
        "sub",
    ]  # no temp files left
    reward_distributions(
        [1.0, 1.0], [1.0, 1.0], tmp_path / "flat.png"
    )  # constant rewards still plot


def test_atomic_write_json_strict_converts_numpy(tmp_path):
    cal = calibration(
        [2.0, 3.0], [0.0, 0.0], n_bins=2
    )  # σ(2) = 0.88, σ(3) = 0.95: both in [0.75, 1]
    path = tmp_path / "report.json"
    path.write_text("old")
    atomic_write_json(
        path,
        {
            "n": np.int64(3),
            "acc": np.float32(0.5),
            "cal": cal,
            "ok": np.bool_(True),
            "ci": (0.1, 0.9),
        },
        strict=True,
    )
    data = json.loads(path.read_text())
    assert data["n"] == 3 and data["acc"] == 0.5 and data["ok"] is True and data["ci"] == [0.1, 0.9]
    assert data["cal"]["counts"] == [0, 2]
    assert data["cal"]["accuracy"][0] is None  # empty bin: NaN -> null
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_format_table_aligned_with_footnote():
    rows = [
        Row("overall", 10, 0.8, 0.490161, 0.943318),
        Row("tiny", 1, 1.0, 0.206543, 1.0, "only 1 example"),
    ]
    text = format_table(rows)
    lines = text.splitlines()
    assert lines[0].split() == ["subset", "n", "accuracy", "95%", "CI"]
    assert "80.0%" in lines[2] and "[49.0%, 94.3%]" in lines[2]
    assert lines[3].startswith("tiny*")
    assert len(lines[2]) == len(lines[3])  # columns aligned
    assert lines[-1] == "* tiny: only 1 example"
