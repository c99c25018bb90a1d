"""The settings and the start and end of every online training run (PPO, GRPO, RLOO, online DPO).

Every online trainer reads as numbered phases per training iteration (CleanRL style):

    1. rollout (`trainers/rollout.py`: sample, decode, score, reference and π_old log-probs)
    2. advantages or pairs (the trainer)
    3. updates (the trainer; `trainers/updates.py` iterates epochs, minibatches, micro-batches)
    4. log and checkpoint (`end_iteration`, here)

Before the loop, a trainer calls, in order: `load_online` (policy, tokenizer, prompts, reward
source), `build_reference` (`trainers/reference.py`), `engine.setup` with
`planned_rollouts` iterations, `make_generator_backend`, `resume`. After it: `finish`.
`max_steps` counts training iterations (rollouts); each may hold several optimizer steps.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from preftune.config import TrainingSettings, arg
from preftune.engine.checkpoint import data_fingerprint
from preftune.errors import PreftuneError
from preftune.trainers.common import load_policy
from preftune.trainers.rollout import RolloutBatch, RolloutSettings, load_prompts, load_reward
from preftune.trainers.rollout import rollout_metrics

NO_GRAD_ACCUM = (
    "online trainers split each rollout into micro-batches of batch_size rows "
    "themselves; use --batch-size (and --num-minibatches where the command has it)"
)
NO_EVAL = (
    "online trainers have no held-out evaluation; the reward of each rollout is logged instead"
)


@dataclass
class OnlineConfig(RolloutSettings, TrainingSettings):
    """Settings of every online training command (each trainer adds its own): the training
    blocks and the rollout's, without gradient accumulation or held-out evaluation."""

    ABSENT_SETTINGS: ClassVar[dict[str, str]] = {
        "grad_accum": NO_GRAD_ACCUM,
        "eval_data": NO_EVAL,
        "eval_fraction": NO_EVAL,
        "eval_steps": NO_EVAL,
    }

    data: str = arg(
        "demo",
        "Prompts: any file or dataset with a prompt (prompt-only, "
        "preference pairs, conversations; extra columns go to the reward "
        "function). `demo` is the built-in HH-RLHF sample.",
    )
    max_steps: int = arg(
        0, "Training iterations (one rollout each) to run (0: use `epochs` over the prompts)."
    )
    batch_size: int = arg(
        8,
        "Rows (completions; pairs for online DPO) per device per forward "
        "pass in the updates; a minibatch is split into such micro-batches.",
    )
    logging_steps: int = arg(1, "Log metrics every this many training iterations.")
    lr: float = arg(1e-5, "Peak learning rate (AdamW).")
    prompts_per_step: int = arg(
        16,
        "Prompts per rollout over all processes (the rollout "
        "batch); each gets num_generations completions.",
    )
    num_generations: int = arg(1, "Completions sampled per prompt in each rollout.")
    ref_model: str = arg(
        "",
        "Reference policy (default: the initial policy; with --lora the "
        "policy with its adapters disabled, no copy).",
    )

    def check(self) -> None:
        for name in ("prompts_per_step", "num_generations"):
            if getattr(self, name) < 1:
                raise PreftuneError(
                    f"{name}: got {getattr(self, name)!r}, expected an integer >= 1"
                )
        if self.generator == "vllm" and self.lora:
            raise PreftuneError(
                "generator=vllm with lora: vLLM needs merged weights every "
                "step; train without --lora or use --generator hf"
            )


@dataclass
class OnlineSetup:
    """Everything a rollout needs that is loaded once."""

    prompts: list[dict]  # {"prompt_ids", "prompt", "extra"}
    policy: torch.nn.Module  # the HF causal LM (or peft model) being trained
    tokenizer: Any
    reward: Any  # a preftune.rewards.RewardSource


def load_online(cfg: OnlineConfig, engine) -> OnlineSetup:
    """Policy, tokenizer, prompts and reward source, before the engine prepares anything."""
    policy, tokenizer = load_policy(cfg)
    prompts = load_prompts(cfg, tokenizer, log=engine.print)
    engine.data_fingerprint = data_fingerprint(prompts)  # checked by --resume
    reward = load_reward(cfg, engine.accelerator.device)
    if cfg.prompts_per_step % engine.world_size:
        raise PreftuneError(
            f"prompts_per_step={cfg.prompts_per_step} must be a multiple of the "
            f"number of processes ({engine.world_size})"
        )
    return OnlineSetup(prompts=prompts, policy=policy, tokenizer=tokenizer, reward=reward)


def planned_rollouts(cfg: OnlineConfig, n_prompts: int) -> int:
    if cfg.max_steps:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * n_prompts / cfg.prompts_per_step))


def resume(engine, vllm_backend) -> int:
    """The iteration to start after (`--resume`: the checkpoint's), with the generation
    backend holding the policy's weights."""
    start = int(engine.maybe_resume()["step"])
    sync_generator(engine, vllm_backend)
    return start


def sync_generator(engine, vllm_backend) -> None:
    """Copy the policy's weights into the vLLM engine (after each update); no-op for HF."""
    if vllm_backend is not None:
        vllm_backend.sync_weights(engine.unwrap().policy)


def end_iteration(
    engine, cfg, window, ro: RolloutBatch, step: int, bar, *, vllm_backend, updates_started: float
) -> dict | None:
    """Phase 4 of every online trainer: hand the updated weights to the generation backend,
    fold in the rollout's metrics and timings (`time/training_s`: since `updates_started`), log
    every `logging_steps` iterations (returning what was logged), checkpoint every
    `save_steps`."""
    sync_generator(engine, vllm_backend)
    ro.times["time/training_s"] = time.perf_counter() - updates_started
    window.add_all(rollout_metrics(ro))
    for name, seconds in ro.times.items():
        window.add(name, seconds)
    bar.update(1)
    logged = None
    if step % cfg.logging_steps == 0 or step == engine.total_steps:
        logged = window.reduce(engine)
        logged["lr"] = engine.lr
        engine.log(step, logged)
        bar.set_postfix(reward=f"{logged.get('reward/mean', float('nan')):.3f}")
    # checkpoint every save_steps; stop here with a checkpoint on SIGTERM/SIGINT
    engine.step_done(step, {"prompt_position": step * cfg.prompts_per_step})
    return logged


def finish(engine, tokenizer, logged: dict, value_model: bool = False) -> None:
    """Save the policy (and PPO's value model, in `value_model/`), then mark the run complete."""
    engine.save_pretrained(engine.unwrap().policy, tokenizer, prefix="policy.")
    saved = f"saved the policy to {engine.output_dir}"
    if value_model:
        engine.save_pretrained(
            engine.unwrap().value_model, tokenizer, prefix="value_model.", subdir="value_model"
        )
        saved += f", the value model to {engine.output_dir / 'value_model'}"
    engine.finish({"metrics": logged, "rollouts": engine.total_steps})
    engine.print(saved)
