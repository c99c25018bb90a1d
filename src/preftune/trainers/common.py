"""What every trainer does the same way: read data, load the policy, wrap it for log-probs."""

from __future__ import annotations

import random
from importlib import resources
from typing import Any

from preftune.config import (
    LengthSettings,
    ModelSettings,
    ModelTrainingSettings,
    TrainConfig,
    TrainingSettings,
)
from preftune.data import formats
from preftune.data.loading import load_rows, parse_column_map
from preftune.data.tokenize import TruncationConfig, set_chat_template
from preftune.errors import PreftuneError
from preftune.models.loading import LoraSettings, apply_lora, load_causal_lm

DEMO_DATA = "demo"  # `--data demo`: 300 real HH-RLHF pairs shipped with the package

CONVERTERS = {
    "sft": formats.to_sft,
    "pairs": formats.to_pairs,
    "unpaired": formats.to_unpaired,
    "ranked": formats.to_ranked,
    "prompts": formats.to_prompts,
}


def resolve_data_source(source: str) -> str:
    if source == DEMO_DATA:
        return str(resources.files("preftune") / "resources" / "demo_hh.jsonl")
    return source


def read_examples(
    source: str, kind: str, cfg: TrainingSettings, log=print, **convert_kw
) -> list[Any]:
    """Load one data source and convert it to examples of `kind`, reporting what was skipped."""
    if not source:
        raise PreftuneError(
            "data: no training data given; pass --data FILE (or `demo` for the "
            "built-in HH-RLHF sample)"
        )
    column_map = parse_column_map(cfg.columns) if cfg.columns else None
    rows = load_rows(resolve_data_source(source), split=cfg.split, column_map=column_map)
    examples, report = CONVERTERS[kind](rows, source, on_bad_row=cfg.on_bad_row, **convert_kw)
    log(report.summary())
    if not examples:
        raise PreftuneError(f"{source}: no usable examples left after validation")
    if cfg.chat_template and not any(
        isinstance(getattr(ex, "prompt", None), list) for ex in examples
    ):
        raise PreftuneError(
            f"chat_template is set but {source} holds plain text, which is tokenized as it is: "
            "a chat template applies only to conversations (lists of role/content messages); "
            "drop --chat-template or give conversational data"
        )
    return examples


def train_eval_examples(
    cfg: TrainConfig, kind: str, log=print, **convert_kw
) -> tuple[list[Any], list[Any]]:
    """Training examples and held-out examples (`eval_data`, or `eval_fraction` of `data`)."""
    train = read_examples(cfg.data, kind, cfg, log, **convert_kw)
    held_out: list[Any] = []
    if cfg.eval_data:
        held_out = read_examples(cfg.eval_data, kind, cfg, log, **convert_kw)
    elif cfg.eval_fraction:
        order = list(range(len(train)))
        random.Random(cfg.seed).shuffle(order)
        n_eval = max(1, int(round(cfg.eval_fraction * len(train))))
        if n_eval >= len(train):
            raise PreftuneError(
                f"eval_fraction={cfg.eval_fraction} leaves no training examples out of {len(train)}"
            )
        held_out = [train[i] for i in order[:n_eval]]
        train = [train[i] for i in order[n_eval:]]
    return train, held_out


def truncation(cfg: LengthSettings) -> TruncationConfig:
    trunc = TruncationConfig(
        max_length=cfg.max_length,
        max_prompt_length=cfg.prompt_limit,
        prompt_truncation=cfg.prompt_truncation,
    )
    return trunc


def prepare_tokenizer(tokenizer, cfg: ModelSettings):
    if cfg.chat_template:
        set_chat_template(tokenizer, cfg.chat_template)
    return tokenizer


def lora_settings(cfg: ModelTrainingSettings) -> LoraSettings:
    targets: Any = cfg.lora_target_modules
    if targets != "all-linear":
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    return LoraSettings(
        r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, target_modules=targets
    )


def load_policy(cfg: TrainingSettings):
    """The causal LM to train, with its tokenizer, LoRA and gradient checkpointing applied."""
    model, tokenizer = load_causal_lm(cfg.model, dtype=cfg.dtype, seed=cfg.seed)
    prepare_tokenizer(tokenizer, cfg)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.lora:
        model = apply_lora(model, lora_settings(cfg), task_type="CAUSAL_LM")
    return model, tokenizer
