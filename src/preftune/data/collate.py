"""Padding tokenized features into batches.

Training batches are right-padded (`input_ids, attention_mask, completion_mask` as
LongTensors); pair batches put all chosen rows first, then all rejected rows, so one forward
pass scores both. Generation prompts are left-padded so that new tokens line up on the right.
"""

from __future__ import annotations

import torch

from preftune.models.packing import PackedBatch, pack_sequences, pair_groups


def pad_sequences(seqs: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad sequence features {"input_ids", "completion_mask"} to the longest one."""
    if not seqs:
        raise ValueError("pad_sequences: no sequences to pad")
    width = max(len(s["input_ids"]) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    completion_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        n = len(s["input_ids"])
        input_ids[i, :n] = torch.tensor(s["input_ids"], dtype=torch.long)
        attention_mask[i, :n] = 1
        completion_mask[i, :n] = torch.tensor(s["completion_mask"], dtype=torch.long)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "completion_mask": completion_mask,
    }


def fewer_tokens(packed: PackedBatch, padded_ids: torch.Tensor) -> bool:
    """Whether the packed rows hold fewer tokens than the padded ones: only then are they
    used (with no padding and nothing shared, the padded rows run a plain causal mask, which
    the 4D mask of a packed batch does not beat)."""
    return packed.input_ids.numel() < padded_ids.numel()


def collate_sft(features: list[dict], pad_id: int, *, pack: bool = False) -> dict:
    """Right-padded rows; `pack`: also "packed", the same sequences padding-free."""
    batch: dict = pad_sequences(features, pad_id)
    if pack:
        packed = pack_sequences(features, pad_id=pad_id, padding_free=True)
        if fewer_tokens(packed, batch["input_ids"]):
            batch["packed"] = packed
    return batch


def collate_unpaired(features: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    batch = pad_sequences(features, pad_id)
    batch["label"] = torch.tensor([bool(f["label"]) for f in features], dtype=torch.bool)
    return batch


def collate_pairs(features: list[dict], pad_id: int, *, pack: bool = False) -> dict:
    """Pairs -> rows [chosen_0..chosen_{B-1}, rejected_0..rejected_{B-1}] + num_pairs (+ margin).

    `pack`: also "packed", the same pairs as [common prefix, chosen suffix, rejected suffix],
    several pairs per row where they fit in the longest pair's length (`models.packing`),
    which the log-prob and reward forwards use where exact."""
    seqs = [
        {"input_ids": f[f"{side}_input_ids"], "completion_mask": f[f"{side}_completion_mask"]}
        for side in ("chosen", "rejected")
        for f in features
    ]
    batch: dict = pad_sequences(seqs, pad_id)
    if pack:
        n = len(features)
        packed = pack_sequences(seqs, pair_groups(n), pad_id=pad_id, padding_free=True)
        if fewer_tokens(packed, batch["input_ids"]):
            batch["packed"] = packed
    batch["num_pairs"] = len(features)
    if any("margin" in f for f in features):
        # formats.to_pairs requires a margin on every row once the column exists.
        batch["margin"] = torch.tensor([float(f["margin"]) for f in features], dtype=torch.float)
    if any("subset" in f for f in features):
        batch["subset"] = [f.get("subset") for f in features]
    return batch


def collate_ranked(features: list[dict], pad_id: int, *, pack: bool = False) -> dict:
    """Ranked lists -> all sequences row by row, "num_completions" [B] and flat "scores".

    `pack`: also "packed", each list's completions sharing their common prefix, padding-free."""
    seqs = [s for f in features for s in f["sequences"]]
    batch: dict = pad_sequences(seqs, pad_id)
    if pack:
        groups, at = [], 0
        for f in features:
            groups.append(list(range(at, at + len(f["sequences"]))))
            at += len(f["sequences"])
        packed = pack_sequences(seqs, groups, pad_id=pad_id, padding_free=True)
        if fewer_tokens(packed, batch["input_ids"]):
            batch["packed"] = packed
    batch["num_completions"] = torch.tensor(
        [len(f["sequences"]) for f in features], dtype=torch.long
    )
    batch["scores"] = torch.tensor([s for f in features for s in f["scores"]], dtype=torch.float)
    return batch


def left_pad(prompt_ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad prompts for generation -> (input_ids, attention_mask)."""
    if not prompt_ids:
        raise ValueError("left_pad: no prompts to pad")
    width = max(len(p) for p in prompt_ids)
    input_ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for i, p in enumerate(prompt_ids):
        if p:
            input_ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            attention_mask[i, width - len(p) :] = 1
    return input_ids, attention_mask
