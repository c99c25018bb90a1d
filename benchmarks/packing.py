"""Packed against padded batches: one forward + backward of the completion log-probs.

    BENCH_THREADS=1 nice -n 10 python benchmarks/packing.py [--repeats 5]

Model as in benchmarks/run.py (Llama-style, hidden 256, 4 layers, vocabulary 8,000, random
weights). Batches of ragged random sequences (lengths drawn uniformly from [32, 256], prompts
a third of each), so that padding exists, unlike run.py's fixed-length data:
- sft: 8 sequences, padded rows against padding-free rows (`collate_sft(pack=True)`);
- dpo: 8 pairs sharing their prompt, [chosen; rejected] padded rows against one
  [prefix, chosen suffix, rejected suffix] row per pair (`collate_pairs(pack=True)`), and
  against several such pairs per row (`pack_sequences(..., padding_free=True)`).
Padded and packed runs alternate; the median time of each is reported, and the ratio.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time

import torch

from preftune.data.collate import collate_pairs, collate_sft
from preftune.models import build_tiny_model, build_tiny_tokenizer
from preftune.models.logprobs import CompletionLogProbs
from preftune.models.packing import pack_sequences

HIDDEN, LAYERS, VOCAB, BATCH = 256, 4, 8000, 8


def _tokens(rng, n):
    return [1] + [rng.randrange(10, VOCAB) for _ in range(n - 1)]


def sft_batch(rng, pad_id):
    seqs = []
    for _ in range(BATCH):
        n = rng.randint(32, 256)
        p = n // 3
        seqs.append({"input_ids": _tokens(rng, n), "completion_mask": [0] * p + [1] * (n - p)})
    return collate_sft(seqs, pad_id, pack=True)


def dpo_batch(rng, pad_id):
    feats = []
    for _ in range(BATCH):
        p = rng.randint(16, 96)
        prompt = _tokens(rng, p)
        c = prompt + [rng.randrange(10, VOCAB) for _ in range(rng.randint(16, 160))]
        r = prompt + [rng.randrange(10, VOCAB) for _ in range(rng.randint(16, 160))]
        feats.append({"chosen_input_ids": c, "chosen_completion_mask": [0] * p + [1] * (len(c) - p),
                      "rejected_input_ids": r,
                      "rejected_completion_mask": [0] * p + [1] * (len(r) - p)})
    return collate_pairs(feats, pad_id, pack=True)


def step(module, batch, packed: bool) -> float:
    kwargs = {"packed": batch["packed"]} if packed else {}
    t0 = time.perf_counter()
    out = module(batch["input_ids"], batch["attention_mask"], batch["completion_mask"], **kwargs)
    out.seq_logps.sum().backward()
    return time.perf_counter() - t0


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok, hidden_size=HIDDEN, num_layers=LAYERS, vocab_size=VOCAB).train()
    module = CompletionLogProbs(model)
    cases = (("sft", sft_batch, False), ("dpo", dpo_batch, False),
             ("dpo, pairs padding-free", dpo_batch, True))
    for name, make, padding_free in cases:
        batch = make(random.Random(0), tok.pad_token_id)
        if padding_free:  # several pairs per row, rows no longer than the longest pair
            seqs = [{"input_ids": ids[m.bool()].tolist(), "completion_mask": c[m.bool()].tolist()}
                    for ids, m, c in zip(batch["input_ids"], batch["attention_mask"],
                                         batch["completion_mask"])]
            batch["packed"] = pack_sequences(seqs, [[i, BATCH + i] for i in range(BATCH)],
                                             pad_id=tok.pad_token_id, padding_free=True)
        padded_tokens = batch["input_ids"].numel()
        packed_tokens = batch["packed"].input_ids.numel()
        times = {False: [], True: []}
        step(module, batch, False)  # warm-up
        step(module, batch, True)
        for _ in range(args.repeats):
            for packed in (False, True):
                model.zero_grad(set_to_none=True)
                times[packed].append(step(module, batch, packed))
        padded, packed = statistics.median(times[False]), statistics.median(times[True])
        print(f"{name}: padded {tuple(batch['input_ids'].shape)} = {padded_tokens} tokens "
              f"{padded:.3f} s; packed {tuple(batch['packed'].input_ids.shape)} = "
              f"{packed_tokens} tokens {packed:.3f} s; speed-up {padded / packed:.2f}x")


if __name__ == "__main__":
    main()
