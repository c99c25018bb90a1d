"""Exact and near-duplicate removal: MinHash signatures of word shingles in an LSH index.

Near duplicates are found with datasketch's MinHash and MinHashLSH (Broder 1997, "On the
resemblance and containment of documents"; banding as in Leskovec, Rajaraman and Ullman,
"Mining of Massive Datasets", ch. 3): two texts are near duplicates when the Jaccard similarity
of their sets of k-word shingles is at least `threshold`. The LSH index only proposes
candidates; each candidate is confirmed by the MinHash estimate of the Jaccard similarity, so
banding's false positives are not removed. The first occurrence is kept.
"""

from __future__ import annotations

import hashlib
import re
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from preftune.data.formats import FORMATS, detect_format, split_implicit_prompt
from preftune.datatools.io import Origin, located_rows, source_name, where
from preftune.datatools.pairs import DETECT_ROWS, text_of
from preftune.errors import PreftuneError

_WORD = re.compile(r"\w+")
DEDUP_KEYS = ("pair", "prompt")
EXAMPLES = 20  # duplicates shown in the report (all of them go to removed.jsonl)


def words(text: str) -> list[str]:
    """Lower-cased word tokens (punctuation and spacing differences do not count)."""
    return _WORD.findall(text.lower())


def exact_hash(text: str) -> int:
    """64-bit fingerprint of a text (blake2b): a set of these is 8 bytes a row, not the text."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


class NearDuplicateIndex:
    """MinHash-LSH index of texts; `add_or_match` returns the id of an earlier near duplicate."""

    def __init__(self, threshold: float = 0.8, *, num_perm: int = 128, shingle: int = 3,
                 seed: int = 1):
        from datasketch import MinHash, MinHashLSH

        if not 0.0 < threshold <= 1.0:
            raise PreftuneError(f"threshold: got {threshold}, expected a number in (0, 1]")
        if num_perm < 16:
            raise PreftuneError(f"num_perm: got {num_perm}, expected an integer >= 16")
        if shingle < 1:
            raise PreftuneError(f"shingle: got {shingle}, expected an integer >= 1")
        self.threshold, self.num_perm, self.shingle = threshold, num_perm, shingle
        self._MinHash = MinHash
        template = MinHash(num_perm=num_perm, seed=seed)  # its permutations are reused below
        self._permutations, self._scheme = template.permutations, template.scheme
        self._lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self._signatures: list[np.ndarray] = []  # uint32 hash values of each indexed text
        self.ids: list = []  # caller's id of each indexed text

    def signature(self, text: str):
        tokens = words(text)
        k = self.shingle
        shingles = ({" ".join(tokens[i:i + k]) for i in range(len(tokens) - k + 1)}
                    if len(tokens) >= k else {" ".join(tokens)})
        m = self._MinHash(num_perm=self.num_perm, permutations=self._permutations,
                          scheme=self._scheme)
        m.update_batch([s.encode("utf-8") for s in shingles])
        return m

    def add_or_match(self, text: str, item_id) -> tuple[object, float] | None:
        """(id, estimated Jaccard) of the most similar earlier text at or above the threshold,
        else None after indexing this text under `item_id`."""
        m = self.signature(text)
        best, best_sim = None, -1.0
        for key in self._lsh.query(m):
            # Estimated Jaccard = the fraction of equal MinHash values.
            sim = float(np.mean(self._signatures[key] == m.hashvalues))
            if sim >= self.threshold and sim > best_sim:
                best, best_sim = key, sim
        if best is not None:
            return self.ids[best], best_sim
        key = len(self._signatures)
        self._signatures.append(m.hashvalues.astype(np.uint32))
        self.ids.append(item_id)
        self._lsh.insert(key, m)
        return None


def key_text(row: dict, fmt: str, on: str) -> str:
    """The text two rows are compared on: the prompt, or the whole example (prompt and replies)."""
    if on == "prompt":
        if fmt == "implicit_paired":
            try:
                return text_of(split_implicit_prompt(row.get("chosen"), row.get("rejected"))[0])
            except (ValueError, TypeError, AttributeError):
                return text_of(row.get("chosen") or "")
        value = row.get("prompt", row.get("messages", row.get("text")))
        return "" if value is None else text_of(value) if isinstance(value, (str, list)) else str(value)
    parts = []
    for column in FORMATS[fmt]:
        value = row.get(column)
        if isinstance(value, list) and value and not isinstance(value[0], dict):
            parts.extend(text_of(v) if isinstance(v, (str, list)) else str(v) for v in value)
        elif value is not None:
            parts.append(text_of(value) if isinstance(value, (str, list)) else str(value))
    return "\n".join(parts)


@dataclass
class DedupReport:
    source: str
    format: str
    on: str
    threshold: float
    num_perm: int
    shingle: int
    n_rows: int = 0
    n_kept: int = 0
    exact_duplicates: int = 0
    near_duplicates: int = 0
    examples: list = field(default_factory=list)  # the first EXAMPLES removed rows


def dedup(rows: Iterable[dict], *, on: str = "pair", threshold: float = 0.8, num_perm: int = 128,
          shingle: int = 3, near: bool = True, source: str | None = None,
          removed: list | None = None) -> tuple[Iterator[dict], DedupReport]:
    """Drop exact and near-duplicate rows, keeping the first occurrence.

    `rows` is a re-iterable list, `datasets.Dataset` or `RowStream`. Returns a generator of the
    kept rows and a report that is complete once the generator is exhausted; `removed`, if
    given, receives one record per removed row (where it was, which kept row it duplicates).
    """
    if on not in DEDUP_KEYS:
        raise PreftuneError(f"on: got {on!r}, expected one of {', '.join(DEDUP_KEYS)}")
    source = source or source_name(rows)
    import itertools

    fmt = detect_format(list(itertools.islice(iter(rows), DETECT_ROWS)), source)
    index = NearDuplicateIndex(threshold, num_perm=num_perm, shingle=shingle) if near else None
    report = DedupReport(source, fmt, on, threshold, num_perm, shingle)

    def generate() -> Iterator[dict]:
        seen: dict[int, int] = {}  # exact fingerprint -> position among kept rows
        kept_labels: list[str] = []
        kept_label_index = array("H")
        kept_numbers = array("q")
        kept_units: list[str] = []

        def kept_where(position: int) -> str:
            i = kept_label_index[position]
            return where((kept_labels[i], kept_units[i], kept_numbers[position]))

        for row, origin in located_rows(rows, source):
            report.n_rows += 1
            text = key_text(row, fmt, on)
            fingerprint = exact_hash(text)
            match, kind, sim = None, "", 1.0
            if fingerprint in seen:
                match, kind = seen[fingerprint], "exact"
            elif index is not None:
                hit = index.add_or_match(text, report.n_kept)
                if hit is not None:
                    (match, sim), kind = hit, "near"
            if match is not None:
                record = {"row": where(origin), "duplicate_of": kept_where(match), "kind": kind,
                          "similarity": round(sim, 4)}
                if kind == "exact":
                    report.exact_duplicates += 1
                else:
                    report.near_duplicates += 1
                if len(report.examples) < EXAMPLES:
                    report.examples.append(record)
                if removed is not None:
                    removed.append(record)
                continue
            seen[fingerprint] = report.n_kept
            _remember(origin, kept_labels, kept_units, kept_label_index, kept_numbers)
            report.n_kept += 1
            yield row

    return generate(), report


def _remember(origin: Origin, labels: list, units: list, label_index: array, numbers: array):
    label, unit, number = origin
    if not labels or labels[-1] != label:
        labels.append(label)
        units.append(unit)
    label_index.append(len(labels) - 1)
    numbers.append(number)
