"""The exception types a user sees as one message, without a traceback.

The CLI catches `PreftuneError`, prints its message and exits with its `exit_code` (2: bad
input, the user's to fix). Subclasses say what else can stop a run cleanly: the training
diverged (`TrainingDiverged`, 3), the disk is full or not writable (`engine.checkpoint.
DiskError`, 2), a signal asked the run to stop (`engine.preemption.Preempted`, 143 or 130).
Anything else is a bug and keeps its traceback.
"""


class PreftuneError(Exception):
    """A user's mistake (bad file, bad column, bad setting). The message says what and where."""

    exit_code = 2


class TrainingDiverged(PreftuneError):
    """A loss or gradient norm became NaN or infinite; the run stopped without saving a model."""

    exit_code = 3
