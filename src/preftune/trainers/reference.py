"""The reference policy π_ref of every trainer that has one (the DPO family, KTO, the online
trainers): one class, one builder, always without gradients.

Its sources, chosen by `build_reference` before training starts:

- a separate model (`--ref-model PATH`), whose tokenizer must match the policy's;
- a frozen copy of the initial policy (the default without LoRA);
- the policy itself with its LoRA adapters disabled (the default with LoRA): the base model
  *is* the initial policy, so no second copy is held in memory;
- precomputed (DPO's `--precompute-ref`): one of the above runs once over the whole data set
  before training, its sequence log-probs are cached in `<output_dir>/ref_logps.safetensors`
  (written atomically, reused by `--resume` when the fingerprint of model and data matches)
  and then travel with each example's features; training holds and runs no reference model.

A method that needs no reference (SimPO, ORPO, CPO) never builds any of these.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from preftune.data.collate import pad_sequences
from preftune.models.loading import check_same_tokenizer, disabled_adapters, load_causal_lm
from preftune.models.logprobs import CompletionLogProbs, LogProbOutput
from preftune.models.packing import PackedBatch, pack_sequences
from preftune.trainers.common import prepare_tokenizer
from preftune.utils import file_mode

CACHE_FILE = "ref_logps.safetensors"


class Reference:
    """Log-probs of completions under π_ref [rows] (`LogProbOutput`), without gradients.

    `model` is a frozen `CompletionLogProbs` (a separate model or a copy of the initial
    policy); or None, and then `policy` is the model whose LoRA adapters are disabled while
    the caller's policy forward runs.
    """

    def __init__(self, model: torch.nn.Module | None = None, policy: torch.nn.Module | None = None):
        if (model is None) == (policy is None):
            raise ValueError("a Reference is a frozen model or a policy with adapters, not both")
        self.model = model
        self.policy = policy

    @property
    def kind(self) -> str:
        return "model" if self.model is not None else "adapters"

    @torch.no_grad()
    def __call__(
        self,
        policy_forward: Callable[..., LogProbOutput],
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        completion_mask: torch.Tensor,
        *,
        temperature: float = 1.0,
        packed: PackedBatch | None = None,
    ) -> LogProbOutput:
        """`policy_forward(input_ids, attention_mask, completion_mask, temperature=)` runs the
        prepared policy (through its DDP/FSDP wrapper); used only with adapters. `packed`: the
        same rows packed (`models.packing`), used where the model computes them exactly."""
        kwargs = {"temperature": temperature}
        if packed is not None:
            kwargs["packed"] = packed
        if self.model is not None:
            return self.model(input_ids, attention_mask, completion_mask, **kwargs)
        # The base model under the adapters is the initial policy; eval mode so that no
        # dropout makes the reference noisy.
        with _eval_mode(self.policy), disabled_adapters(self.policy):
            return policy_forward(input_ids, attention_mask, completion_mask, **kwargs)


@contextlib.contextmanager
def _eval_mode(module: torch.nn.Module):
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def build_reference(
    cfg, engine, policy: torch.nn.Module, tokenizer, *, precompute: bool = False
) -> Reference:
    """π_ref for the policy about to be trained (call before `engine.setup`).

    `--ref-model`: that model; else with LoRA the policy with its adapters disabled; else a
    frozen copy of the initial policy, prepared on the device. With `precompute` the reference
    runs once before training and is dropped: the policy itself serves without a copy, and the
    caller places it (`precomputed_logps`).
    """
    if cfg.ref_model:
        model, ref_tokenizer = load_causal_lm(cfg.ref_model, dtype=cfg.dtype, seed=cfg.seed)
        prepare_tokenizer(ref_tokenizer, cfg)  # the same --chat-template as the policy's
        check_same_tokenizer(tokenizer, ref_tokenizer, f"ref_model {cfg.ref_model!r}")
    elif cfg.lora:
        return Reference(policy=policy)
    else:
        model = policy if precompute else copy.deepcopy(policy)
    model = CompletionLogProbs(model)
    return Reference(model if precompute else engine.prepare_frozen(model))


# --- precomputation -------------------------------------------------------------------------


def fingerprint(identity: dict, sequences: list[dict]) -> str:
    """A hash of the reference's identity and of every token it scores."""
    h = hashlib.sha256(json.dumps(identity, sort_keys=True).encode())
    for s in sequences:
        h.update(json.dumps([s["input_ids"], s["completion_mask"]]).encode())
    return h.hexdigest()


