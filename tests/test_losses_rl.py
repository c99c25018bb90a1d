"""RL pieces (GAE, whitening, KL estimators, PPO losses, GRPO/RLOO advantages, aggregation)
against numbers computed by hand in the test."""

import math

import pytest
import torch

from preftune.errors import PreftuneError
from preftune.losses import (
    aggregate,
    aggregate_sum_and_units,
    gae,
    group_advantages,
    kl_penalty,
    leave_one_out_advantages,
    ppo_policy_loss,
    ppo_value_loss,
    whiten,
)


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


def test_gae_three_step_example_by_hand():
    gamma, lam = 0.9, 0.8
    rewards = t(0.0, 0.0, 1.0, 5.0)[None]  # last position is padding: its reward must be ignored
    values = t(0.5, 0.4, 0.2, 9.0)[None]  # ... and so must its value (the episode has ended)
    mask = torch.tensor([[1, 1, 1, 0]])
    # Backwards: δ_t = r_t + γ V_{t+1} − V_t, A_t = δ_t + γλ A_{t+1}, V after the last token = 0.
    d2 = 1.0 + gamma * 0.0 - 0.2  # 0.8
    a2 = d2
    d1 = 0.0 + gamma * 0.2 - 0.4  # −0.22
    a1 = d1 + gamma * lam * a2  # −0.22 + 0.72·0.8 = 0.356
    d0 = 0.0 + gamma * 0.4 - 0.5  # −0.14
    a0 = d0 + gamma * lam * a1  # −0.14 + 0.72·0.356 = 0.11632
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam)
    assert adv[0].tolist() == pytest.approx([a0, a1, a2, 0.0], rel=1e-12)
    assert adv[0, 0].item() == pytest.approx(0.11632, rel=1e-12)
    assert ret[0].tolist() == pytest.approx([a0 + 0.5, a1 + 0.4, a2 + 0.2, 0.0], rel=1e-12)


def test_gae_rows_of_different_lengths_and_masked_prefix():
    gamma, lam = 1.0, 0.5
    rewards = t(7.0, 0.0, 2.0, 0.0, 3.0, 0.0, 0.0, 0.0).reshape(2, 4)
    values = t(7.0, 1.0, 1.5, 3.0, 0.5, 6.0, 6.0, 6.0).reshape(2, 4)
    mask = torch.tensor([[0, 1, 1, 0], [1, 0, 0, 0]])  # row 0: prompt token, 2 response tokens, pad
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam)
    a2 = 2.0 - 1.5  # last response token of row 0
    a1 = (0.0 + 1.0 * 1.5 - 1.0) + 0.5 * a2
    b0 = 3.0 - 0.5  # one-token episode in row 1
    assert adv.tolist() == [pytest.approx([0.0, a1, a2, 0.0]), pytest.approx([b0, 0.0, 0.0, 0.0])]
    assert ret[0].tolist() == pytest.approx([0.0, a1 + 1.0, a2 + 1.5, 0.0])


def test_whiten_by_hand():
    x = t(1.0, 2.0, 3.0, 4.0, 100.0)[None]
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    mean = 2.5
    var = (
        (1 - mean) ** 2 + (2 - mean) ** 2 + (3 - mean) ** 2 + (4 - mean) ** 2
    ) / 3  # unbiased: 5/3
    expected = [(v - mean) / math.sqrt(var + 1e-8) for v in (1.0, 2.0, 3.0, 4.0)] + [0.0]
    assert whiten(x, mask)[0].tolist() == pytest.approx(expected, rel=1e-12)
    expected_unshifted = [e + mean for e in expected[:4]] + [0.0]
    assert whiten(x, mask, shift_mean=False)[0].tolist() == pytest.approx(
        expected_unshifted, rel=1e-12
    )
    no_mask = whiten(t(1.0, 3.0))
    assert no_mask.tolist() == pytest.approx([-1 / math.sqrt(2 + 1e-8), 1 / math.sqrt(2 + 1e-8)])


def test_kl_estimators_by_hand():
    logps, ref = t(-1.0, -2.0), t(-1.5, -1.0)
    # token 0: log π − log π_ref = 0.5; token 1: −1.0
    assert kl_penalty(logps, ref, "k1").tolist() == pytest.approx([0.5, -1.0])
    assert kl_penalty(logps, ref, "k2").tolist() == pytest.approx([0.5 * 0.25, 0.5 * 1.0])
    k3 = [(math.exp(-0.5) - 1) - (-0.5), (math.exp(1.0) - 1) - 1.0]
    assert kl_penalty(logps, ref, "k3").tolist() == pytest.approx(k3, rel=1e-12)
    with pytest.raises(PreftuneError, match="k1, k2, k3"):
        kl_penalty(logps, ref, "k4")


def test_k3_is_finite_for_extreme_ratios():
    logps = torch.tensor([-200.0, 0.0], requires_grad=True)
    out = kl_penalty(logps, torch.tensor([0.0, -200.0]), "k3")
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(logps.grad).all()


