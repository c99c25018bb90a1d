"""Batched sampling from a causal LM with a KV cache, and the `Rollout` it returns.

Why our own loop rather than `model.generate`: the online trainers (PPO, GRPO, RLOO, online
DPO, best-of-N) score completions with log-probs under *exactly* the distribution we sampled
from, and tests must be able to replay a rollout from a seed. A dozen lines over the model's
forward make both guarantees visible: the only randomness is one `torch.multinomial` call per
step drawing from `generator`, and temperature / top-k / top-p are applied exactly as
`sample_next_token` documents (no repetition penalty, no default `generation_config` of the
checkpoint silently changing the distribution, no logits processors chosen by the model repo).

The loop: left-pad the prompts, run the prompt once to fill the KV cache, then feed one token
per step. Position ids come from the attention mask so that left padding does not shift them.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from preftune.errors import PreftuneError


@dataclass
class SamplingConfig:
    """How completions are sampled (shared by the HF loop and the vLLM backend)."""

    max_new_tokens: int = 64
    """Most tokens generated per completion (EOS included)."""
    temperature: float = 1.0
    """Logits are divided by this before the softmax; must be > 0 (small values approach greedy)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of most likely tokens whose probability mass
    reaches top_p (Holtzman et al. 2020). 1.0 keeps every token."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 keeps every token."""
    stop_at_eos: bool = True
    """Stop a completion at its first EOS token (kept as the completion's last token)."""

    def validate(self) -> "SamplingConfig":
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise PreftuneError(f"sampling max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not self.temperature > 0:
            raise PreftuneError(
                f"sampling temperature must be > 0, got {self.temperature!r} "
                "(use a small value such as 1e-3 for near-greedy decoding)"
            )
        if not 0 < self.top_p <= 1:
            raise PreftuneError(f"sampling top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise PreftuneError(f"sampling top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        return self


@dataclass
class Rollout:
    """Sampled completions. Rows are prompt-major: with `num_samples=G`, rows [i*G, (i+1)*G)
    are the G samples of prompt i (`prompt_ids` is repeated accordingly)."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    """Generated tokens, ending with the EOS token when one was produced; nothing after it."""
    finished: list[bool]
    """True where the completion ended with an EOS token (False: cut at max_new_tokens)."""
    num_samples: int = 1

    def __len__(self) -> int:
        return len(self.completion_ids)

    @property
    def completion_lengths(self) -> list[int]:
        return [len(c) for c in self.completion_ids]

    def to_batch(self, pad_id: int) -> dict[str, torch.Tensor]:
        """Right-padded training tensors (the collated-batch contract of docs/ARCHITECTURE.md):
        `input_ids` = prompt + completion per row, `attention_mask` marks real tokens,
        `completion_mask` marks the completion tokens (EOS included)."""
        rows = [p + c for p, c in zip(self.prompt_ids, self.completion_ids)]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), int(pad_id), dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        completion_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (p, c) in enumerate(zip(self.prompt_ids, self.completion_ids)):
            n = len(p) + len(c)
            input_ids[i, :n] = torch.tensor(p + c, dtype=torch.long)
            attention_mask[i, :n] = 1
            completion_mask[i, len(p) : n] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


def sample_next_token(
    logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Draw one token per row from `logits [B, V]`.

    p = softmax(logits / temperature), restricted to the top_k most likely tokens (if top_k > 0),
    then to the nucleus: the most likely tokens, in decreasing order, until their mass under p
    reaches top_p (the most likely token is always kept, so a tiny top_p is greedy). The kept
    tokens are renormalised and one is drawn with `torch.multinomial(..., generator=generator)`.
    """
    logits = logits.float() / sampling.temperature
    if sampling.top_k > 0 and sampling.top_k < logits.shape[-1]:
        kth_largest = torch.topk(logits, sampling.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        drop_sorted = mass_before >= sampling.top_p  # the nucleus already reached top_p without it
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    # A CPU generator can drive sampling for a GPU model: draw on the generator's device.
    if generator is not None and generator.device != probs.device:
        return torch.multinomial(probs.to(generator.device), 1, generator=generator).squeeze(-1).to(logits.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def generate(
    model: torch.nn.Module,
    tokenizer,
    prompt_ids: list[list[int]],
    sampling: SamplingConfig,
    *,
    num_samples: int = 1,
    batch_size: int = 64,
    generator: torch.Generator | None = None,
) -> Rollout:
    """Sample `num_samples` completions per prompt from a plain HF causal LM (unwrap it first).

    Runs in eval mode under `torch.no_grad` on the model's device and restores train mode after.
    `tokenizer` supplies the EOS id (the model's `generation_config.eos_token_id` ids count too);
    it may be None when the model config names the EOS. With the same `generator` seed,
    `batch_size` and inputs, the rollout is identical.
    """
    sampling.validate()
    _check_inputs(model, prompt_ids, num_samples, batch_size)
    eos_ids = _eos_token_ids(model, tokenizer)
    if sampling.stop_at_eos and not eos_ids:
        raise PreftuneError(
            "generation needs an EOS token to stop at: neither the tokenizer's eos_token_id nor the "
            "model's generation_config/config eos_token_id is set (set one, or stop_at_eos=False)"
        )
    pad_id = _pad_token_id(tokenizer, eos_ids)

    # Prompt-major repetition: prompt 0's samples first, then prompt 1's, ...
    rows = [list(p) for p in prompt_ids for _ in range(num_samples)]
    completions: list[list[int]] = []
    finished: list[bool] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(rows), batch_size):
                chunk_completions, chunk_finished = _sample_chunk(
                    model, rows[start : start + batch_size], sampling, eos_ids, pad_id, generator
                )
                completions += chunk_completions
                finished += chunk_finished
    finally:
        model.train(was_training)
    return Rollout(prompt_ids=rows, completion_ids=completions, finished=finished, num_samples=num_samples)


def _sample_chunk(model, prompts, sampling, eos_ids, pad_id, generator):
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):  # left padding: every row's last prompt token is at column -1
        input_ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long, device=device)
        attention_mask[i, width - len(p) :] = 1
    # Positions count real tokens only, so a left-padded prompt sees the same positions as unpadded.
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    eos = torch.tensor(sorted(eos_ids) or [-1], dtype=torch.long, device=device)

    step = _CachedForward(model)
    logits = step(input_ids, attention_mask, position_ids)
    next_position = position_ids[:, -1:] + 1

    tokens = torch.full((len(prompts), sampling.max_new_tokens), pad_id, dtype=torch.long, device=device)
    lengths = torch.zeros(len(prompts), dtype=torch.long, device=device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    for t in range(sampling.max_new_tokens):
        token = sample_next_token(logits, sampling, generator)
        token = token.masked_fill(done, pad_id)  # rows past their EOS only carry padding
        tokens[:, t] = token
        lengths += (~done).long()
        if sampling.stop_at_eos:
            done |= torch.isin(token, eos)
        if t + 1 == sampling.max_new_tokens or bool(done.all()):
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(prompts), 1))], dim=1)
        logits = step(token[:, None], attention_mask, next_position)
        next_position = next_position + 1

    tokens, lengths = tokens.tolist(), lengths.tolist()
    completions = [row[:n] for row, n in zip(tokens, lengths)]
    finished = [bool(c) and c[-1] in eos_ids for c in completions]
    return completions, finished


