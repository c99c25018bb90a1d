"""benchmarks/run.py's model FLOPs (for MFU) count the matmul weights a real model has."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

RUN_PY = Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"


@pytest.fixture(scope="module")
def run():
    spec = importlib.util.spec_from_file_location("bench_run", RUN_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _matmul_weights(model: nn.Module) -> int:
    """Weights of every linear layer (the tied output head counted once, as a matmul)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


@pytest.mark.parametrize(
    "make",
    [
        lambda: Qwen2ForCausalLM(
            Qwen2Config(  # Qwen2-0.5B's sizes
                vocab_size=151936,
                hidden_size=896,
                intermediate_size=4864,
                num_hidden_layers=24,
                num_attention_heads=14,
                num_key_value_heads=2,
                tie_word_embeddings=True,
            )
        ),
        lambda: LlamaForCausalLM(
            LlamaConfig(  # the tiny benchmark model's kind, with GQA
                vocab_size=8000,
                hidden_size=256,
                intermediate_size=704,
                num_hidden_layers=4,
                num_attention_heads=8,
                num_key_value_heads=2,
            )
        ),
    ],
)
def test_flops_per_token_count_the_models_matmul_weights(run, make):
    with torch.device("meta"):
        model = make()
    config = model.config.to_dict()
    train, forward = run.model_flops_per_token(config, seq_len=142)
    n, layers, hidden = _matmul_weights(model), config["num_hidden_layers"], config["hidden_size"]
    assert train == 6 * n + 12 * layers * hidden * 142  # PaLM, App. B
    assert forward == pytest.approx(train / 3)


def test_mfu_only_for_rows_with_a_known_pass_count(run):
    config = {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "intermediate_size": 256,
        "vocab_size": 100,
    }
    train, forward = run.model_flops_per_token(config, run.SEQ_TOKENS)
    row = {"value": 1000.0}  # tokens/s
    assert run.mfu("dpo-ref", row, config, 1.0) == pytest.approx((train + forward) * 1000 / 1e12)
    assert run.mfu("dpo-pre", row, config, 1.0) == pytest.approx(train * 1000 / 1e12)
    assert run.mfu("kto", row, config, 1.0) is None
    assert run.mfu("ppo", {"value": 3.0}, config, 1.0) is None
