"""Exact and near-duplicate removal: MinHash signatures of word shingles, banded (LSH).

Two texts are near duplicates when the Jaccard similarity of their sets of k-word shingles is
at least `threshold`. The signatures are datasketch MinHashes (Broder 1997, "On the resemblance
and containment of documents") and the band layout (b bands of r values) is datasketch's own
choice for the threshold; banding as in Leskovec, Rajaraman and Ullman, "Mining of Massive
Datasets", ch. 3. Candidates from the bands are confirmed by the MinHash estimate of the
Jaccard similarity, so banding's false positives are not removed. The first occurrence is kept.

Why not datasketch's MinHashLSH index: measured here it holds ~3.6 KB of Python objects and
costs ~1 ms per inserted text, i.e. ~3.6 GB and tens of minutes for a million rows. Instead,
`NearDuplicateFinder` keeps each text's band keys as b 64-bit integers in memory (72 bytes a
text at 0.8) and its signature in a temporary file, then finds colliding band keys by sorting:
bounded memory, and a second pass over the rows writes the survivors.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
import tempfile
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from preftune.data.formats import FORMATS, detect_format, split_implicit_prompt
from preftune.datatools.io import located_rows, source_name, where
from preftune.datatools.pairs import DETECT_ROWS, text_of
from preftune.errors import PreftuneError

_WORD = re.compile(r"\w+")
DEDUP_KEYS = ("pair", "prompt")
EXAMPLES = 20  # duplicates shown in the report (all of them go to removed.jsonl)
GROUP_CAP = 64  # a text is compared with at most this many earlier texts sharing a band key
_BATCH = 4096


def words(text: str) -> list[str]:
    """Lower-cased word tokens (punctuation and spacing differences do not count)."""
    return _WORD.findall(text.lower())


def exact_hash(text: str) -> int:
    """64-bit fingerprint of a text (blake2b): a set of these is 8 bytes a row, not the text."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


