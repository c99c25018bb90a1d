"""Packed batches: shared prefixes and several sequences per row, exact to float rounding.

A *group* is one shared prefix followed by K suffixes: K = 2 for a preference pair (the
longest common token prefix of chosen and rejected, then the rest of each), K = G for a GRPO
group of completions of one prompt, K = 1 for a plain sequence (all of it is "prefix"). Each
row of a packed batch holds one or more whole groups (padding-free when several share a row):

    row:      [ prefix_g | suffix_g,1 | suffix_g,2 | prefix_h | suffix_h,1 | ... | pad ]
    position:   0 .. P-1   P .. P+n1-1  P .. P+n2-1  0 ..        ...              0

Every suffix's positions continue from its prefix, and the 4D attention mask lets a token see
the earlier tokens of its own group that are in the prefix or in its own suffix. Because
attention is causal, each token then sees exactly the tokens (at exactly the positions) it
sees in its own unpadded sequence, so hidden states, log-probs and gradients equal the padded
path's up to float rounding; sharing the longest common *token* prefix (not only the prompt)
is exact for the same reason. The prefix runs once per group instead of K times.

API (stable; the online trainers use it for GRPO/RLOO groups):

- `pack_sequences(seqs, groups=None, *, pad_id, row_tokens=None, padding_free=False)
  -> PackedBatch`, at collate time on the CPU. `seqs`: list of {"input_ids": list[int], "completion_mask": list[int]} in
  the caller's order (e.g. chosen rows, then rejected rows). `groups`: lists of indices into
  `seqs` that share a prefix (each index in exactly one group; default: each sequence alone;
  a group's members need not share any token: the prefix is then empty). `row_tokens`: pack
  several groups per row up to this many tokens (first-fit decreasing; a longer group gets a
  row of its own); None: one group per row. `padding_free`: row_tokens = the longest group,
  so that rows are fewer but never longer (attention, O(L^2) per row under a dense mask, does
  not grow).
- `PackedBatch.to(device)`; `attention_mask_4d(packed, dtype=torch.bool)`: the [R, 1, L, L]
  mask (bool, True = attend, for sdpa; a float dtype gives the additive 0 / min mask eager
  attention needs).
- `supports_packing(config, row_length) -> bool`: the architectures and attention kernels for
  which the 4D mask is verified to be used as given (transformers 5.x returns a 4D mask
  unchanged from `masking_utils`); everything else takes the padded path.
- Scored tokens (completion tokens that have a context, as in the padded path) are listed
  flat: `target_index` and `predict_index` index the flattened [R * L] row tokens (the token,
  and the hidden state that predicts it: the previous token of the same sequence, so the
  first suffix token is predicted by the last prefix token), `seq_index` names its original
  sequence and `token_offset` its column in the right-padded [S, T] layout of `seqs`.
  `models.logprobs.packed_completion_logprobs(model, packed)` turns these into a
  `LogProbOutput` per original sequence, in the original order.
- `last_index` [S]: the flattened row index of each sequence's last token that is not
  `pad_id` (its first token when all are): where a sequence classifier reads its score.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

# Architectures whose attention layers take the 4D mask as given (checked in transformers 5.24:
# masking_utils returns a 4D mask unchanged; sdpa and eager attention apply it as is). Other
# model types, and flash-attention kernels (which take no 4D mask), use the padded path.
PACKABLE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
PACKABLE_ATTENTION = ("sdpa", "eager")


class PackedBatch(NamedTuple):
    # NamedTuple: DDP and torch pytrees traverse it; `to` moves the tensors, not the ints.
    input_ids: torch.Tensor
    """[R, L] int64 token ids of the packed rows (pad_id after the last group)"""
    position_ids: torch.Tensor
    """[R, L] int64: each token's position in its own sequence"""
    group_ids: torch.Tensor
    """[R, L] int64: the group of each token within its row (the row's padding is one more group)"""
    branch_ids: torch.Tensor
    """[R, L] int64: 0 for a group's shared prefix, k >= 1 for its k-th suffix"""
    target_index: torch.Tensor
    """[N] int64: flattened [R * L] index of each scored token"""
    predict_index: torch.Tensor
    """[N] int64: flattened index of the hidden state that predicts it"""
    seq_index: torch.Tensor
    """[N] int64: the original sequence (index into `seqs`) of each scored token"""
    token_offset: torch.Tensor
    """[N] int64: the scored token's column in its original sequence"""
    last_index: torch.Tensor
    """[S] int64: flattened index of each sequence's last token that is not pad_id"""
    num_sequences: int
    """S, the number of original sequences"""
    width: int
    """T, the length of the longest original sequence (the right-padded layout's width)"""
    pad_id: int
    """the padding token id (`last_index` skips it, as a transformers classifier does)"""

    def to(self, device) -> PackedBatch:
        return PackedBatch(*(v.to(device) if isinstance(v, torch.Tensor) else v for v in self))


def common_prefix_length(token_lists: list[list[int]]) -> int:
    """Length of the longest common prefix of all lists (the whole list when there is one)."""
    first = token_lists[0]
    n = min(len(t) for t in token_lists)
    for other in token_lists[1:]:
        i = 0
        while i < n and other[i] == first[i]:
            i += 1
        n = i
    return n


