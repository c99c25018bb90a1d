"""Checkpoints that verify themselves: write, commit, verify, resume, prune.

A checkpoint is `checkpoints/step-N/`: accelerate's state (model, optimizer, scheduler, RNG
states of every process), `trainer_state.json` (the step, the data fingerprint, what a trainer
adds) and, written last, `manifest.json` with the size and SHA-256 of every other file.

Writing: everything goes into `.tmp-step-N/`; every file is fsynced while it is hashed, the
manifest is written and fsynced, the folder is fsynced, then renamed to `step-N` and the parent
fsynced. A crash or a full disk at any point leaves a `.tmp-` folder (removed when possible)
that resume never looks at.

Resuming: the newest `step-N` is checked against its manifest (a truncated or bit-flipped
file, a missing file, an unreadable state, non-finite weights); a damaged one is reported and
the next older one is tried; if none is intact the run stops and says so. The metrics lines of
steps after the checkpoint are dropped (a torn last line is repaired), and the training data's
fingerprint must match the one the checkpoint was written with unless `--allow-data-change`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from preftune.errors import PreftuneError
from preftune.utils import atomic_write_text, file_mode, fsync_dir

if TYPE_CHECKING:
    from preftune.engine.engine import Engine

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
# Test hook: SIGKILL this process right after the checkpoint of this step is committed.
KILL_AFTER_CHECKPOINT_ENV = "PREFTUNE_TEST_KILL_AFTER_CHECKPOINT"
_HASH_CHUNK = 1 << 20


class DiskError(PreftuneError):
    """Writing into the output folder failed: a full disk, no permission, a read-only mount."""


def disk_error(exc: OSError, what: str, folder: Path | str) -> DiskError:
    """A user-facing message for an OSError met while writing `what` into `folder`."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskError(
            f"the disk is full (no space left on device) while writing {what} in "
            f"{folder}; free some space (or lower --save-total-limit) and rerun "
            "the same command with --resume"
        )
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return DiskError(
            f"cannot write {what} in {folder}: {os.strerror(exc.errno)}; choose "
            "a writable --output-dir"
        )
    return DiskError(f"could not write {what} in {folder}: {exc.strerror or exc}")


