"""Supervised fine-tuning: negative log-likelihood of completion tokens."""

from __future__ import annotations

import torch
from torch import Tensor


def nll_loss(token_logps: Tensor, completion_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Summed NLL over completion tokens and the number of those tokens.

    Returns `(loss_sum, n_tokens)`, both scalar tensors: loss_sum = Σ −log p over tokens where
    `completion_mask` is set. The caller divides by the *global* token count (summed over
    gradient-accumulation steps and data-parallel ranks), so that neither changes the loss;
    dividing per micro-batch would weight short batches more.
    """
    mask = completion_mask.bool()
    # where, not multiply: a -inf log-prob on a padding position must not become NaN.
    loss_sum = torch.where(mask, -token_logps, torch.zeros_like(token_logps)).sum()
    return loss_sum, mask.sum()
