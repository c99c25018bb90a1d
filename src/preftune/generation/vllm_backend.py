"""Optional vLLM generation backend (colocated: the vLLM engine lives in the trainer's process).

`vllm` is imported only when a `VLLMGenerator` is created, so the default (HF) path never
imports it. Written against vLLM 0.6 - 0.10 (`LLM`, `SamplingParams`, token-id prompts as
`{"prompt_token_ids": [...]}`); weight syncing reaches the in-process model runner, which the
V1 engine only exposes when `VLLM_ENABLE_V1_MULTIPROCESSING=0` (set below before the import,
as TRL's colocate mode does). Not tested in CI (no GPU there); the HF path is the reference.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from preftune.errors import PreftuneError
from preftune.generation.sampling import Rollout, SamplingConfig


def vllm_available() -> bool:
    """True when vllm is installed and a CUDA device is present (does not import vllm)."""
    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


class VLLMGenerator:
    """Samples with a vLLM engine; call `sync_weights(model)` after every optimizer step that
    should be reflected in the next rollout."""

    def __init__(
        self,
        model_name_or_path: str,
        sampling: SamplingConfig,
        gpu_memory_utilization: float = 0.3,
        *,
        dtype: str = "auto",
        max_model_len: int | None = None,
        seed: int = 0,
        eos_token_ids: list[int] | None = None,
        **llm_kwargs,
    ):
        if not vllm_available():
            raise PreftuneError(
                "the vLLM backend needs the `vllm` package and a CUDA GPU "
                "(pip install 'preftune[vllm]'); or use the default HF generation"
            )
        if not 0 < gpu_memory_utilization <= 1:
            raise PreftuneError(
                f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization!r}"
            )
        self.sampling = sampling.validate()
        # The V1 engine runs the model in a subprocess by default; weight sync needs it in-process.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        import vllm  # noqa: PLC0415 - deliberately lazy

        self._vllm = vllm
        self.seed = seed
        self._calls = 0
        self.llm = vllm.LLM(
            model=model_name_or_path,
            gpu_memory_utilization=gpu_memory_utilization,
            dtype=dtype,
            max_model_len=max_model_len,
            seed=seed,
            **llm_kwargs,
        )
        if eos_token_ids is None:
            eos = self.llm.get_tokenizer().eos_token_id
            eos_token_ids = [] if eos is None else [int(eos)]
        self.eos_token_ids = set(eos_token_ids)

    def generate(self, prompt_ids: list[list[int]], num_samples: int = 1) -> Rollout:
        """Same contract as `sampling.generate`: prompt-major rows, EOS kept, `finished` flags.
        Reproducible for a given constructor `seed` and call sequence, but not token-identical
        to the HF loop (different kernels and RNG)."""
        if not isinstance(num_samples, int) or num_samples < 1:
            raise PreftuneError(f"num_samples must be an integer >= 1, got {num_samples!r}")
        s = self.sampling
        params = self._vllm.SamplingParams(
            n=num_samples,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k if s.top_k > 0 else -1,  # vLLM: -1 disables top-k
            max_tokens=s.max_new_tokens,
            ignore_eos=not s.stop_at_eos,
            seed=self.seed + self._calls,  # a fresh but reproducible stream per call
        )
        self._calls += 1
        requests = [{"prompt_token_ids": list(p)} for p in prompt_ids]
        outputs = self.llm.generate(requests, sampling_params=params, use_tqdm=False)
        prompts, completions, finished = [], [], []
        for p, request_output in zip(prompt_ids, outputs):  # vLLM returns outputs in request order
            for sample in request_output.outputs:
                tokens = list(sample.token_ids)
                stopped_at_eos = bool(tokens) and tokens[-1] in self.eos_token_ids
                prompts.append(list(p))
                completions.append(tokens)
                finished.append(stopped_at_eos)
        return Rollout(
            prompt_ids=prompts,
            completion_ids=completions,
            finished=finished,
            num_samples=num_samples,
        )

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Load the trainer's current weights (a plain HF causal LM: unwrapped, LoRA merged)."""
        state_dict = model.state_dict()
        if any("lora_" in name for name in state_dict):
            raise PreftuneError(
                "sync_weights got a model with LoRA adapters; merge them first "
                "(peft's merge_and_unload on a copy) so vLLM receives plain weights"
            )
        runner_model = self._runner_model()
        runner_model.load_weights(((name, t.detach()) for name, t in state_dict.items()))
        reset = getattr(self.llm, "reset_prefix_cache", None)
        if callable(reset):  # cached prefixes hold K/V computed with the old weights
            reset()

    def _runner_model(self):
        engine = self.llm.llm_engine
        paths = (
            # V0 engine and in-process V1 (vLLM ~0.7-0.10)
            lambda: engine.model_executor.driver_worker.worker.model_runner.model,
            # vLLM <= 0.6
            lambda: engine.model_executor.driver_worker.model_runner.model,
            # V1 with an in-process engine core
            lambda: (
                engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner.model
            ),
        )
        for path in paths:
            try:
                return path()
            except AttributeError:
                continue
        raise PreftuneError(
            f"cannot reach the model inside this vLLM version ({getattr(self._vllm, '__version__', '?')}) "
            "to sync weights; preftune supports vLLM 0.6-0.10 with VLLM_ENABLE_V1_MULTIPROCESSING=0 "
            "and tensor_parallel_size=1"
        )
