"""Sampling completions: our own KV-cache loop over a HF causal LM, or an optional vLLM engine.

`vllm` is never imported unless a `VLLMGenerator` is created.
"""

from preftune.generation.sampling import Rollout, SamplingConfig, generate, sample_next_token
from preftune.generation.vllm_backend import VLLMGenerator, vllm_available

__all__ = [
    "Rollout",
    "SamplingConfig",
    "VLLMGenerator",
    "generate",
    "sample_next_token",
    "vllm_available",
]
