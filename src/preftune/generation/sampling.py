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
            raise PreftuneError(
                f"sampling max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}"
            )
        if not self.temperature > 0:
            raise PreftuneError(
                f"sampling temperature must be > 0, got {self.temperature!r} "
                "(use a small value such as 1e-3 for near-greedy decoding)"
            )
        if not 0 < self.top_p <= 1:
            raise PreftuneError(f"sampling top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise PreftuneError(
                f"sampling top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}"
            )
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
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "completion_mask": completion_mask,
        }


def sample_next_token(
    logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Draw one token per row from `logits [B, V]`.

    p = softmax(logits / temperature), restricted to the top_k most likely tokens (if top_k > 0),
    then to the nucleus: the most likely tokens, in decreasing order, until their mass under p
    reaches top_p (the most likely token is always kept, so a tiny top_p is greedy). The kept
    tokens are renormalised and one is drawn with `torch.multinomial(..., generator=generator)`.
    """
    return _draw(_filtered_probs(logits, sampling), generator)


def _filtered_probs(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """softmax(logits / temperature) restricted by top_k and top_p (see `sample_next_token`)."""
    logits = logits.float()
    if sampling.temperature != 1.0:  # x / 1.0 == x exactly: skip the copy
        logits = logits / sampling.temperature
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
    return torch.softmax(logits, dim=-1)


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    # A CPU generator can drive sampling for a GPU model: draw on the generator's device.
    if generator is not None and generator.device != probs.device:
        return (
            torch.multinomial(probs.to(generator.device), 1, generator=generator)
            .squeeze(-1)
            .to(probs.device)
        )
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
    decoder = _FastDecoder.supports(model)
    sample = _sample_chunk_fast if decoder else _sample_chunk
    completions: list[list[int]] = []
    finished: list[bool] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(rows), batch_size):
                chunk_completions, chunk_finished = sample(
                    model, rows[start : start + batch_size], sampling, eos_ids, pad_id, generator
                )
                completions += chunk_completions
                finished += chunk_finished
    finally:
        model.train(was_training)
    return Rollout(
        prompt_ids=rows, completion_ids=completions, finished=finished, num_samples=num_samples
    )


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

    tokens = torch.full(
        (len(prompts), sampling.max_new_tokens), pad_id, dtype=torch.long, device=device
    )
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
        attention_mask = torch.cat(
            [attention_mask, attention_mask.new_ones((len(prompts), 1))], dim=1
        )
        logits = step(token[:, None], attention_mask, next_position)
        next_position = next_position + 1

    tokens, lengths = tokens.tolist(), lengths.tolist()
    completions = [row[:n] for row, n in zip(tokens, lengths)]
    finished = [bool(c) and c[-1] in eos_ids for c in completions]
    return completions, finished


# The fast decoder for Llama-style models (below) and its group prefill; tests switch them off
# to compare.
FAST_DECODE = True
GROUP_PREFILL = True
_FAST_MODEL_TYPES = ("llama", "mistral", "qwen2")


def _sample_chunk_fast(model, prompts, sampling, eos_ids, pad_id, generator):
    """`_sample_chunk` with the same draws, faster per token.

    Each distinct prompt of the chunk runs once through the model's own backbone (the samples
    of a prompt share it) and the LM head runs on the chunk's rows, as the plain loop's
    forward does (a matmul's rounding can depend on its row count; the KV cache and logits
    were bitwise equal to the plain loop's on the CPU). The KV cache is copied, once per
    sample, into a preallocated buffer that decode steps write in place (no concatenation),
    and each decode step calls the layers' modules directly (projections, norms, MLP: LoRA
    adapters included) with one scaled-dot-product attention over the buffer, skipping the
    model wrapper's mask and cache plumbing. Finished rows leave the batch: the buffer is
    compacted to the rows still sampling. Random draws are unchanged: `torch.multinomial` with
    one sample draws one Exp(1) variate per vocabulary entry and row (argmax p / q), so each
    step still draws for every row of the chunk (finished rows get a one-hot distribution) and
    the rows still sampling see exactly the variates they saw before.
    """
    device = next(model.parameters()).device
    n, width = len(prompts), max(len(p) for p in prompts)
    # Group prefill: the samples of a prompt share it, so each distinct prompt runs once (same
    # padded width) and its row of the KV cache and logits is repeated for its samples.
    distinct, row_of = _distinct(prompts) if GROUP_PREFILL else (prompts, list(range(n)))
    input_ids = torch.full((len(distinct), width), pad_id, dtype=torch.long, device=device)
    prompt_mask = torch.zeros((len(distinct), width), dtype=torch.long, device=device)
    for i, p in enumerate(distinct):
        input_ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long, device=device)
        prompt_mask[i, width - len(p) :] = 1
    position_ids = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    eos = torch.tensor(sorted(eos_ids) or [-1], dtype=torch.long, device=device)

    row_of = torch.tensor(row_of, dtype=torch.long, device=device)
    decoder = _FastDecoder(model)
    logits = decoder.prefill(input_ids, prompt_mask, position_ids, row_of, sampling.max_new_tokens)
    positions = position_ids[row_of, -1] + 1  # [n], of the rows still sampling

    tokens = torch.full((n, sampling.max_new_tokens), pad_id, dtype=torch.long, device=device)
    lengths = torch.zeros(n, dtype=torch.long, device=device)
    active = torch.arange(n, device=device)  # chunk rows still sampling, in order
    for t in range(sampling.max_new_tokens):
        probs = _filtered_probs(logits, sampling)
        if len(active) < n:  # the finished rows draw from a one-hot: same variates for the rest
            full = probs.new_zeros((n, probs.shape[-1]))
            full[:, 0] = 1.0
            full[active] = probs
            probs = full
        token = _draw(probs, generator)[active]
        tokens[active, t] = token
        lengths[active] += 1
        if t + 1 == sampling.max_new_tokens:
            break
        if sampling.stop_at_eos:
            keep = ~torch.isin(token, eos)
            if not bool(keep.all()):
                if not bool(keep.any()):
                    break
                active, token, positions = active[keep], token[keep], positions[keep]
                decoder.keep_rows(keep)
        logits = decoder.step(token, positions)
        positions = positions + 1

    tokens, lengths = tokens.tolist(), lengths.tolist()
    completions = [row[:k] for row, k in zip(tokens, lengths)]
    finished = [bool(c) and c[-1] in eos_ids for c in completions]
    return completions, finished


def _distinct(prompts: list[list[int]]) -> tuple[list[list[int]], list[int]]:
    """The distinct prompts in order of first appearance, and each row's index among them."""
    index: dict[tuple[int, ...], int] = {}
    row_of = [index.setdefault(tuple(p), len(index)) for p in prompts]
    return [list(p) for p in index], row_of


