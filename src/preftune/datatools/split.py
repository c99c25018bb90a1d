"""Train/test splits that never put the same prompt on both sides.

Each row goes to the test side when a hash of its prompt (with the seed) falls below
`test_fraction`, so every row of a prompt lands on the same side, in one streaming pass, and
the split does not depend on the order of the rows. The test fraction of rows is therefore
close to, not exactly, `test_fraction` (it is exact in expectation over prompts).
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from preftune.data.formats import detect_format, split_implicit_prompt
from preftune.datatools.io import located_rows, source_name
from preftune.datatools.pairs import DETECT_ROWS, text_of
from preftune.errors import PreftuneError

SPLIT_BY = ("prompt", "row")


def prompt_key(row: dict, fmt: str) -> str | None:
    """The prompt of a row as text (implicit pairs: their common prefix); None if it has none."""
    if fmt == "implicit_paired":
        try:
            return text_of(split_implicit_prompt(row.get("chosen"), row.get("rejected"))[0])
        except (ValueError, TypeError, AttributeError):
            return None
    if fmt == "conversational":
        messages = row.get("messages")
        if not isinstance(messages, list) or not messages:
            return None
        if isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
            messages = messages[:-1]
        return text_of(messages)
    value = row.get("prompt", row.get("text"))
    return text_of(value) if isinstance(value, (str, list)) and value else None


def unit_hash(text: str, seed: int) -> float:
    """A uniform number in [0, 1) from a text and the seed (blake2b)."""
    digest = hashlib.blake2b(f"{seed}\x00{text}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


@dataclass
class SplitReport:
    source: str
    test_fraction: float
    by: str
    seed: int
    n_rows: int = 0
    n_train: int = 0
    n_test: int = 0
    no_prompt_dropped: int = 0
    prompts: dict = field(default_factory=dict)  # side -> distinct prompts


def split(
    rows: Iterable[dict],
    *,
    test_fraction: float,
    by: str = "prompt",
    seed: int = 0,
    source: str | None = None,
) -> tuple[Iterator[tuple[str, dict]], SplitReport]:
    """Yields ("train" | "test", row). Rows without a prompt (which training would skip too)
    are dropped and counted when splitting by prompt."""
    if not 0.0 < test_fraction < 1.0:
        raise PreftuneError(f"test_fraction: got {test_fraction}, expected a number in (0, 1)")
    if by not in SPLIT_BY:
        raise PreftuneError(f"by: got {by!r}, expected one of {', '.join(SPLIT_BY)}")
    source = source or source_name(rows)
    fmt = detect_format(list(itertools.islice(iter(rows), DETECT_ROWS)), source)
    report = SplitReport(source, test_fraction, by, seed)

    def generate() -> Iterator[tuple[str, dict]]:
        prompt_hashes = {"train": set(), "test": set()}
        for n, (row, _) in enumerate(located_rows(rows, source), start=1):
            report.n_rows += 1
            if by == "row":
                key = str(n)
            else:
                key = prompt_key(row, fmt)
                if key is None:
                    report.no_prompt_dropped += 1
                    continue
            u = unit_hash(key, seed)
            side = "test" if u < test_fraction else "train"
            if by == "prompt":
                prompt_hashes[side].add(u)
            if side == "test":
                report.n_test += 1
            else:
                report.n_train += 1
            yield side, row
        report.prompts = (
            {side: len(h) for side, h in prompt_hashes.items()} if by == "prompt" else {}
        )

    return generate(), report
