"""The training engine every trainer shares: accelerate, the optimizer, checkpoints, logging.

What it owns, so that a trainer only writes its loss (or its rollout loop):
- accelerate: `accelerate launch` gives DDP, FSDP or DeepSpeed with no change to a trainer;
- AdamW and the learning-rate schedule;
- loss normalisation over the *global* number of loss units (tokens or examples) of an
  optimizer step, so that gradient accumulation and data-parallel sharding give the same
  gradients as one large batch (see `backward`);
- atomic checkpoints (model, optimizer, scheduler, RNG states, data position) and `--resume`;
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
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from preftune.config import TrainConfig, config_to_dict, save_config
from preftune.errors import PreftuneError
from preftune.utils import atomic_write_json, atomic_write_text

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"
# Settings that may differ between a run and its resumption without changing the result.
RESUMABLE_DIFFERENCES = {"resume", "overwrite", "report_to", "logging_steps", "max_steps",
                         "epochs", "save_steps", "save_total_limit", "eval_steps"}
# Test hook: SIGKILL this process right after the checkpoint of this step is committed.
KILL_AFTER_CHECKPOINT_ENV = "PREFTUNE_TEST_KILL_AFTER_CHECKPOINT"


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


class Engine:
    """One run's accelerate state, optimizer, schedule, checkpoints and metrics."""

    def __init__(self, cfg: TrainConfig, command: str):
        self.cfg = cfg
        self.command = command
        self.output_dir = Path(cfg.output_dir or f"runs/{command}")
        trackers = [t.strip() for t in cfg.report_to.split(",") if t.strip()]
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
        self._prepare_output_dir()
        # Seeding, in one place: the same seed gives the same run on the CPU.
        set_seed(cfg.seed)
        if trackers:
            self.accelerator.init_trackers(command, config=_flat_config(cfg))
        self.model: torch.nn.Module | None = None
        self.optimizer = None
        self.scheduler = None
        self.total_steps = 0
        self._metrics_path = self.output_dir / "metrics.jsonl"
        self._progress = None

    # --- output directory ----------------------------------------------------------------

    def _prepare_output_dir(self) -> None:
        cfg, out = self.cfg, self.output_dir
        existing = out / "config.yaml"
        if existing.exists() and not (cfg.overwrite or cfg.resume):
            raise PreftuneError(
                f"output directory {out} already holds a run (config.yaml): pass --resume to "
                "continue it, --overwrite to replace it, or another --output-dir")
        if cfg.resume and existing.exists():
            self._check_resumable(existing)
        self.accelerator.wait_for_everyone()
        if self.is_main:
            if cfg.overwrite and out.exists():
                for child in out.iterdir():
                    if child.is_dir():
                        shutil.rmtree(child)
                    else:
                        child.unlink()
            out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, out / "config.yaml", extra={"command": self.command})
        self.accelerator.wait_for_everyone()

    def _check_resumable(self, path: Path) -> None:
        import yaml

        saved = yaml.safe_load(path.read_text()) or {}
        saved_command = saved.pop("command", self.command)
        if saved_command != self.command:
            raise PreftuneError(f"--resume: {self.output_dir} holds a `{saved_command}` run, "
                                f"not a `{self.command}` run")
        now = config_to_dict(self.cfg)
        for key, value in saved.items():
            if key in RESUMABLE_DIFFERENCES or key not in now:
                continue
            if now[key] != value:
                raise PreftuneError(
                    f"--resume: setting {key} was {value!r} in the run in {self.output_dir}, "
                    f"now {now[key]!r}; resume with the same settings or start a new run")

    # --- model and optimizer -------------------------------------------------------------

    def setup(self, model: torch.nn.Module, total_steps: int,
              schedule_steps: int | None = None) -> torch.nn.Module:
        """Create AdamW and the schedule for the trainable parameters and prepare them.

        `total_steps` counts the engine's steps (progress, checkpoints, resume); the
        learning-rate schedule runs over `schedule_steps` optimizer steps (default: the same;
        an online trainer takes several optimizer steps per training iteration).
        """
        cfg = self.cfg
        self.total_steps = total_steps
        schedule_steps = schedule_steps or total_steps
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise PreftuneError("the model has no trainable parameters")
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
            # One fused kernel over all parameters (CPU and CUDA) instead of a Python loop.
            fused=_fused_adam_ok(params))
        warmup = cfg.warmup_steps or int(cfg.warmup_ratio * schedule_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, _schedule(cfg.lr_scheduler, warmup, schedule_steps))
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(
            model, optimizer, scheduler)
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
    def global_batch_size(self) -> int:
        return self.cfg.batch_size * self.cfg.grad_accum * self.world_size

    def steps_per_epoch(self, n_examples: int) -> int:
        steps = n_examples // self.global_batch_size
        if steps == 0:
            raise PreftuneError(
                f"the training data has {n_examples} examples, fewer than one global batch of "
                f"{self.global_batch_size} (batch_size x grad_accum x processes): lower "
                "batch_size or grad_accum, or add data")
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
            mine = order[start:start + per_process]
            micro = [mine[i:i + self.cfg.batch_size]
                     for i in range(0, per_process, self.cfg.batch_size)]
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
        gradients over processes, so the world size is multiplied back in.
        """
        self.accelerator.backward(loss_sum * (self.world_size / max(global_units, 1e-12)))

    def optimizer_step(self) -> float:
        """Clip, step the optimizer and the schedule, zero the gradients; return the norm."""
        max_norm = self.cfg.max_grad_norm or float("inf")
        params = [p for p in self.model.parameters() if p.requires_grad]
        grad_norm = self.accelerator.clip_grad_norm_(params, max_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm) if grad_norm is not None else float("nan")

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    # --- metrics -------------------------------------------------------------------------

    def reduce_metrics(self, sums: dict[str, float], counts: dict[str, float]) -> dict[str, float]:
        """Means over all processes of metrics kept as (sum, count) pairs."""
        names = sorted(sums)
        if not names:
            return {}
        t = torch.tensor([[sums[n], counts[n]] for n in names], dtype=torch.float64,
                         device=self.accelerator.device)
        if self.world_size > 1:
            t = self.accelerator.reduce(t, reduction="sum")
        return {n: (float(t[i, 0] / t[i, 1]) if t[i, 1] > 0 else float("nan"))
                for i, n in enumerate(names)}

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Append one line to metrics.jsonl (main process) and send it to the trackers."""
        record = {"step": step, **{k: _round(v) for k, v in metrics.items()}}
        if self.is_main:
            with open(self._metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()
        if self.cfg.report_to:
            self.accelerator.log(metrics, step=step)

    def progress(self, start_step: int, desc: str | None = None):
        """A progress bar over optimizer steps; quiet when stderr is not a terminal."""
        self._progress = tqdm(total=self.total_steps, initial=start_step, desc=desc or self.command,
                              disable=not (self.is_main and sys.stderr.isatty()), dynamic_ncols=True)
        return self._progress

    def print(self, *args) -> None:
        if self.is_main:
            print(*args, file=sys.stderr, flush=True)

    # --- checkpoints ---------------------------------------------------------------------

    @property
    def checkpoint_root(self) -> Path:
        return self.output_dir / CHECKPOINT_DIR

    def latest_checkpoint(self) -> Path | None:
        """The committed checkpoint with the highest step; half-written ones are ignored."""
        if not self.checkpoint_root.is_dir():
            return None
        done = [p for p in self.checkpoint_root.glob("step-*") if (p / STATE_FILE).is_file()]
        if not done:
            return None
        return max(done, key=lambda p: int(p.name.split("-")[1]))

    def save_checkpoint(self, step: int, state: dict[str, Any] | None = None) -> Path:
        """Write everything needed to continue, then commit it with one atomic rename.

        The checkpoint is written into a hidden temporary folder; only after every file is
        on disk is the folder renamed to `step-N`. A crash while writing leaves a temporary
        folder that `latest_checkpoint` never picks up.
        """
        root = self.checkpoint_root
        tmp = root / f".tmp-step-{step}"
        final = root / f"step-{step}"
        if self.is_main:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(tmp), safe_serialization=True)
        if self.is_main:
            trainer_state = {"step": step, "total_steps": self.total_steps, **(state or {})}
            atomic_write_json(tmp / STATE_FILE, trainer_state)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(root)
            self._prune_checkpoints()
        self.accelerator.wait_for_everyone()
        if os.environ.get(KILL_AFTER_CHECKPOINT_ENV) == str(step):
            os.kill(os.getpid(), signal.SIGKILL)
        return final

    def _prune_checkpoints(self) -> None:
        limit = self.cfg.save_total_limit
        if not limit:
            return
        done = sorted((p for p in self.checkpoint_root.glob("step-*")),
                      key=lambda p: int(p.name.split("-")[1]))
        for old in done[:-limit]:
            shutil.rmtree(old, ignore_errors=True)

    def maybe_resume(self) -> dict[str, Any]:
        """Load the latest checkpoint when `--resume` was given; return its trainer state."""
        if not self.cfg.resume:
            self._truncate_metrics(0)
            return {"step": 0}
        ckpt = self.latest_checkpoint()
        if ckpt is None:
            self.print(f"--resume: no checkpoint in {self.checkpoint_root}; starting from step 0")
            self._truncate_metrics(0)
            return {"step": 0}
        self.accelerator.load_state(str(ckpt))
        state = json.loads((ckpt / STATE_FILE).read_text())
        self._truncate_metrics(state["step"])
        self.print(f"resumed from {ckpt} (step {state['step']})")
        return state

    def _truncate_metrics(self, step: int) -> None:
        """Drop metric lines the resumed run will write again."""
        if not self.is_main or not self._metrics_path.exists():
            return
        kept = [line for line in self._metrics_path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        atomic_write_text(self._metrics_path, "".join(line + "\n" for line in kept))

    def should_save(self, step: int) -> bool:
        return bool(self.cfg.save_steps) and step % self.cfg.save_steps == 0 and step < self.total_steps

    # --- final model ---------------------------------------------------------------------

    def save_pretrained(self, model: torch.nn.Module, tokenizer=None, *, prefix: str = "",
                        subdir: str = "") -> Path:
        """Save the final model (safetensors) and tokenizer with `save_pretrained`.

        `model` is the Hugging Face model inside the prepared module; `prefix` is its
        attribute path in that module, stripped from the gathered state dict (which FSDP and
        DeepSpeed need to gather shards). Files go to a temporary folder first and are moved
        into place one by one; `run_complete.json` is written last.
        """
        target = self.output_dir / subdir if subdir else self.output_dir
        state_dict = self.accelerator.get_state_dict(self.model)
        if prefix:
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if self.is_main:
            tmp = self.output_dir / ".tmp-final"
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
            if _is_peft(model):
                model.save_pretrained(str(tmp))  # adapters (and modules_to_save) only
            else:
                model.save_pretrained(str(tmp), state_dict=state_dict, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
            target.mkdir(parents=True, exist_ok=True)
            for item in tmp.iterdir():
                dest = target / item.name
                if dest.is_dir():
                    shutil.rmtree(dest)
                os.replace(item, dest)
            shutil.rmtree(tmp)
        self.accelerator.wait_for_everyone()
        return target

    def finish(self, summary: dict[str, Any]) -> None:
        """Mark the run complete and close trackers."""
        if self.is_main:
            from preftune.engine.model_card import write_run_outputs  # curves.png, README.md
            write_run_outputs(self.output_dir, self.command, self.cfg, summary)
            atomic_write_json(self.output_dir / "run_complete.json",
                              {"command": self.command, "finished_at": time.time(), **summary})
        if self._progress is not None:
            self._progress.close()
        if self.cfg.report_to:
            self.accelerator.end_training()
        self.accelerator.wait_for_everyone()


def _fused_adam_ok(params) -> bool:
    return all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)


def _has_accelerator_device() -> bool:
    xpu = getattr(torch, "xpu", None)
    mps = getattr(torch.backends, "mps", None)
    return bool(torch.cuda.is_available() or (xpu is not None and xpu.is_available())
                or (mps is not None and mps.is_available()))


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


def _flat_config(cfg: TrainConfig) -> dict[str, Any]:
    return {k: v for k, v in config_to_dict(cfg).items() if isinstance(v, (int, float, str, bool))}


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
