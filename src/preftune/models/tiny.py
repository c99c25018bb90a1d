"""The `tiny` model: a small random Llama and a byte-level tokenizer, built locally.

Every test, the lab and a user's first dry run can say `--model tiny` and run offline, in
seconds, with no download. `tiny` is deterministic: the same seed builds the same weights, so
a policy and its reference built separately from `tiny` start identical.

Names: `tiny` (64 hidden, 2 layers) or `tiny-<hidden>x<layers>`, e.g. `tiny-256x4`.
"""

from __future__ import annotations

import re

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

from preftune.errors import PreftuneError

TINY_NAME = "tiny"

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
USER, ASSISTANT, SYSTEM, END = "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"
SPECIAL_TOKENS = (BOS, EOS, PAD, USER, ASSISTANT, SYSTEM, END)

# Each message is "<|role|>\n{content}<|end|>\n"; the generation prompt is "<|assistant|>\n".
# Expressions rather than literal text so Jinja's whitespace control cannot eat the newlines.
# No BOS here: tokenising the rendered text with add_special_tokens=True prepends it once.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{ raise_exception('tiny chat template: role must be system, user or assistant, got ' + message['role']) }}"
    "{%- endif -%}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\n' }}{%- endif -%}"
)

_TINY_SPEC = re.compile(r"^tiny-(\d+)x(\d+)$")


def parse_tiny_spec(name: str) -> dict | None:
    """`tiny` -> {} ; `tiny-<hidden>x<layers>` -> {"hidden_size", "num_layers"} ; else None.

    A name that starts with `tiny` but matches neither form is a typo, not a hub id, so it
    raises rather than falling through to a download attempt. Names with a slash
    ("tinyorg/model", "tiny/checkpoint-100") are hub ids or folders, not tiny specs.
    """
    if not isinstance(name, str) or not name.startswith(TINY_NAME) or "/" in name or "\\" in name:
        return None
    if name == TINY_NAME:
        return {}
    match = _TINY_SPEC.match(name)
    if match is None:
        raise PreftuneError(
            f"model name {name!r} is not a tiny spec: expected 'tiny' or 'tiny-<hidden>x<layers>' "
            "(e.g. 'tiny-256x4')"
        )
    hidden, layers = int(match.group(1)), int(match.group(2))
    if hidden < 4 or hidden % 4 != 0 or layers < 1:
        raise PreftuneError(
            f"model name {name!r}: hidden size must be a positive multiple of 4 (the tiny model "
            f"has 4 heads) and layers at least 1, got hidden={hidden}, layers={layers}"
        )
    return {"hidden_size": hidden, "num_layers": layers}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the ByteLevel alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def build_tiny_tokenizer(model_max_length: int = 2048) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: token id `b` is byte `b` (0..255), then the special tokens.

    Why byte-level: it needs no download and no training, it is deterministic, and it
    round-trips any Unicode text exactly (emoji, CJK, curly quotes), so tests and the lab run
    offline on real text. Sequences are longer than with a learned BPE; for a tiny model that
    is fine.

    Special tokens: <|bos|> <|eos|> <|pad|> <|user|> <|assistant|> <|system|> <|end|>.
    Encoding with add_special_tokens=True prepends <|bos|> (never appends <|eos|>: the data
    code appends EOS to completions itself). The chat template writes each message as
    "<|role|>\\n{content}<|end|>\\n" and the generation prompt as "<|assistant|>\\n".
    """
    byte_to_char = _bytes_to_unicode()
    vocab = {byte_to_char[b]: b for b in range(256)}
    # BPE with no merges: every byte is its own token.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]
    )
    bos_id = backend.token_to_id(BOS)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B:1", special_tokens=[(BOS, bos_id)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        extra_special_tokens=[USER, ASSISTANT, SYSTEM, END],
        padding_side="right",
        # The default clean-up rewrites " ." as "." on decode, which breaks the round trip.
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _tiny_config(
    tokenizer,
    *,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int | None,
    intermediate_size: int | None,
    max_position_embeddings: int,
    vocab_size: int | None,
    **extra,
) -> LlamaConfig:
    if tokenizer is None:
        tokenizer = build_tiny_tokenizer(model_max_length=max_position_embeddings)
    if hidden_size % num_heads != 0:
        raise PreftuneError(
            f"tiny model: hidden_size ({hidden_size}) must be a multiple of num_heads ({num_heads})"
        )
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if num_heads % num_kv_heads != 0:
        raise PreftuneError(
            f"tiny model: num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})"
        )
    if intermediate_size is None:
        # 4x hidden, rounded up to a multiple of 32 as real checkpoints do.
        intermediate_size = -(-4 * hidden_size // 32) * 32
    vocab_size = len(tokenizer) if vocab_size is None else vocab_size
    if vocab_size < len(tokenizer):
        raise PreftuneError(
            f"tiny model: vocab_size ({vocab_size}) is smaller than the tokenizer ({len(tokenizer)} tokens)"
        )
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **extra,
    )


def _seeded_build(model_class, config: LlamaConfig, seed: int):
    # fork_rng: the caller's global RNG state is left as it was (no hidden global side effect).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    return model.float().eval()


def build_tiny_model(
    tokenizer=None,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 2048,
    vocab_size: int | None = None,
    seed: int = 0,
) -> LlamaForCausalLM:
    """A randomly initialised Llama causal LM, deterministic in `seed`, in eval mode, float32."""
    config = _tiny_config(
        tokenizer,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        vocab_size=vocab_size,
    )
    model = _seeded_build(LlamaForCausalLM, config, seed)
    model.generation_config.bos_token_id = config.bos_token_id
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    return model


def build_tiny_sequence_classifier(
    tokenizer=None,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 2048,
    vocab_size: int | None = None,
    num_labels: int = 1,
    seed: int = 0,
) -> LlamaForSequenceClassification:
    """A random Llama with a linear score head; the score is read at the last non-pad token.

    config.pad_token_id is set, which is how LlamaForSequenceClassification finds that token.
    """
    config = _tiny_config(
        tokenizer,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        vocab_size=vocab_size,
        num_labels=num_labels,
    )
    return _seeded_build(LlamaForSequenceClassification, config, seed)
