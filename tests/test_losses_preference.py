"""Preference losses (DPO family, SimPO/ORPO/CPO), KTO and the SFT NLL against hand-computed numbers.

Expected values are written out with math.log / math.exp on plain floats; the function
under test is never used to compute its own expected value.
"""

import math

import pytest
import torch

from preftune.errors import PreftuneError
from preftune.losses import (
    PREFERENCE_LOSSES,
    REFERENCE_FREE,
    add_sft_term,
    check_preference_hparams,
    kto_loss,
    kto_reference_point,
    nll_loss,
    preference_loss,
)


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


def neg_log_sigmoid(x):
    return math.log(1 + math.exp(-x))


# Two pairs. Pair 0: π_c=-10, π_r=-12, ref_c=-11, ref_r=-11.5 -> log-ratios +1, -0.5, h = 1.5.
# Pair 1: π_c=-20, π_r=-15, ref_c=-19, ref_r=-16 -> log-ratios -1, +1, h = -2.
PI_C, PI_R, REF_C, REF_R = t(-10.0, -20.0), t(-12.0, -15.0), t(-11.0, -19.0), t(-11.5, -16.0)
H = [1.5, -2.0]
BETA = 0.1


def ref_based(loss_type, **kw):
    return preference_loss(PI_C, PI_R, REF_C, REF_R, loss_type=loss_type, beta=BETA, **kw)


def test_dpo_matches_hand_numbers_and_metrics():
    losses, m = ref_based("dpo")
    expected = [neg_log_sigmoid(0.1 * 1.5), neg_log_sigmoid(0.1 * -2.0)]
    assert losses.tolist() == pytest.approx(expected, rel=1e-12)
    assert m["rewards/chosen"].tolist() == pytest.approx([0.1 * 1.0, 0.1 * -1.0])
    assert m["rewards/rejected"].tolist() == pytest.approx([0.1 * -0.5, 0.1 * 1.0])
    assert m["rewards/margins"].tolist() == pytest.approx([0.15, -0.2])
    assert m["rewards/accuracies"].tolist() == [1.0, 0.0]
    assert m["kl/chosen"].tolist() == pytest.approx([1.0, -1.0])
    assert m["logps/chosen"].tolist() == [-10.0, -20.0]
    assert m["logps/rejected"].tolist() == [-12.0, -15.0]
    assert "nll/chosen" not in m  # no lengths given
    assert all(not v.requires_grad for v in m.values())


def test_cdpo_and_robust_match_hand_numbers():
    eps = 0.2
    losses, _ = ref_based("cdpo", label_smoothing=eps)
    expected = [(1 - eps) * neg_log_sigmoid(0.1 * h) + eps * neg_log_sigmoid(-0.1 * h) for h in H]
    assert losses.tolist() == pytest.approx(expected, rel=1e-12)

    losses, _ = ref_based("robust", label_smoothing=eps)
    expected = [
        ((1 - eps) * neg_log_sigmoid(0.1 * h) - eps * neg_log_sigmoid(-0.1 * h)) / (1 - 2 * eps)
        for h in H
    ]
    assert losses.tolist() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("loss_type", ["cdpo", "robust"])
def test_smoothed_losses_with_zero_epsilon_equal_dpo(loss_type):
    dpo, _ = ref_based("dpo")
    other, _ = ref_based(loss_type, label_smoothing=0.0)
    torch.testing.assert_close(other, dpo)


def test_hinge_and_ipo_match_hand_numbers():
    losses, _ = ref_based("hinge")
    assert losses.tolist() == pytest.approx([max(0.0, 1 - 0.15), max(0.0, 1 + 0.2)])
    big_beta = preference_loss(PI_C, PI_R, REF_C, REF_R, loss_type="hinge", beta=1.0)[0]
    assert big_beta.tolist() == pytest.approx([0.0, 3.0])  # 1 − 1.5 < 0 is clipped to 0

    losses, _ = ref_based("ipo")  # 1/(2β) = 5
    assert losses.tolist() == pytest.approx([(1.5 - 5.0) ** 2, (-2.0 - 5.0) ** 2])


