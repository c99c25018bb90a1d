"""Decontamination: drop rows that share a long word n-gram with an evaluation item.

The rule of GPT-3's contamination study (Brown et al. 2020, appendix C) and of open-instruct's
decontamination scripts: lower-cased word tokens, 13-grams by default; a training row whose
prompt (and, optionally, replies) contains any n-gram of any evaluation item is contaminated.
The matching span reported is the longest run of consecutive matching n-grams in the row,
quoted from the row's own text.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from preftune.data.formats import detect_format, split_implicit_prompt
from preftune.datatools.io import located_rows, source_name, where
from preftune.datatools.pairs import DETECT_ROWS, text_of
from preftune.errors import PreftuneError

_WORD = re.compile(r"\w+")
EXAMPLES = 5  # matching spans shown per evaluation set
_REPLY_COLUMNS = ("chosen", "rejected", "completion", "completions")


def _tokens(text: str) -> list[re.Match]:
    return list(_WORD.finditer(text))


def eval_texts(row) -> list[str]:
    """Every text of an evaluation item: all its string fields and message contents (an
    evaluation set's question may be called prompt, question, input, ...)."""
    out: list[str] = []

    def visit(value):
        if isinstance(value, str):
            out.append(value)
        elif isinstance(value, dict):
            for v in value.values():
                visit(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                visit(v)

    visit(row)
    return out


class NgramIndex:
    """The set of word n-grams of evaluation items, each mapped to (eval set, item number)."""

    def __init__(self, n: int = 13):
        if n < 1:
            raise PreftuneError(f"ngram: got {n}, expected an integer >= 1")
        self.n = n
        self.grams: dict[tuple[str, ...], tuple[str, int]] = {}
        self.items: dict[str, int] = {}

    def add_eval_set(self, name: str, rows: Iterable[dict]) -> None:
        count = 0
        for count, row in enumerate(rows, start=1):
            for text in eval_texts(row):
                tokens = [m.group().lower() for m in _tokens(text)]
                for i in range(len(tokens) - self.n + 1):
                    self.grams.setdefault(tuple(tokens[i : i + self.n]), (name, count))
        self.items[name] = count

    def longest_match(self, text: str) -> tuple[str, str, int] | None:
        """(matching span quoted from `text`, eval set, eval item number) of the longest run of
        consecutive matching n-grams, or None when no n-gram matches."""
        matches = _tokens(text)
        tokens = [m.group().lower() for m in matches]
        best = None  # (number of n-grams, start, end, hit)
        run_start, run_hit = None, None
        for i in range(len(tokens) - self.n + 2):
            hit = (
                self.grams.get(tuple(tokens[i : i + self.n])) if i <= len(tokens) - self.n else None
            )
            if hit is not None and run_start is None:
                run_start, run_hit = i, hit
            elif hit is None and run_start is not None:
                if best is None or i - run_start > best[0]:
                    best = (i - run_start, run_start, i - 1 + self.n - 1, run_hit)
                run_start = None
        if best is None:
            return None
        _, start, end, (name, item) = best
        return text[matches[start].start() : matches[end].end()], name, item


@dataclass
class DecontaminationReport:
    source: str
    ngram: int
    fields: str
    n_rows: int = 0
    n_kept: int = 0
    n_removed: int = 0
    eval_sets: dict = field(default_factory=dict)  # name -> {items, rows_matched, examples}


def row_texts(row: dict, fmt: str, responses: bool) -> list[str]:
    """The prompt (and with `responses`, the replies) of a training row, as text."""
    if fmt == "implicit_paired":
        chosen, rejected = row.get("chosen"), row.get("rejected")
        try:
            prompt, c, r = split_implicit_prompt(chosen, rejected)
            texts = [text_of(prompt)] + ([text_of(c), text_of(r)] if responses else [])
        except (ValueError, TypeError, AttributeError):
            texts = [text_of(v) for v in (chosen, rejected) if isinstance(v, (str, list))]
        return texts
    texts = []
    for column in ("prompt", "messages", "text"):
        value = row.get(column)
        if isinstance(value, (str, list)):
            if column == "messages" and not responses:  # the prompt is all but the last reply
                value = value[:-1] if value and value[-1].get("role") == "assistant" else value
            texts.append(text_of(value))
            break
    if responses:
        for column in _REPLY_COLUMNS:
            value = row.get(column)
            if isinstance(value, str):
                texts.append(value)
            elif isinstance(value, list):
                texts.extend(eval_texts(value))
    return texts


def decontaminate(
    rows: Iterable[dict],
    index: NgramIndex,
    *,
    responses: bool = False,
    source: str | None = None,
    removed: list | None = None,
) -> tuple[Iterator[dict], DecontaminationReport]:
    """Drop rows whose prompt (and with `responses`, replies) shares an n-gram with `index`.

    Returns a generator of the kept rows and a report complete once it is exhausted; `removed`
    receives one record per removed row (where, eval set, eval item, matching span)."""
    source = source or source_name(rows)
    import itertools

    fmt = detect_format(list(itertools.islice(iter(rows), DETECT_ROWS)), source)
    report = DecontaminationReport(
        source, index.n, "prompt and responses" if responses else "prompt"
    )
    for name, n_items in index.items.items():
        report.eval_sets[name] = {"items": n_items, "rows_matched": 0, "examples": []}

    def generate() -> Iterator[dict]:
        for row, origin in located_rows(rows, source):
            report.n_rows += 1
            found = None
            for text in row_texts(row, fmt, responses):
                found = index.longest_match(text)
                if found:
                    break
            if found is None:
                report.n_kept += 1
                yield row
                continue
            span, name, item = found
            report.n_removed += 1
            entry = report.eval_sets[name]
            entry["rows_matched"] += 1
            record = {"row": where(origin), "eval_set": name, "eval_item": item, "span": span}
            if len(entry["examples"]) < EXAMPLES:
                entry["examples"].append(record)
            if removed is not None:
                removed.append(record)

    return generate(), report