def test_k3_keeps_its_restoring_gradient_when_the_policy_overshoots():
    # d = log π_ref − log π = −30 (π far above π_ref): k3 = (e^d − 1) − d = 29 + e^−30, and
    # ∂k3/∂log π = 1 − e^d ≈ 1 pulls log π back down (a clamp of d at −20 would give 0 there).
    logps = torch.tensor([0.0], dtype=torch.float64, requires_grad=True)
    out = kl_penalty(logps, torch.tensor([-30.0], dtype=torch.float64), "k3")
    out.sum().backward()
    assert out.item() == pytest.approx(math.expm1(-30.0) + 30.0, rel=1e-12)
    assert logps.grad.item() == pytest.approx(1 - math.exp(-30.0), rel=1e-12)
    # The overflow guard stays: d = +200 is clamped to 20, a finite value with zero gradient.
    logps = torch.tensor([-200.0], dtype=torch.float64, requires_grad=True)
    out = kl_penalty(logps, torch.tensor([0.0], dtype=torch.float64), "k3")
    out.sum().backward()
    assert out.item() == pytest.approx(math.expm1(20.0) - 20.0) and logps.grad.item() == 0.0


def test_ppo_policy_loss_values_clipfrac_and_zero_gradient_where_clipped():
    eps = 0.2
    # tokens: (A, ρ) = (1, 1.5) clipped; (−1, 0.5) clipped; (1, 0.9) unclipped; (−1, 1.5) unclipped
    # (the clip only limits the gain, not the loss); (1, 1.1) inside; then one padding token.
    adv = t(1.0, -1.0, 1.0, -1.0, 1.0, 50.0)[None]
    ratios = [1.5, 0.5, 0.9, 1.5, 1.1, 3.0]
    old = t(-1.0, -2.0, -0.5, -1.0, -3.0, -1.0)[None]
    logps = (old + torch.log(t(*ratios))).detach().requires_grad_(True)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    losses, m = ppo_policy_loss(logps, old, adv, mask, clip_eps=eps)
    expected = [
        max(-1.0 * 1.5, -1.0 * 1.2),  # −1.2
        max(1.0 * 0.5, 1.0 * 0.8),  # 0.8
        max(-0.9, -0.9),
        max(1.5, 1.2),  # 1.5
        max(-1.1, -1.1),
        0.0,
    ]
    assert losses[0].tolist() == pytest.approx(expected, rel=1e-12)
    losses.sum().backward()
    # d(−Aρ)/d log π = −Aρ where unclipped; 0 where the clip binds or off the mask.
    assert logps.grad[0].tolist() == pytest.approx([0.0, 0.0, -0.9, 1.5, -1.1, 0.0], rel=1e-12)
    assert m["clipfrac"].item() == pytest.approx(2 / 5)
    approx_kl = sum((r - 1) - math.log(r) for r in ratios[:5]) / 5
    assert m["approx_kl"].item() == pytest.approx(approx_kl, rel=1e-12)
    assert m["ratio"].item() == pytest.approx(sum(ratios[:5]) / 5)


def test_ppo_value_loss_by_hand():
    eps = 0.2
    values = torch.tensor([[1.5, 1.1, 0.0, 2.0, 9.0]], dtype=torch.float64, requires_grad=True)
    old = t(1.0, 1.0, 1.0, 1.0, 0.0)[None]
    returns = t(2.0, 0.0, 0.0, 0.5, 0.0)[None]
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    losses, m = ppo_value_loss(values, old, returns, mask, clip_eps=eps)
    expected = [
        0.5 * max((1.5 - 2.0) ** 2, (1.2 - 2.0) ** 2),  # clipped one larger: 0.32
        0.5 * max(1.1**2, 1.1**2),  # inside the clip range
        0.5 * max(0.0**2, 0.8**2),  # clipped one larger: 0.32
        0.5 * max(1.5**2, 0.7**2),  # unclipped larger: 1.125
        0.0,
    ]
    assert losses[0].tolist() == pytest.approx(expected, rel=1e-12)
    losses.sum().backward()
    # Where the clipped error wins, V is outside V_old ± ε and gets no gradient.
    assert values.grad[0].tolist() == pytest.approx([0.0, 1.1, 0.0, 1.5, 0.0], rel=1e-12)
    assert m["vf_clipfrac"].item() == pytest.approx(2 / 4)


def test_group_advantages_by_hand():
    rewards = t(1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 5.0)
    std1 = math.sqrt(4 * 0.25 / 3)  # group 1: mean 0.5, unbiased std
    std2 = math.sqrt((3 * 0.75**2 + 2.25**2) / 3)  # group 2: mean 2.75 -> 1.5
    expected = [x / (std1 + 1e-4) for x in (0.5, -0.5, -0.5, 0.5)] + [
        x / (std2 + 1e-4) for x in (-0.75, -0.75, -0.75, 2.25)
    ]
    assert group_advantages(rewards, 4).tolist() == pytest.approx(expected, rel=1e-12)
    assert group_advantages(rewards, 4, normalize_std=False).tolist() == pytest.approx(
        [0.5, -0.5, -0.5, 0.5, -0.75, -0.75, -0.75, 2.25]
    )
    # A group with identical rewards has zero advantage, not NaN.
    assert group_advantages(t(3.0, 3.0), 2).tolist() == [0.0, 0.0]


