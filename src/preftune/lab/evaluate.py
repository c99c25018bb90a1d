"""Evaluating a policy of the lab on held-out prompts: gold reward, KL to the base, win rate.

Every number is a mean over held-out prompts with its standard error (s.e. = sample standard
deviation / sqrt(n)). One completion per prompt is sampled from the policy at temperature 1
(the distribution the KL is about), with the same sampling seed for every policy.

- gold: the world's programmatic reward of the sampled completion.
- KL to the base policy, per sequence: the Monte-Carlo "k1" estimator (Schulman 2020),
      KL(π ‖ π_base) ≈ mean_i  Σ_t [log π(y_it | x_i, y_i<t) − log π_base(y_it | x_i, y_i<t)],
      y_i ~ π(· | x_i),
  unbiased; a single term can be negative, the mean cannot be far below 0 except by noise.
- win rate against the base policy under the gold reward: each prompt also has one completion
  sampled from the base policy (the *reference sample*, drawn once per world and seed with its
  own seed); a win counts 1, a tie 1/2, a loss 0. The base policy evaluated with the usual
  sampling seed is an independent sample of itself, so its win rate is a measured 50%.
- length: completion tokens (the tiny model's tokens are bytes), EOS excluded.
- proxy: the learned reward model's score of the completion (what the RL methods maximise).

Best-of-N needs no training: N completions are sampled from the base policy per prompt and the
one the proxy scores highest is kept. Its KL is reported as the analytic bound
log N − (N − 1)/N (Stiennon et al. 2020; Beirami et al. 2024 prove it is an upper bound).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Sequence

import torch

from preftune.generation import SamplingConfig, generate
from preftune.models.logprobs import completion_logprobs

KL_ESTIMATOR = ("Monte-Carlo k1: mean over held-out prompts of sum_t [log pi(y_t|x,y<t) - "
                "log pi_base(y_t|x,y<t)], y ~ pi(.|x), one sample per prompt")
BON_KL_BOUND = "analytic bound log N - (N-1)/N (an upper bound on KL(best-of-N || base))"


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """(mean, standard error of the mean); s.e. is 0 for fewer than two values."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def win_scores(gold: Sequence[float], gold_reference: Sequence[float]) -> list[float]:
    """Per prompt: 1 if the policy's completion beats the reference sample, 1/2 on a tie, else 0."""
    return [1.0 if g > r else 0.5 if g == r else 0.0 for g, r in zip(gold, gold_reference)]


def bon_kl_bound(n: int) -> float:
    return math.log(n) - (n - 1) / n


@dataclass
class EvalPrompts:
    """The held-out prompts of one world and seed, and the base policy's reference sample."""

    prompts: list[str]
    prompt_ids: list[list[int]]
    reference_gold: list[float]  # gold reward of the base policy's reference sample per prompt


