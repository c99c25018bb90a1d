"""Packed against padded batches: one forward + backward of the completion log-probs.

    BENCH_THREADS=1 nice -n 10 python benchmarks/packing.py [--repeats 5]

Model as in benchmarks/run.py (Llama-style, hidden 256, 4 layers, vocabulary 8,000, random
weights). Batches of ragged random sequences (lengths drawn uniformly from [32, 256], prompts
a third of each), so that padding exists, unlike run.py's fixed-length data:
- sft: 8 sequences, padded rows against padding-free rows (`collate_sft(pack=True)`);
- dpo: 8 pairs sharing their prompt, [chosen; rejected] padded rows against one
  [prefix, chosen suffix, rejected suffix] row per pair (`collate_pairs(pack=True)`), and
  against several such pairs per row (`pack_sequences(..., padding_free=True)`); and pairs of
  run.py's fixed shape (47-token prompt, two 95-token replies: no padding, prefix only);
- kto reference: run.py's KTO shape, the reference pass (no gradient) over matched and
  mismatched rows, two padded forwards against one packed forward sharing each prompt.
Padded and packed runs alternate; the median wall and process CPU time of each is reported
(CPU time: what other processes on a loaded machine do not change), and the ratios.
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
from preftune.trainers.kto import collate_kto

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


def dpo_batch(rng, pad_id, fixed: bool = False):
    """Ragged pairs; `fixed`: run.py's shape (47-token prompts, 95-token replies, no padding)."""
    feats = []
    for _ in range(BATCH):
        p = 47 if fixed else rng.randint(16, 96)
        prompt = _tokens(rng, p)
        c = prompt + [
            rng.randrange(10, VOCAB) for _ in range(95 if fixed else rng.randint(16, 160))
        ]
        r = prompt + [
            rng.randrange(10, VOCAB) for _ in range(95 if fixed else rng.randint(16, 160))
        ]
        feats.append(
            {
                "chosen_input_ids": c,
                "chosen_completion_mask": [0] * p + [1] * (len(c) - p),
                "rejected_input_ids": r,
                "rejected_completion_mask": [0] * p + [1] * (len(r) - p),
            }
        )
    return collate_pairs(feats, pad_id, pack=True)


def kto_batch(rng, pad_id):
    """run.py's KTO shape: 8 examples of a 47-token prompt and a 95-token completion."""
    feats = []
    for i in range(BATCH):
        ids = _tokens(rng, 47 + 95)
        feats.append(
            {
                "input_ids": ids,
                "completion_mask": [0] * 47 + [1] * 95,
                "prompt_length": 47,
                "label": i % 2 == 0,
            }
        )
    return collate_kto(feats, pad_id, max_length=256, pack=True)


def kto_reference_step(module, batch, packed: bool) -> tuple[float, float]:
    """KTO's reference pass (no gradient): matched and mismatched rows as two padded forwards,
    or one packed forward sharing each prompt."""
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.no_grad():
        if packed:
            module(
                batch["ref_input_ids"],
                batch["ref_attention_mask"],
                batch["ref_completion_mask"],
                packed=batch["ref_packed"],
            )
        else:
            for p in ("", "kl_"):
                module(
                    batch[f"{p}input_ids"],
                    batch[f"{p}attention_mask"],
                    batch[f"{p}completion_mask"],
                )
    return time.perf_counter() - t0, time.process_time() - c0


def step(module, batch, packed: bool) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one forward + backward."""
    kwargs = {"packed": batch["packed"]} if packed else {}
    t0, c0 = time.perf_counter(), time.process_time()
    out = module(batch["input_ids"], batch["attention_mask"], batch["completion_mask"], **kwargs)
    out.seq_logps.sum().backward()
    return time.perf_counter() - t0, time.process_time() - c0


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", default="", help="run only the cases whose name contains this")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok, hidden_size=HIDDEN, num_layers=LAYERS, vocab_size=VOCAB).train()
    module = CompletionLogProbs(model)
    cases = (
        ("sft", sft_batch, True),
        ("dpo, one pair per row", dpo_batch, False),
        ("dpo, pairs padding-free (default)", dpo_batch, True),
        ("dpo, run.py lengths", lambda rng, pad: dpo_batch(rng, pad, fixed=True), True),
        ("kto reference, run.py lengths", kto_batch, True),
    )
    for name, make, padding_free in cases:
        if args.only and args.only not in name:
            continue
        batch = make(random.Random(0), tok.pad_token_id)
        if not padding_free and name.startswith("dpo"):  # one pair per row
            seqs = [
                {"input_ids": ids[m.bool()].tolist(), "completion_mask": c[m.bool()].tolist()}
                for ids, m, c in zip(
                    batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
                )
            ]
            batch["packed"] = pack_sequences(
                seqs, [[i, BATCH + i] for i in range(BATCH)], pad_id=tok.pad_token_id
            )
        run, padded_ids = step, batch["input_ids"]
        if name.startswith("kto"):
            run, packed_ids = kto_reference_step, batch["ref_packed"]
            padded_ids = torch.cat([batch["input_ids"], batch["kl_input_ids"]])
        else:
            packed_ids = batch["packed"]
        padded_tokens, packed_tokens = padded_ids.numel(), packed_ids.input_ids.numel()
        times = {False: [], True: []}
        run(module, batch, False)  # warm-up
        run(module, batch, True)
        for _ in range(args.repeats):
            for packed in (False, True):
                model.zero_grad(set_to_none=True)
                times[packed].append(run(module, batch, packed))
        wall = [statistics.median(t[0] for t in times[k]) for k in (False, True)]
        cpu = [statistics.median(t[1] for t in times[k]) for k in (False, True)]
        print(
            f"{name}: padded {tuple(padded_ids.shape)} = {padded_tokens} tokens, "
            f"packed {tuple(packed_ids.input_ids.shape)} = {packed_tokens} tokens; "
            f"wall {wall[0]:.3f} s vs {wall[1]:.3f} s ({wall[0] / wall[1]:.2f}x), "
            f"CPU {cpu[0]:.3f} s vs {cpu[1]:.3f} s ({cpu[0] / cpu[1]:.2f}x)",
            flush=True,
        )


if __name__ == "__main__":
    main()
