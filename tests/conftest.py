"""Shared test fixtures.

`byte_tokenizer`: a tiny self-contained byte-level tokenizer (256 byte tokens + <|bos|>,
<|eos|>, <|pad|>) with a small Jinja chat template, built in memory: no hub, no files.
"""

import os

import pytest
import torch

# Tiny models gain nothing from a second thread, and several threads on a busy 2-core machine
# (or two test processes at once) are many times slower: one thread, here and in subprocesses.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_byte_tokenizer(add_bos: bool = True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # the 256 byte symbols
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|bos|>", "<|eos|>", "<|pad|>"])  # ids 256, 257, 258
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<|bos|> $A", special_tokens=[("<|bos|>", 256)]
        )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>"
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


@pytest.fixture
def byte_tokenizer():
    return build_byte_tokenizer()


@pytest.fixture
def byte_tokenizer_no_bos():
    """The same tokenizer without a BOS token (like GPT-2 style tokenizers)."""
    return build_byte_tokenizer(add_bos=False)