def test_leave_one_out_advantages_by_hand():
    rewards = t(1.0, 0.0, 0.0, 1.0, 3.0, 1.0, 2.0, 6.0)
    expected = [
        1.0 - (0 + 0 + 1) / 3,
        0.0 - (1 + 0 + 1) / 3,
        0.0 - (1 + 0 + 1) / 3,
        1.0 - (1 + 0 + 0) / 3,
        3.0 - (1 + 2 + 6) / 3,
        1.0 - (3 + 2 + 6) / 3,
        2.0 - (3 + 1 + 6) / 3,
        6.0 - (3 + 1 + 2) / 3,
    ]
    assert leave_one_out_advantages(rewards, 4).tolist() == pytest.approx(expected, rel=1e-12)
    assert leave_one_out_advantages(t(3.0, 1.0), 2).tolist() == [2.0, -2.0]


@pytest.mark.parametrize("fn", [group_advantages, leave_one_out_advantages])
def test_group_size_is_validated(fn):
    with pytest.raises(PreftuneError, match="multiple"):
        fn(t(1.0, 2.0, 3.0), 2)
    with pytest.raises(PreftuneError, match=">= 2"):
        fn(t(1.0, 2.0), 1)


LOSSES = t(1.0, 2.0, 3.0, 100.0, 4.0, 100.0, 100.0, 100.0, 0.5, 1.5, 2.5, 3.5).reshape(3, 4)
MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])


def test_aggregation_modes_by_hand():
    # Row sums over the mask: 6 (3 tokens), 4 (1 token), 8 (4 tokens); padding (100) ignored.
    assert aggregate(LOSSES, MASK, "sequence").item() == pytest.approx((6 / 3 + 4 / 1 + 8 / 4) / 3)
    assert aggregate(LOSSES, MASK, "token").item() == pytest.approx((6 + 4 + 8) / 8)
    assert aggregate(LOSSES, MASK, "constant", max_len=10).item() == pytest.approx(
        (6 + 4 + 8) / (3 * 10)
    )
    assert aggregate(LOSSES, MASK, "constant").item() == pytest.approx((6 + 4 + 8) / (3 * 4))
    with pytest.raises(PreftuneError, match="sequence, token, constant"):
        aggregate(LOSSES, MASK, "mean")


@pytest.mark.parametrize("mode", ["sequence", "token", "constant"])
def test_sum_and_units_make_micro_batches_match_the_full_batch(mode):
    # What the engine does under accumulation / data parallel: sum the sums and the units.
    full = aggregate(LOSSES, MASK, mode, max_len=4)
    parts = [
        aggregate_sum_and_units(LOSSES[s], MASK[s], mode, 4) for s in (slice(0, 1), slice(1, 3))
    ]
    total = sum(p[0] for p in parts) / sum(p[1] for p in parts)
    assert total.item() == pytest.approx(full.item(), rel=1e-12)
    # ... whereas averaging per-micro-batch means does not, for token mode (rows differ in length).
    if mode == "token":
        naive = (aggregate(LOSSES[:1], MASK[:1], mode) + aggregate(LOSSES[1:], MASK[1:], mode)) / 2
        assert naive.item() != pytest.approx(full.item())


def test_sequence_sum_is_reinforce_on_the_sequence_log_prob():
    # Row sums over the mask 6, 4, 8 over 3 rows: the mean of the per-completion sums.
    assert aggregate(LOSSES, MASK, "sequence_sum").item() == pytest.approx((6 + 4 + 8) / 3)
    parts = [
        aggregate_sum_and_units(LOSSES[s], MASK[s], "sequence_sum")
        for s in (slice(0, 1), slice(1, 3))
    ]
    assert (sum(p[0] for p in parts) / sum(p[1] for p in parts)).item() == pytest.approx(18 / 3)
    # On-policy (ratio 1) the gradient of the clipped surrogate under sequence_sum is
    # −A_i / B per completion token: Ahmadian et al. 2024, Eq. 8, −1/B Σ_i A_i ∇log π(y_i|x).
    # `constant` gives the same direction max_len (here 4) times smaller.
    logps = t(-1.0, -2.0, -0.5, -3.0, -1.5, -1.0, -2.0, -1.0, -0.2, -0.3, -0.4, -0.5).reshape(3, 4)
    adv = t(2.0, -1.0, 0.5)
    grads = {}
    for mode in ("sequence_sum", "constant"):
        x = logps.clone().requires_grad_(True)
        per_token, _ = ppo_policy_loss(x, x.detach(), adv[:, None], MASK, clip_eps=0.2)
        aggregate(per_token, MASK, mode, max_len=4).backward()
        grads[mode] = x.grad
    expected = -adv[:, None] / 3 * MASK
    torch.testing.assert_close(grads["sequence_sum"], expected.to(torch.float64))
    torch.testing.assert_close(grads["constant"], expected.to(torch.float64) / 4)
