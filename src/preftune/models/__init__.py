"""Models: the offline `tiny` Llama, loading (with LoRA), and completion-only log-probs."""

from preftune.models.loading import (
    LoraSettings,
    apply_lora,
    disabled_adapters,
    load_causal_lm,
    load_sequence_classifier,
    load_tokenizer,
    minilm_path,
    unwrap_model,
)
from preftune.models.logprobs import CompletionLogProbs, LogProbOutput, completion_logprobs
from preftune.models.tiny import (
    TINY_NAME,
    build_tiny_model,
    build_tiny_sequence_classifier,
    build_tiny_tokenizer,
    parse_tiny_spec,
)

__all__ = [
    "TINY_NAME",
    "CompletionLogProbs",
    "LogProbOutput",
    "LoraSettings",
    "apply_lora",
    "build_tiny_model",
    "build_tiny_sequence_classifier",
    "build_tiny_tokenizer",
    "completion_logprobs",
    "disabled_adapters",
    "load_causal_lm",
    "load_sequence_classifier",
    "load_tokenizer",
    "minilm_path",
    "parse_tiny_spec",
    "unwrap_model",
]
