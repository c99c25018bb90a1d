"""`preftune best-of-n`: sample N completions per prompt, keep the best by the reward source.

Not a training run (no optimizer): it loads the model, prompts and reward source as the online
trainers do and writes, atomically, to `output_dir`:
- `best_of_n.jsonl`: one row per prompt, {prompt, completion, reward} of the best completion;
- `pairs.jsonl`: {prompt, chosen, rejected, chosen_reward, rejected_reward}, best vs worst, for
  iterative DPO (`preftune dpo --data pairs.jsonl`); prompts whose N rewards all tie are left
  out (no preference);
- `summary.json`: mean reward of the best, of all and of the worst completions, and the
  analytic KL bound of the best-of-N policy, KL(π_bon ‖ π) ≤ log N − (N−1)/N (Stiennon et al.
  2020, App. G.3; Beirami et al. 2024 show it is an upper bound).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from preftune.config import DataSettings, RunSettings, arg, save_config
from preftune.errors import PreftuneError
from preftune.models.loading import load_causal_lm
from preftune.trainers.common import prepare_tokenizer
from preftune.trainers.rollout import (
    RolloutSettings,
    load_prompts,
    load_reward,
    make_generator_backend,
    sample_and_score,
    sampling_seed,
)
from preftune.utils import atomic_write_json, atomic_write_text


@dataclass
class BestOfNConfig(RunSettings, DataSettings, RolloutSettings):
    """The rollout's blocks (model, token budgets, sampling, reward), the data's and the
    output folder's, plus N."""

    model: str = arg("tiny", "Policy to sample from: a local folder, a hub name, or `tiny`.")
    data: str = arg(
        "demo",
        "Prompts: any file or dataset with a prompt column (prompt-only, "
        "pairs, conversations). `demo` is the built-in HH-RLHF sample.",
    )
    max_prompts: int = arg(0, "Use only the first this many prompts (0: all).")
    n: int = arg(4, "N: completions sampled per prompt.")
    prompts_per_batch: int = arg(16, "Prompts sampled and scored together.")
    output_dir: str = arg("", "Where the dataset and summary go (default: runs/best-of-n).")
    overwrite: bool = arg(False, "Replace the files of a previous run in `output_dir`.")
    seed: int = arg(0, "Seed for `tiny`'s weights and for sampling.")

    def check(self) -> None:
        for name, value in (("n", self.n), ("prompts_per_batch", self.prompts_per_batch)):
            if not isinstance(value, int) or value < 1:
                raise PreftuneError(f"{name}: got {value!r}, expected an integer >= 1")
        if self.max_prompts < 0:
            raise PreftuneError(f"max_prompts: got {self.max_prompts}, expected an integer >= 0")


def kl_bound(n: int) -> float:
    """KL(best-of-n ‖ π) ≤ log n − (n−1)/n (Stiennon et al. 2020; Beirami et al. 2024, Thm. 1)."""
    return math.log(n) - (n - 1) / n


def run_best_of_n(cfg: BestOfNConfig) -> dict:
    out_dir = Path(cfg.output_dir or "runs/best-of-n")
    if (out_dir / "config.yaml").exists() and not cfg.overwrite:
        raise PreftuneError(
            f"output directory {out_dir} already holds a run (config.yaml): pass "
            "--overwrite to replace it, or another --output-dir"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.yaml", extra={"command": "best-of-n"})

    def log(*args):
        print(*args, file=sys.stderr, flush=True)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_causal_lm(cfg.model, dtype=cfg.dtype, seed=cfg.seed)
    prepare_tokenizer(tokenizer, cfg)
    model.to(device).eval()
    prompts = load_prompts(cfg, tokenizer, log=log)
    if cfg.max_prompts:
        prompts = prompts[: cfg.max_prompts]
    reward = load_reward(cfg, device)
    vllm_backend = make_generator_backend(cfg, tokenizer)

    best_rows, pair_rows = [], []
    ensemble_std: list[float] = []
    all_rewards, best_rewards, worst_rewards = [], [], []
    times = {"time/generation_s": 0.0, "time/scoring_s": 0.0}
    for start in range(0, len(prompts), cfg.prompts_per_batch):
        features = prompts[start : start + cfg.prompts_per_batch]
        scored = sample_and_score(
            cfg,
            model,
            tokenizer,
            reward,
            features,
            cfg.n,
            sampling_seed(cfg.seed, start, 0),
            device,
            times,
            vllm_backend,
        )
        rewards, texts = scored.rewards, scored.completions
        if "ensemble_std" in scored.components:  # the members' disagreement (an ensemble)
            ensemble_std += scored.components["ensemble_std"].tolist()
        grouped = rewards.view(len(features), cfg.n)
        for i, f in enumerate(features):
            group = grouped[i]
            best, worst = int(group.argmax()), int(group.argmin())
            completions = texts[i * cfg.n : (i + 1) * cfg.n]
            best_rows.append(
                {
                    "prompt": f["prompt"],
                    "completion": completions[best],
                    "reward": float(group[best]),
                }
            )
            if float(group[best]) > float(group[worst]):
                pair_rows.append(
                    {
                        "prompt": f["prompt"],
                        "chosen": completions[best],
                        "rejected": completions[worst],
                        "chosen_reward": float(group[best]),
                        "rejected_reward": float(group[worst]),
                    }
                )
            best_rewards.append(float(group[best]))
            worst_rewards.append(float(group[worst]))
        all_rewards += rewards.tolist()

    _write_jsonl(out_dir / "best_of_n.jsonl", best_rows)
    _write_jsonl(out_dir / "pairs.jsonl", pair_rows)
    summary = {
        "n": cfg.n,
        "prompts": len(best_rows),
        "pairs": len(pair_rows),
        "reward/best_mean": sum(best_rewards) / len(best_rewards),
        "reward/all_mean": sum(all_rewards) / len(all_rewards),
        "reward/worst_mean": sum(worst_rewards) / len(worst_rewards),
        "kl_bound": kl_bound(cfg.n),
        **times,
    }
    if ensemble_std:
        summary["reward/ensemble_std"] = sum(ensemble_std) / len(ensemble_std)
    atomic_write_json(out_dir / "summary.json", summary)
    log(
        f"best-of-{cfg.n} over {len(best_rows)} prompts: mean reward of the best "
        f"{summary['reward/best_mean']:.4f}, of all {summary['reward/all_mean']:.4f}; "
        f"KL(best-of-n ‖ policy) <= log N - (N-1)/N = {summary['kl_bound']:.4f} nats. "
        f"Wrote {out_dir / 'best_of_n.jsonl'} and {len(pair_rows)} pairs to "
        f"{out_dir / 'pairs.jsonl'}"
    )
    return summary


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    """All rows at once through a temporary file and a rename: never a half-written dataset."""
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