def encode_prompts(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """Prompt token ids the way the trainers tokenize a plain-text prompt (BOS first)."""
    return [list(tokenizer(p, add_special_tokens=True)["input_ids"]) for p in prompts]


def sample(model, tokenizer, prompt_ids, max_new_tokens: int, seed: int, num_samples: int = 1):
    """Completions at temperature 1 with a seeded generator: (rollout, decoded texts)."""
    generator = torch.Generator().manual_seed(seed)
    rollout = generate(model, tokenizer, prompt_ids, SamplingConfig(max_new_tokens=max_new_tokens),
                       num_samples=num_samples, generator=generator)
    texts = tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
    return rollout, texts


@torch.no_grad()
def sequence_logps(model, rollout, pad_id: int, batch_size: int = 64) -> list[float]:
    """log π(y | x) summed over the completion tokens of every row of a rollout."""
    out: list[float] = []
    for start in range(0, len(rollout), batch_size):
        rows = range(start, min(start + batch_size, len(rollout)))
        chunk = type(rollout)(prompt_ids=[rollout.prompt_ids[i] for i in rows],
                              completion_ids=[rollout.completion_ids[i] or [pad_id] for i in rows],
                              finished=[rollout.finished[i] for i in rows])
        batch = chunk.to_batch(pad_id)
        lp = completion_logprobs(model, batch["input_ids"], batch["attention_mask"],
                                 batch["completion_mask"])
        out += lp.seq_logps.tolist()
    return out


def _completion_length(ids: list[int], eos_id: int) -> int:
    return len(ids) - (1 if ids and ids[-1] == eos_id else 0)


def evaluate_policy(policy, base, tokenizer, world, held_out: EvalPrompts, proxy, *,
                    seed: int) -> dict:
    """Sample one completion per held-out prompt from `policy` and measure it (module docstring).

    `base` is the base policy (the KL's reference); `proxy` a reward source or None.
    """
    t0 = time.perf_counter()
    rollout, texts = sample(policy, tokenizer, held_out.prompt_ids, world.max_new_tokens, seed)
    gold = world.gold_reward(held_out.prompts, texts)
    pad_id = tokenizer.pad_token_id
    if policy is base:  # the same model: the log-ratio is exactly 0 for every token
        kl = [0.0] * len(rollout)
    else:
        lp = sequence_logps(policy, rollout, pad_id)
        lp_base = sequence_logps(base, rollout, pad_id)
        kl = [a - b for a, b in zip(lp, lp_base)]
    lengths = [_completion_length(c, tokenizer.eos_token_id) for c in rollout.completion_ids]
    result = _summary(gold, held_out.reference_gold, lengths, rollout.finished,
                      proxy(held_out.prompts, texts).tolist() if proxy is not None else None)
    result["kl"], result["kl_se"] = mean_se(kl)
    result["kl_kind"] = "estimate"
    result["eval_time_s"] = time.perf_counter() - t0
    result["eval_tokens_generated"] = sum(len(c) for c in rollout.completion_ids)
    result["samples"] = [{"prompt": p, "completion": c, "gold": g}
                         for p, c, g in list(zip(held_out.prompts, texts, gold))[:5]]
    return result


def evaluate_best_of_n(base, tokenizer, world, held_out: EvalPrompts, proxy, ns: Sequence[int],
                       *, seed: int) -> dict[int, dict]:
    """Best-of-N from the base policy for every N in `ns`, ranked by the proxy reward.

    The max(ns) samples per prompt are drawn once; best-of-N uses the first N of them, so the
    curves over N share their randomness (common random numbers: less noise between N's).
    """
    t0 = time.perf_counter()
    n_max = max(ns)
    rollout, texts = sample(base, tokenizer, held_out.prompt_ids, world.max_new_tokens, seed,
                            num_samples=n_max)
    prompts_rep = [p for p in held_out.prompts for _ in range(n_max)]
    gold_all = world.gold_reward(prompts_rep, texts)
    proxy_all = proxy(prompts_rep, texts).tolist()
    lengths_all = [_completion_length(c, tokenizer.eos_token_id) for c in rollout.completion_ids]
    sample_time = time.perf_counter() - t0
    results = {}
    for n in sorted(set(ns)):
        picks = []
        for i in range(len(held_out.prompts)):
            rows = range(i * n_max, i * n_max + n)
            picks.append(max(rows, key=lambda r: proxy_all[r]))  # first one wins a tie
        result = _summary([gold_all[r] for r in picks], held_out.reference_gold,
                          [lengths_all[r] for r in picks], [rollout.finished[r] for r in picks],
                          [proxy_all[r] for r in picks])
        result["kl"], result["kl_se"] = bon_kl_bound(n), 0.0
        result["kl_kind"] = "bound"
        # Cost of best-of-N at inference: N completions per prompt.
        result["eval_tokens_generated"] = sum(
            len(rollout.completion_ids[i * n_max + j])
            for i in range(len(held_out.prompts)) for j in range(n))
        result["eval_time_s"] = sample_time * n / n_max
        result["samples"] = [{"prompt": held_out.prompts[i], "completion": texts[r],
                              "gold": gold_all[r]} for i, r in enumerate(picks[:5])]
        results[n] = result
    return results


def _summary(gold, reference_gold, lengths, finished, proxy_scores) -> dict:
    result: dict = {"n_prompts": len(gold)}
    result["gold"], result["gold_se"] = mean_se(gold)
    result["win_rate"], result["win_rate_se"] = mean_se(win_scores(gold, reference_gold))
    result["length"], result["length_se"] = mean_se([float(n) for n in lengths])
    result["eos_fraction"] = sum(finished) / max(1, len(finished))
    if proxy_scores is not None:
        result["proxy"], result["proxy_se"] = mean_se(proxy_scores)
    return result
