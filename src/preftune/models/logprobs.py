"""Completion-only log-probabilities: the hot path of every trainer.

`token_logps[b, t] = log p(input_ids[b, t] | input_ids[b, :t])` for completion tokens, 0
elsewhere. The backbone runs once over the whole sequence; the LM head and the log-softmax run
only on the hidden states that predict a completion token. With a 150k vocabulary and long
prompts, the full [B, T, V] logits tensor is the largest activation of the step; most of it
(prompt and padding positions) would be thrown away.
"""

from __future__ import annotations

import inspect
from typing import NamedTuple

import torch
from torch import nn

from preftune.errors import PreftuneError
from preftune.models.packing import PackedBatch, attention_mask_4d, supports_packing


class LogProbOutput(NamedTuple):
    # NamedTuple rather than dataclass: DDP and torch pytrees traverse tuples natively.
    token_logps: torch.Tensor
    """[B, T] float32, aligned with input_ids; 0 off the completion"""
    seq_logps: torch.Tensor
    """[B] float32, sum of token_logps over the completion"""
    n_tokens: torch.Tensor
    """[B] int64, number of completion tokens scored"""
    entropy: torch.Tensor | None
    """[B, T] float32 entropy of the next-token distribution that predicts each completion
    token (0 elsewhere), or None when not asked for"""


def unwrap_peft(model):
    """The transformers model under a peft wrapper (peft injects LoRA layers in place, so
    calling its submodules still runs the adapters)."""
    if hasattr(model, "get_base_model") and hasattr(model, "peft_config"):
        return model.get_base_model()
    return model


def _head_and_backbone(model):
    """(lm_head, backbone) or None when the logits must come from the full forward.

    Fallback cases: architectures that post-process the head's output (Gemma 2's
    final_logit_softcapping, Cohere's logit_scale) would give wrong log-probs if we applied
    the head ourselves; and models whose head or backbone cannot be found generically.
    """
    hf = unwrap_peft(model)
    config = getattr(hf, "config", None)
    if config is None:
        return None
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for cfg in (config, text_config):
        if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
            return None
    get_head = getattr(hf, "get_output_embeddings", None)
    head = get_head() if get_head is not None else None
    prefix = getattr(hf, "base_model_prefix", "")
    backbone = getattr(hf, prefix, None) if prefix else None
    if backbone is None and hasattr(hf, "get_decoder"):
        backbone = hf.get_decoder()
    if not isinstance(head, nn.Module) or not isinstance(backbone, nn.Module) or backbone is hf:
        return None
    return head, backbone


def _accepts(module: nn.Module, name: str) -> bool:
    try:
        parameters = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def _position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    # Positions count real tokens only, so a left-padded row scores like its unpadded self.
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


