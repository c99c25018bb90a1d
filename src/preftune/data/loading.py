"""Files, folders and hub datasets -> a list of row dicts.

`load_rows` reads what users already have on disk (JSON lines, JSON, gzip'd JSON, Parquet,
CSV, a folder of such files, a `datasets.save_to_disk` folder) and, only when `source` is not
a local path, asks `datasets.load_dataset`. Every problem becomes a `PreftuneError` that names
the file and line (or row) so the user can fix the data.

The returned list is a `Rows` (a plain `list` subclass) that remembers where each row came
from, so that later validation (`data.formats`) can say "data.jsonl, line 7" rather than
"row 7" when lines and rows differ (blank lines, several files).
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

from preftune.errors import PreftuneError

# Suffix -> reader kind. Longest suffixes first so ".jsonl.gz" wins over ".gz".
FILE_SUFFIXES = (".jsonl.gz", ".json.gz", ".jsonl", ".json", ".parquet", ".csv")
# Files `datasets.save_to_disk` writes: a Dataset folder has state.json, a DatasetDict folder
# has dataset_dict.json.
_SAVE_TO_DISK_MARKERS = ("state.json", "dataset_dict.json")


class Rows(list):
    """A list of row dicts that remembers each row's file and line (or row) number."""

    def __init__(self, rows=(), *, source: str = ""):
        super().__init__(rows)
        self.source = source
        # Parallel to the rows: (file label, unit, number), e.g. ("data.jsonl", "line", 7).
        self.origins: list[tuple[str, str, int]] = []

    def where(self, index: int) -> str:
        """Human location of row `index` (0-based), e.g. 'data.jsonl, line 7'."""
        if index < len(self.origins):
            label, unit, number = self.origins[index]
            return f"{label}, {unit} {number}"
        return f"{self.source}, row {index + 1}"


def parse_column_map(spec: str) -> dict[str, str]:
    """Parse the CLI syntax "prompt=question,chosen=good" (standard=source).

    Returns the mapping in the direction `load_rows` takes it: {source column: standard name},
    e.g. {"question": "prompt", "good": "chosen"}.
    """
    mapping: dict[str, str] = {}
    if not spec or not spec.strip():
        return mapping
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        standard, sep, column = (part.strip() for part in item.partition("="))
        if not sep or not standard or not column or "=" in column:
            raise PreftuneError(
                f"column map {spec!r}: item {item!r} is not of the form standard=source "
                "(e.g. 'prompt=question,chosen=good')"
            )
        if standard in mapping.values():
            raise PreftuneError(f"column map {spec!r}: {standard!r} is mapped more than once")
        if column in mapping:
            raise PreftuneError(f"column map {spec!r}: source column {column!r} is used twice")
        mapping[column] = standard
    return mapping


def load_rows(
    source: str, *, split: str = "train", column_map: dict[str, str] | None = None
) -> Rows:
    """Load rows from a local file or folder, else from `datasets.load_dataset(source)`.

    `split` selects a split of a hub dataset or of a `save_to_disk` DatasetDict folder; plain
    files have no splits, so another value than "train" is refused for them rather than
    ignored. `column_map` renames source columns to the standard names ({"question": "prompt"}).
    """
    path = Path(os.path.expanduser(str(source)))
    if path.is_file():
        if split != "train":
            raise PreftuneError(
                f"{source}: split={split!r} applies only to hub datasets and save_to_disk "
                "folders; a plain file has no splits (leave split as 'train')"
            )
        rows = Rows(source=str(source))
        _read_file(path, str(source), rows)
    elif path.is_dir():
        rows = _read_folder(path, str(source), split)
    elif _looks_like_local_path(str(source)):
        raise PreftuneError(f"{source}: no such file or folder")
    else:
        rows = _load_hub(str(source), split)
    if not rows:
        raise PreftuneError(f"{source}: no rows (the file or dataset is empty)")
    if column_map:
        _rename_columns(rows, column_map)
    return rows


def _looks_like_local_path(source: str) -> bool:
    # A hub name is "name" or "owner/name"; anything with a data suffix, a leading "./", "/",
    # "~" or more than one "/" is meant as a local path, so say "not found" instead of
    # sending it to the hub.
    return (
        source.endswith(FILE_SUFFIXES)
        or source.startswith((".", "/", "~"))
        or source.count("/") > 1
        or os.sep != "/"
        and os.sep in source
    )


def _read_file(path: Path, label: str, rows: Rows) -> None:
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz")):
        _read_jsonl(path, label, rows)
    elif name.endswith((".json", ".json.gz")):
        _read_json(path, label, rows)
    elif name.endswith(".parquet"):
        _read_arrow(path, label, rows, "parquet")
    elif name.endswith(".csv"):
        _read_arrow(path, label, rows, "csv")
    else:
        raise PreftuneError(
            f"{label}: unknown file type; expected one of {', '.join(FILE_SUFFIXES)}"
        )


def _read_text(path: Path, label: str) -> str:
    try:
        if path.name.lower().endswith(".gz"):
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError) as e:
        raise PreftuneError(f"{label}: could not read file ({e})") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise PreftuneError(
            f"{label}, line {line}: not UTF-8 text (byte {raw[e.start : e.start + 1]!r} at column "
            f"{column}); save the file as UTF-8"
        ) from None


