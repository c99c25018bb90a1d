"""The rollout phase of the online trainers and of best-of-N: sample, decode, score, and the
log-probs the update needs (reference, π_old), each timed.

- the settings: the reward source and its penalties (`RewardSettings`), sampling and the
  generation backend (`SamplingSettings`); `RolloutSettings` is both, with the model and the
  token budgets they are checked against;
- the prompts: read and tokenized once; their order is a pure function of (seed, step), so a
  resumed run reads the prompts the interrupted one would have read next;
- the sampling RNG, re-derived from (seed, step, rank) at every step, so a resumed run draws
  the same completions without carrying generator state between steps;
- `sample_and_score` (best-of-N and the trainers) and `collect_rollout` (the trainers: plus the
  reference and π_old log-probs), timed as `time/generation_s` and `time/scoring_s`.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from preftune.config import LengthSettings, ModelSettings, Settings, _require, arg
from preftune.data.tokenize import tokenize_prompts
from preftune.errors import PreftuneError
from preftune.generation import SamplingConfig, VLLMGenerator, generate, vllm_available
from preftune.models.packing import PackedBatch, pack_sequences
from preftune.rewards import apply_penalties, is_ensemble, parse_reward_spec
from preftune.rewards.sources import check_ensemble_settings
from preftune.trainers.common import read_examples
from preftune.trainers.reference import Reference


@dataclass
class RewardSettings(Settings):
    """Where the reward of a completion comes from, and the penalties subtracted from it."""

    reward_model: str = arg(
        "",
        "Reward model folder (a sequence classifier with one output, "
        "e.g. the output of `preftune reward`).",
    )
    reward_fn: list[str] = arg(
        [],
        "Reward function(s) `module:function` or "
        "`path/to/file.py:function`, called as fn(prompts, completions, "
        "**extra_columns) and returning one number per completion. "
        "The file is imported and run with your user's rights.",
    )
    reward_weights: list[float] = arg(
        [],
        "One weight per reward source (the reward model "
        "first, then the functions in order); default all 1.",
    )
    reward_batch_size: int = arg(32, "Completions per reward-model forward pass.")
    ensemble_agg: str = arg(
        "mean",
        "How the members of a reward-model ensemble (a folder from "
        "`preftune reward --ensemble K`) are combined (Coste et al. 2023): "
        "mean; min (worst case); mean-minus-std or mean-minus-var (mean "
        "minus ensemble_coef times the members' std or variance).",
        choices=("mean", "min", "mean-minus-std", "mean-minus-var"),
    )
    ensemble_coef: float = arg(
        1.0,
        "The multiple of the members' std (or variance) that "
        "mean-minus-std (mean-minus-var) subtracts.",
    )
    reward_timeout: float = arg(
        600.0,
        "Seconds a reward function may take for one call "
        "before the run stops with an error (0: no limit).",
    )
    missing_eos_penalty: float = arg(
        0.0,
        "Subtracted from the reward of a completion cut at "
        "max_new_tokens without EOS (Huang et al. 2024).",
    )
    length_penalty: float = arg(0.0, "Subtracted from the reward once per completion token.")

    def check(self) -> None:
        _require(
            self.reward_batch_size >= 1,
            "reward_batch_size",
            self.reward_batch_size,
            "an integer >= 1",
        )
        _require(
            self.reward_timeout >= 0,
            "reward_timeout",
            self.reward_timeout,
            "a number of seconds >= 0 (0: no limit)",
        )
        for name in ("missing_eos_penalty", "length_penalty"):
            value = getattr(self, name)
            _require(
                math.isfinite(value) and value >= 0,
                name,
                value,
                "a finite number >= 0 (it is subtracted from the reward)",
            )
        if not self.reward_model and not self.reward_fn:
            raise PreftuneError(
                "no reward source: pass --reward-model PATH and/or "
                "--reward-fn module:function (or path/to/file.py:function)"
            )
        n_sources = int(bool(self.reward_model)) + len(self.reward_fn)
        if self.reward_weights and len(self.reward_weights) != n_sources:
            raise PreftuneError(
                f"reward_weights: got {len(self.reward_weights)} weights for {n_sources} reward "
                "sources; give one per source, the reward model first, then the functions"
            )
        check_ensemble_settings(
            self.ensemble_agg, self.ensemble_coef, is_ensemble(self.reward_model), self.reward_model
        )


@dataclass
class SamplingSettings(Settings):
    """How completions are sampled, and by which backend."""

    max_new_tokens: int = arg(64, "Most tokens sampled per completion (EOS included).")
    temperature: float = arg(
        1.0,
        "Sampling temperature (> 0); log-probs are computed under the same tempered distribution.",
    )
    top_p: float = arg(1.0, "Nucleus sampling mass in (0, 1]; 1 keeps every token.")
    generation_batch_size: int = arg(64, "Rows per generation forward pass (HF backend).")
    generator: str = arg(
        "hf",
        "Generation backend: `hf` (our KV-cache loop, CPU or GPU) or "
        "`vllm` (needs vllm and a CUDA GPU; weights synced every step).",
        choices=("hf", "vllm"),
    )
    vllm_gpu_memory_utilization: float = arg(0.3, "GPU memory share for the vLLM engine.")

    def check(self) -> None:
        _require(
            self.generation_batch_size >= 1,
            "generation_batch_size",
            self.generation_batch_size,
            "an integer >= 1",
        )
        _require(self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens, "an integer >= 1")
        _require(
            math.isfinite(self.temperature) and self.temperature > 0,
            "temperature",
            self.temperature,
            "a number > 0 (use e.g. 1e-3 for near-greedy sampling)",
        )
        _require(0 < self.top_p <= 1, "top_p", self.top_p, "a number in (0, 1]")
        _require(
            0 < self.vllm_gpu_memory_utilization <= 1,
            "vllm_gpu_memory_utilization",
            self.vllm_gpu_memory_utilization,
            "a number in (0, 1]",
        )
        if self.generator == "vllm" and not vllm_available():
            raise PreftuneError(
                "generator=vllm needs the `vllm` package and a CUDA GPU "
                "(pip install 'preftune[vllm]'); use --generator hf here"
            )

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(
            max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p
        ).validate()


@dataclass
class RolloutSettings(SamplingSettings, RewardSettings, LengthSettings, ModelSettings):
    """Prompts are sampled, completions scored: settings shared by training and best-of-N,
    with the model that samples and the token budgets the sampling must fit in."""

    def check(self) -> None:
        if self.max_new_tokens > self.max_length - self.prompt_limit:
            raise PreftuneError(
                f"max_new_tokens={self.max_new_tokens} does not fit after a prompt of up to "
                f"{self.prompt_limit} tokens within max_length={self.max_length}; lower "
                "max_new_tokens or max_prompt_length, or raise max_length"
            )
        if self.generator == "vllm" and self.model.startswith("tiny"):
            raise PreftuneError("generator=vllm needs a model folder or hub name, not `tiny`")


@dataclass
class GroupPackingSettings(Settings):
    """How the completions of one prompt go through the model after sampling (the commands
    that sample several per prompt: grpo, rloo, online-dpo)."""

    packing: str = arg(
        "auto",
        "Run the completions of one prompt as one packed row that "
        "computes the prompt once (reference, old-policy and update forward "
        "passes), exact to float rounding. `auto`: where the model is verified "
        "for it (Llama, Mistral, Qwen2/3 with sdpa or eager attention), else "
        "padded rows; `off`: always padded rows.",
        choices=("auto", "off"),
    )


# --- loading ---------------------------------------------------------------------------------


def load_prompts(cfg, tokenizer, log=print) -> list[dict]:
    """Read `data` as prompts {"prompt_ids", "prompt", "extra"}, truncated to `prompt_limit`."""
    examples = read_examples(cfg.data, "prompts", cfg, log)
    prompts, report = tokenize_prompts(tokenizer, examples, cfg.prompt_limit, cfg.prompt_truncation)
    log(report.summary())
    if not prompts:
        raise PreftuneError(f"{cfg.data}: no usable prompts left after tokenization")
    return prompts


def load_reward(cfg: RewardSettings, device) -> Any:
    """The reward source (a preftune.rewards.RewardSource) of the settings."""
    return parse_reward_spec(
        cfg.reward_model or None,
        cfg.reward_fn,
        cfg.reward_weights or None,
        batch_size=cfg.reward_batch_size,
        max_length=cfg.max_length,
        device=device,
        ensemble_agg=cfg.ensemble_agg,
        ensemble_coef=cfg.ensemble_coef,
        timeout=cfg.reward_timeout,
    )


def make_generator_backend(cfg: RolloutSettings, tokenizer):
    """None for the HF loop; a VLLMGenerator when `generator=vllm` (imports vllm only then)."""
    if cfg.generator != "vllm":
        return None
    return VLLMGenerator(
        cfg.model,
        cfg.sampling(),
        cfg.vllm_gpu_memory_utilization,
        dtype=cfg.dtype,
        max_model_len=cfg.max_length,
        seed=cfg.seed,
        eos_token_ids=[tokenizer.eos_token_id],
    )


# --- prompt order and sampling randomness ---------------------------------------------------


@functools.lru_cache(maxsize=4)
def _prompt_order(n_prompts: int, seed: int, epoch: int) -> tuple[int, ...]:
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return tuple(torch.randperm(n_prompts, generator=generator).tolist())


def step_prompt_indices(
    n_prompts: int, prompts_per_step: int, step: int, seed: int, rank: int = 0, world_size: int = 1
) -> list[int]:
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


# --- sample and score ------------------------------------------------------------------------


@dataclass
class Scored:
    """G completions of each prompt, prompt-major, with their rewards."""

    rollout: Any  # generation.Rollout: completion ids, lengths, finished
    prompts: list  # per row
    completions: list[str]  # per row, decoded with skip_special_tokens=True
    rewards: torch.Tensor  # [N] on the CPU: the reward source's total, penalties applied
    components: dict[str, torch.Tensor]  # unweighted score per source, [N]


def sample_and_score(
    cfg: RolloutSettings,
    model,
    tokenizer,
    reward,
    features: list[dict],
    num_samples: int,
    seed: int,
    device,
    times: dict[str, float],
    vllm_backend=None,
) -> Scored:
    """Sample `num_samples` completions per prompt from `model` (a plain HF model), decode and
    score them; add the seconds spent to `times`."""
    t0 = time.perf_counter()
    prompt_ids = [f["prompt_ids"] for f in features]
    if vllm_backend is not None:
        rollout = vllm_backend.generate(prompt_ids, num_samples=num_samples)
    else:
        generator = torch.Generator(device=device).manual_seed(seed)
        rollout = generate(
            model,
            tokenizer,
            prompt_ids,
            cfg.sampling(),
            num_samples=num_samples,
            batch_size=cfg.generation_batch_size,
            generator=generator,
        )
    t1 = time.perf_counter()
    completions = tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
    prompts = [f["prompt"] for f in features for _ in range(num_samples)]
    extras = extra_columns([f["extra"] for f in features for _ in range(num_samples)])
    rewards, components = score(
        reward, prompts, completions, extras, rollout.finished, rollout.completion_lengths, cfg
    )
    times["time/generation_s"] = times.get("time/generation_s", 0.0) + t1 - t0
    times["time/scoring_s"] = times.get("time/scoring_s", 0.0) + time.perf_counter() - t1
    return Scored(rollout, prompts, completions, rewards, components)


def extra_columns(extras: list[dict]) -> dict[str, list]:
    """Per-row extra columns -> {column: [value per row]} (None where a row lacks it)."""
    names: dict[str, None] = {}
    for e in extras:
        names.update(dict.fromkeys(e))
    return {name: [e.get(name) for e in extras] for name in names}


def score(
    reward, prompts, completions, extras, finished, lengths, cfg: RewardSettings
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The reward source's total with the penalties applied, and its components."""
    total, components = reward.score_with_components(prompts, completions, **extras)
    total = torch.as_tensor(total, dtype=torch.float32).cpu()
    bad = (~torch.isfinite(total)).nonzero().flatten().tolist()
    if bad:  # a reward model can return NaN; functions are checked by FunctionReward
        raise PreftuneError(
            f"the reward source {getattr(reward, 'name', 'reward')!r} returned "
            f"{len(bad)} non-finite (NaN or inf) rewards of {len(total)}, e.g. "
            f"for completion {completions[bad[0]]!r}"
        )
    total = apply_penalties(
        total,
        finished,
        lengths,
        missing_eos_penalty=cfg.missing_eos_penalty,
        length_penalty=cfg.length_penalty,
    )
    return total, components


