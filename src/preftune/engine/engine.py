"""The training engine every trainer shares: accelerate, the optimizer, checkpoints, logging.

What it owns, so that a trainer only writes its loss (or its rollout loop):
- accelerate: `accelerate launch` gives DDP, FSDP or DeepSpeed with no change to a trainer;
- AdamW and the learning-rate schedule;
- loss normalisation over the *global* number of loss units (tokens or examples) of an
  optimizer step, so that gradient accumulation and data-parallel sharding give the same
  gradients as one large batch (see `backward`);
- the output folder: owned and locked (`engine/rundir.py`);
- checkpoints that verify themselves, and `--resume` (`engine/checkpoint.py`);
- finite-or-fail: the loss and the gradient norm are checked at every optimizer step;
- graceful preemption on SIGTERM/SIGINT (`engine/preemption.py`);
- `metrics.jsonl`, trackers (`--report-to`) and a progress bar.

Systems code stays here; trainers never touch distributed primitives directly.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from preftune.config import TrainingSettings, config_to_dict, save_config
from preftune.engine import preemption, rundir
from preftune.engine.checkpoint import (  # noqa: F401  (re-exported for trainers and tests)
    CHECKPOINT_DIR,
    KILL_AFTER_CHECKPOINT_ENV,
    STATE_FILE,
    Checkpoints,
    DiskError,
    data_fingerprint,
    disk_error,
    repair_metrics,
)
from preftune.errors import PreftuneError, TrainingDiverged
from preftune.utils import atomic_write_json, file_mode, fsync_dir

# Settings that may differ between a run and its resumption without changing the result.
# The data paths may change (a moved folder, another working directory): the data's
# fingerprint, checked on resume, says whether the data itself changed.
RESUMABLE_DIFFERENCES = {
    "resume",
    "overwrite",
    "report_to",
    "logging_steps",
    "max_steps",
    "epochs",
    "save_steps",
    "save_total_limit",
    "eval_steps",
    "output_dir",
    "data",
    "eval_data",
    "nan_policy",
    "allow_data_change",
    "reward_timeout",
}
# --nan-policy skip-step gives up after this many non-finite steps in a row.
MAX_SKIPPED_IN_A_ROW = 10


@dataclass
class StepBatches:
    """What one process consumes in one optimizer step."""

    step: int  # the optimizer step these batches belong to (1-based)
    epoch: int
    micro_batches: list[list[int]]  # dataset indices, one list per micro-batch


def _cpu_has_native_bf16() -> bool:
    """avx512_bf16 or AMX: the CPU computes bf16 dot products in hardware."""
    cpu = getattr(torch, "cpu", None)
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        fn = getattr(cpu, probe, None)
        if fn is not None and fn():
            return True
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _bf16_speedup_on_cpu(size: int = 512, repeats: int = 5) -> float:
    """fp32 time / bf16-autocast time of one [size, size] x [size, 4 size] linear layer: the
    median over `repeats` interleaved pairs, in process CPU time (so that other processes on a
    shared machine do not decide), about 0.2 s in all. Native bf16 support does not guarantee
    speed (oneDNN may not use it; a virtual machine may hide it), so `auto` measures."""
    x, w = torch.randn(size, size), torch.randn(4 * size, size)

    def timed(autocast: bool) -> float:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            t0 = time.process_time()
            torch.nn.functional.linear(x, w)
            return time.process_time() - t0

    timed(False), timed(True)  # warm-up (weight cast, kernel choice)
    ratios = sorted(timed(False) / max(timed(True), 1e-9) for _ in range(repeats))
    return ratios[len(ratios) // 2]


@functools.lru_cache(maxsize=None)
def _cpu_auto_precision() -> str:
    """Measured once per process: accelerate's state cannot change its precision later."""
    if not _cpu_has_native_bf16():
        return "no"
    return "bf16" if _bf16_speedup_on_cpu() >= CPU_BF16_MIN_SPEEDUP else "no"


