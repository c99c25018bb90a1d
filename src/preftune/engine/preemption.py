"""Graceful preemption: SIGTERM (schedulers, spot instances) and SIGINT (Ctrl-C).

While training, the first signal only raises a flag: the engine finishes the current step
(an online trainer: the current iteration, the unit its checkpoints are made of), writes a
checkpoint and stops with `Preempted` (exit 143 for SIGTERM, 130 for SIGINT). All processes of
a multi-process run agree on the step (`Engine.step_done` reduces the flag over processes), so
a signal that reaches only some of them still stops all at the same step.

A second signal exits at once (checkpoints are committed atomically, so nothing half-written
is ever taken for a checkpoint). A repeat within `REPEAT_WINDOW_S` of the first counts as the
same one: a Ctrl-C reaches every process of the terminal's process group *and* is forwarded by
`accelerate launch` to its workers.

Before training starts (loading models, reading data) there is nothing to save: a signal
stops the command right away.

The handlers are installed by the CLI around one command (`handling()`); library users who
call a trainer directly keep Python's default behaviour.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time

from preftune.errors import PreftuneError

REPEAT_WINDOW_S = 2.0
EXIT_CODES = {signal.SIGTERM: 143, signal.SIGINT: 130}
# Test hook "N" or "N:INT": send SIGTERM (SIGINT) to this process (rank 0 only) during
# optimizer step N, as a scheduler would.
SIGNAL_AT_STEP_ENV = "PREFTUNE_TEST_SIGNAL_AT_STEP"


class Preempted(PreftuneError):
    """The run stopped on a signal; a checkpoint to resume from was written (or none needed)."""

    def __init__(self, message: str, signum: int, resumable: bool):
        super().__init__(message)
        self.exit_code = EXIT_CODES.get(signum, 128 + signum)
        self.resumable = resumable


class StoppedBeforeTraining(BaseException):
    """SIGTERM before training started: nothing to save. A BaseException, like
    KeyboardInterrupt, so that no `except Exception` on the way swallows it."""

    exit_code = EXIT_CODES[signal.SIGTERM]


class SignalWatch:
    """What the handler saw: the first signal's number and time, and whether training runs."""

    def __init__(self):
        self.signum: int | None = None
        self.first_at = 0.0
        self.training = False
        self.installed = False

    def handle(self, signum: int, frame) -> None:
        now = time.monotonic()
        name = signal.Signals(signum).name
        if self.signum is None:
            self.signum, self.first_at = signum, now
            if not self.training:
                if signum == signal.SIGINT:
                    raise KeyboardInterrupt
                raise StoppedBeforeTraining
            if _is_main_rank():
                print(
                    f"preftune: {name} received: finishing the current step and writing a "
                    "checkpoint (send it again to stop at once)",
                    file=sys.stderr,
                    flush=True,
                )
            return
        if now - self.first_at < REPEAT_WINDOW_S:
            return
        if _is_main_rank():
            print(
                f"preftune: second {name}: stopping at once without a checkpoint",
                file=sys.stderr,
                flush=True,
            )
        os._exit(EXIT_CODES.get(signum, 128 + signum))


WATCH = SignalWatch()


@contextlib.contextmanager
def handling():
    """Install the handlers for one command (main thread only); restore the old ones after."""
    global WATCH
    WATCH = SignalWatch()
    if threading.current_thread() is not threading.main_thread():
        yield WATCH
        return
    old = {sig: signal.signal(sig, WATCH.handle) for sig in EXIT_CODES}
    WATCH.installed = True
    try:
        yield WATCH
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        WATCH.installed = False


def _is_main_rank() -> bool:
    return os.environ.get("RANK", "0") == "0"


def maybe_send_test_signal(optimizer_step: int, rank: int) -> None:
    spec = os.environ.get(SIGNAL_AT_STEP_ENV)
    if not spec or rank != 0:
        return
    step, _, name = spec.partition(":")
    if int(step) == optimizer_step:
        os.kill(os.getpid(), signal.SIGINT if name.upper() == "INT" else signal.SIGTERM)