def step_of(path: Path) -> int:
    try:
        return int(path.name.split("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def sha256_file(path: Path, fsync: bool = False) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
        if fsync:
            os.fsync(f.fileno())
    return h.hexdigest()


def write_manifest(folder: Path) -> dict[str, Any]:
    """fsync every file of `folder` while hashing it, then write the manifest (fsynced) last."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel == MANIFEST_FILE:
            continue
        os.chmod(path, file_mode())  # torch/safetensors writers may leave 0600
        files[rel] = {"size": path.stat().st_size, "sha256": sha256_file(path, fsync=True)}
    for sub in sorted({p.parent for p in folder.rglob("*")} | {folder}):
        fsync_dir(sub)
    manifest = {"format": 1, "files": files}
    path = folder / MANIFEST_FILE
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(manifest, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(folder)
    return manifest


def verify(folder: Path) -> str | None:
    """None when `folder` matches its manifest; else what is wrong, in words."""
    manifest_path = folder / MANIFEST_FILE
    if not manifest_path.is_file():
        # Checkpoints of preftune before manifests: trainer_state.json was the commit marker.
        return None if (folder / STATE_FILE).is_file() else "it has no manifest.json"
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return "its manifest.json is unreadable"
    for rel, expected in files.items():
        path = folder / rel
        if not path.is_file():
            return f"{rel} is missing"
        size = path.stat().st_size
        if size != expected["size"]:
            return f"{rel} has {size} bytes, the manifest says {expected['size']}"
        if sha256_file(path) != expected["sha256"]:
            return f"{rel} does not match its checksum (the file was changed or damaged)"
    return None


def data_fingerprint(items: Iterable[Any]) -> str:
    """SHA-256 of the training examples, in order: a resumed run must read the same data."""
    h = hashlib.sha256()
    n = 0
    for item in items:
        _feed(h, item)
        n += 1
    return f"{n}:{h.hexdigest()[:32]}"


def _feed(h, obj: Any) -> None:
    if isinstance(obj, dict):
        h.update(b"{")
        for key in sorted(obj, key=str):
            h.update(str(key).encode() + b"=")
            _feed(h, obj[key])
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        if obj and all(isinstance(v, int) and not isinstance(v, bool) for v in obj):
            h.update(b"i" + np.asarray(obj, dtype=np.int64).tobytes())
        else:
            h.update(b"[")
            for v in obj:
                _feed(h, v)
            h.update(b"]")
    elif isinstance(obj, torch.Tensor):
        h.update(b"t" + obj.detach().cpu().contiguous().numpy().tobytes())
    elif hasattr(obj, "__dataclass_fields__"):
        _feed(h, {k: getattr(obj, k) for k in obj.__dataclass_fields__})
    else:
        h.update(repr(obj).encode() + b";")


class Checkpoints:
    """The checkpoints of one run (`<output_dir>/checkpoints`), written and read by `engine`."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.root = engine.output_dir / CHECKPOINT_DIR

    # --- writing -------------------------------------------------------------------------

    def committed(self) -> list[Path]:
        """Committed checkpoints (step-N with a manifest, or a pre-manifest state file), newest first."""
        if not self.root.is_dir():
            return []
        done = [
            p
            for p in self.root.glob("step-*")
            if p.is_dir()
            and step_of(p) >= 0
            and ((p / MANIFEST_FILE).is_file() or (p / STATE_FILE).is_file())
        ]
        return sorted(done, key=step_of, reverse=True)

    def save(self, step: int, state: dict[str, Any] | None = None) -> Path:
        """Write everything needed to continue, verify-ably, then commit it with one rename."""
        engine = self.engine
        tmp = self.root / f".tmp-step-{step}"
        final = self.root / f"step-{step}"
        error: OSError | None = None
        try:
            if engine.is_main:
                self.root.mkdir(parents=True, exist_ok=True)
                if tmp.exists():
                    shutil.rmtree(tmp)
        except OSError as exc:
            error = exc
        if engine.any_rank(error is not None):
            raise self._failed(error, tmp, step)
        try:
            engine.accelerator.save_state(str(tmp), safe_serialization=True)
        except OSError as exc:
            error = exc
        if engine.any_rank(error is not None):
            raise self._failed(error, tmp, step)
        if engine.is_main:
            try:
                trainer_state = {
                    "step": step,
                    "total_steps": engine.total_steps,
                    "data_fingerprint": engine.data_fingerprint,
                    **(state or {}),
                }
                (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=2) + "\n")
                write_manifest(tmp)
                old = self.root / f".old-step-{step}"  # the same step written again (resume)
                if final.exists():
                    os.replace(final, old)
                os.replace(tmp, final)
                fsync_dir(self.root)
                shutil.rmtree(old, ignore_errors=True)
            except OSError as exc:
                error = exc
        if engine.any_rank(error is not None):
            raise self._failed(error, tmp, step)
        if engine.is_main:
            self.prune()
        engine.accelerator.wait_for_everyone()
        if os.environ.get(KILL_AFTER_CHECKPOINT_ENV) == str(step):
            os.kill(os.getpid(), signal.SIGKILL)
        return final

    def _failed(self, error: OSError | None, tmp: Path, step: int) -> PreftuneError:
        """Remove the half-written checkpoint; say what happened (on every process)."""
        if self.engine.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        if error is None:  # another process failed; its own message names the cause
            return DiskError(
                f"writing checkpoint step-{step} failed on another process; "
                f"see its message (output folder {self.engine.output_dir})"
            )
        return disk_error(error, f"checkpoint step-{step}", self.root)

    def prune(self) -> None:
        limit = self.engine.cfg.save_total_limit
        if not limit:
            return
        for old in self.committed()[limit:]:
            shutil.rmtree(old, ignore_errors=True)

    # --- resuming ------------------------------------------------------------------------

    def load_newest_intact(self) -> dict[str, Any] | None:
        """Load the newest checkpoint that passes verification; its trainer state, or None
        when there is no checkpoint at all. Damaged ones are reported and skipped."""
        engine = self.engine
        candidates = self.committed()
        if not candidates:
            return None
        damaged: list[str] = []
        for ckpt in candidates:
            problem = engine.broadcast(verify(ckpt) if engine.is_main else None)
            state = None
            if problem is None:
                state, problem = self._load(ckpt)
            if problem is None:
                if damaged:
                    engine.print(
                        f"--resume: falling back to {ckpt.name}, the newest intact "
                        "checkpoint; the damaged ones are kept as step-N.damaged"
                    )
                    self._set_aside(candidates[: len(damaged)])
                return state
            damaged.append(f"{ckpt.name} ({problem})")
            engine.print(f"--resume: checkpoint {ckpt} is damaged: {problem}")
        raise PreftuneError(
            f"--resume: no intact checkpoint in {self.root}: "
            + "; ".join(damaged)
            + ". Start again with --overwrite (or another --output-dir)"
        )

    def _set_aside(self, folders: list[Path]) -> None:
        """Rename damaged checkpoints out of the way (kept for inspection, never loaded or
        counted by --save-total-limit), so that they do not displace intact ones."""
        if self.engine.is_main:
            for folder in folders:
                target = folder.with_name(folder.name + ".damaged")
                if target.exists():
                    shutil.rmtree(target, ignore_errors=True)
                os.replace(folder, target)
            fsync_dir(self.root)
        self.engine.accelerator.wait_for_everyone()

    def _load(self, ckpt: Path) -> tuple[dict[str, Any] | None, str | None]:
        engine = self.engine
        problem = None
        state = None
        try:
            state = json.loads((ckpt / STATE_FILE).read_text())
            int(state["step"])
            engine.accelerator.load_state(str(ckpt))
        except Exception as exc:  # noqa: BLE001  (a damaged file shows up as any of a dozen types)
            problem = f"it cannot be loaded ({type(exc).__name__}: {str(exc)[:200]})"
        if problem is None and not all(
            bool(torch.isfinite(p).all()) for p in engine.model.parameters()
        ):
            problem = "it holds non-finite (NaN or inf) weights"
        if engine.any_rank(problem is not None):
            return None, problem or "it cannot be loaded on another process"
        return state, None


def repair_metrics(path: Path, keep_through_step: int, log) -> None:
    """Keep the metrics lines of steps <= `keep_through_step` (none when it is 0: the resumed
    run writes its step-0 evaluation again); drop a torn (unparsable) line with a note."""
    if not path.exists():
        return
    kept, torn = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            step = json.loads(line).get("step", 0)
        except (ValueError, AttributeError):
            torn += 1
            continue
        if keep_through_step > 0 and step <= keep_through_step:
            kept.append(line)
    if torn:
        log(f"--resume: dropped {torn} unreadable line(s) of {path} (a write cut off by a crash)")
    atomic_write_text(path, "".join(line + "\n" for line in kept))