def test_ipo_length_normalisation_divides_each_log_ratio_by_its_length():
    # Pair 0: chosen log-ratio +1 over 4 tokens, rejected −0.5 over 2 -> h = 0.25 + 0.25 = 0.5.
    # Pair 1: chosen −1 over 5 tokens, rejected +1 over 4 -> h = −0.2 − 0.25 = −0.45.
    lc, lr = t(4.0, 5.0), t(2.0, 4.0)
    losses, m = ref_based("ipo", ipo_length_normalize=True, chosen_lengths=lc, rejected_lengths=lr)
    assert losses.tolist() == pytest.approx([(0.5 - 5.0) ** 2, (-0.45 - 5.0) ** 2], rel=1e-12)
    assert m["rewards/chosen"].tolist() == pytest.approx([0.1 * 0.25, 0.1 * -0.2])
    with pytest.raises(PreftuneError, match="applies to loss_type=.ipo. only"):
        ref_based("dpo", ipo_length_normalize=True, chosen_lengths=lc, rejected_lengths=lr)
    with pytest.raises(PreftuneError, match="lengths"):
        ref_based("ipo", ipo_length_normalize=True)


def test_simpo_matches_hand_numbers():
    lc, lr = t(4.0, 5.0), t(3.0, 5.0)
    losses, m = preference_loss(
        PI_C,
        PI_R,
        loss_type="simpo",
        beta=2.0,
        simpo_gamma=0.5,
        chosen_lengths=lc,
        rejected_lengths=lr,
    )
    # pair 0: 2·(−10/4 − (−12/3)) − 0.5 = 2·1.5 − 0.5 = 2.5; pair 1: 2·(−4 + 3) − 0.5 = −2.5
    assert losses.tolist() == pytest.approx(
        [neg_log_sigmoid(2.5), neg_log_sigmoid(-2.5)], rel=1e-12
    )
    assert m["rewards/chosen"].tolist() == pytest.approx([2 * -2.5, 2 * -4.0])
    assert m["rewards/rejected"].tolist() == pytest.approx([2 * -4.0, 2 * -3.0])
    assert m["rewards/accuracies"].tolist() == [1.0, 0.0]
    assert m["nll/chosen"].tolist() == pytest.approx([2.5, 4.0])
    assert "kl/chosen" not in m


def test_orpo_matches_hand_numbers():
    lc, lr = t(4.0, 5.0), t(3.0, 5.0)
    lam = 0.25

    def log_odds(ell):
        return ell - math.log(1 - math.exp(ell))

    expected = []
    for pc, pr, nc, nr in [(-10.0, -12.0, 4.0, 3.0), (-20.0, -15.0, 5.0, 5.0)]:
        ell_c, ell_r = pc / nc, pr / nr
        expected.append(-ell_c + lam * neg_log_sigmoid(log_odds(ell_c) - log_odds(ell_r)))
    losses, m = preference_loss(
        PI_C, PI_R, loss_type="orpo", beta=lam, chosen_lengths=lc, rejected_lengths=lr
    )
    assert losses.tolist() == pytest.approx(expected, rel=1e-12)
    assert m["nll/chosen"].tolist() == pytest.approx([2.5, 4.0])
    assert m["log_odds_ratio"][0].item() == pytest.approx(log_odds(-2.5) - log_odds(-4.0))


def test_orpo_is_accurate_near_certainty():
    # ℓ = −1e-10: log(1 − e^ℓ) ≈ log(1e-10); naive log1p(−exp(ℓ)) loses most digits here.
    ell_c, ell_r = -1e-10, -1.0
    expected_lor = (ell_c - math.log(-math.expm1(ell_c))) - (ell_r - math.log(-math.expm1(ell_r)))
    _, m = preference_loss(
        t(ell_c),
        t(ell_r),
        loss_type="orpo",
        beta=1.0,
        chosen_lengths=t(1.0),
        rejected_lengths=t(1.0),
    )
    assert m["log_odds_ratio"].item() == pytest.approx(expected_lor, rel=1e-9)
    # A model certain of every token (ℓ = 0) must not produce inf/NaN.
    losses, _ = preference_loss(
        t(0.0), t(0.0), loss_type="orpo", beta=1.0, chosen_lengths=t(3.0), rejected_lengths=t(3.0)
    )
    assert torch.isfinite(losses).all()


def test_cpo_matches_hand_numbers():
    lc, lr = t(4.0, 5.0), t(3.0, 5.0)
    losses, m = preference_loss(
        PI_C, PI_R, loss_type="cpo", beta=BETA, chosen_lengths=lc, rejected_lengths=lr
    )
    # pair 0: β(π_c − π_r) = 0.1·2 = 0.2, NLL = 10/4; pair 1: 0.1·(−5) = −0.5, NLL = 20/5
    expected = [neg_log_sigmoid(0.2) + 2.5, neg_log_sigmoid(-0.5) + 4.0]
    assert losses.tolist() == pytest.approx(expected, rel=1e-12)
    assert m["rewards/margins"].tolist() == pytest.approx([0.2, -0.5])