def _first_fit_decreasing(lengths: list[int], capacity: int | None) -> list[list[int]]:
    """Bins of item indices; None: one item per bin. Items longer than capacity get their own."""
    if capacity is None:
        return [[i] for i in range(len(lengths))]
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for b, r in enumerate(room):
            if lengths[i] <= r:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


def pair_groups(num_pairs: int) -> list[list[int]]:
    """The groups of pairs laid out as [chosen_0..chosen_{n-1}, rejected_0..rejected_{n-1}]:
    chosen_i with rejected_i."""
    return [[i, num_pairs + i] for i in range(num_pairs)]


def pack_sequences(
    seqs: list[dict],
    groups: list[list[int]] | None = None,
    *,
    pad_id: int,
    row_tokens: int | None = None,
    padding_free: bool = False,
) -> PackedBatch:
    """The packed layout of `seqs` (see the module docstring). `padding_free`: row_tokens is
    the longest group's size (fewer rows, none longer than one group would need alone)."""
    if not seqs:
        raise ValueError("pack_sequences: no sequences to pack")
    n_seqs = len(seqs)
    if groups is None:
        groups = [[i] for i in range(n_seqs)]
    members = sorted(i for g in groups for i in g)
    if members != list(range(n_seqs)) or any(not g for g in groups):
        raise ValueError("pack_sequences: groups must cover every sequence exactly once")
    tokens = [list(s["input_ids"]) for s in seqs]
    prefix = [common_prefix_length([tokens[i] for i in g]) for g in groups]
    sizes = [p + sum(len(tokens[i]) - p for i in g) for g, p in zip(groups, prefix)]
    if padding_free:
        row_tokens = max(sizes)
    rows = _first_fit_decreasing(sizes, row_tokens)
    width_l = max(sum(sizes[g] for g in row) for row in rows)

    ids, pos, grp, br = [], [], [], []
    # loc[s][t]: flattened index of sequence s's token t
    loc: list[list[int]] = [[] for _ in range(n_seqs)]
    for r, row in enumerate(rows):
        rid, rpos, rgrp, rbr = [], [], [], []
        for gi, g in enumerate(row):
            members_g, p = groups[g], prefix[g]
            base = r * width_l + len(rid)
            lead = tokens[members_g[0]]
            rid += lead[:p]
            rpos += range(p)
            rgrp += [gi] * p
            rbr += [0] * p
            for k, s in enumerate(members_g, start=1):
                start = r * width_l + len(rid)
                suffix = tokens[s][p:]
                loc[s] = [base + t for t in range(p)] + [start + t for t in range(len(suffix))]
                rid += suffix
                rpos += range(p, p + len(suffix))
                rgrp += [gi] * len(suffix)
                rbr += [k] * len(suffix)
        n_pad = width_l - len(rid)
        ids.append(rid + [pad_id] * n_pad)
        pos.append(rpos + [0] * n_pad)
        grp.append(rgrp + [len(row)] * n_pad)  # padding: a group of its own, so no row is empty
        br.append(rbr + [0] * n_pad)

    target, predict, seq_of, offset, last = [], [], [], [], []
    for s, seq in enumerate(seqs):
        mask = seq["completion_mask"]
        for t in range(1, len(tokens[s])):  # position 0 has no context and is never scored
            if mask[t]:
                target.append(loc[s][t])
                predict.append(loc[s][t - 1])
                seq_of.append(s)
                offset.append(t)
        real = [t for t, tok in enumerate(tokens[s]) if tok != pad_id]
        last.append(loc[s][real[-1] if real else 0])

    def long(x):
        return torch.tensor(x, dtype=torch.long)

    return PackedBatch(
        long(ids),
        long(pos),
        long(grp),
        long(br),
        long(target),
        long(predict),
        long(seq_of),
        long(offset),
        long(last),
        n_seqs,
        max(len(t) for t in tokens),
        pad_id,
    )


def attention_mask_4d(packed: PackedBatch, dtype: torch.dtype = torch.bool) -> torch.Tensor:
    """[R, 1, L, L]: query i attends key j iff j <= i, same group, and j is in the group's
    prefix or in i's own suffix. bool (True = attend) or additive (0 / dtype's minimum)."""
    g, b = packed.group_ids, packed.branch_ids
    length = g.shape[1]
    idx = torch.arange(length, device=g.device)
    causal = idx[:, None] >= idx[None, :]
    visible = (g[:, :, None] == g[:, None, :]) & (
        (b[:, None, :] == 0) | (b[:, :, None] == b[:, None, :])
    )
    mask = (visible & causal)[:, None]
    if dtype == torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=g.device).masked_fill_(
        ~mask, torch.finfo(dtype).min
    )


def supports_packing(config, row_length: int) -> bool:
    """Whether a model with this transformers config computes a packed row exactly."""
    if config is None:
        return False
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text, "model_type", None) not in PACKABLE_MODEL_TYPES:
        return False
    if getattr(config, "_attn_implementation", None) not in PACKABLE_ATTENTION:
        return False
    # A sliding window is not in our mask: packed only when the window covers the whole row.
    window = getattr(text, "sliding_window", None)
    layer_types = getattr(text, "layer_types", None) or ()
    windowed = "sliding_attention" in layer_types or text.model_type == "mistral"
    if windowed and window is not None and window < row_length:
        return False
    return True
