"""Small helpers shared by every module: the one atomic writer."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch


def file_mode() -> int:
    """The mode a new file gets from the user's umask (0666 & ~umask), like `open` gives it."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def fsync_dir(path: Path | str) -> None:
    """Make a rename or creation inside `path` durable (no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(path: Path | str) -> Iterator[str]:
    """Yield a temporary path next to `path`; once the caller has written it, move it onto `path`.

    The temporary file is in the same folder, so the move is a rename on one filesystem: a
    reader sees the old file or the new one, never a half-written one, and a crash (or a full
    disk) leaves no partial file behind. The file gets the mode the umask gives any new file
    (mkstemp would leave 0600), its data and the folder entry are fsynced.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        os.chmod(tmp, file_mode())
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path | str, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically (see `atomic_output`)."""
    with atomic_output(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def to_jsonable(obj: Any) -> Any:
    """Plain-python copy of `obj` for strict JSON: numpy scalars/arrays, tensors, dataclasses,
    tuples and paths converted; NaN/inf become None (JSON has no NaN, other tools reject it)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        return to_jsonable(obj.tolist())
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


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def atomic_write_json(path: Path | str, obj: Any, *, strict: bool = False) -> None:
    """Write `obj` as indented JSON to `path` atomically.

    `strict`: standard JSON for other tools (NaN/inf become null, see `to_jsonable`); otherwise
    numpy values are converted and NaN is written as Python's `NaN` token, which `json` reads back.
    """
    if strict:
        text = json.dumps(to_jsonable(obj), indent=2, allow_nan=False)
    else:
        text = json.dumps(obj, indent=2, default=_jsonable)
    atomic_write_text(path, text + "\n")