def test_equal_logps_give_log_2_for_dpo():
    x = t(-5.0, -7.0)
    losses, m = preference_loss(x, x, x, x, loss_type="dpo", beta=0.5)
    assert losses.tolist() == pytest.approx([math.log(2.0)] * 2, rel=1e-12)
    assert m["rewards/accuracies"].tolist() == [0.0, 0.0]  # a tie is not a win


@pytest.mark.parametrize("loss_type", PREFERENCE_LOSSES)
@pytest.mark.parametrize("beta", [1e-3, 1.0, 10.0])
def test_extreme_margins_stay_finite_with_finite_gradients(loss_type, beta):
    for dtype in (torch.float32, torch.float64):
        chosen = torch.tensor([-1.0, -1e4, -5.0], dtype=dtype, requires_grad=True)
        rejected = torch.tensor([-1e4, -1.0, -5.0], dtype=dtype, requires_grad=True)
        lengths = torch.tensor([1.0, 10.0, 5.0], dtype=dtype)
        kw = {}
        if loss_type in REFERENCE_FREE:
            kw = dict(chosen_lengths=lengths, rejected_lengths=lengths)
            args = (chosen, rejected)
        else:
            zeros = torch.zeros(3, dtype=dtype)
            args = (chosen, rejected, zeros, zeros)
        ls = 0.1 if loss_type in ("cdpo", "robust") else 0.0
        losses, metrics = preference_loss(
            *args, loss_type=loss_type, beta=beta, label_smoothing=ls, **kw
        )
        losses.sum().backward()
        assert torch.isfinite(losses).all(), (loss_type, dtype, losses)
        assert torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()
        assert all(torch.isfinite(v).all() for v in metrics.values())


def test_dpo_margin_of_1e4_is_zero_loss_one_way_and_linear_the_other():
    zeros = t(0.0, 0.0)
    losses, _ = preference_loss(t(1e4, -1e4), zeros, zeros, zeros, loss_type="dpo", beta=1.0)
    assert losses[0].item() == 0.0
    assert losses[1].item() == pytest.approx(1e4)  # −log σ(−x) ≈ x for large x


def test_dpo_gradient_wrt_h_is_minus_beta_sigmoid_minus_beta_h():
    beta = 0.3
    h_values = [2.0, -1.0, 0.0, 7.5]
    h = torch.tensor(h_values, dtype=torch.float64, requires_grad=True)
    zeros = torch.zeros(4, dtype=torch.float64)
    # chosen log-ratio = h, rejected log-ratio = 0, so the margin is exactly h.
    losses, _ = preference_loss(h, zeros, zeros, zeros, loss_type="dpo", beta=beta)
    losses.sum().backward()
    expected = [-beta / (1 + math.exp(beta * x)) for x in h_values]  # −β·σ(−βh)
    assert h.grad.tolist() == pytest.approx(expected, rel=1e-12)


def test_add_sft_term():
    losses = t(1.0, 2.0)
    out = add_sft_term(losses, t(-6.0, -9.0), t(3.0, 3.0), 0.5)
    assert out.tolist() == pytest.approx([1.0 + 0.5 * 2.0, 2.0 + 0.5 * 3.0])


def test_hparam_validation_names_the_field():
    with pytest.raises(PreftuneError, match="loss_type.*dpo, ipo"):
        check_preference_hparams("dpoo", 0.1)
    with pytest.raises(PreftuneError, match="beta"):
        check_preference_hparams("dpo", 0.0)
    with pytest.raises(PreftuneError, match="beta"):
        check_preference_hparams("dpo", -1.0)
    with pytest.raises(PreftuneError, match="label_smoothing"):
        check_preference_hparams("cdpo", 0.1, label_smoothing=0.5)
    with pytest.raises(PreftuneError, match="label_smoothing"):
        check_preference_hparams("robust", 0.1, label_smoothing=-0.1)
    with pytest.raises(PreftuneError, match="label_smoothing.*no effect"):
        check_preference_hparams("dpo", 0.1, label_smoothing=0.1)
    with pytest.raises(PreftuneError, match="sft_weight.*already includes an NLL"):
        check_preference_hparams("orpo", 0.1, sft_weight=1.0)
    check_preference_hparams("cdpo", 0.1, label_smoothing=0.1)  # valid: no error
    check_preference_hparams("dpo", 0.1, sft_weight=1.0)


