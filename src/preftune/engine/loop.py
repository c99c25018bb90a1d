"""The offline training loop shared by SFT, the DPO family, KTO and reward modelling.

A trainer hands it an `Objective`: how many loss units a batch holds (tokens or examples)
and the summed loss of a batch with its per-example metrics. The loop reads top to bottom:
collate → count the global units → forward/backward each micro-batch → optimizer step →
log → evaluate → checkpoint.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from typing import Any, Callable, Protocol, Sequence

import torch

from preftune.engine.engine import Engine, data_fingerprint
from preftune.models.packing import PackedBatch


class Objective(Protocol):
    def units(self, batch: dict[str, Any]) -> float:
        """Loss units in this batch (tokens or examples); the loss is their global mean."""

    def __call__(
        self, module: torch.nn.Module, batch: dict[str, Any]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(summed loss over the batch's units, per-example detached metrics)."""


class MetricWindow:
    """Running (sum, count) of metrics between two logging steps."""

    def __init__(self):
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, float] = defaultdict(float)

    def add(self, name: str, value: torch.Tensor | float, count: float | None = None) -> None:
        if isinstance(value, torch.Tensor):
            value = value.detach().float()
            if value.ndim == 0:
                self.sums[name] += float(value)
                self.counts[name] += 1.0 if count is None else count
            else:
                finite = value[torch.isfinite(value)]
                self.sums[name] += float(finite.sum())
                self.counts[name] += float(finite.numel())
        else:
            self.sums[name] += float(value)
            self.counts[name] += 1.0 if count is None else count

    def add_all(self, metrics: dict[str, torch.Tensor]) -> None:
        for name, value in metrics.items():
            self.add(name, value)

    def reduce(self, engine: Engine) -> dict[str, float]:
        out = engine.reduce_metrics(dict(self.sums), dict(self.counts))
        self.sums.clear()
        self.counts.clear()
        return out


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {
        k: (v.to(device) if isinstance(v, (torch.Tensor, PackedBatch)) else v)
        for k, v in batch.items()
    }


def _count_tokens(batch: dict[str, Any]) -> int:
    mask = batch.get("attention_mask")
    return int(mask.sum()) if isinstance(mask, torch.Tensor) else 0


def train_offline(
    engine: Engine,
    module: torch.nn.Module,
    train_set: Sequence[Any],
    collate: Callable[[list[Any]], dict[str, Any]],
    objective: Objective,
    *,
    eval_set: Sequence[Any] | None = None,
    eval_fn: Callable[[], dict[str, float]] | None = None,
) -> dict[str, float]:
    """Run the optimisation; return the last logged training and evaluation metrics."""
    cfg = engine.cfg
    device = engine.accelerator.device
    engine.data_fingerprint = data_fingerprint(train_set)
    state = engine.maybe_resume()
    start = int(state["step"])
    bar = engine.progress(start)
    window = MetricWindow()
    window_tokens = window_examples = 0.0
    window_time = 0.0
    window_steps = 0
    last: dict[str, float] = {}

    def run_eval() -> dict[str, float]:
        if eval_fn is not None:
            return eval_fn()
        if eval_set is not None and len(eval_set):
            return evaluate(engine, module, eval_set, collate, objective)
        return {}

    if start == 0:  # the starting point, so that every run shows how far held-out loss moved
        ev = run_eval()
        if ev:
            engine.log(0, ev)
    for sb in engine.batches(len(train_set), start):
        t0 = time.perf_counter()
        batches = [
            to_device(collate([train_set[i] for i in mb]), device) for mb in sb.micro_batches
        ]
        global_units = engine.global_sum(sum(objective.units(b) for b in batches))
        module.train()
        for i, batch in enumerate(batches):
            with engine.sync_context(i, len(batches)):
                loss_sum, metrics = objective(module, batch)
                engine.backward(loss_sum, global_units)
            window.add("loss", loss_sum.detach(), count=objective.units(batch))
            window.add_all(metrics)
            window_tokens += _count_tokens(batch)
            window_examples += len(sb.micro_batches[i])
        grad_norm = engine.optimizer_step()
        window.add("grad_norm", grad_norm)
        window_time += time.perf_counter() - t0
        window_steps += 1
        bar.update(1)

        step = sb.step
        if step % cfg.logging_steps == 0 or step == engine.total_steps:
            logged = window.reduce(engine)
            tokens = engine.global_sum(window_tokens)
            examples = engine.global_sum(window_examples)
            logged.update(
                {
                    "lr": engine.lr,
                    "epoch": sb.epoch + 1,
                    "tokens_per_s": tokens / max(window_time, 1e-9),
                    "examples_per_s": examples / max(window_time, 1e-9),
                    "step_time_s": window_time / max(window_steps, 1),
                }
            )
            engine.log(step, logged)
            last = logged
            bar.set_postfix(loss=f"{logged.get('loss', math.nan):.4f}")
            window_tokens = window_examples = window_time = 0.0
            window_steps = 0
        if cfg.eval_steps and step % cfg.eval_steps == 0 and step < engine.total_steps:
            ev = run_eval()
            if ev:
                engine.log(step, ev)
                last.update(ev)
        engine.step_done(step)  # checkpoint every save_steps; stop here on SIGTERM/SIGINT

    ev = run_eval()
    if ev:
        engine.log(engine.total_steps, ev)
        last.update(ev)
    return last


@torch.no_grad()
def evaluate(
    engine: Engine,
    module: torch.nn.Module,
    eval_set: Sequence[Any],
    collate: Callable[[list[Any]], dict[str, Any]],
    objective: Objective,
    prefix: str = "eval/",
) -> dict[str, float]:
    """Loss and metrics on held-out data, sharded over processes.

    Every process runs the same number of forward passes (a process with fewer examples
    repeats a batch and discards it) so that wrapped models never wait on each other.
    """
    device = engine.accelerator.device
    bs = engine.cfg.batch_size
    mine = list(range(engine.rank, len(eval_set), engine.world_size))
    n_batches = math.ceil(math.ceil(len(eval_set) / engine.world_size) / bs)
    was_training = module.training
    module.eval()
    window = MetricWindow()
    for b in range(n_batches):
        idx = mine[b * bs : (b + 1) * bs]
        real = bool(idx)
        batch = to_device(collate([eval_set[i] for i in (idx or mine[:bs] or [0])]), device)
        loss_sum, metrics = objective(module, batch)
        if real:
            window.add("loss", loss_sum.detach(), count=objective.units(batch))
            window.add_all(metrics)
    module.train(was_training)
    return {prefix + k: v for k, v in window.reduce(engine).items()}
