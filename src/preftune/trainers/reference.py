"""Reference log-probs for the DPO family and KTO: where they come from, computed once, no grad.

Three sources, chosen by the trainer before training starts:

- a separate frozen model (`--ref-model PATH`, or a copy of the initial policy), prepared with
  `engine.prepare_frozen` and run under `torch.no_grad` on every batch;
- the policy itself with its LoRA adapters disabled: the base model *is* the initial policy,
  so no second copy is held in memory;
- precomputed (`--precompute-ref`): the reference runs once over the whole data set before
  training, its sequence log-probs are cached in `<output_dir>/ref_logps.safetensors` (written
  atomically, reused by `--resume` when the fingerprint of model and data matches) and then
  travel with each example's features; training holds and runs no reference model.

A method that needs no reference (SimPO, ORPO, CPO) never builds any of these.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from preftune.data.collate import pad_sequences
from preftune.errors import PreftuneError
from preftune.models.loading import disabled_adapters, load_causal_lm
from preftune.models.logprobs import completion_logprobs
from preftune.utils import file_mode

CACHE_FILE = "ref_logps.safetensors"


class Reference:
    """Sequence log-probs [rows] under the reference policy, always without gradients.

    `model` is a frozen causal LM (a separate reference), or None: then the reference is the
    policy module the objective is given, run with its LoRA adapters disabled.
    """

    def __init__(self, model: torch.nn.Module | None = None):
        self.model = model

    @property
    def kind(self) -> str:
        return "model" if self.model is not None else "adapters"

    @torch.no_grad()
    def __call__(self, module: torch.nn.Module, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
        if self.model is not None:
            return completion_logprobs(self.model, input_ids, attention_mask,
                                       completion_mask).seq_logps
        # The base model under the adapters is the initial policy; eval mode so that no
        # dropout makes the reference noisy.
        was_training = module.training
        module.eval()
        try:
            with disabled_adapters(module):
                return module(input_ids, attention_mask, completion_mask).seq_logps.detach()
        finally:
            module.train(was_training)


def load_reference_model(name: str, policy_tokenizer, *, dtype: str, seed: int):
    """Load `--ref-model` and refuse it when its tokenizer differs from the policy's."""
    model, tokenizer = load_causal_lm(name, dtype=dtype, seed=seed)
    check_same_tokenizer(policy_tokenizer, tokenizer, name)
    return model


def check_same_tokenizer(policy_tok, ref_tok, ref_name: str) -> None:
    """Log-ratios compare token by token, so both models must split text the same way."""
    problems = []
    if len(policy_tok) != len(ref_tok):
        problems.append(f"vocabulary sizes {len(policy_tok)} (policy) vs {len(ref_tok)} (reference)")
    elif policy_tok.get_vocab() != ref_tok.get_vocab():
        problems.append("the same vocabulary size but different token ids")
    for name in ("bos_token_id", "eos_token_id"):
        a, b = getattr(policy_tok, name, None), getattr(ref_tok, name, None)
        if a != b:
            problems.append(f"{name} {a} (policy) vs {b} (reference)")
    if problems:
        raise PreftuneError(
            f"ref_model {ref_name!r}: its tokenizer differs from the policy's ("
            + "; ".join(problems) + "); the reference must use the policy's tokenizer so that "
            "log-probs of the same token ids can be compared")


# --- precomputation -------------------------------------------------------------------------

def fingerprint(identity: dict, sequences: list[dict]) -> str:
    """A hash of the reference's identity and of every token it scores."""
    h = hashlib.sha256(json.dumps(identity, sort_keys=True).encode())
    for s in sequences:
        h.update(json.dumps([s["input_ids"], s["completion_mask"]]).encode())
    return h.hexdigest()


@torch.no_grad()
def sequence_logps(engine, score: Callable[..., torch.Tensor], sequences: list[dict], pad_id: int,
                   batch_size: int) -> torch.Tensor:
    """Sequence log-probs [N] of `sequences` under `score(input_ids, attention_mask, completion_mask)`.

    Sorted by length so batches carry little padding; sharded over processes (each process
    scores a contiguous block, the blocks are gathered in order).
    """
    n = len(sequences)
    order = sorted(range(n), key=lambda i: len(sequences[i]["input_ids"]))
    per_process = math.ceil(n / engine.world_size)
    mine = order[engine.rank * per_process:(engine.rank + 1) * per_process]
    device = engine.accelerator.device
    values = torch.zeros(per_process, dtype=torch.float32, device=device)
    for start in range(0, len(mine), batch_size):
        chunk = mine[start:start + batch_size]
        batch = pad_sequences([sequences[i] for i in chunk], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        values[start:start + len(chunk)] = score(batch["input_ids"], batch["attention_mask"],
                                                 batch["completion_mask"]).float()
    if engine.world_size > 1:
        values = engine.accelerator.gather(values)
    out = torch.empty(n, dtype=torch.float32)
    out[torch.tensor(order, dtype=torch.long)] = values[:n].cpu()
    return out


def cached_logps(engine, path: Path, key: str, compute: Callable[[], dict[str, torch.Tensor]],
                 ) -> dict[str, torch.Tensor]:
    """The tensors in `path` when their fingerprint is `key`; else compute and save them atomically."""
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as f:
                if (f.metadata() or {}).get("fingerprint") == key:
                    engine.print(f"reference log-probs: reusing {path}")
                    return {name: f.get_tensor(name) for name in f.keys()}
            engine.print(f"reference log-probs: {path} was made for other data or another "
                         "reference model; computing them again")
        except Exception:  # a corrupt or foreign file: recompute rather than trust it
            engine.print(f"reference log-probs: {path} is unreadable; computing them again")
    tensors = compute()
    engine.claim(path.name)  # the run's own file, removed by --overwrite
    if engine.is_main:
        tmp = path.with_name(f".tmp-{path.name}")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"fingerprint": key})
        os.chmod(tmp, file_mode())  # safetensors writes 0600; respect the umask instead
        os.replace(tmp, path)
    engine.accelerator.wait_for_everyone()
    return tensors


def scorer(model: torch.nn.Module, *, lora: bool):
    """score(input_ids, attention_mask, completion_mask) -> seq log-probs, for precomputation."""
    def score(input_ids, attention_mask, completion_mask):
        with disabled_adapters(model) if lora else nullcontext():
            return completion_logprobs(model, input_ids, attention_mask, completion_mask).seq_logps
    return score