# Rows of hidden states per chunk of the chunked head: a [chunk, vocabulary] float32 block is
# the largest temporary (64 MB at a 128k vocabulary).
HEAD_CHUNK_ROWS = 128
# The chunked head recomputes the logits in the backward pass (one more [N, H] x [H, V] product):
# below this many logit elements (N x V) storing them is cheaper than recomputing them, so the
# straightforward path runs when gradients are needed. Under no_grad the chunked head always runs.
CHUNKED_HEAD_MIN_ELEMENTS = 32 * 2**20


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype autocast would run a matmul on `t` in (t's own dtype outside autocast)."""
    device_type = t.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return t.dtype


class _ChunkedTokenLogProb(torch.autograd.Function):
    """log softmax(h W^T + b)[target] / temperature, row by row, never holding [N, V] logits.

    Forward: per chunk of rows, the logits (float32), their log-sum-exp, the target's log-prob
    (and the entropy, without gradient). Backward: recompute the chunk's logits, then
    d logp_t / d z = onehot(t) - softmax(z) (scaled by 1 / temperature), and accumulate the
    gradients of the hidden states, the weight and the bias (the fused linear cross-entropy
    scheme of Liger-Kernel, Hsu et al. 2024, for a per-token output)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk, want_entropy):
        dtype = _compute_dtype(hidden)
        w = weight.to(dtype)
        b = bias.to(dtype) if bias is not None else None
        n = hidden.shape[0]
        picked = hidden.new_empty(n, dtype=torch.float32)
        lse = hidden.new_empty(n, dtype=torch.float32)
        entropy = hidden.new_empty(n, dtype=torch.float32) if want_entropy else None
        for start in range(0, n, chunk):
            rows = slice(start, start + chunk)
            z = torch.nn.functional.linear(hidden[rows].to(dtype), w, b).float()
            if temperature != 1.0:
                z = z / temperature
            lse[rows] = torch.logsumexp(z, dim=-1)
            picked[rows] = z.gather(-1, targets[rows, None]).squeeze(-1) - lse[rows]
            if want_entropy:
                # H = lse - sum_v p_v z_v, with p = softmax(z)
                entropy[rows] = lse[rows] - (torch.softmax(z, dim=-1) * z).sum(-1)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.temperature, ctx.chunk, ctx.dtype = temperature, chunk, dtype
        if want_entropy:
            ctx.mark_non_differentiable(entropy)
        return picked, entropy

    @staticmethod
    def backward(ctx, grad_picked, _grad_entropy):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        dtype, temperature = ctx.dtype, ctx.temperature
        w = weight.to(dtype)
        b = bias.to(dtype) if bias is not None else None
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        )
        grad_b = (
            torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
            if need_b and bias is not None
            else None
        )
        for start in range(0, hidden.shape[0], ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            h = hidden[rows].to(dtype)
            z = torch.nn.functional.linear(h, w, b).float()
            if temperature != 1.0:
                z = z / temperature
            # d logp_t / d z = onehot(t) - softmax(z); chain through z = logits / temperature
            dz = torch.exp(z - lse[rows, None]).neg_()
            dz.scatter_add_(-1, targets[rows, None], torch.ones_like(lse[rows, None]))
            dz *= grad_picked[rows, None].float()
            if temperature != 1.0:
                dz /= temperature
            dz = dz.to(dtype)
            if grad_h is not None:
                grad_h[rows] = (dz @ w).to(hidden.dtype)
            if grad_w is not None:
                grad_w += (dz.t() @ h).float()
            if grad_b is not None:
                grad_b += dz.float().sum(0)
        return (
            grad_h,
            grad_w.to(weight.dtype) if grad_w is not None else None,
            grad_b.to(bias.dtype) if grad_b is not None else None,
            None,
            None,
            None,
            None,
        )


def _plain_linear_head(head) -> bool:
    """A bare nn.Linear with ordinary tensors (not a LoRA-wrapped or sharded DTensor head)."""
    if type(head) is not nn.Linear:
        return False
    return all(type(p) in (torch.Tensor, nn.Parameter) for p in head.parameters())


def token_logps_from_hidden(
    head,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    chunked: bool | None = None,
):
    """(log p(target | hidden) [N] float32, entropy [N] or None) through the LM head.

    `chunked=None` decides: the chunked head (no [N, V] logits kept) under no_grad, or when
    the logits would exceed CHUNKED_HEAD_MIN_ELEMENTS; the straightforward path otherwise."""
    vocab = head.out_features if isinstance(head, nn.Linear) else None
    if chunked is None:
        chunked = vocab is not None and (
            not torch.is_grad_enabled() or hidden.shape[0] * vocab >= CHUNKED_HEAD_MIN_ELEMENTS
        )
    if chunked and _plain_linear_head(head):
        picked, entropy = _ChunkedTokenLogProb.apply(
            hidden,
            head.weight,
            head.bias,
            targets,
            float(temperature),
            HEAD_CHUNK_ROWS,
            return_entropy,
        )
        return picked, entropy
    return _logps_from_logits(head(hidden), targets, temperature, return_entropy)


def _logps_from_logits(logits, targets, temperature, return_entropy):
    logits = (
        logits.float()
    )  # log-softmax in float32: bf16 log-probs lose the small differences DPO needs
    if temperature != 1.0:
        logits = (
            logits / temperature
        )  # sample from softmax(logits / T); score under the same distribution
    logps = torch.log_softmax(logits, dim=-1)
    picked = logps.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = None
    if return_entropy:
        # H = -sum_v p_v log p_v of the distribution that predicts each completion token.
        entropy = -(logps.exp() * logps).sum(-1)
    return picked, entropy


def completion_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    chunked_head: bool | None = None,
    packed: PackedBatch | None = None,
) -> LogProbOutput:
    """Completion-only log-probs of a bare causal LM (e.g. a reference model under no_grad).

    Trainers call the policy through `CompletionLogProbs` instead, so that DDP/FSDP see the
    forward. Inputs are [B, T] tensors; completion_mask marks the tokens to score (position 0
    has no context and is never scored). `chunked_head`: see `token_logps_from_hidden` (None
    decides by size; the entropy of the chunked head carries no gradient: a metric only).
    `packed`: the same rows packed by `models.packing.pack_sequences` (right-padded [B, T]
    layout assumed); used where `can_pack` says the model computes it exactly, else ignored.
    """
    if isinstance(model, CompletionLogProbs):
        model = model.policy
    if not temperature > 0:
        raise PreftuneError(f"temperature must be positive, got {temperature!r}")
    if packed is not None and can_pack(model, packed):
        return packed_completion_logprobs(
            model,
            packed,
            temperature=temperature,
            return_entropy=return_entropy,
            chunked_head=chunked_head,
        )
    if input_ids.shape != attention_mask.shape or input_ids.shape != completion_mask.shape:
        raise ValueError(
            "input_ids, attention_mask and completion_mask must have the same [B, T] shape, got "
            f"{tuple(input_ids.shape)}, {tuple(attention_mask.shape)}, {tuple(completion_mask.shape)}"
        )
    # Mask once: completion tokens that are real tokens and have a context to predict them from.
    target_mask = completion_mask.bool() & attention_mask.bool()
    target_mask[:, 0] = False
    # The hidden state at t predicts the token at t + 1.
    predict_mask = torch.zeros_like(target_mask)
    predict_mask[:, :-1] = target_mask[:, 1:]
    targets = input_ids[target_mask]  # [N], row-major, same order as predict_mask's positions

    parts = _head_and_backbone(model)
    forward_kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
    if parts is not None:
        head, backbone = parts
        if _accepts(backbone, "position_ids"):
            forward_kwargs["position_ids"] = _position_ids(attention_mask)
        outputs = backbone(**forward_kwargs)
        hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
        # The head runs on completion positions only.
        picked, token_entropy = token_logps_from_hidden(
            head,
            hidden[predict_mask],
            targets,
            temperature=temperature,
            return_entropy=return_entropy,
            chunked=chunked_head,
        )
    else:
        if _accepts(model, "position_ids"):
            forward_kwargs["position_ids"] = _position_ids(attention_mask)
        logits = model(**forward_kwargs).logits[predict_mask]
        picked, token_entropy = _logps_from_logits(logits, targets, temperature, return_entropy)

    token_logps = torch.zeros(input_ids.shape, dtype=torch.float32, device=input_ids.device)
    token_logps = token_logps.masked_scatter(target_mask, picked)
    entropy = None
    if return_entropy:
        entropy = torch.zeros_like(token_logps).masked_scatter(target_mask, token_entropy)
    return LogProbOutput(
        token_logps=token_logps,
        seq_logps=token_logps.sum(-1),
        n_tokens=target_mask.sum(-1),
        entropy=entropy,
    )


def can_pack(model, packed: PackedBatch) -> bool:
    """Whether `packed_completion_logprobs` is exact for this causal LM (else: the padded path)."""
    parts = _head_and_backbone(model)
    if parts is None or not _accepts(parts[1], "position_ids"):
        return False
    return supports_packing(getattr(unwrap_peft(model), "config", None), packed.input_ids.shape[1])


def packed_forward(backbone, config, packed: PackedBatch) -> torch.Tensor:
    """Hidden states [R * L, H] of the packed rows (flattened, as the packed indices expect)."""
    impl = getattr(config, "_attn_implementation", "sdpa")
    dtype = torch.bool if impl == "sdpa" else next(backbone.parameters()).dtype
    outputs = backbone(
        input_ids=packed.input_ids,
        position_ids=packed.position_ids,
        attention_mask=attention_mask_4d(packed, dtype),
        use_cache=False,
    )
    hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
    return hidden.flatten(0, 1)


def packed_completion_logprobs(
    model,
    packed: PackedBatch,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    chunked_head: bool | None = None,
) -> LogProbOutput:
    """`completion_logprobs` of the original sequences of a packed batch, in their order.

    token_logps (and entropy) come back in the right-padded [S, T] layout of the sequences;
    the caller checks `can_pack` first."""
    head, backbone = _head_and_backbone(model)
    hidden = packed_forward(backbone, unwrap_peft(model).config, packed)
    targets = packed.input_ids.flatten()[packed.target_index]
    picked, token_entropy = token_logps_from_hidden(
        head,
        hidden[packed.predict_index],
        targets,
        temperature=temperature,
        return_entropy=return_entropy,
        chunked=chunked_head,
    )
    shape = (packed.num_sequences, packed.width)
    device = packed.input_ids.device
    token_logps = torch.zeros(shape, dtype=torch.float32, device=device)
    token_logps = token_logps.index_put((packed.seq_index, packed.token_offset), picked)
    entropy = None
    if return_entropy:
        entropy = torch.zeros(shape, dtype=torch.float32, device=device).index_put(
            (packed.seq_index, packed.token_offset), token_entropy
        )
    n_tokens = torch.bincount(packed.seq_index, minlength=packed.num_sequences)
    return LogProbOutput(
        token_logps=token_logps, seq_logps=token_logps.sum(-1), n_tokens=n_tokens, entropy=entropy
    )


class CompletionLogProbs(nn.Module):
    """The policy, as a module whose forward returns completion-only log-probs.

    Why a module: accelerate wraps what it is given in DDP/FSDP, and only that wrapper's
    forward triggers DDP's gradient-sync bookkeeping and FSDP's parameter all-gathers. We call
    the backbone and the LM head separately (to run the head on completion positions only);
    doing that on a wrapped policy from outside would bypass the wrapper. Wrapping this module
    instead keeps the whole computation inside the synchronised forward.

    Works with gradient checkpointing (enable it on `policy`) and with peft models.
    `policy` is the causal LM (or peft model) to save and generate with.
    """

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        completion_mask: torch.Tensor,
        *,
        temperature: float = 1.0,
        return_entropy: bool = False,
        packed: PackedBatch | None = None,
    ) -> LogProbOutput:
        return completion_logprobs(
            self.policy,
            input_ids,
            attention_mask,
            completion_mask,
            temperature=temperature,
            return_entropy=return_entropy,
            packed=packed,
        )