# --- the rollout of a training iteration -----------------------------------------------------


@dataclass
class RolloutBatch:
    """One rollout on this process: prompt-major rows, G consecutive rows per prompt."""

    batch: dict[str, torch.Tensor]  # input_ids, attention_mask, completion_mask, ref_logps
    # (+ whatever `old_policy` returned: old_logps, PPO's old_values)
    prompts: list  # per row
    completions: list[str]  # per row
    rewards: torch.Tensor  # [N] on the device
    components: dict[str, torch.Tensor]
    finished: list[bool]
    lengths: list[int]
    times: dict[str, float]


def pack_groups(
    batch: dict[str, torch.Tensor],
    num_generations: int,
    pad_id: int,
    rows: torch.Tensor | None = None,
) -> PackedBatch:
    """Rows of a rollout batch (right-padded) packed so that the completions of one prompt
    share it: one packed row per prompt, [prompt, completion 1, ..., completion k], each
    completion seeing the prompt and itself (`models/packing.py`). `rows`: the rollout rows
    these batch rows are (default: all, in order); rollout rows r and s are completions of the
    same prompt when r // num_generations == s // num_generations (prompt-major rollouts)."""
    lengths = batch["attention_mask"].sum(-1).tolist()
    ids, completion = batch["input_ids"].tolist(), batch["completion_mask"].tolist()
    seqs = [
        {"input_ids": ids[i][:n], "completion_mask": completion[i][:n]}
        for i, n in enumerate(lengths)
    ]
    rollout_rows = range(len(seqs)) if rows is None else rows.tolist()
    groups: dict[int, list[int]] = {}
    for i, r in enumerate(rollout_rows):
        groups.setdefault(r // num_generations, []).append(i)
    return pack_sequences(seqs, list(groups.values()), pad_id=pad_id)


def collect_rollout(
    cfg,
    engine,
    setup,
    step: int,
    *,
    reference: Reference,
    policy_forward: Callable[..., Any],
    old_policy: Callable[[dict, PackedBatch | None], dict[str, torch.Tensor]] | None = None,
    pack: Callable[[dict], PackedBatch | None] | None = None,
    vllm_backend=None,
) -> RolloutBatch:
    """Training iteration `step`'s rollout: sample `num_generations` completions per prompt from
    the current policy, score them, then the reference log-probs and, when the update needs
    them, `old_policy(batch, packed)`: a no-grad forward of the current policy before any update
    whose tensors (old_logps, ...) join the batch. `setup` holds the prompts, tokenizer and reward
    source; `policy_forward` is the prepared policy's log-prob forward (the reference runs it
    with the adapters disabled); `pack(batch)`: the batch packed for the reference's and
    `old_policy`'s forwards (`pack_groups`, packed once), or None for padded rows."""
    prompts, tokenizer = setup.prompts, setup.tokenizer
    device = engine.accelerator.device
    indices = step_prompt_indices(
        len(prompts), cfg.prompts_per_step, step, cfg.seed, engine.rank, engine.world_size
    )
    features = [prompts[i] for i in indices]
    times: dict[str, float] = {}
    # Generate with the plain HF model, outside DDP.
    s = sample_and_score(
        cfg,
        engine.unwrap().policy,
        tokenizer,
        setup.reward,
        features,
        cfg.num_generations,
        sampling_seed(cfg.seed, step, engine.rank),
        device,
        times,
        vllm_backend,
    )
    t0 = time.perf_counter()
    batch = {k: v.to(device) for k, v in s.rollout.to_batch(tokenizer.pad_token_id).items()}
    packed = pack(batch) if pack is not None else None
    batch["ref_logps"] = reference(
        policy_forward,
        batch["input_ids"],
        batch["attention_mask"],
        batch["completion_mask"],
        temperature=cfg.temperature,
        packed=packed,
    ).token_logps
    if old_policy is not None:
        with torch.no_grad():
            batch.update(old_policy(batch, packed))
    times["time/scoring_s"] += time.perf_counter() - t0
    return RolloutBatch(
        batch=batch,
        prompts=s.prompts,
        completions=s.completions,
        rewards=s.rewards.to(device),
        components=s.components,
        finished=s.rollout.finished,
        lengths=s.rollout.completion_lengths,
        times=times,
    )


def rollout_metrics(ro: RolloutBatch) -> dict[str, Any]:
    """Reward, its components, completion length and EOS rate of one rollout."""
    metrics: dict[str, Any] = {
        "reward/mean": ro.rewards.float().mean().item(),
        "reward/std": ro.rewards.float().std().item() if len(ro.rewards) > 1 else 0.0,
        "completion/length": torch.tensor(ro.lengths, dtype=torch.float32),
        "completion/eos_fraction": torch.tensor(ro.finished, dtype=torch.float32),
    }
    for name, scores in ro.components.items():
        metrics[f"reward/{name}"] = torch.as_tensor(scores, dtype=torch.float32)
    return metrics
