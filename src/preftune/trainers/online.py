"""What the online trainers (PPO, GRPO, RLOO, online DPO) and best-of-N share.

Every online trainer reads as three visible phases per training iteration (CleanRL style):

    rollout (here: sample, decode, score, reference log-probs)
      -> advantages or pairs (the trainer)
      -> minibatch updates (the trainer)

This module owns the first phase and the plumbing around it:
- the settings: prompts (`--data`), the reward source and its penalties, sampling, the KL
  reference, the generation backend (`RolloutSettings`, `OnlineConfig`);
- loading the prompts, the policy, the reward source and the reference (`load_online`,
  `build_reference`);
- the prompt order, a pure function of (seed, step): a resumed run reads the prompts the
  interrupted one would have read next;
- the sampling RNG, re-derived from (seed, step, rank) at every step, so a resumed run draws
  the same completions without carrying generator state between steps;
- `collect_rollout`, timed (`time/generation_s`, `time/scoring_s`), and the metric helpers.

`max_steps` counts training iterations (rollouts); each may hold several optimizer steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from preftune.config import TrainConfig, arg
from preftune.errors import PreftuneError
from preftune.generation import SamplingConfig, generate
from preftune.losses.rl import KL_ESTIMATORS, aggregate_sum_and_units, kl_penalty
from preftune.models.logprobs import CompletionLogProbs, LogProbOutput


@dataclass
class RolloutSettings:
    """Prompts are sampled, completions scored: settings shared by training and best-of-N."""

    # --- reward ----------------------------------------------------------------------------
    reward_model: str = arg("", "Reward model folder (a sequence classifier with one output, "
                            "e.g. the output of `preftune reward`).")
    reward_fn: list[str] = arg([], "Reward function(s) `module:function` or "
                               "`path/to/file.py:function`, called as fn(prompts, completions, "
                               "**extra_columns) and returning one number per completion. "
                               "The file is imported and run with your user's rights.")
    reward_weights: list[float] = arg([], "One weight per reward source (the reward model "
                                      "first, then the functions in order); default all 1.")
    reward_batch_size: int = arg(32, "Completions per reward-model forward pass.")
    reward_timeout: float = arg(600.0, "Seconds a reward function may take for one call "
                                "before the run stops with an error (0: no limit).")
    missing_eos_penalty: float = arg(0.0, "Subtracted from the reward of a completion cut at "
                                     "max_new_tokens without EOS (Huang et al. 2024).")
    length_penalty: float = arg(0.0, "Subtracted from the reward once per completion token.")

    # --- sampling --------------------------------------------------------------------------
    max_new_tokens: int = arg(64, "Most tokens sampled per completion (EOS included).")
    temperature: float = arg(1.0, "Sampling temperature (> 0); log-probs are computed under "
                             "the same tempered distribution.")
    top_p: float = arg(1.0, "Nucleus sampling mass in (0, 1]; 1 keeps every token.")
    generation_batch_size: int = arg(64, "Rows per generation forward pass (HF backend).")
    generator: str = arg("hf", "Generation backend: `hf` (our KV-cache loop, CPU or GPU) or "
                         "`vllm` (needs vllm and a CUDA GPU; weights synced every step).",
                         choices=("hf", "vllm"))
    vllm_gpu_memory_utilization: float = arg(0.3, "GPU memory share for the vLLM engine.")

    def validate_rollout(self) -> None:
        _require(self.reward_batch_size >= 1, "reward_batch_size", self.reward_batch_size,
                 "an integer >= 1")
        _require(self.generation_batch_size >= 1, "generation_batch_size",
                 self.generation_batch_size, "an integer >= 1")
        _require(self.reward_timeout >= 0, "reward_timeout", self.reward_timeout,
                 "a number of seconds >= 0 (0: no limit)")
        _require(self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens,
                 "an integer >= 1")
        _require(math.isfinite(self.temperature) and self.temperature > 0, "temperature",
                 self.temperature, "a number > 0 (use e.g. 1e-3 for near-greedy sampling)")
        _require(0 < self.top_p <= 1, "top_p", self.top_p, "a number in (0, 1]")
        for name in ("missing_eos_penalty", "length_penalty"):
            value = getattr(self, name)
            _require(math.isfinite(value) and value >= 0, name, value,
                     "a finite number >= 0 (it is subtracted from the reward)")
        _require(0 < self.vllm_gpu_memory_utilization <= 1, "vllm_gpu_memory_utilization",
                 self.vllm_gpu_memory_utilization, "a number in (0, 1]")
        if not self.reward_model and not self.reward_fn:
            raise PreftuneError("no reward source: pass --reward-model PATH and/or "
                                "--reward-fn module:function (or path/to/file.py:function)")
        n_sources = int(bool(self.reward_model)) + len(self.reward_fn)
        if self.reward_weights and len(self.reward_weights) != n_sources:
            raise PreftuneError(
                f"reward_weights: got {len(self.reward_weights)} weights for {n_sources} reward "
                "sources; give one per source, the reward model first, then the functions")
        if self.generator == "vllm":
            from preftune.generation import vllm_available

            if not vllm_available():
                raise PreftuneError("generator=vllm needs the `vllm` package and a CUDA GPU "
                                    "(pip install 'preftune[vllm]'); use --generator hf here")

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                              top_p=self.top_p).validate()


@dataclass
class OnlineConfig(TrainConfig, RolloutSettings):
    """Settings of every online training command (each trainer adds its own)."""

    data: str = arg("demo", "Prompts: any file or dataset with a prompt (prompt-only, "
                    "preference pairs, conversations; extra columns go to the reward "
                    "function). `demo` is the built-in HH-RLHF sample.")
    max_steps: int = arg(0, "Training iterations (one rollout each) to run (0: use `epochs` "
                         "over the prompts).")
    batch_size: int = arg(8, "Rows (completions; pairs for online DPO) per device per forward "
                          "pass in the updates; a minibatch is split into such micro-batches.")
    logging_steps: int = arg(1, "Log metrics every this many training iterations.")
    lr: float = arg(1e-5, "Peak learning rate (AdamW).")
    prompts_per_step: int = arg(16, "Prompts per rollout over all processes (the rollout "
                                "batch); each gets num_generations completions.")
    num_generations: int = arg(1, "Completions sampled per prompt in each rollout.")
    kl_coef: float = arg(0.05, "Weight β of the KL penalty to the reference policy.")
    kl_estimator: str = arg("k1", "Per-token KL estimator for the penalty (Schulman 2020): k1 "
                            "= log π/π_ref, k2 = ½(log π/π_ref)², k3 = π_ref/π − 1 − log π_ref/π.",
                            choices=KL_ESTIMATORS)
    ref_model: str = arg("", "Reference policy (default: the initial policy; with --lora the "
                         "policy with its adapters disabled, no copy).")

    def validate(self) -> None:
        super().validate()
        self.validate_rollout()
        _require(self.prompts_per_step >= 1, "prompts_per_step", self.prompts_per_step,
                 "an integer >= 1")
        _require(self.num_generations >= 1, "num_generations", self.num_generations,
                 "an integer >= 1")
        _require(math.isfinite(self.kl_coef) and self.kl_coef >= 0, "kl_coef", self.kl_coef,
                 "a finite number >= 0")
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        if self.kl_coef == 0 and self.kl_estimator != defaults["kl_estimator"]:
            raise PreftuneError(f"kl_estimator={self.kl_estimator!r} has no effect: kl_coef is 0, "
                                "so there is no KL term (the KL is still logged with k1 and k3); "
                                "set --kl-coef or drop --kl-estimator")
        single_pass = getattr(self, "ppo_epochs", 1) == 1 and getattr(self, "num_minibatches", 1) == 1
        if "clip_eps" in defaults and single_pass and self.clip_eps != defaults["clip_eps"]:
            raise PreftuneError(f"clip_eps={self.clip_eps} has no effect with ppo_epochs=1 and "
                                "num_minibatches=1: each rollout is used once, the ratio is 1 "
                                "and never clipped; raise --ppo-epochs or --num-minibatches, or "
                                "drop --clip-eps")
        if self.grad_accum != 1:
            raise PreftuneError(
                f"grad_accum={self.grad_accum}: online trainers split each rollout into "
                "micro-batches of batch_size rows themselves; use --batch-size (and "
                "--num-minibatches where the command has it) instead")
        if self.eval_data or self.eval_fraction:
            raise PreftuneError("eval_data / eval_fraction: online trainers have no held-out "
                                "evaluation; the reward of each rollout is logged instead")
        if self.max_new_tokens > self.max_length - self.prompt_limit:
            raise PreftuneError(
                f"max_new_tokens={self.max_new_tokens} does not fit after a prompt of up to "
                f"{self.prompt_limit} tokens within max_length={self.max_length}; lower "
                "max_new_tokens or max_prompt_length, or raise max_length")
        if self.generator == "vllm" and self.lora:
            raise PreftuneError("generator=vllm with lora: vLLM needs merged weights every "
                                "step; train without --lora or use --generator hf")
        if self.generator == "vllm" and self.model.startswith("tiny"):
            raise PreftuneError("generator=vllm needs a model folder or hub name, not `tiny`")


def _require(ok: bool, name: str, value: Any, expected: str) -> None:
    if not ok:
        raise PreftuneError(f"{name}: got {value!r}, expected {expected}")


# --- loading -------------------------------------------------------------------------------

@dataclass
class OnlineSetup:
    """Everything a rollout needs that is loaded once."""

    prompts: list[dict]  # {"prompt_ids", "prompt", "extra"}
    policy: torch.nn.Module  # the HF causal LM (or peft model) being trained
    tokenizer: Any
    reward: Any  # a preftune.rewards.RewardSource


def load_prompts(cfg, tokenizer, log=print) -> list[dict]:
    """Read `data` as prompts and tokenize them (truncated to `prompt_limit`)."""
    from preftune.data.tokenize import tokenize_prompts
    from preftune.trainers.common import read_examples

    examples = read_examples(cfg.data, "prompts", cfg, log)
    prompts, report = tokenize_prompts(tokenizer, examples, cfg.prompt_limit,
                                       cfg.prompt_truncation)
    log(report.summary())
    if not prompts:
        raise PreftuneError(f"{cfg.data}: no usable prompts left after tokenization")
    return prompts


def load_reward(cfg: RolloutSettings, device) -> Any:
    from preftune.rewards import parse_reward_spec

    return parse_reward_spec(cfg.reward_model or None, cfg.reward_fn, cfg.reward_weights or None,
                             batch_size=cfg.reward_batch_size, max_length=cfg.max_length,
                             device=device, timeout=cfg.reward_timeout)


def load_online(cfg: OnlineConfig, engine) -> OnlineSetup:
    """Policy, tokenizer, prompts and reward source, before the engine prepares anything."""
    from preftune.engine.checkpoint import data_fingerprint
    from preftune.trainers.common import load_policy

    policy, tokenizer = load_policy(cfg)
    prompts = load_prompts(cfg, tokenizer, log=engine.print)
    engine.data_fingerprint = data_fingerprint(prompts)  # checked by --resume
    reward = load_reward(cfg, engine.accelerator.device)
    if cfg.prompts_per_step % engine.world_size:
        raise PreftuneError(f"prompts_per_step={cfg.prompts_per_step} must be a multiple of the "
                            f"number of processes ({engine.world_size})")
    return OnlineSetup(prompts=prompts, policy=policy, tokenizer=tokenizer, reward=reward)


def planned_rollouts(cfg: OnlineConfig, n_prompts: int) -> int:
    if cfg.max_steps:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * n_prompts / cfg.prompts_per_step))


class Reference:
    """log π_ref of the rollout tokens.

    With LoRA and no `ref_model`, the reference is the policy with its adapters disabled: the
    same forward, through the prepared (DDP-wrapped) module, no second copy of the weights.
    Otherwise a frozen model (`ref_model`, or a fresh load of `model`) is kept.
    """

    def __init__(self, frozen: torch.nn.Module | None, adapter_model: torch.nn.Module | None):
        self.frozen = frozen
        self.adapter_model = adapter_model

    @torch.no_grad()
    def token_logps(self, policy_logps: Callable[[dict], LogProbOutput], batch: dict,
                    temperature: float) -> torch.Tensor:
        from preftune.models.loading import disabled_adapters

        if self.frozen is None:
            with disabled_adapters(self.adapter_model):
                return policy_logps(batch).token_logps
        return self.frozen(batch["input_ids"], batch["attention_mask"], batch["completion_mask"],
                           temperature=temperature).token_logps


def build_reference(cfg: OnlineConfig, engine, policy: torch.nn.Module, tokenizer) -> Reference:
    from preftune.models.loading import load_causal_lm

    if cfg.lora and not cfg.ref_model:
        return Reference(frozen=None, adapter_model=policy)
    ref, ref_tokenizer = load_causal_lm(cfg.ref_model or cfg.model, dtype=cfg.dtype, seed=cfg.seed)
    if len(ref_tokenizer) != len(tokenizer):
        raise PreftuneError(f"ref_model {cfg.ref_model!r} has a vocabulary of {len(ref_tokenizer)} "
                            f"tokens, the policy {len(tokenizer)}: they must share a tokenizer")
    return Reference(frozen=engine.prepare_frozen(CompletionLogProbs(ref)), adapter_model=None)


# --- prompt order and sampling randomness ---------------------------------------------------

@functools.lru_cache(maxsize=4)
def _prompt_order(n_prompts: int, seed: int, epoch: int) -> tuple[int, ...]:
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return tuple(torch.randperm(n_prompts, generator=generator).tolist())


def step_prompt_indices(n_prompts: int, prompts_per_step: int, step: int, seed: int,
                        rank: int = 0, world_size: int = 1) -> list[int]:
    """This process's prompts for training iteration `step` (1-based).

    The prompts form one endless stream, a fresh permutation per pass; iteration `step` takes
    positions [(step−1)·P, step·P) of it and process r its r-th slice. A pure function of its
    arguments: resuming needs only the step.
    """
    per_process = prompts_per_step // world_size
    out = []
    for k in range(rank * per_process, (rank + 1) * per_process):
        epoch, i = divmod((step - 1) * prompts_per_step + k, n_prompts)
        out.append(_prompt_order(n_prompts, seed, epoch)[i])
    return out


def sampling_seed(seed: int, step: int, rank: int) -> int:
    """The sampling RNG seed of one process at one iteration (checkpointed with the step)."""
    return (seed * 1_000_003 + step * 1_009 + rank) % (2**63 - 1)


# --- the rollout phase ----------------------------------------------------------------------

@dataclass
class RolloutBatch:
    """One rollout on this process: prompt-major rows, G consecutive rows per prompt."""

    batch: dict[str, torch.Tensor]  # input_ids, attention_mask, completion_mask (+ ref_logps)
    prompts: list  # per row
    completions: list[str]  # per row, decoded with skip_special_tokens=True
    rewards: torch.Tensor  # [N] on the device: the reward source's total, penalties applied
    components: dict[str, torch.Tensor]  # unweighted score per source, [N]
    finished: list[bool]
    lengths: list[int]
    times: dict[str, float]


def make_generator_backend(cfg: OnlineConfig, tokenizer):
    """None for the HF loop; a VLLMGenerator when `generator=vllm` (imports vllm only then)."""
    if cfg.generator != "vllm":
        return None
    from preftune.generation import VLLMGenerator

    return VLLMGenerator(cfg.model, cfg.sampling(), cfg.vllm_gpu_memory_utilization,
                         dtype=cfg.dtype, max_model_len=cfg.max_length, seed=cfg.seed,
                         eos_token_ids=[tokenizer.eos_token_id])


def collect_rollout(cfg: OnlineConfig, engine, setup: OnlineSetup, step: int, *,
                    policy_logps: Callable[[dict], LogProbOutput],
                    reference: Reference | None, vllm_backend=None) -> RolloutBatch:
    """Sample G completions per prompt from the current policy, score them, and compute the
    reference log-probs. `policy_logps(batch)` runs the prepared policy module (used for the
    adapter-disabled reference)."""
    device = engine.accelerator.device
    indices = step_prompt_indices(len(setup.prompts), cfg.prompts_per_step, step, cfg.seed,
                                  engine.rank, engine.world_size)
    features = [setup.prompts[i] for i in indices]
    G = cfg.num_generations

    t0 = time.perf_counter()
    prompt_ids = [f["prompt_ids"] for f in features]
    if vllm_backend is not None:
        rollout = vllm_backend.generate(prompt_ids, num_samples=G)
    else:
        policy = engine.unwrap().policy  # generate with the plain HF model, outside DDP
        generator = torch.Generator(device=device).manual_seed(sampling_seed(cfg.seed, step,
                                                                             engine.rank))
        rollout = generate(policy, setup.tokenizer, prompt_ids, cfg.sampling(), num_samples=G,
                           batch_size=cfg.generation_batch_size, generator=generator)
    t1 = time.perf_counter()

    completions = setup.tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
    prompts = [f["prompt"] for f in features for _ in range(G)]
    extras = extra_columns([f["extra"] for f in features for _ in range(G)])
    rewards, components = score(setup.reward, prompts, completions, extras, rollout.finished,
                                rollout.completion_lengths, cfg)
    batch = {k: v.to(device) for k, v in rollout.to_batch(setup.tokenizer.pad_token_id).items()}
    if reference is not None:
        batch["ref_logps"] = reference.token_logps(policy_logps, batch, cfg.temperature)
    t2 = time.perf_counter()
    return RolloutBatch(batch=batch, prompts=prompts, completions=completions,
                        rewards=rewards.to(device), components=components,
                        finished=rollout.finished, lengths=rollout.completion_lengths,
                        times={"time/generation_s": t1 - t0, "time/scoring_s": t2 - t1})


def extra_columns(extras: list[dict]) -> dict[str, list]:
    """Per-row extra columns -> {column: [value per row]} (None where a row lacks it)."""
    names: dict[str, None] = {}
    for e in extras:
        names.update(dict.fromkeys(e))
    return {name: [e.get(name) for e in extras] for name in names}


def score(reward, prompts, completions, extras, finished, lengths, cfg: RolloutSettings
          ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The reward source's total with the penalties applied, and its components."""
    from preftune.rewards import apply_penalties

    total, components = reward.score_with_components(prompts, completions, **extras)
    total = torch.as_tensor(total, dtype=torch.float32).cpu()
    bad = (~torch.isfinite(total)).nonzero().flatten().tolist()
    if bad:  # a reward model can return NaN; functions are checked by FunctionReward
        raise PreftuneError(f"the reward source {getattr(reward, 'name', 'reward')!r} returned "
                            f"{len(bad)} non-finite (NaN or inf) rewards of {len(total)}, e.g. "
                            f"for completion {completions[bad[0]]!r}")
    total = apply_penalties(total, finished, lengths, missing_eos_penalty=cfg.missing_eos_penalty,
                            length_penalty=cfg.length_penalty)
    return total, components


