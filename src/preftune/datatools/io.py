"""Reading any data preftune reads as a stream of rows, and writing rows and reports atomically.

`data.loading.load_rows` reads a whole file into memory, which is right for training but not
for a million-row cleaning pass. `open_rows` reads the same sources (JSON lines, gzip'd JSON
lines, JSON, Parquet, CSV, folders of them, `save_to_disk` folders, hub names with a split,
a column map) as a re-iterable stream: JSON lines line by line, Parquet batch by batch, Arrow
datasets memory-mapped. A whole-document JSON or CSV file has no streaming form and goes
through `load_rows`. Every problem names the file and line, like `load_rows` does.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

from preftune.data.loading import (
    FILE_SUFFIXES,
    _looks_like_local_path,
    load_rows,
    parse_jsonl_line,
    parse_column_map,
)
from preftune.errors import PreftuneError
from preftune.utils import atomic_output, atomic_write_json

Origin = tuple[str, str, int]  # (file label, unit, number), e.g. ("data.jsonl", "line", 7)
OUTPUT_FORMATS = ("jsonl", "parquet")
_SAVE_TO_DISK_MARKERS = ("state.json", "dataset_dict.json")
_PARQUET_BATCH = 1024


def where(origin: Origin) -> str:
    """'data.jsonl, line 7'."""
    label, unit, number = origin
    return f"{label}, {unit} {number}"


class RowStream:
    """A re-iterable stream of row dicts from one source; each pass re-reads the source.

    Iterating gives rows (like a list or a `datasets.Dataset`); `located()` gives
    (row, origin) so that reports can name the file and line of a row.
    """

    def __init__(self, source: str, *, split: str = "train", columns: str | dict = ""):
        self.source = str(source)
        self.split = split
        self.column_map = parse_column_map(columns) if isinstance(columns, str) else dict(columns)
        self._parts = _resolve(self.source, split)  # fails now, before any output is written
        self.n_rows: int | None = None  # known after the first full pass (or from Arrow)

    def __iter__(self) -> Iterator[dict]:
        for row, _ in self.located():
            yield row

    def located(self) -> Iterator[tuple[dict, Origin]]:
        n = 0
        checked = not self.column_map
        for kind, target, label in self._parts:
            for row, origin in _read_part(kind, target, label, self.split):
                if not checked:
                    _check_column_map(self.column_map, row, origin)
                    checked = True
                if self.column_map:
                    row = _rename(row, self.column_map, origin)
                n += 1
                yield row, origin
        if n == 0:
            raise PreftuneError(f"{self.source}: no rows (the file or dataset is empty)")
        self.n_rows = n


def located_rows(rows: Iterable[dict], source: str = "rows") -> Iterator[tuple[dict, Origin]]:
    """(row, origin) for a RowStream, a `data.Rows` list, a plain list or a `datasets.Dataset`."""
    if isinstance(rows, RowStream):
        yield from rows.located()
        return
    origins = getattr(rows, "origins", None)
    for i, row in enumerate(rows):
        if origins is not None and i < len(origins):
            yield row, tuple(origins[i])
        else:
            yield row, (source, "row", i + 1)


def source_name(rows, default: str = "rows") -> str:
    return getattr(rows, "source", None) or default


def _resolve(source: str, split: str) -> list[tuple[str, object, str]]:
    """The parts of a source, as (reader kind, target, label), in reading order."""
    path = Path(os.path.expanduser(source))
    if path.is_file():
        if split != "train":
            raise PreftuneError(
                f"{source}: split={split!r} applies only to hub datasets and save_to_disk "
                "folders; a plain file has no splits (leave split as 'train')"
            )
        return [(_file_kind(path, source), path, source)]
    if path.is_dir():
        if any((path / m).is_file() for m in _SAVE_TO_DISK_MARKERS):
            return [("disk", path, source)]
        files = sorted(
            p for p in path.iterdir() if p.is_file() and p.name.lower().endswith(FILE_SUFFIXES)
        )
        if not files:
            raise PreftuneError(
                f"{source}: folder has no data files ({', '.join(FILE_SUFFIXES)}) and is not a "
                "datasets.save_to_disk folder"
            )
        if split != "train":
            raise PreftuneError(
                f"{source}: split={split!r} applies only to hub datasets and save_to_disk "
                "folders; a folder of files has no splits (leave split as 'train')"
            )
        return [(_file_kind(p, str(p)), p, str(p)) for p in files]
    if _looks_like_local_path(source):
        raise PreftuneError(f"{source}: no such file or folder")
    return [("hub", source, source)]


def _file_kind(path: Path, label: str) -> str:
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".json", ".json.gz", ".csv")):
        return "whole"  # no streaming form: load_rows reads it
    raise PreftuneError(f"{label}: unknown file type; expected one of {', '.join(FILE_SUFFIXES)}")


def _read_part(kind: str, target, label: str, split: str) -> Iterator[tuple[dict, Origin]]:
    if kind == "jsonl":
        yield from _stream_jsonl(target, label)
    elif kind == "parquet":
        yield from _stream_parquet(target, label)
    elif kind == "whole":
        rows = load_rows(str(target))
        for row, origin in zip(rows, rows.origins):
            yield row, origin
    else:
        yield from _stream_arrow(kind, target, label, split)


def _stream_jsonl(path: Path, label: str) -> Iterator[tuple[dict, Origin]]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if line.strip():
                    yield parse_jsonl_line(line, label, line_no), (label, "line", line_no)
    except UnicodeDecodeError as e:
        raise PreftuneError(f"{label}: not UTF-8 text ({e})") from None
    except (OSError, EOFError) as e:
        raise PreftuneError(f"{label}: could not read file ({e})") from None


def _stream_parquet(path: Path, label: str) -> Iterator[tuple[dict, Origin]]:
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=_PARQUET_BATCH)
        number = 0
        for batch in batches:
            for row in batch.to_pylist():
                number += 1
                yield row, (label, "row", number)
    except OSError as e:
        raise PreftuneError(f"{label}: could not read parquet file ({e})") from None


def _stream_arrow(kind: str, target, label: str, split: str) -> Iterator[tuple[dict, Origin]]:
    import datasets

    try:
        if kind == "disk":
            ds = datasets.load_from_disk(str(target))
        else:
            ds = datasets.load_dataset(str(target), split=split)
    except Exception as e:  # network, missing dataset, missing split, corrupt folder, ...
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PreftuneError(
            f"could not load dataset {label!r} (split {split!r}): {reason}; "
            "pass a local file or folder"
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise PreftuneError(f"{label}: no split {split!r}; the folder has splits {sorted(ds)}")
        ds = ds[split]
    # An Arrow dataset is memory-mapped: iterating it reads one batch at a time.
    for i, row in enumerate(ds, start=1):
        yield row, (label, "row", i)


def _check_column_map(column_map: dict[str, str], row: dict, origin: Origin) -> None:
    missing = [c for c in column_map if c not in row]
    if missing:
        raise PreftuneError(
            f"{where(origin)}: column map names column(s) {missing} that are not "
            f"in the data; columns present: {sorted(row)}"
        )


def _rename(row: dict, column_map: dict[str, str], origin: Origin) -> dict:
    out = {k: v for k, v in row.items() if k not in column_map}
    for src, dst in column_map.items():
        if dst in out:
            raise PreftuneError(
                f"{where(origin)}: column map renames {src!r} to {dst!r}, but the "
                f"data already has a {dst!r} column; map that one away too"
            )
        if src in row:
            out[dst] = row[src]
    return out


# --- writing ------------------------------------------------------------------------------


class RowWriter:
    """Writes rows to JSONL or Parquet in a temporary file, renamed onto `path` on `close()`.

    Used as a context manager: an exception leaves no (half-written) output behind.
    """

    def __init__(self, path: str | os.PathLike, fmt: str = "jsonl"):
        if fmt not in OUTPUT_FORMATS:
            raise PreftuneError(f"format: got {fmt!r}, expected one of {', '.join(OUTPUT_FORMATS)}")
        self.path, self.fmt, self.n = Path(path), fmt, 0
        self._stack = contextlib.ExitStack()
        self._tmp = self._stack.enter_context(atomic_output(self.path))
        self._file = open(self._tmp, "w", encoding="utf-8") if fmt == "jsonl" else None
        self._batch: list[dict] = []
        self._parquet = None

    def write(self, row: dict) -> None:
        self.n += 1
        if self._file is not None:
            self._file.write(json.dumps(row, ensure_ascii=False) + "\n")
            return
        self._batch.append(row)
        if len(self._batch) >= _PARQUET_BATCH:
            self._flush_parquet()

    def _flush_parquet(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self._batch:
            return
        try:
            if self._parquet is None:
                table = pa.Table.from_pylist(self._batch)
                self._parquet = pq.ParquetWriter(self._tmp, table.schema)
            else:
                table = pa.Table.from_pylist(self._batch, schema=self._parquet.schema)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise PreftuneError(
                f"{self.path}: rows do not fit one Parquet schema ({e}); "
                "write JSON lines instead (--format jsonl)"
            ) from None
        self._parquet.write_table(table)
        self._batch = []

    def __enter__(self) -> RowWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                if self._file is not None:
                    self._file.close()
                else:
                    self._flush_parquet()
                    if self._parquet is None:  # no rows: an empty file with no columns
                        import pyarrow as pa
                        import pyarrow.parquet as pq

                        pq.write_table(pa.table({}), self._tmp)
                    else:
                        self._parquet.close()
            else:
                if self._file is not None:
                    self._file.close()
                if self._parquet is not None:
                    self._parquet.close()
        finally:
            self._stack.__exit__(exc_type, exc, tb)


def write_rows(path: str | os.PathLike, rows: Iterable[dict], fmt: str = "jsonl") -> int:
    """Write rows atomically; returns how many were written."""
    with RowWriter(path, fmt) as writer:
        for row in rows:
            writer.write(row)
    return writer.n


def write_report(report: dict, path: str | os.PathLike) -> None:
    atomic_write_json(path, report, strict=True)


def output_path(output_dir: str | os.PathLike, stem: str, fmt: str) -> Path:
    return Path(output_dir) / f"{stem}.{fmt}"


def progress(iterable, *, total: int | None = None, desc: str = ""):
    """A tqdm bar on an interactive terminal; nothing when stderr is a file or a pipe."""
    from tqdm.auto import tqdm

    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=" rows",
        disable=not sys.stderr.isatty(),
        mininterval=1.0,
    )