def test_missing_or_unexpected_inputs_are_refused():
    with pytest.raises(PreftuneError, match="reference log-probs"):
        preference_loss(PI_C, PI_R, loss_type="dpo", beta=0.1)
    with pytest.raises(PreftuneError, match="reference-free"):
        preference_loss(
            PI_C,
            PI_R,
            REF_C,
            REF_R,
            loss_type="simpo",
            beta=0.1,
            chosen_lengths=t(1, 1),
            rejected_lengths=t(1, 1),
        )
    for loss_type in ("simpo", "orpo", "cpo"):
        with pytest.raises(PreftuneError, match="lengths"):
            preference_loss(PI_C, PI_R, loss_type=loss_type, beta=0.1)
    with pytest.raises(PreftuneError, match="label_smoothing"):
        preference_loss(PI_C, PI_R, REF_C, REF_R, loss_type="ipo", beta=0.1, label_smoothing=0.1)


# ----------------------------------------------------------------------------- KTO


def test_kto_reference_point_is_clamped_mean_and_detached():
    pol = torch.tensor([-3.0, -5.0, -4.0], dtype=torch.float64, requires_grad=True)
    ref = t(-4.0, -4.5, -4.0)
    z0 = kto_reference_point(pol, ref)
    assert z0.item() == pytest.approx((1.0 - 0.5 + 0.0) / 3)
    assert not z0.requires_grad
    assert kto_reference_point(t(-5.0), t(-4.0)).item() == 0.0  # negative mean clamps to 0


def test_kto_loss_matches_hand_numbers():
    pol, ref = t(-3.0, -8.0, -6.0), t(-4.0, -7.0, -6.5)  # r = 1, −1, 0.5
    labels = torch.tensor([True, False, True])
    z0, beta, wd, wu = torch.tensor(0.2, dtype=torch.float64), 0.5, 1.0, 1.5

    def sigmoid(x):
        return 1 / (1 + math.exp(-x))

    expected = [
        wd * (1 - sigmoid(0.5 * (1.0 - 0.2))),
        wu * (1 - sigmoid(0.5 * (0.2 - (-1.0)))),
        wd * (1 - sigmoid(0.5 * (0.5 - 0.2))),
    ]
    losses, m = kto_loss(
        pol, ref, labels, z0, beta=beta, desirable_weight=wd, undesirable_weight=wu
    )
    assert losses.tolist() == pytest.approx(expected, rel=1e-12)
    assert m["rewards"].tolist() == pytest.approx([0.5, -0.5, 0.25])
    assert m["mask/chosen"].tolist() == [1.0, 0.0, 1.0]
    assert m["rewards/chosen_sum"].item() == pytest.approx(0.75)
    assert m["rewards/rejected_sum"].item() == pytest.approx(-0.5)
    assert m["count/chosen"].item() == 2 and m["count/rejected"].item() == 1
    assert m["logps/rejected_sum"].item() == -8.0
    assert m["kl"].item() == pytest.approx(0.2)


def test_kto_gradient_does_not_flow_into_reference_point():
    pol = torch.tensor([-3.0], dtype=torch.float64, requires_grad=True)
    z0 = kto_reference_point(pol, t(-4.0))
    losses, _ = kto_loss(pol, t(-4.0), torch.tensor([True]), z0, beta=1.0)
    losses.sum().backward()
    s = 1 / (1 + math.exp(-(1.0 - 1.0)))  # r = 1, z0 = 1 (same pair); treated as a constant
    assert pol.grad.item() == pytest.approx(-s * (1 - s))


def test_kto_extremes_are_finite():
    pol = torch.tensor([0.0, -1e4], dtype=torch.float32, requires_grad=True)
    losses, _ = kto_loss(
        pol, torch.tensor([-1e4, 0.0]), torch.tensor([True, False]), torch.tensor(0.0), beta=1e-3
    )
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(pol.grad).all()


# ----------------------------------------------------------------------------- SFT


def test_nll_loss_sums_completion_tokens_only():
    token_logps = t(0.0, -1.0, -2.0, 0.0)
    token_logps = torch.stack([token_logps, t(0.0, -0.5, float("-inf"), 0.0)])
    mask = torch.tensor([[0, 1, 1, 0], [0, 1, 0, 0]])
    loss_sum, n = nll_loss(token_logps, mask)
    assert loss_sum.item() == pytest.approx(1.0 + 2.0 + 0.5)  # −inf off the mask is ignored
    assert n.item() == 3
