"""The output folder of a run: owned, locked, never emptied blindly.

- Owned: `.preftune-files.json` lists the top-level names a preftune run wrote in the folder
  (config, metrics, checkpoints, the model's files, caches). `--overwrite` removes exactly
  those and refuses a folder that holds anything else, naming it; so `--output-dir .` can
  never empty the working directory.
- Locked: `.preftune.lock` holds an exclusive `flock` for the life of the run, with the PID,
  host and start time inside for the message. The kernel drops the flock when the process
  dies, so a lock left by a killed run is recognised as stale (on the same host) and taken
  over; a live run is never entered.
- A run that stopped before its first training step (bad data, a missing model) has nothing
  worth keeping: the same command may start it again without `--overwrite`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path

from preftune.errors import PreftuneError
from preftune.utils import atomic_write_json

OWNED_FILE = ".preftune-files.json"
LOCK_FILE = ".preftune.lock"
# Names every run writes (or may write) at the top of its folder.
RUN_FILES = (
    "config.yaml",
    "metrics.jsonl",
    "checkpoints",
    "run_complete.json",
    ".tmp-final",
    OWNED_FILE,
    LOCK_FILE,
)
# What a model/tokenizer save writes: claimed when saved; used to recognise the folder of a run
# written before `OWNED_FILE` existed, and refused as collisions in a folder that is not a run.
MODEL_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "adapter_model.safetensors",
    "adapter_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "tokenizer.model",
    "ref_logps.safetensors",
    "summary.json",
    "README.md",
    "curves.png",
)

_HELD: dict[str, RunLock] = {}  # locks this process holds, by folder


class RunLock:
    """An exclusive lock on an output folder, held until `release` or the process's end."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.path = folder / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock; return a note when a stale lock was taken over. Raise when held."""
        key = str(self.folder.resolve())
        mine = _HELD.pop(key, None)
        if mine is not None:  # left by an earlier run in this process that stopped with an error
            mine.release()
        note = None
        for _ in range(5):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = _read_holder(fd)
                os.close(fd)
                raise PreftuneError(
                    f"output folder {self.folder} is in use by another preftune run "
                    f"({_describe(holder)}): wait for it to finish or stop it, or choose another "
                    "--output-dir"
                ) from None
            # The file may have been removed (by a finishing run) between open and flock.
            if not _same_file(fd, self.path):
                os.close(fd)
                continue
            holder = _read_holder(fd)
            if holder and holder.get("host") != socket.gethostname():
                os.close(fd)
                raise PreftuneError(
                    f"output folder {self.folder} is locked by a preftune run on another machine "
                    f"({_describe(holder)}); if that run is over, delete {self.path} and run "
                    "again"
                )
            if holder:
                note = (
                    f"output folder {self.folder}: taking over the lock of preftune process "
                    f"{holder.get('pid')}, which is no longer running"
                )
            os.ftruncate(fd, 0)
            os.pwrite(
                fd,
                json.dumps(
                    {
                        "pid": os.getpid(),
                        "host": socket.gethostname(),
                        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                    }
                ).encode(),
                0,
            )
            self.fd = fd
            _HELD[key] = self
            return note
        raise PreftuneError(
            f"could not lock output folder {self.folder}: the lock file keeps "
            "changing; is another run starting there?"
        )

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            if _same_file(self.fd, self.path):
                self.path.unlink()
        with contextlib.suppress(OSError):
            os.close(self.fd)
        self.fd = None
        _HELD.pop(str(self.folder.resolve()), None)


def release_all() -> None:
    """Release every lock this process holds (the CLI calls it when a command ends)."""
    for lock in list(_HELD.values()):
        lock.release()


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _read_holder(fd: int) -> dict:
    try:
        data = os.pread(fd, 4096, 0)
        holder = json.loads(data.decode()) if data.strip() else {}
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


def _describe(holder: dict) -> str:
    if not holder:
        return "no details recorded"
    return f"PID {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}"


# --- ownership ---------------------------------------------------------------------------------


def owned_names(folder: Path) -> set[str]:
    """Top-level names in `folder` that a preftune run wrote."""
    path = folder / OWNED_FILE
    if path.is_file():
        try:
            names = set(json.loads(path.read_text())["names"])
        except (OSError, ValueError, KeyError, TypeError):
            names = set()
        return names | set(RUN_FILES)
    if (folder / "config.yaml").is_file():  # a run written before OWNED_FILE existed
        return set(RUN_FILES) | set(MODEL_FILES)
    return {LOCK_FILE, OWNED_FILE}


def claim(folder: Path, names) -> None:
    """Record `names` (top-level entries of `folder`) as written by this run."""
    current = owned_names(folder) if (folder / OWNED_FILE).is_file() else set(RUN_FILES)
    new = current | {str(n) for n in names}
    if new != current or not (folder / OWNED_FILE).is_file():
        atomic_write_json(folder / OWNED_FILE, {"names": sorted(new)})


def holds_run(folder: Path) -> bool:
    return (folder / "config.yaml").is_file() or (folder / OWNED_FILE).is_file()


def run_started(folder: Path) -> bool:
    """Did the run in `folder` get past its first training step (or finish)?"""
    if (folder / "run_complete.json").exists():
        return True
    ckpts = folder / "checkpoints"
    if ckpts.is_dir() and any(p.name.startswith("step-") for p in ckpts.iterdir()):
        return True
    if any((folder / name).exists() for name in ("model.safetensors", "adapter_model.safetensors")):
        return True
    metrics = folder / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text(errors="replace").splitlines():
            try:
                if json.loads(line).get("step", 0) >= 1:
                    return True
            except (ValueError, AttributeError):
                continue
    return False


def _is_owned(name: str, owned: set[str]) -> bool:
    """An owned name, or the temporary file of one left by a crash (`.tmp-NAME` of the
    engine's writers, `.NAME.<random>.tmp` of `utils.atomic_output`)."""
    if name in owned:
        return True
    if name.startswith(".tmp-") and name[len(".tmp-") :] in owned:
        return True
    return (
        name.startswith(".")
        and name.endswith(".tmp")
        and any(name.startswith(f".{o}.") for o in owned)
    )


def foreign_entries(folder: Path) -> list[str]:
    """Entries of `folder` that no preftune run wrote."""
    owned = owned_names(folder)
    return sorted(p.name for p in folder.iterdir() if not _is_owned(p.name, owned))


def remove_owned(folder: Path) -> None:
    """Delete what the run wrote (its lock and the ownership list excepted)."""
    owned = owned_names(folder)
    for path in list(folder.iterdir()):
        if path.name in (LOCK_FILE, OWNED_FILE) or not _is_owned(path.name, owned):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def name_list(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