class _FastDecoder:
    """Decode steps of a Llama-style causal LM over a preallocated KV buffer."""

    @staticmethod
    def supports(model) -> bool:
        if not FAST_DECODE:
            return False
        hf = (
            model.get_base_model()
            if hasattr(model, "get_base_model") and hasattr(model, "peft_config")
            else model
        )
        cfg = getattr(hf, "config", None)
        inner = getattr(hf, "model", None)
        if (
            cfg is None
            or getattr(cfg, "model_type", None) not in _FAST_MODEL_TYPES
            or inner is None
        ):
            return False
        if getattr(cfg, "_attn_implementation", None) not in ("sdpa", "eager"):
            return False
        if getattr(cfg, "use_sliding_window", False) or getattr(cfg, "sliding_window", None):
            return False  # a window would mask old positions: the model's own loop handles it
        if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
            return False
        layers = getattr(inner, "layers", None)
        needed = ("embed_tokens", "norm", "rotary_emb")
        if layers is None or len(layers) == 0 or not all(hasattr(inner, a) for a in needed):
            return False
        attn = layers[0].self_attn
        return all(
            hasattr(attn, a)
            for a in ("q_proj", "k_proj", "v_proj", "o_proj", "scaling", "head_dim")
        ) and not hasattr(attn, "q_norm")

    def __init__(self, model):
        import sys

        hf = (
            model.get_base_model()
            if hasattr(model, "get_base_model") and hasattr(model, "peft_config")
            else model
        )
        self.inner, self.head = hf.model, hf.get_output_embeddings()
        self.layers = list(self.inner.layers)
        self.rope = sys.modules[type(self.layers[0].self_attn).__module__].apply_rotary_pos_emb
        self.cache_kwarg = (
            "cache" if "cache" in _forward_parameters(self.inner) else "past_key_values"
        )

    def prefill(
        self,
        input_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        position_ids: torch.Tensor,
        row_of: torch.Tensor,
        max_new_tokens: int,
    ) -> torch.Tensor:
        """Run the distinct prompts [d, width] through the model's own backbone, fill the
        buffer of the batch rows (row i is prompt `row_of[i]`), and return the next-token
        logits [rows, vocab]. The head runs on the batch rows, as the model's forward would."""
        cache = _new_cache(self.inner)
        out = self.inner(
            input_ids=input_ids,
            attention_mask=prompt_mask,
            position_ids=position_ids,
            use_cache=True,
            **{self.cache_kwarg: cache},
        )
        for name in ("cache", "past_key_values"):  # the attribute follows the kwarg's rename
            if getattr(out, name, None) is not None:
                cache = getattr(out, name)
                break
        n, width = len(row_of), input_ids.shape[1]
        self.length = width  # columns of the buffer filled so far
        total = width + max_new_tokens
        self.keys, self.values = [], []
        for i in range(len(self.layers)):
            k, v = cache.layers[i].keys, cache.layers[i].values  # [d, kv_heads, width, head_dim]
            kb = k.new_zeros((n, k.shape[1], total, k.shape[3]))
            vb = v.new_zeros((n, v.shape[1], total, v.shape[3]))
            kb[:, :, :width] = k[row_of]
            vb[:, :, :width] = v[row_of]
            self.keys.append(kb)
            self.values.append(vb)
        # Additive mask (0 or -inf): what sdpa turns a boolean mask into, made once, not per call.
        dtype = self.keys[0].dtype
        self.mask = torch.zeros((n, 1, 1, total), dtype=dtype, device=prompt_mask.device)
        self.mask[:, 0, 0, :width].masked_fill_(prompt_mask[row_of] == 0, float("-inf"))
        return self.head(out.last_hidden_state[row_of, -1:])[:, -1]

    def keep_rows(self, keep: torch.Tensor) -> None:
        self.keys = [k[keep] for k in self.keys]
        self.values = [v[keep] for v in self.values]
        self.mask = self.mask[keep]

    def step(self, token: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Feed one token per row at `positions`; the next-token logits [rows, vocab]."""
        x = self.inner.embed_tokens(token[:, None])
        cos, sin = self.inner.rotary_emb(x, positions[:, None])
        col, rows = self.length, x.shape[0]
        self.length += 1
        mask = self.mask[:, :, :, : self.length]
        for layer, kb, vb in zip(self.layers, self.keys, self.values):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(rows, 1, -1, attn.head_dim).transpose(1, 2)
            k = attn.k_proj(h).view(rows, 1, -1, attn.head_dim).transpose(1, 2)
            v = attn.v_proj(h).view(rows, 1, -1, attn.head_dim).transpose(1, 2)
            q, k = self.rope(q, k, cos, sin)
            kb[:, :, col : col + 1] = k
            vb[:, :, col : col + 1] = v
            o = torch.nn.functional.scaled_dot_product_attention(
                q,
                kb[:, :, : self.length],
                vb[:, :, : self.length],
                attn_mask=mask,
                scale=attn.scaling,
                enable_gqa=q.shape[1] != k.shape[1],
            )
            x = x + attn.o_proj(o.transpose(1, 2).reshape(rows, 1, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.head(self.inner.norm(x[:, -1]))


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
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs
        )
        returned = getattr(out, "cache", None)
        if returned is None:
            returned = getattr(out, "past_key_values", None)
        if returned is not None:
            self.cache = returned
        return out.logits[:, -1, :]


def _forward_parameters(model) -> set[str]:
    params = set(inspect.signature(model.forward).parameters)
    base = getattr(
        model, "get_base_model", None
    )  # e.g. a PEFT wrapper with forward(*args, **kwargs)
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
    vocab = (
        model.get_input_embeddings().num_embeddings
        if hasattr(model, "get_input_embeddings")
        else None
    )
    for i, p in enumerate(prompt_ids):
        if not isinstance(p, (list, tuple)) or len(p) == 0:
            raise PreftuneError(
                f"generate: prompt {i} must be a non-empty list of token ids, got {p!r}"
            )
        if vocab is not None and (min(p) < 0 or max(p) >= vocab):
            raise PreftuneError(
                f"generate: prompt {i} has token ids outside the model's vocabulary [0, {vocab}): "
                f"min {min(p)}, max {max(p)} (was it tokenized with another tokenizer?)"
            )