# `auto` picks bf16 autocast on the CPU only when the probe shows at least this speed-up.
CPU_BF16_MIN_SPEEDUP = 1.3


def _resolve_mixed_precision(setting: str) -> str:
    """`auto`: bf16 on CUDA devices that support it; on the CPU, bf16 autocast when the CPU
    has native bf16 (avx512_bf16 or AMX) and a probe measures it at least 1.3x faster than
    float32; otherwise no autocast. Losses and log-softmax stay in float32 either way."""
    if setting != "auto":
        return setting
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    if _has_accelerator_device():
        return "no"
    return _cpu_auto_precision()


def _check_mixed_precision(setting: str) -> None:
    if setting == "fp16" and not torch.cuda.is_available():
        # accelerate would run fp16 autocast on the CPU without a word, or fail deep inside
        raise PreftuneError(
            "mixed_precision=fp16 needs a CUDA GPU, and none is available; "
            "use --mixed-precision no (or bf16) on the CPU"
        )


class Engine:
    """One run's accelerate state, optimizer, schedule, checkpoints and metrics."""

    def __init__(self, cfg: TrainingSettings, command: str):
        self.cfg = cfg
        self.command = command
        self.output_dir = Path(cfg.output_dir or f"runs/{command}")
        trackers = [t.strip() for t in cfg.report_to.split(",") if t.strip()]
        _check_mixed_precision(cfg.mixed_precision)
        self.accelerator = Accelerator(
            mixed_precision=_resolve_mixed_precision(cfg.mixed_precision),
            log_with=trackers or None,
            project_dir=str(self.output_dir),
            # The engine steps the schedule once per optimizer step itself; accelerate would
            # otherwise step it once per process.
            step_scheduler_with_optimizer=False,
            # Without an accelerator device, accelerate only sets up gloo data parallelism
            # (`accelerate launch --multi_gpu` on CPUs) when told it runs on the CPU.
            cpu=not _has_accelerator_device(),
        )
        self.is_main = self.accelerator.is_main_process
        if cfg.mixed_precision == "auto":
            self.print(f"mixed precision auto: {self.accelerator.mixed_precision}")
        self.world_size = self.accelerator.num_processes
        self.rank = self.accelerator.process_index
        self.model: torch.nn.Module | None = None
        self.optimizer = None
        self.scheduler = None
        self.total_steps = 0
        self.schedule_steps = 0  # optimizer steps in the schedule (> total_steps when online)
        self.data_fingerprint: str | None = None  # set by the trainer before `maybe_resume`
        self.checkpoints = Checkpoints(self)
        self._metrics_path = self.output_dir / "metrics.jsonl"
        self._progress = None
        self._lock: rundir.RunLock | None = None
        self._names_at_start: set[str] = set()
        self._loss_finite: torch.Tensor | None = None  # all micro-batch losses of this step finite?
        self._skipped_in_a_row = 0
        self._prepare_output_dir()
        # Seeding, in one place: the same seed gives the same run on the CPU.
        set_seed(cfg.seed)
        if trackers:
            self.accelerator.init_trackers(command, config=_flat_config(cfg))

    # --- processes agreeing --------------------------------------------------------------

    def any_rank(self, flag: bool) -> bool:
        """True on every process when `flag` is true on any (a collective call)."""
        if self.world_size == 1:
            return bool(flag)
        t = torch.tensor([1.0 if flag else 0.0], device=self.accelerator.device)
        return bool(self.accelerator.reduce(t, reduction="sum").item() > 0)

    def broadcast(self, obj: Any) -> Any:
        """The main process's `obj`, on every process (a collective call)."""
        if self.world_size == 1:
            return obj
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([obj], from_process=0)[0]

    # --- output directory ----------------------------------------------------------------

    def _prepare_output_dir(self) -> None:
        """Check, lock and claim the output folder on the main process; all processes agree."""
        error: PreftuneError | None = None
        if self.is_main:
            try:
                self._prepare_output_dir_main()
            except PreftuneError as exc:
                error = exc
                if self._lock is not None:
                    self._lock.release()
        message = self.broadcast(str(error) if error is not None else None)
        if error is not None:
            raise error
        if message is not None:
            raise PreftuneError(message)

    def _prepare_output_dir_main(self) -> None:
        cfg, out = self.cfg, self.output_dir
        if out.exists() and not out.is_dir():
            raise PreftuneError(
                f"output_dir {out} is a file, not a folder; choose another --output-dir"
            )
        try:
            out.mkdir(parents=True, exist_ok=True)
            self._lock = rundir.RunLock(out)
            note = self._lock.acquire()
        except OSError as exc:
            raise disk_error(exc, "the run's files", out) from None
        if note:
            self.print(note)
        if rundir.holds_run(out) and not (cfg.overwrite or cfg.resume):
            if rundir.run_started(out):
                raise PreftuneError(
                    f"output directory {out} already holds a run (config.yaml): pass --resume "
                    "to continue it, --overwrite to replace it, or another --output-dir"
                )
            self.print(
                f"{out} holds a run that stopped before its first training step; starting it again"
            )
        if cfg.resume and (out / "config.yaml").exists():
            self._check_resumable(out / "config.yaml")
        foreign = rundir.foreign_entries(out)
        if cfg.overwrite and foreign:
            raise PreftuneError(
                f"--overwrite: {out} holds files no preftune run wrote ("
                f"{rundir.name_list(foreign)}); --overwrite removes only a run's own files, "
                "so move those away or choose another --output-dir"
            )
        collisions = sorted(set(foreign) & set(rundir.RUN_FILES + rundir.MODEL_FILES))
        if collisions:
            raise PreftuneError(
                f"output_dir {out} holds {rundir.name_list(collisions)}, not written by "
                "preftune, which this run would overwrite; choose another --output-dir"
            )
        try:
            if cfg.overwrite:
                rundir.remove_owned(out)
            rundir.claim(out, rundir.RUN_FILES)
            save_config(cfg, out / "config.yaml", extra={"command": self.command})
        except OSError as exc:
            raise disk_error(exc, "config.yaml", out) from None
        self._names_at_start = {p.name for p in out.iterdir()}

    def _check_resumable(self, path: Path) -> None:
        import yaml

        try:
            saved = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise PreftuneError(f"--resume: {path} is unreadable ({exc})") from None
        if not isinstance(saved, dict):
            raise PreftuneError(f"--resume: {path} is not a run's config")
        saved_command = saved.pop("command", self.command)
        if saved_command != self.command:
            raise PreftuneError(
                f"--resume: {self.output_dir} holds a `{saved_command}` run, "
                f"not a `{self.command}` run"
            )
        now = config_to_dict(self.cfg)
        for key, value in saved.items():
            if key in RESUMABLE_DIFFERENCES or key not in now:
                continue
            if now[key] != value:
                raise PreftuneError(
                    f"--resume: setting {key} was {value!r} in the run in {self.output_dir}, "
                    f"now {now[key]!r}; resume with the same settings or start a new run"
                )

    def claim(self, *names: str) -> None:
        """Record top-level entries of the output folder as this run's (for `--overwrite`)."""
        if self.is_main:
            rundir.claim(self.output_dir, names)

    def _claim_new_entries(self) -> None:
        """Claim what appeared in the folder since the start (trainer files, tracker logs)."""
        if self.is_main and self.output_dir.is_dir():
            new = {p.name for p in self.output_dir.iterdir()} - self._names_at_start
            if new:
                rundir.claim(self.output_dir, new)
                self._names_at_start |= new

    def close(self) -> None:
        """Release the output folder's lock (`finish` does; the CLI calls `rundir.release_all`
        for a run that stopped with an error)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # --- model and optimizer -------------------------------------------------------------

    def setup(
        self, model: torch.nn.Module, total_steps: int, schedule_steps: int | None = None
    ) -> torch.nn.Module:
        """Create AdamW and the schedule for the trainable parameters and prepare them.

        `total_steps` counts the engine's steps (progress, checkpoints, resume); the
        learning-rate schedule runs over `schedule_steps` optimizer steps (default: the same;
        an online trainer takes several optimizer steps per training iteration).
        """
        cfg = self.cfg
        self.total_steps = total_steps
        schedule_steps = schedule_steps or total_steps
        self.schedule_steps = schedule_steps
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise PreftuneError("the model has no trainable parameters")
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": cfg.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=cfg.lr,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            # One fused kernel over all parameters (CPU and CUDA) instead of a Python loop.
            fused=_fused_adam_ok(params),
        )
        warmup = cfg.warmup_steps or int(cfg.warmup_ratio * schedule_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, _schedule(cfg.lr_scheduler, warmup, schedule_steps)
        )
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(
            model, optimizer, scheduler
        )
        return self.model

    def prepare_frozen(self, model: torch.nn.Module) -> torch.nn.Module:
        """Prepare a model that is only evaluated (reference, reward model): no optimizer."""
        model.requires_grad_(False)
        model.eval()
        return self.accelerator.prepare_model(model, evaluation_mode=True)

    def unwrap(self, model: torch.nn.Module | None = None) -> torch.nn.Module:
        return self.accelerator.unwrap_model(model if model is not None else self.model)

    # --- data order ----------------------------------------------------------------------

    @property
    def global_batch_size(self) -> int:  # the offline commands' (`config.TrainConfig`)
        return self.cfg.batch_size * self.cfg.grad_accum * self.world_size

    def steps_per_epoch(self, n_examples: int) -> int:
        steps = n_examples // self.global_batch_size
        if steps == 0:
            raise PreftuneError(
                f"the training data has {n_examples} examples, fewer than one global batch of "
                f"{self.global_batch_size} (batch_size x grad_accum x processes): lower "
                "batch_size or grad_accum, or add data"
            )
        return steps

    def planned_steps(self, n_examples: int) -> int:
        if self.cfg.max_steps:
            return self.cfg.max_steps
        return max(1, math.ceil(self.cfg.epochs * self.steps_per_epoch(n_examples)))

    def batches(self, n_examples: int, start_step: int = 0) -> Iterator[StepBatches]:
        """This process's micro-batches for every optimizer step after `start_step`.

        The data order is a pure function of the seed and the step, so a resumed run reads
        exactly the examples the interrupted one would have read next. Every optimizer step
        consumes one global batch; process r takes its slice of it, split into `grad_accum`
        micro-batches. Partial global batches at the end of an epoch are dropped.
        """
        per_epoch = self.steps_per_epoch(n_examples)
        per_process = self.cfg.batch_size * self.cfg.grad_accum
        order = None
        order_epoch = -1
        for step in range(start_step + 1, self.total_steps + 1):
            epoch, position = divmod(step - 1, per_epoch)
            if epoch != order_epoch:
                generator = torch.Generator().manual_seed(self.cfg.seed * 100_003 + epoch)
                order = torch.randperm(n_examples, generator=generator).tolist()
                order_epoch = epoch
            start = position * self.global_batch_size + self.rank * per_process
            mine = order[start : start + per_process]
            micro = [
                mine[i : i + self.cfg.batch_size]
                for i in range(0, per_process, self.cfg.batch_size)
            ]
            yield StepBatches(step=step, epoch=epoch, micro_batches=micro)

    # --- the optimisation step -----------------------------------------------------------

    def global_sum(self, value: float | torch.Tensor) -> float:
        """Sum of a number over all processes."""
        t = torch.as_tensor(value, dtype=torch.float64, device=self.accelerator.device)
        if self.world_size > 1:
            t = self.accelerator.reduce(t.reshape(1), reduction="sum")
        return float(t.sum())

    def sync_context(self, micro_index: int, n_micro: int):
        """Skip the gradient all-reduce on every micro-batch but the last of a step."""
        if micro_index < n_micro - 1 and self.world_size > 1:
            return self.accelerator.no_sync(self.model)
        return contextlib.nullcontext()

    def backward(self, loss_sum: torch.Tensor, global_units: float) -> None:
        """Back-propagate `loss_sum / global_units` as the whole global batch's mean loss.

        `loss_sum` is this micro-batch's summed loss; `global_units` counts the loss units
        (tokens or examples) of the whole optimizer step on all processes. DDP averages
        gradients over processes, so the world size is multiplied back in. Whether the loss
        is finite is noted here and checked (with no extra device sync) at the optimizer step.
        """
        finite = torch.isfinite(loss_sum.detach()).all()
        self._loss_finite = finite if self._loss_finite is None else self._loss_finite & finite
        self.accelerator.backward(loss_sum * (self.world_size / max(global_units, 1e-12)))

    def optimizer_step(self) -> float:
        """Clip, check, step the optimizer and the schedule, zero the gradients; return the norm.

        Finite or fail: a non-finite loss (of any micro-batch on any process) or gradient norm
        stops the run before the optimizer touches the weights, naming the step and the
        quantity; with `--nan-policy skip-step` the update is skipped instead (the schedule
        still advances) and the run stops after `MAX_SKIPPED_IN_A_ROW` such steps in a row.
        """
        opt_step = _inner(self.scheduler).last_epoch + 1  # restored by --resume
        preemption.maybe_send_test_signal(opt_step, self.rank)
        max_norm = self.cfg.max_grad_norm or float("inf")
        params = [p for p in self.model.parameters() if p.requires_grad]
        grad_norm = self.accelerator.clip_grad_norm_(params, max_norm)
        norm = float(grad_norm) if grad_norm is not None else float("nan")
        loss_ok = True if self._loss_finite is None else bool(self._loss_finite)
        self._loss_finite = None
        bad_loss = self.any_rank(not loss_ok)
        bad_norm = not math.isfinite(norm) if grad_norm is not None else False
        if bad_loss or bad_norm:
            self.optimizer.zero_grad(set_to_none=True)
            what = "the loss" if bad_loss else f"the gradient norm ({norm})"
            where = self._describe_step(opt_step)
            if self.cfg.nan_policy == "skip-step":
                self._skipped_in_a_row += 1
                if self._skipped_in_a_row <= MAX_SKIPPED_IN_A_ROW:
                    self.print(
                        f"{where}: {what} is not finite (NaN or inf); skipped this "
                        "update (--nan-policy skip-step)"
                    )
                    self.scheduler.step()
                    return norm
            raise TrainingDiverged(
                f"{where}: {what} is not finite (NaN or inf)"
                + (f", {MAX_SKIPPED_IN_A_ROW + 1} steps in a row" if self._skipped_in_a_row else "")
                + "; the run stopped without saving a model (the checkpoints written so far are "
                "intact). Lower --lr, check the data, or set --max-grad-norm"
            )
        self._skipped_in_a_row = 0
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def _describe_step(self, opt_step: int) -> str:
        per_iteration = self.schedule_steps // max(self.total_steps, 1)
        if per_iteration > 1:
            return (
                f"optimizer step {opt_step} (training iteration "
                f"{math.ceil(opt_step / per_iteration)})"
            )
        return f"step {opt_step}"

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    # --- metrics -------------------------------------------------------------------------

    def reduce_metrics(self, sums: dict[str, float], counts: dict[str, float]) -> dict[str, float]:
        """Means over all processes of metrics kept as (sum, count) pairs."""
        names = sorted(sums)
        if not names:
            return {}
        t = torch.tensor(
            [[sums[n], counts[n]] for n in names],
            dtype=torch.float64,
            device=self.accelerator.device,
        )
        if self.world_size > 1:
            t = self.accelerator.reduce(t, reduction="sum")
        return {
            n: (float(t[i, 0] / t[i, 1]) if t[i, 1] > 0 else float("nan"))
            for i, n in enumerate(names)
        }

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Append one line to metrics.jsonl (main process) and send it to the trackers."""
        record = {"step": step, **{k: _round(v) for k, v in metrics.items()}}
        if self.is_main:
            try:
                with open(self._metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                    f.flush()
            except OSError as exc:
                raise disk_error(exc, "metrics.jsonl", self.output_dir) from None
        if self.cfg.report_to:
            self.accelerator.log(metrics, step=step)

    def progress(self, start_step: int, desc: str | None = None):
        """A progress bar over optimizer steps; quiet when stderr is not a terminal."""
        self._progress = tqdm(
            total=self.total_steps,
            initial=start_step,
            desc=desc or self.command,
            disable=not (self.is_main and sys.stderr.isatty()),
            dynamic_ncols=True,
        )
        return self._progress

    def print(self, *args) -> None:
        if self.is_main:
            print(*args, file=sys.stderr, flush=True)

    # --- checkpoints and the end of a step ------------------------------------------------

    @property
    def checkpoint_root(self) -> Path:
        return self.checkpoints.root

    def latest_checkpoint(self) -> Path | None:
        """The newest committed checkpoint (not verified; `maybe_resume` verifies)."""
        done = self.checkpoints.committed()
        return done[0] if done else None

    def save_checkpoint(self, step: int, state: dict[str, Any] | None = None) -> Path:
        """Write a self-verifying checkpoint of `step` (see `engine/checkpoint.py`)."""
        path = self.checkpoints.save(step, state)
        self._claim_new_entries()
        return path

    def should_save(self, step: int) -> bool:
        return (
            bool(self.cfg.save_steps)
            and step % self.cfg.save_steps == 0
            and step < self.total_steps
        )

    def step_done(self, step: int, state: dict[str, Any] | None = None) -> None:
        """The end of training step `step`: checkpoint every `save_steps`, and stop here with a
        checkpoint when SIGTERM/SIGINT arrived (all processes agree on whether it did)."""
        saved = None
        if self.should_save(step):
            saved = self.save_checkpoint(step, state)
        watch = preemption.WATCH
        signum = watch.signum if (watch.installed and watch.signum is not None) else 0
        if self.world_size > 1:
            t = torch.tensor([float(signum)], device=self.accelerator.device)
            signum = int(self.accelerator.reduce(t, reduction="max").item())
        if not signum:
            return
        if saved is None:
            saved = self.save_checkpoint(step, state)
        name = preemption.signal.Signals(signum).name
        raise preemption.Preempted(
            f"stopped by {name} after step {step} of {self.total_steps}; checkpoint {saved} "
            "written",
            signum,
            resumable=True,
        )

    def maybe_resume(self) -> dict[str, Any]:
        """Load the newest intact checkpoint when `--resume` was given; return its trainer
        state ({"step": 0} for a fresh start). From here on a signal stops the run gracefully."""
        preemption.WATCH.training = True
        if not self.cfg.resume:
            self._repair_metrics(0)
            return {"step": 0}
        state = self.checkpoints.load_newest_intact()
        if state is None:
            self.print(f"--resume: no checkpoint in {self.checkpoint_root}; starting from step 0")
            self._repair_metrics(0)
            return {"step": 0}
        saved_fp, now_fp = state.get("data_fingerprint"), self.data_fingerprint
        if saved_fp and now_fp and saved_fp != now_fp:
            if not self.cfg.allow_data_change:
                raise PreftuneError(
                    f"--resume: the training data differs from the data checkpoint step-"
                    f"{state['step']} was trained on ({_examples(saved_fp)} then, "
                    f"{_examples(now_fp)} now, different contents); resume with the same data, "
                    "or pass --allow-data-change to continue on the new data"
                )
            self.print(
                "--resume: the training data changed since the checkpoint; continuing "
                "on the new data (--allow-data-change)"
            )
        self._repair_metrics(int(state["step"]))
        self.print(
            f"resumed from {self.checkpoint_root / ('step-' + str(state['step']))} "
            f"(step {state['step']})"
        )
        return state

    def _repair_metrics(self, step: int) -> None:
        """Drop metric lines the resumed run will write again, and a torn last line."""
        if self.is_main:
            try:
                repair_metrics(self._metrics_path, step, self.print)
            except OSError as exc:
                raise disk_error(exc, "metrics.jsonl", self.output_dir) from None
        self.accelerator.wait_for_everyone()

    # --- final model ---------------------------------------------------------------------

    def save_pretrained(
        self, model: torch.nn.Module, tokenizer=None, *, prefix: str = "", subdir: str = ""
    ) -> Path:
        """Save the final model (safetensors) and tokenizer with `save_pretrained`.

        `model` is the Hugging Face model inside the prepared module; `prefix` is its
        attribute path in that module, stripped from the gathered state dict (which FSDP and
        DeepSpeed need to gather shards). Files go to a temporary folder first, are claimed
        as the run's, and are moved into place one by one; `run_complete.json` is written last.
        """
        target = self.output_dir / subdir if subdir else self.output_dir
        state_dict = self.accelerator.get_state_dict(self.model)
        if prefix:
            state_dict = {
                k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)
            }
        error: OSError | None = None
        if self.is_main:
            tmp = self.output_dir / ".tmp-final"
            try:
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir(parents=True)
                if _is_peft(model):
                    model.save_pretrained(str(tmp))  # adapters (and modules_to_save) only
                else:
                    model.save_pretrained(str(tmp), state_dict=state_dict, safe_serialization=True)
                if tokenizer is not None:
                    tokenizer.save_pretrained(str(tmp))
                mode = file_mode()
                for item in tmp.rglob("*"):
                    if item.is_file():
                        os.chmod(item, mode)
                self.claim(
                    *([subdir.split("/")[0]] if subdir else [item.name for item in tmp.iterdir()])
                )
                target.mkdir(parents=True, exist_ok=True)
                for item in tmp.iterdir():
                    dest = target / item.name
                    if dest.is_dir():
                        shutil.rmtree(dest)
                    os.replace(item, dest)
                shutil.rmtree(tmp)
                fsync_dir(target)
            except OSError as exc:
                shutil.rmtree(tmp, ignore_errors=True)
                error = exc
        if self.any_rank(error is not None):
            raise (
                disk_error(error, "the final model", target)
                if error
                else DiskError("saving the final model failed on the main process")
            )
        return target

    def finish(self, summary: dict[str, Any]) -> None:
        """Mark the run complete, close trackers, release the output folder."""
        if self.is_main:
            try:
                from preftune.engine.model_card import write_run_outputs  # curves.png, README.md

                write_run_outputs(self.output_dir, self.command, self.cfg, summary)
                atomic_write_json(
                    self.output_dir / "run_complete.json",
                    {"command": self.command, "finished_at": time.time(), **summary},
                )
            except OSError as exc:
                raise disk_error(exc, "run_complete.json", self.output_dir) from None
            self._claim_new_entries()
        if self._progress is not None:
            self._progress.close()
        if self.cfg.report_to:
            self.accelerator.end_training()
        self.accelerator.wait_for_everyone()
        self.close()


def _examples(fingerprint: str) -> str:
    return f"{fingerprint.split(':', 1)[0]} examples"


def _fused_adam_ok(params) -> bool:
    return all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)


def _has_accelerator_device() -> bool:
    xpu = getattr(torch, "xpu", None)
    mps = getattr(torch.backends, "mps", None)
    return bool(
        torch.cuda.is_available()
        or (xpu is not None and xpu.is_available())
        or (mps is not None and mps.is_available())
    )


def _schedule(name: str, warmup: int, total: int):
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / (warmup + 1)
        if name == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        progress = min(max(progress, 0.0), 1.0)
        if name == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config")


def _round(v: Any) -> Any:
    if isinstance(v, float):
        return float(f"{v:.6g}") if math.isfinite(v) else v
    return v


def _flat_config(cfg: TrainingSettings) -> dict[str, Any]:
    return {k: v for k, v in config_to_dict(cfg).items() if isinstance(v, (int, float, str, bool))}


def _inner(scheduler):
    """The torch scheduler inside accelerate's wrapper."""
    return getattr(scheduler, "scheduler", scheduler)
