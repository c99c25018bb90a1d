"""Evaluating a policy of the lab on a set of prompts: gold reward, proxy reward, KL to the base.

One completion per prompt is sampled from the policy at temperature 1 (the distribution the KL
is about), with the same sampling seed for every policy of a seed: the base policy's samples
on the same prompts are the pairing partner of every comparison (common random numbers).

- gold: the world's programmatic reward of the sampled completion; means over the whole set
  and over its named parts (test: `seen`, `unseen`).
- KL(pi || pi_base) per sequence: k1 and k3 with standard errors (`stats.kl_estimates`).
- proxy: the learned reward model's score of the completion (what the RL methods maximise).
- length: completion tokens (the tiny model's tokens are bytes), EOS excluded.

Best-of-N needs no training: M = max(N) completions are sampled from the base policy per prompt
once; best-of-N keeps, of the first N, the one the scorer (the reward model, or the gold reward
for the oracle control) ranks highest. KL: the analytic bound log N - (N-1)/N and a plug-in
estimate from the M samples (`stats.bon_kl_plugin`), both reported.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from preftune.generation import SamplingConfig, generate
from preftune.lab import stats
from preftune.models.logprobs import completion_logprobs


@dataclass
class PromptSet:
    """Prompts to evaluate on, tokenized, with named parts (e.g. seen/unseen) as index ranges."""

    prompts: list[str]
    prompt_ids: list[list[int]]
    parts: dict[str, tuple[int, int]] = field(default_factory=dict)


def encode_prompts(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """Prompt token ids the way the trainers tokenize a plain-text prompt (BOS first)."""
    return [list(tokenizer(p, add_special_tokens=True)["input_ids"]) for p in prompts]


def sample(model, tokenizer, prompt_ids, max_new_tokens: int, seed: int, num_samples: int = 1):
    """Completions at temperature 1 with a seeded generator: (rollout, decoded texts)."""
    generator = torch.Generator().manual_seed(seed)
    rollout = generate(
        model,
        tokenizer,
        prompt_ids,
        SamplingConfig(max_new_tokens=max_new_tokens),
        num_samples=num_samples,
        generator=generator,
    )
    texts = tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
    return rollout, texts


@torch.no_grad()
def sequence_logps(model, rollout, pad_id: int, batch_size: int = 64) -> list[float]:
    """log pi(y | x) summed over the completion tokens of every row of a rollout."""
    out: list[float] = []
    for start in range(0, len(rollout), batch_size):
        rows = range(start, min(start + batch_size, len(rollout)))
        chunk = type(rollout)(
            prompt_ids=[rollout.prompt_ids[i] for i in rows],
            completion_ids=[rollout.completion_ids[i] or [pad_id] for i in rows],
            finished=[rollout.finished[i] for i in rows],
        )
        batch = chunk.to_batch(pad_id)
        lp = completion_logprobs(
            model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
        )
        out += lp.seq_logps.tolist()
    return out


def _completion_length(ids: list[int], eos_id: int) -> int:
    return len(ids) - (1 if ids and ids[-1] == eos_id else 0)


def _part_means(values: Sequence[float], parts: dict[str, tuple[int, int]], name: str) -> dict:
    out = {name: stats.mean_se(values)[0]}
    for part, (lo, hi) in parts.items():
        out[f"{name}_{part}"] = stats.mean_se(values[lo:hi])[0]
    return out


def evaluate_policy(
    policy, base, tokenizer, world, ps: PromptSet, proxy, *, seed: int, keep_texts: bool = False
) -> dict:
    """Sample one completion per prompt from `policy` and measure it (module docstring).
    `base` is the base policy (the KL's reference); `proxy` a reward source or None."""
    t0 = time.perf_counter()
    rollout, texts = sample(policy, tokenizer, ps.prompt_ids, world.max_new_tokens, seed)
    gold = world.gold_reward(ps.prompts, texts)
    pad_id = tokenizer.pad_token_id
    if policy is base:  # the same model: the log-ratio is exactly 0 for every sequence
        log_ratios = [0.0] * len(rollout)
    else:
        lp = sequence_logps(policy, rollout, pad_id)
        lp_base = sequence_logps(base, rollout, pad_id)
        log_ratios = [a - b for a, b in zip(lp, lp_base)]
    result = {
        "n_prompts": len(ps.prompts),
        **_part_means(gold, ps.parts, "gold"),
        **stats.kl_estimates(log_ratios),
    }
    result["gold_se"] = stats.mean_se(gold)[1]
    if proxy is not None:
        result["proxy"] = stats.mean_se(proxy(ps.prompts, texts).tolist())[0]
    result["length"] = stats.mean_se(
        [float(_completion_length(c, tokenizer.eos_token_id)) for c in rollout.completion_ids]
    )[0]
    result["eval_time_s"] = time.perf_counter() - t0
    result["tokens_generated"] = sum(len(c) for c in rollout.completion_ids)
    result["samples"] = [
        {"prompt": p, "completion": c, "gold": g}
        for p, c, g in list(zip(ps.prompts, texts, gold))[:3]
    ]
    if keep_texts:
        result["texts"] = texts
    return result


@dataclass
class BestOfNSamples:
    """M base-policy samples per prompt (prompt-major), their gold rewards and lengths."""

    ps: PromptSet
    m: int
    texts: list[str]
    gold: list[float]
    tokens: list[int]
    time_s: float


def sample_best_of_n(base, tokenizer, world, ps: PromptSet, m: int, *, seed: int) -> BestOfNSamples:
    t0 = time.perf_counter()
    rollout, texts = sample(
        base, tokenizer, ps.prompt_ids, world.max_new_tokens, seed, num_samples=m
    )
    prompts = [p for p in ps.prompts for _ in range(m)]
    return BestOfNSamples(
        ps,
        m,
        texts,
        world.gold_reward(prompts, texts),
        [len(c) for c in rollout.completion_ids],
        time.perf_counter() - t0,
    )


def best_of_n(
    samples: BestOfNSamples,
    scores: list[float],
    ns: Sequence[int],
    proxy_scores: list[float] | None,
) -> list[dict]:
    """One point per N: the pick of the first N samples that `scores` ranks highest (the first
    one wins a tie), its gold (and proxy) reward, and its KL bound and plug-in estimate."""
    m, ps = samples.m, samples.ps
    per_prompt = [scores[i * m : (i + 1) * m] for i in range(len(ps.prompts))]
    out = []
    for n in sorted(set(ns)):
        picks = [i * m + max(range(n), key=lambda j: row[j]) for i, row in enumerate(per_prompt)]
        point = {
            "value": n,
            **_part_means([samples.gold[r] for r in picks], ps.parts, "gold"),
            "kl_bound": stats.bon_kl_bound(n),
            "kl_plugin": stats.bon_kl_plugin(per_prompt, n),
            "tokens_generated": sum(
                samples.tokens[i * m + j] for i in range(len(ps.prompts)) for j in range(n)
            ),
            "eval_time_s": samples.time_s * n / m,
        }
        if proxy_scores is not None:
            point["proxy"] = stats.mean_se([proxy_scores[r] for r in picks])[0]
        out.append(point)
    return out


# --- implicit reward of an offline policy -----------------------------------------------------


def implicit_rewards(
    policy, reference, rollout, pad_id: int, beta: float, kind: str
) -> list[float]:
    """The reward an offline method's loss pushes apart, per row of `rollout`, as `eval-rm`
    scores a policy: `ratio`: β·(log π(y|x) − log π_ref(y|x)) (Rafailov et al. 2023, Eq. 5);
    `sum`: β·log π(y|x) (CPO, reference-free); `mean`: β·log π(y|x)/|y| (SimPO, Meng et al.
    2024, Eq. 4; ORPO's λ-scaled mean log-prob). Log-probs are summed over the completion
    tokens, EOS included, exactly as the trainers score them."""
    lp = sequence_logps(policy, rollout, pad_id)
    if kind == "ratio":
        ref = sequence_logps(reference, rollout, pad_id)
        return [beta * (a - b) for a, b in zip(lp, ref)]
    if kind == "sum":
        return [beta * a for a in lp]
    if kind == "mean":
        return [beta * a / max(1, len(c)) for a, c in zip(lp, rollout.completion_ids)]
    raise ValueError(f"implicit reward kind {kind!r}: expected ratio, sum or mean")


def gold_order_accuracy(gold: Sequence[float], scores: Sequence[float]) -> tuple[float | None, int]:
    """Pairs are rows (2i, 2i+1). Of the pairs whose gold rewards differ, the fraction that
    `scores` orders the same way (a score tie counts as preferring the second), and how many
    pairs that is."""
    decided = [i for i in range(0, len(gold), 2) if gold[i] != gold[i + 1]]
    right = sum((gold[i] > gold[i + 1]) == (scores[i] > scores[i + 1]) for i in decided)
    return (right / len(decided) if decided else None), len(decided)