# --- updates ---------------------------------------------------------------------------------

@torch.no_grad()
def no_grad_logps(policy_logps: Callable[[dict], LogProbOutput], batch: dict) -> torch.Tensor:
    """Per-token log-probs of the rollout under the current policy (π_old), no graph."""
    return policy_logps(batch).token_logps


def minibatch_indices(n_rows: int, num_minibatches: int, generator: torch.Generator
                      ) -> list[torch.Tensor]:
    """A random split of the rollout's rows into `num_minibatches` nearly equal parts."""
    if num_minibatches > n_rows:
        raise PreftuneError(f"num_minibatches={num_minibatches} exceeds the {n_rows} rows of a "
                            "rollout on this process; lower it or raise prompts_per_step")
    return list(torch.randperm(n_rows, generator=generator).chunk(num_minibatches))


def take(batch: dict[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Rows of every tensor in `batch`, with [N, T] tensors cut to these rows' longest length
    (batches are right-padded, so the trailing all-padding columns carry nothing)."""
    rows = rows.to(batch["attention_mask"].device)
    width = int(batch["attention_mask"][rows].sum(-1).max())
    T = batch["attention_mask"].shape[1]
    out = {}
    for k, v in batch.items():
        v = v[rows]
        out[k] = v[:, :width] if v.dim() == 2 and v.shape[1] == T else v
    return out


def loss_units(mask: torch.Tensor, mode: str, max_len: int | None = None) -> float:
    """The loss units (rows or tokens) these rows contribute, for `engine.backward`."""
    return float(aggregate_sum_and_units(torch.zeros_like(mask, dtype=torch.float32), mask,
                                         mode, max_len)[1])


def update_generator(cfg, step: int, rank: int) -> torch.Generator:
    """RNG of the minibatch split: a function of (seed, step, rank), like the sampling RNG."""
    return torch.Generator().manual_seed(sampling_seed(cfg.seed + 7, step, rank))


# --- metrics ---------------------------------------------------------------------------------

def rollout_metrics(ro: RolloutBatch) -> dict[str, Any]:
    """Reward, its components, completion length and EOS rate of one rollout."""
    lengths = torch.tensor(ro.lengths, dtype=torch.float32)
    metrics: dict[str, Any] = {
        "reward/mean": ro.rewards.float().mean().item(),
        "reward/std": ro.rewards.float().std().item() if len(ro.rewards) > 1 else 0.0,
        "completion/length": lengths,
        "completion/eos_fraction": torch.tensor(ro.finished, dtype=torch.float32),
    }
    for name, scores in ro.components.items():
        metrics[f"reward/{name}"] = torch.as_tensor(scores, dtype=torch.float32)
    return metrics


def sequence_kl(logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor
                ) -> dict[str, torch.Tensor]:
    """KL(π ‖ π_ref) per sequence [B], summed over its tokens, with two estimators (Schulman
    2020): `kl/k1` (unbiased, can be negative per sample) and `kl/k3` (unbiased, ≥ 0)."""
    m = mask.float()
    with torch.no_grad():
        return {f"kl/{k}": (kl_penalty(logps.detach(), ref_logps, k) * m).sum(-1)
                for k in ("k1", "k3")}


def token_mean(window, name: str, values: torch.Tensor, mask: torch.Tensor) -> None:
    """Add a per-token quantity to the metric window as a mean over the masked tokens."""
    m = mask.float()
    window.add(name, float((values.detach().float() * m).sum()), count=float(m.sum()))


def optimizer_steps_per_rollout(cfg) -> int:
    return getattr(cfg, "ppo_epochs", 1) * getattr(cfg, "num_minibatches", 1)


def setup_engine_steps(engine, module: torch.nn.Module, n_rollouts: int, steps_per_rollout: int):
    """Prepare `module` with a schedule over every optimizer step, then count iterations.

    The learning-rate schedule runs over n_rollouts × steps_per_rollout optimizer steps; the
    engine's step counter (progress bar, checkpoints, resume) counts training iterations.
    """
    prepared = engine.setup(module, n_rollouts * steps_per_rollout)
    engine.total_steps = n_rollouts
    return prepared


def log_step(engine, window, step: int) -> dict:
    """Reduce the window (means since the last log line), add the learning rate, write it."""
    logged = window.reduce(engine)
    logged["lr"] = engine.lr
    engine.log(step, logged)
    return logged


@contextlib.contextmanager
def timed(times: dict[str, float], name: str):
    t0 = time.perf_counter()
    try:
        yield
    finally:
        times[name] = times.get(name, 0.0) + time.perf_counter() - t0


def end_iteration(engine, cfg, window, ro, step: int, n_rollouts: int, bar) -> dict | None:
    """Phase 4 of every online trainer: fold in the rollout's metrics and timings, log every
    `logging_steps` iterations (returning what was logged), checkpoint every `save_steps`."""
    window.add_all(rollout_metrics(ro))
    for name, seconds in ro.times.items():
        window.add(name, seconds)
    bar.update(1)
    logged = None
    if step % cfg.logging_steps == 0 or step == n_rollouts:
        logged = log_step(engine, window, step)
        bar.set_postfix(reward=f"{logged.get('reward/mean', float('nan')):.3f}")
    # checkpoint every save_steps; stop here on SIGTERM/SIGINT
    engine.step_done(step, {"prompt_position": step * cfg.prompts_per_step})
    return logged


def reference_backend_and_resume(cfg, engine, tokenizer):
    """After `setup_engine_steps`: the reference, the optional vLLM backend (weights synced),
    and the step to start from (`--resume`). -> (reference, vllm_backend or None, start)."""
    reference = build_reference(cfg, engine, engine.unwrap().policy, tokenizer)
    vllm_backend = make_generator_backend(cfg, tokenizer)
    start = int(engine.maybe_resume()["step"])
    if vllm_backend is not None:
        vllm_backend.sync_weights(engine.unwrap().policy)
    return reference, vllm_backend, start


def save_policy_and_finish(engine, tokenizer, logged: dict, n_rollouts: int) -> None:
    engine.save_pretrained(engine.unwrap().policy, tokenizer, prefix="policy.")
    engine.finish({"metrics": logged, "rollouts": n_rollouts})
    engine.print(f"saved the policy to {engine.output_dir}")
