"""Writers for the eval-rm report: an aligned text table and strict JSON, written atomically."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from preftune.evaluation.stats import Row


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path in the folder of `path`; on success move it onto `path`.

    Same folder so that os.replace is a rename on one filesystem: a reader never sees a
    half-written file, and a crash leaves the old file (or none) rather than a truncated one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def to_jsonable(obj):
    """Plain-python copy of `obj` for strict JSON: numpy scalars/arrays, dataclasses, tuples and
    paths converted; NaN/inf become None (JSON has no NaN, and other tools reject it)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [to_jsonable(v) for v in obj.tolist()]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def write_json_atomic(obj, path: str | os.PathLike) -> None:
    """json.dump `obj` (numpy types converted, see `to_jsonable`) to `path` atomically."""
    data = to_jsonable(obj)
    with atomic_output(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, allow_nan=False)
            f.write("\n")


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def format_table(rows: Sequence[Row], *, confidence: float = 0.95) -> str:
    """Aligned text table: name, n, accuracy, CI; rows with a warning get a `*` and a footnote.

    `confidence` only labels the CI column: pass the level the rows were computed with.
    """
    header = ["subset", "n", "accuracy", f"{100 * confidence:g}% CI"]
    body = []
    notes = []
    for row in rows:
        name = row.name
        if row.warning:
            name += "*"
            notes.append(f"* {row.name}: {row.warning}")
        body.append([name, str(row.n), _pct(row.accuracy), f"[{_pct(row.ci_low)}, {_pct(row.ci_high)}]"])
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        # Name left-aligned, numbers right-aligned so the decimal points line up.
        parts = [cells[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]
        return "  ".join(parts).rstrip()

    lines = [line(header), "  ".join("-" * w for w in widths)]
    lines += [line(r) for r in body]
    return "\n".join(lines + notes) + "\n"