class NearDuplicateFinder:
    """Add texts in order with `add`; `finish` says which ones near-duplicate an earlier kept one.

    Use as a context manager (the signatures live in a temporary file until `close`).
    """

    def __init__(
        self, threshold: float = 0.8, *, num_perm: int = 128, shingle: int = 3, seed: int = 1
    ):
        try:
            from datasketch import MinHash
            from datasketch.lsh import _optimal_param
        except ImportError:
            raise PreftuneError(
                "near-duplicate search needs datasketch >= 2.0: pip install "
                "'preftune[data]' (or look for exact duplicates only: "
                "dedup --no-near, inspect --no-near-duplicates)"
            ) from None

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
        # datasketch's band layout for this threshold (equal weight on false +/- rates).
        self.bands, self.rows_per_band = _optimal_param(threshold, num_perm, 0.5, 0.5)
        rng = np.random.default_rng(seed)
        self._mix = rng.integers(1, 2**63, size=self.rows_per_band, dtype=np.uint64) | np.uint64(1)
        self._keys = [array("Q") for _ in range(self.bands)]
        self._pending: list[np.ndarray] = []
        fd, self._path = tempfile.mkstemp(prefix="preftune-minhash-", suffix=".u32")
        self._file = os.fdopen(fd, "wb")
        self.n = 0

    def signature(self, text: str) -> np.ndarray:
        tokens = words(text)
        k = self.shingle
        shingles = (
            {" ".join(tokens[i : i + k]) for i in range(len(tokens) - k + 1)}
            if len(tokens) >= k
            else {" ".join(tokens)}
        )
        m = self._MinHash(
            num_perm=self.num_perm, permutations=self._permutations, scheme=self._scheme
        )
        m.update_batch([s.encode("utf-8") for s in shingles])
        return m.hashvalues.astype(np.uint32)

    def add(self, text: str) -> int:
        """Index a text; returns its id (0, 1, 2, ... in the order added)."""
        self._pending.append(self.signature(text))
        if len(self._pending) >= _BATCH:
            self._flush()
        self.n += 1
        return self.n - 1

    def _flush(self) -> None:
        if not self._pending:
            return
        sigs = np.stack(self._pending)  # [batch, num_perm] uint32
        self._file.write(sigs.tobytes())
        used = sigs[:, : self.bands * self.rows_per_band].astype(np.uint64)
        bands = used.reshape(len(sigs), self.bands, self.rows_per_band)
        with np.errstate(over="ignore"):  # a multiplicative hash: wrapping is intended
            keys = (bands * self._mix).sum(axis=2, dtype=np.uint64)
        for b in range(self.bands):
            self._keys[b].extend(keys[:, b].tolist())
        self._pending = []

    def finish(self) -> dict[int, tuple[int, float]]:
        """{later id: (earlier kept id, estimated Jaccard)} for every near duplicate: a text is a
        duplicate when it reaches the threshold with an earlier text that is itself kept."""
        self._flush()
        self._file.flush()
        if self.n < 2:
            return {}
        sigs = np.memmap(self._path, dtype=np.uint32, mode="r", shape=(self.n, self.num_perm))
        later, earlier = [], []
        for keys in self._keys:
            k = np.frombuffer(keys, dtype=np.uint64)
            order = np.argsort(k, kind="stable")  # ids ascending within equal keys
            sk = k[order]
            starts = np.flatnonzero(np.r_[True, sk[1:] != sk[:-1]])
            sizes = np.diff(np.r_[starts, sk.size])
            for start, size in zip(starts[sizes > 1], sizes[sizes > 1]):
                group = order[start : start + size]
                for pos in range(1, size):
                    for prev in group[max(0, pos - GROUP_CAP) : pos]:
                        earlier.append(prev)
                        later.append(group[pos])
        if not later:
            return {}
        pairs = np.unique(np.stack([np.asarray(later), np.asarray(earlier)], axis=1), axis=0)
        sims = np.empty(len(pairs))
        for s in range(0, len(pairs), 65536):
            chunk = pairs[s : s + 65536]
            # Estimated Jaccard = the fraction of equal MinHash values (Broder 1997).
            sims[s : s + 65536] = (sigs[chunk[:, 0]] == sigs[chunk[:, 1]]).mean(axis=1)
        keep = sims >= self.threshold
        duplicates: dict[int, tuple[int, float]] = {}
        # Pairs are sorted by later id, then earlier id: decide ids in order (keep the first).
        for (j, i), sim in zip(pairs[keep].tolist(), sims[keep].tolist()):
            if j not in duplicates and i not in duplicates:
                duplicates[j] = (i, sim)
        return duplicates

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
        if os.path.exists(self._path):
            os.remove(self._path)

    def __enter__(self) -> NearDuplicateFinder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def key_text(row: dict, fmt: str, on: str) -> str:
    """The text two rows are compared on: the prompt, or the whole example (prompt and replies)."""
    if on == "prompt":
        if fmt == "implicit_paired":
            try:
                return text_of(split_implicit_prompt(row.get("chosen"), row.get("rejected"))[0])
            except (ValueError, TypeError, AttributeError):
                return text_of(row.get("chosen") or "")
        value = row.get("prompt", row.get("messages", row.get("text")))
        return (
            ""
            if value is None
            else text_of(value)
            if isinstance(value, (str, list))
            else str(value)
        )
    parts = []
    for column in FORMATS[fmt]:
        value = row.get(column)
        if isinstance(value, list) and value and not isinstance(value[0], dict):
            parts.extend(text_of(v) if isinstance(v, (str, list)) else str(v) for v in value)
        elif value is not None:
            parts.append(text_of(value) if isinstance(value, (str, list)) else str(value))
    return "\n".join(parts)


class Origins:
    """Where each row came from, compactly (a label index and a number per row)."""

    def __init__(self):
        self.labels: list[tuple[str, str]] = []
        self.label_index = array("l")
        self.numbers = array("q")

    def append(self, origin) -> None:
        label, unit, number = origin
        if not self.labels or self.labels[-1] != (label, unit):
            self.labels.append((label, unit))
        self.label_index.append(len(self.labels) - 1)
        self.numbers.append(number)

    def where(self, i: int) -> str:
        label, unit = self.labels[self.label_index[i]]
        return where((label, unit, self.numbers[i]))


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


