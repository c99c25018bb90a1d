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


def _hf_model(model):
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
    hf = _hf_model(model)
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


def completion_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
) -> LogProbOutput:
    """Completion-only log-probs of a bare causal LM (e.g. a reference model under no_grad).

    Trainers call the policy through `CompletionLogProbs` instead, so that DDP/FSDP see the
    forward. Inputs are [B, T] tensors; completion_mask marks the tokens to score (position 0
    has no context and is never scored).
    """
    if isinstance(model, CompletionLogProbs):
        model = model.policy
    if not temperature > 0:
        raise PreftuneError(f"temperature must be positive, got {temperature!r}")
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
        logits = head(hidden[predict_mask])  # [N, V]: the head runs on completion positions only
    else:
        if _accepts(model, "position_ids"):
            forward_kwargs["position_ids"] = _position_ids(attention_mask)
        logits = model(**forward_kwargs).logits[predict_mask]

    logits = logits.float()  # log-softmax in float32: bf16 log-probs lose the small differences DPO needs
    if temperature != 1.0:
        logits = logits / temperature  # sample from softmax(logits / T); score under the same distribution
    logps = torch.log_softmax(logits, dim=-1)
    picked = logps.gather(-1, targets.unsqueeze(-1)).squeeze(-1)

    token_logps = torch.zeros(input_ids.shape, dtype=torch.float32, device=input_ids.device)
    token_logps = token_logps.masked_scatter(target_mask, picked)
    entropy = None
    if return_entropy:
        # H = -sum_v p_v log p_v of the distribution that predicts each completion token.
        token_entropy = -(logps.exp() * logps).sum(-1)
        entropy = torch.zeros_like(token_logps).masked_scatter(target_mask, token_entropy)
    return LogProbOutput(
        token_logps=token_logps,
        seq_logps=token_logps.sum(-1),
        n_tokens=target_mask.sum(-1),
        entropy=entropy,
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
    ) -> LogProbOutput:
        return completion_logprobs(
            self.policy,
            input_ids,
            attention_mask,
            completion_mask,
            temperature=temperature,
            return_entropy=return_entropy,
        )