def parse_jsonl_line(line: str, label: str, line_no: int) -> dict:
    """One JSON-lines row, or an error naming the file and line."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise PreftuneError(f"{label}, line {line_no}: not valid JSON ({e.msg})") from None
    if not isinstance(row, dict):
        raise PreftuneError(
            f"{label}, line {line_no}: expected a JSON object, got {type(row).__name__}"
        )
    return row


def _read_jsonl(path: Path, label: str, rows: Rows, text: str | None = None) -> None:
    text = _read_text(path, label) if text is None else text
    for line_no, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            rows.append(parse_jsonl_line(line, label, line_no))
            rows.origins.append((label, "line", line_no))


def _read_json(path: Path, label: str, rows: Rows) -> None:
    text = _read_text(path, label)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        # Many "*.json" files are really JSON lines (one object a line): read them as such.
        if e.msg == "Extra data" and text.lstrip().startswith("{"):
            _read_jsonl(path, label, rows, text)
            return
        raise PreftuneError(f"{label}, line {e.lineno}: not valid JSON ({e.msg})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise PreftuneError(
            f'{label}: expected a JSON list of objects or {{"data": [...]}}, '
            f"got {type(data).__name__}"
        )
    for i, row in enumerate(data, start=1):
        if not isinstance(row, dict):
            raise PreftuneError(
                f"{label}, item {i}: expected a JSON object, got {type(row).__name__}"
            )
        rows.append(row)
        rows.origins.append((label, "item", i))


def _read_arrow(path: Path, label: str, rows: Rows, kind: str) -> None:
    try:
        if kind == "parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
        else:
            import pyarrow.csv as pcsv

            _check_csv_quotes(path, label)
            table = pcsv.read_csv(path)
    except PreftuneError:
        raise
    except Exception as e:  # pyarrow raises several types (ArrowInvalid, OSError, ...)
        raise PreftuneError(f"{label}: could not read {kind} file ({e})") from None
    for i, row in enumerate(table.to_pylist(), start=1):
        rows.append(row)
        rows.origins.append((label, "row", i))


def _check_csv_quotes(path: Path, label: str) -> None:
    """Refuse a malformed quoted field such as `"ans"wer`, which pyarrow silently reads as
    `answer`: Python's strict CSV reader finds it and its line."""
    import csv
    import io

    reader = csv.reader(io.StringIO(_read_text(path, label), newline=""), strict=True)
    try:
        for _ in reader:
            pass
    except csv.Error as e:
        raise PreftuneError(
            f"{label}, line {reader.line_num}: malformed CSV ({e}); a field with quotes must be "
            'quoted as a whole, with inner quotes doubled: "say ""hi"""'
        ) from None


def _read_folder(path: Path, label: str, split: str) -> Rows:
    if any((path / marker).is_file() for marker in _SAVE_TO_DISK_MARKERS):
        return _load_from_disk(path, label, split)
    files = sorted(
        p for p in path.iterdir() if p.is_file() and p.name.lower().endswith(FILE_SUFFIXES)
    )
    if not files:
        raise PreftuneError(
            f"{label}: folder has no data files ({', '.join(FILE_SUFFIXES)}) and is not a "
            "datasets.save_to_disk folder"
        )
    if split != "train":
        raise PreftuneError(
            f"{label}: split={split!r} applies only to hub datasets and save_to_disk folders; "
            "a folder of files has no splits (leave split as 'train')"
        )
    rows = Rows(source=label)
    for file in files:
        _read_file(file, str(file), rows)
    return rows


def _load_from_disk(path: Path, label: str, split: str) -> Rows:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise PreftuneError(f"{label}: could not load save_to_disk folder ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise PreftuneError(f"{label}: no split {split!r}; the folder has splits {sorted(ds)}")
        ds = ds[split]
    return _dataset_rows(ds, label)


def _load_hub(source: str, split: str) -> Rows:
    import datasets

    try:
        ds = datasets.load_dataset(source, split=split)
    except Exception as e:  # network, missing dataset, missing split, ...
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PreftuneError(
            f"could not load dataset {source!r} (split {split!r}): {reason}; "
            "pass a local file or folder"
        ) from None
    return _dataset_rows(ds, source)


def _dataset_rows(ds, label: str) -> Rows:
    rows = Rows(ds.to_list(), source=label)
    rows.origins = [(label, "row", i) for i in range(1, len(rows) + 1)]
    return rows


def _rename_columns(rows: Rows, column_map: dict[str, str]) -> None:
    present: set[str] = set()
    for row in rows:
        present.update(row)
    missing = [col for col in column_map if col not in present]
    if missing:
        raise PreftuneError(
            f"{rows.source}: column map names column(s) {missing} that are not in the data; "
            f"columns present: {sorted(present)}"
        )
    for src, dst in column_map.items():
        if dst in present and dst not in column_map:
            raise PreftuneError(
                f"{rows.source}: column map renames {src!r} to {dst!r}, but the data already "
                f"has a {dst!r} column; map that one away too or drop it"
            )
    for i, row in enumerate(rows):
        renamed = {k: v for k, v in row.items() if k not in column_map}
        for src, dst in column_map.items():
            if src in row:
                renamed[dst] = row[src]
        rows[i] = renamed