@torch.no_grad()
def sequence_logps(
    engine,
    score: Callable[..., torch.Tensor],
    sequences: list[dict],
    pad_id: int,
    batch_size: int,
    *,
    groups: list[list[int]] | None = None,
    pack: bool = False,
) -> torch.Tensor:
    """Sequence log-probs [N] of `sequences` under `score(input_ids, attention_mask,
    completion_mask, **kw)`.

    `groups`: sequences scored in the same batch (e.g. [[chosen_i, rejected_i], ...]);
    default: each alone. `pack`: each batch also passes `packed=` (the groups sharing their
    common prefix, `models.packing`). Groups are sorted by length so batches carry little
    padding, `batch_size` sequences at a time; sharded over processes (each process scores a
    contiguous block of groups, the blocks are gathered in order).
    """
    n = len(sequences)
    if groups is None:
        groups = [[i] for i in range(n)]
    size = max(len(g) for g in groups)
    order = sorted(
        range(len(groups)), key=lambda g: max(len(sequences[i]["input_ids"]) for i in groups[g])
    )
    per_process = math.ceil(len(groups) / engine.world_size)
    mine = order[engine.rank * per_process : (engine.rank + 1) * per_process]
    device = engine.accelerator.device
    # values[j * size + k]: the k-th sequence of this process's j-th group (NaN: no such one)
    values = torch.full((per_process * size,), float("nan"), dtype=torch.float32, device=device)
    step = max(1, batch_size // size)
    for start in range(0, len(mine), step):
        chunk = [groups[g] for g in mine[start : start + step]]
        flat = [i for g in chunk for i in g]
        seqs = [sequences[i] for i in flat]
        batch = pad_sequences(seqs, pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        kwargs = {}
        if pack:
            local, at = [], 0
            for g in chunk:
                local.append(list(range(at, at + len(g))))
                at += len(g)
            kwargs["packed"] = pack_sequences(seqs, local, pad_id=pad_id, padding_free=True).to(
                device
            )
        scores = score(
            batch["input_ids"], batch["attention_mask"], batch["completion_mask"], **kwargs
        ).float()
        slots = [(start + j) * size + k for j, g in enumerate(chunk) for k in range(len(g))]
        values[torch.tensor(slots, dtype=torch.long, device=device)] = scores
    if engine.world_size > 1:
        values = engine.accelerator.gather(values)
    values = values[: len(groups) * size].cpu().view(len(groups), size)
    out = torch.empty(n, dtype=torch.float32)
    for j, g in enumerate(order):
        out[torch.tensor(groups[g], dtype=torch.long)] = values[j, : len(groups[g])]
    return out


def cached_logps(
    engine,
    path: Path,
    key: str,
    compute: Callable[[], dict[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """The tensors in `path` when their fingerprint is `key`; else compute and save them atomically."""
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as f:
                if (f.metadata() or {}).get("fingerprint") == key:
                    engine.print(f"reference log-probs: reusing {path}")
                    return {name: f.get_tensor(name) for name in f.keys()}
            engine.print(
                f"reference log-probs: {path} was made for other data or another "
                "reference model; computing them again"
            )
        except Exception:  # a corrupt or foreign file: recompute rather than trust it
            engine.print(f"reference log-probs: {path} is unreadable; computing them again")
    tensors = compute()
    engine.claim(path.name)  # the run's own file, removed by --overwrite
    if engine.is_main:
        tmp = path.with_name(f".tmp-{path.name}")
        save_file(
            {k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"fingerprint": key}
        )
        os.chmod(tmp, file_mode())  # safetensors writes 0600; respect the umask instead
        os.replace(tmp, path)
    engine.accelerator.wait_for_everyone()
    return tensors