class _CachedForward:
    """One forward step with a KV cache, papering over the transformers API rename
    (`past_key_values=` up to v5.x, `cache=` in later v5 releases)."""

    def __init__(self, model):
        self.model = model
        params = _forward_parameters(model)
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self.keep_last_only = "logits_to_keep" in params  # skip the LM head on prompt positions
        self.cache = _new_cache(model)

    def __call__(self, input_ids, attention_mask, position_ids) -> torch.Tensor:
        kwargs = {self.cache_kwarg: self.cache, "use_cache": True}
        if self.keep_last_only:
            kwargs["logits_to_keep"] = 1
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
        returned = getattr(out, "cache", None)
        if returned is None:
            returned = getattr(out, "past_key_values", None)
        if returned is not None:
            self.cache = returned
        return out.logits[:, -1, :]


def _forward_parameters(model) -> set[str]:
    params = set(inspect.signature(model.forward).parameters)
    base = getattr(model, "get_base_model", None)  # e.g. a PEFT wrapper with forward(*args, **kwargs)
    if "input_ids" not in params and callable(base):
        params |= set(inspect.signature(base().forward).parameters)
    return params


def _new_cache(model):
    try:
        from transformers import DynamicCache
    except ImportError:  # very old transformers: the model builds its own tuple cache
        return None
    try:
        return DynamicCache(config=model.config)
    except TypeError:  # transformers < 4.56: no config argument
        return DynamicCache()


def _eos_token_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    candidates = [getattr(tokenizer, "eos_token_id", None)]
    for cfg in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        candidates.append(getattr(cfg, "eos_token_id", None))
    for c in candidates:
        if c is None:
            continue
        ids.update(int(x) for x in (c if isinstance(c, (list, tuple)) else [c]))
    return ids


def _pad_token_id(tokenizer, eos_ids) -> int:
    # Any id works for left padding (it is masked out); prefer the tokenizer's own.
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is not None:
        return int(pad)
    return min(eos_ids) if eos_ids else 0


def _check_inputs(model, prompt_ids, num_samples, batch_size) -> None:
    if not isinstance(num_samples, int) or num_samples < 1:
        raise PreftuneError(f"generate: num_samples must be an integer >= 1, got {num_samples!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise PreftuneError(f"generate: batch_size must be an integer >= 1, got {batch_size!r}")
    if not isinstance(prompt_ids, (list, tuple)) or len(prompt_ids) == 0:
        raise PreftuneError("generate: prompt_ids must be a non-empty list of token-id lists")
    vocab = model.get_input_embeddings().num_embeddings if hasattr(model, "get_input_embeddings") else None
    for i, p in enumerate(prompt_ids):
        if not isinstance(p, (list, tuple)) or len(p) == 0:
            raise PreftuneError(f"generate: prompt {i} must be a non-empty list of token ids, got {p!r}")
        if vocab is not None and (min(p) < 0 or max(p) >= vocab):
            raise PreftuneError(
                f"generate: prompt {i} has token ids outside the model's vocabulary [0, {vocab}): "
                f"min {min(p)}, max {max(p)} (was it tokenized with another tokenizer?)"
            )
