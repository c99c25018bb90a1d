"""Reward-model losses against hand-computed numbers (math.log / math.exp on plain floats)."""

import math

import pytest
import torch

from preftune.errors import PreftuneError
from preftune.losses import (
    all_pairs_loss,
    bradley_terry_loss,
    plackett_luce_loss,
    reward_centering_penalty,
)


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


def neg_log_sigmoid(x):
    return math.log(1 + math.exp(-x))


def test_bradley_terry_by_hand():
    losses, m = bradley_terry_loss(t(2.0, -1.0, 0.5), t(0.5, 1.0, 0.5))
    assert losses.tolist() == pytest.approx(
        [neg_log_sigmoid(1.5), neg_log_sigmoid(-2.0), math.log(2.0)], rel=1e-12
    )
    assert m["accuracy"].tolist() == [1.0, 0.0, 0.0]
    assert m["margin"].tolist() == [1.5, -2.0, 0.0]
    assert m["reward/chosen"].tolist() == [2.0, -1.0, 0.5]
    assert m["reward/rejected"].tolist() == [0.5, 1.0, 0.5]


def test_bradley_terry_with_margin_by_hand():
    losses, m = bradley_terry_loss(t(2.0, -1.0), t(0.5, 1.0), margin=t(1.0, 0.5))
    # Llama 2 Eq. 2: −log σ(r_c − r_r − m)
    assert losses.tolist() == pytest.approx(
        [neg_log_sigmoid(1.5 - 1.0), neg_log_sigmoid(-2.0 - 0.5)], rel=1e-12
    )
    assert m["margin"].tolist() == [1.5, -2.0]  # the reported margin excludes m


def test_bradley_terry_gradient_and_extremes():
    rc = torch.tensor([3.0, 1e4, -1e4], dtype=torch.float32, requires_grad=True)
    losses, _ = bradley_terry_loss(rc, torch.zeros(3))
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(rc.grad).all()
    assert rc.grad[0].item() == pytest.approx(-1 / (1 + math.exp(3.0)), rel=1e-6)  # −σ(−Δ)
    assert losses[2].item() == pytest.approx(1e4)


def test_centering_penalty_by_hand():
    out = reward_centering_penalty(t(2.0, -1.0), t(0.5, 1.0), 0.01)
    assert out.tolist() == pytest.approx([0.01 * 2.5**2, 0.0])
    with pytest.raises(PreftuneError, match="coef"):
        reward_centering_penalty(t(1.0), t(1.0), -0.1)


def test_plackett_luce_k3_by_hand():
    # Scores rank completion 2 first, then 0, then 1: σ = (2, 0, 1).
    rewards = t(0.3, -0.7, 1.2)[None]
    scores = t(5.0, 1.0, 9.0)[None]
    r1, r2, r3 = 1.2, 0.3, -0.7  # rewards in ranked order
    expected = -(
        (r1 - math.log(math.exp(r1) + math.exp(r2) + math.exp(r3)))
        + (r2 - math.log(math.exp(r2) + math.exp(r3)))
    )
    losses, m = plackett_luce_loss(rewards, scores)
    assert losses.tolist() == pytest.approx([expected], rel=1e-12)
    # Pairs (2>0): 1.2>0.3 yes, (2>1): yes, (0>1): 0.3>−0.7 yes.
    assert m["accuracy"].tolist() == [1.0]


def test_plackett_luce_k2_equals_bradley_terry():
    rewards = t(0.4, 1.5, -2.0, 3.0).reshape(2, 2)
    scores = t(1.0, 0.0, 0.0, 1.0).reshape(2, 2)  # row 0: item 0 preferred; row 1: item 1 preferred
    pl, _ = plackett_luce_loss(rewards, scores)
    bt, _ = bradley_terry_loss(t(0.4, 3.0), t(1.5, -2.0))
    torch.testing.assert_close(pl, bt)
    assert pl.tolist() == pytest.approx(
        [neg_log_sigmoid(0.4 - 1.5), neg_log_sigmoid(3.0 + 2.0)], rel=1e-12
    )


def test_plackett_luce_ties_keep_index_order():
    # Scores tie between items 0 and 1: order is (0, 1) by index, after item 2 (highest).
    rewards = t(1.0, 0.0, 2.0)[None]
    scores = t(1.0, 1.0, 3.0)[None]
    expected = -(
        (2.0 - math.log(math.exp(2.0) + math.exp(1.0) + math.exp(0.0)))
        + (1.0 - math.log(math.exp(1.0) + math.exp(0.0)))
    )
    losses, _ = plackett_luce_loss(rewards, scores)
    assert losses.item() == pytest.approx(expected, rel=1e-12)


def test_plackett_luce_mask_for_variable_k():
    # Row 0 has 3 real completions; row 1 has 2 (the last entry is padding, even with the top score).
    rewards = torch.tensor(
        [[0.3, -0.7, 1.2], [0.5, 2.0, 99.0]], dtype=torch.float64, requires_grad=True
    )
    scores = t(5.0, 1.0, 9.0, 0.0, 1.0, 100.0).reshape(2, 3)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    losses, m = plackett_luce_loss(rewards, scores, mask)
    r1, r2, r3 = 1.2, 0.3, -0.7
    row0 = -(
        (r1 - math.log(math.exp(r1) + math.exp(r2) + math.exp(r3)))
        + (r2 - math.log(math.exp(r2) + math.exp(r3)))
    )
    row1 = neg_log_sigmoid(2.0 - 0.5)  # item 1 over item 0; padding excluded
    assert losses.tolist() == pytest.approx([row0, row1], rel=1e-12)
    losses.sum().backward()
    assert torch.isfinite(rewards.grad).all()
    assert rewards.grad[1, 2].item() == 0.0  # padding gets no gradient
    assert m["accuracy"].tolist() == [1.0, 1.0]


def test_plackett_luce_single_completion_is_zero():
    losses, _ = plackett_luce_loss(t(1.0, 2.0)[None], t(0.0, 1.0)[None], torch.tensor([[1, 0]]))
    assert losses.tolist() == [0.0]


def test_all_pairs_loss_by_hand():
    rewards = t(0.3, -0.7, 1.2)[None]
    scores = t(5.0, 5.0, 9.0)[None]  # items 0 and 1 tie: that pair is skipped
    losses, m = all_pairs_loss(rewards, scores)
    expected = (neg_log_sigmoid(1.2 - 0.3) + neg_log_sigmoid(1.2 + 0.7)) / 2
    assert losses.tolist() == pytest.approx([expected], rel=1e-12)
    assert m["pairs"].tolist() == [2]
    assert m["accuracy"].tolist() == [1.0]


def test_all_pairs_loss_with_mask_and_no_pairs():
    rewards = t(0.3, -0.7, 1.2, 1.0, 2.0, 3.0).reshape(2, 3)
    scores = t(1.0, 2.0, 0.0, 1.0, 1.0, 1.0).reshape(2, 3)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    losses, m = all_pairs_loss(rewards, scores, mask)
    # row 0: only (1 over 0) among valid items; row 1: all tied -> no pairs, loss 0.
    assert losses.tolist() == pytest.approx([neg_log_sigmoid(-0.7 - 0.3), 0.0], rel=1e-12)
    assert m["pairs"].tolist() == [1, 0]
    assert m["accuracy"].tolist() == [0.0, 0.0]
