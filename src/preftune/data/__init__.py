"""The data layer: load rows, detect and normalise formats, tokenize, collate.

load_rows (loading.py) -> to_sft / to_pairs / ... (formats.py) -> tokenize_* (tokenize.py)
-> collate_* (collate.py).
"""

from preftune.data.collate import (
    collate_pairs,
    collate_ranked,
    collate_sft,
    collate_unpaired,
    left_pad,
    pad_sequences,
)
from preftune.data.formats import (
    FORMATS,
    DataReport,
    Pair,
    PromptExample,
    Ranked,
    SFTExample,
    Unpaired,
    detect_format,
    split_implicit_prompt,
    to_pairs,
    to_prompts,
    to_ranked,
    to_sft,
    to_unpaired,
)
from preftune.data.loading import Rows, load_rows, parse_column_map
from preftune.data.tokenize import (
    TokenizeReport,
    TruncationConfig,
    load_chat_template,
    render,
    set_chat_template,
    tokenize_pairs,
    tokenize_prompts,
    tokenize_ranked,
    tokenize_sft,
    tokenize_unpaired,
)

__all__ = [
    "FORMATS",
    "DataReport",
    "Pair",
    "PromptExample",
    "Ranked",
    "Rows",
    "SFTExample",
    "TokenizeReport",
    "TruncationConfig",
    "Unpaired",
    "collate_pairs",
    "collate_ranked",
    "collate_sft",
    "collate_unpaired",
    "detect_format",
    "left_pad",
    "load_chat_template",
    "load_rows",
    "pad_sequences",
    "parse_column_map",
    "render",
    "set_chat_template",
    "split_implicit_prompt",
    "to_pairs",
    "to_prompts",
    "to_ranked",
    "to_sft",
    "to_unpaired",
    "tokenize_pairs",
    "tokenize_prompts",
    "tokenize_ranked",
    "tokenize_sft",
    "tokenize_unpaired",
]