def find_duplicates(
    rows: Iterable[dict],
    *,
    on: str = "pair",
    threshold: float = 0.8,
    num_perm: int = 128,
    shingle: int = 3,
    near: bool = True,
    source: str | None = None,
    progress=None,
) -> tuple[dict, DedupReport, Origins]:
    """One pass: {row position: record} for every duplicate row (exact or near) of an earlier
    kept row, with the report so far and where every row came from."""
    if on not in DEDUP_KEYS:
        raise PreftuneError(f"on: got {on!r}, expected one of {', '.join(DEDUP_KEYS)}")
    source = source or source_name(rows)
    fmt = detect_format(list(itertools.islice(iter(rows), DETECT_ROWS)), source)
    report = DedupReport(source, fmt, on, threshold, num_perm, shingle)
    origins = Origins()
    seen: dict[int, int] = {}  # exact fingerprint -> first row position
    exact: dict[int, int] = {}  # row position -> first row position with the same text
    finder_rows = array("q")  # near-duplicate finder id -> row position
    stream = located_rows(rows, source)
    if progress is not None:
        stream = progress(stream)
    with (
        NearDuplicateFinder(threshold, num_perm=num_perm, shingle=shingle) if near else _NoFinder()
    ) as finder:
        for position, (row, origin) in enumerate(stream):
            origins.append(origin)
            text = key_text(row, fmt, on)
            fingerprint = exact_hash(text)
            if fingerprint in seen:
                exact[position] = seen[fingerprint]
                continue
            seen[fingerprint] = position
            if near:
                finder.add(text)
                finder_rows.append(position)
        near_hits = finder.finish() if near else {}
    report.n_rows = len(origins.numbers)
    duplicates: dict[int, dict] = {}
    for position, first in exact.items():
        duplicates[position] = {
            "row": origins.where(position),
            "duplicate_of": origins.where(first),
            "kind": "exact",
            "similarity": 1.0,
        }
    for j, (i, sim) in near_hits.items():
        position, first = finder_rows[j], finder_rows[i]
        duplicates[position] = {
            "row": origins.where(position),
            "duplicate_of": origins.where(first),
            "kind": "near",
            "similarity": round(sim, 4),
        }
    # An exact copy of a row that is itself a near duplicate goes with it (its text is the same).
    for position, first in exact.items():
        if first in duplicates and duplicates[first]["kind"] == "near":
            duplicates[position]["duplicate_of"] = duplicates[first]["duplicate_of"]
    duplicates = dict(sorted(duplicates.items()))
    report.exact_duplicates = sum(d["kind"] == "exact" for d in duplicates.values())
    report.near_duplicates = len(duplicates) - report.exact_duplicates
    report.n_kept = report.n_rows - len(duplicates)
    report.examples = list(itertools.islice(duplicates.values(), EXAMPLES))
    return duplicates, report, origins


class _NoFinder:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def dedup(
    rows: Iterable[dict],
    *,
    on: str = "pair",
    threshold: float = 0.8,
    num_perm: int = 128,
    shingle: int = 3,
    near: bool = True,
    source: str | None = None,
    removed: list | None = None,
    progress=None,
) -> tuple[Iterator[dict], DedupReport]:
    """Drop exact and near-duplicate rows, keeping the first occurrence.

    `rows` is a re-iterable list, `datasets.Dataset` or `RowStream` (read twice: once to find
    the duplicates, once to hand back the others). Returns a generator of the kept rows and the
    report; `removed`, if given, receives one record per removed row (where it was, which kept
    row it duplicates, exact or near, estimated Jaccard).
    """
    source = source or source_name(rows)
    duplicates, report, _ = find_duplicates(
        rows,
        on=on,
        threshold=threshold,
        num_perm=num_perm,
        shingle=shingle,
        near=near,
        source=source,
        progress=progress,
    )
    if removed is not None:
        for record in duplicates.values():
            removed.append(record)

    def generate() -> Iterator[dict]:
        for position, row in enumerate(rows):
            if position not in duplicates:
                yield row

    return generate(), report
