"""The stages of a lab run, as functions: base policy, prompt split and preference data, the
trainer settings of each cell, checkpoint loading and cost accounting.

1. base policy: `run_sft` on a corpus written from the world's demonstrations; cached under
   `cache_dir` by a hash of its settings (trained in a temporary folder, then renamed);
2. prompts: the world's three-way split (train / validation / test seen + unseen), disjoint as
   strings, drawn per seed;
3. preference data per noise setting: two base-policy samples per training prompt, pairs that
   tie on gold dropped (and counted), the rest labelled by Bradley-Terry on the gold reward
   with the noise setting's flip rate;
4. a reward model per noise setting (`run_reward` with early stopping on held-out pairs), and
   for the ensemble variants an ensemble of K of them (`run_reward` with `ensemble=K`);
5. methods, each trained by the same `run_*` function and config a user runs, with
   checkpoints along the way that the runner evaluates.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

from preftune.lab import evaluate as ev
from preftune.lab.methods import METHODS, OFFLINE, ONLINE
from preftune.lab.plan import Plan, flip_rate, noise_rate
from preftune.lab.worlds import bt_label_pairs
from preftune.utils import atomic_write_json, atomic_write_text

# Temperature of the Bradley-Terry draw that labels the pairs. Gold gaps are O(1) in both
# worlds; at temperature 1 the draw alone disagreed with the gold argmax on ~20% of pairs, so
# the flip rate would not be the disagreement it stands for. At 0.1 the flip rate sets it.
LABEL_TEMPERATURE = 0.1
MAX_LENGTH = 96  # prompt <= 41 tokens (BOS + 40 bytes), completion <= 49 (48 bytes + EOS)
MAX_PROMPT_LENGTH = 44
QUIET = 10**9  # logging_steps: trainers log once, at their last step
SFT_LR = 3e-3
REWARD_LR = 1e-3
REWARD_EVAL_STEPS = 20  # held-out loss of the reward model every this many steps...
REWARD_PATIENCE = 3  # ...and stop after this many evaluations without improvement


def hash_of(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


@contextlib.contextmanager
def captured_output(log_path: Path):
    """Trainer output (data reports, progress bars, warnings) goes to the cell's log file."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with (
        open(log_path, "a") as log,
        contextlib.redirect_stderr(log),
        contextlib.redirect_stdout(log),
    ):
        yield


def trainer(name: str):
    """(config class, run function) of a method, or of `sft`/`reward`."""
    import importlib

    if name == "sft":
        from preftune.trainers.sft import SFTConfig, run_sft

        return SFTConfig, run_sft
    if name == "reward":
        from preftune.trainers.reward import RewardConfig, run_reward

        return RewardConfig, run_reward
    m = METHODS[name]
    mod = importlib.import_module(m.module)
    return getattr(mod, m.config), getattr(mod, m.run)


def common_settings(seed: int) -> dict[str, Any]:
    # curves=False: the lab's many short runs need no training-curve figure each
    return dict(
        max_length=MAX_LENGTH,
        max_prompt_length=MAX_PROMPT_LENGTH,
        seed=seed,
        logging_steps=QUIET,
        save_steps=0,
        overwrite=True,
        report_to="",
        curves=False,
    )


def tokens_trained(run_dir: Path) -> int:
    """Tokens (prompt + completion, no padding) through forward+backward, from metrics.jsonl:
    the engine logs `tokens_per_s` and `step_time_s` over each logging window."""
    total, previous = 0.0, 0
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if "tokens_per_s" in rec and "step_time_s" in rec:
            total += rec["tokens_per_s"] * rec["step_time_s"] * (rec["step"] - previous)
            previous = rec["step"]
    return int(round(total))


# --- stage 1: the base policy ------------------------------------------------------------------


def base_settings(plan: Plan, world: str, seed: int, lab_format: int) -> dict:
    return {
        "lab_format": lab_format,
        "world": world,
        "model": plan.model,
        "steps": plan.sft_steps,
        "corpus": plan.sft_examples,
        "lr": SFT_LR,
        "batch_size": 32,
        "max_length": MAX_LENGTH,
        "seed": seed,
    }


def train_base_policy(settings: dict, world, final: Path, log_path: Path) -> None:
    """Train the SFT policy into `final` (via a temporary folder renamed at the end)."""
    seed = settings["seed"]
    cache_dir = final.parent
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    corpus = world.make_corpus(settings["corpus"], random.Random(seed * 7919 + 1))
    corpus_path = cache_dir / f".tmp-corpus-{final.name}-{os.getpid()}.jsonl"
    write_jsonl(corpus_path, [{"prompt": p, "completion": c} for p, c in corpus])
    config_cls, run = trainer("sft")
    cfg = config_cls(
        model=settings["model"],
        data=str(corpus_path),
        output_dir=str(tmp),
        max_steps=settings["steps"],
        batch_size=32,
        lr=SFT_LR,
        warmup_steps=20,
        **common_settings(seed),
    )
    cfg.validate()
    try:
        t0 = time.perf_counter()
        with captured_output(log_path):
            metrics = run(cfg)
        atomic_write_json(
            tmp / "lab_base.json",
            {
                "settings": settings,
                "metrics": metrics,
                "wall_time_s": time.perf_counter() - t0,
                "tokens_trained": tokens_trained(tmp),
            },
        )
        try:
            os.replace(tmp, final)
        except OSError:  # another lab finished the same base policy first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        corpus_path.unlink(missing_ok=True)


# --- stage 2: prompts and preference data ------------------------------------------------------


def prompt_split(world, seed: int):
    return world.split_prompts(random.Random(seed * 7919 + 5))


def eval_prompt_sets(world, seed: int, n: int, tokenizer) -> dict[str, ev.PromptSet]:
    """Validation prompts (n) and test prompts (n seen, then n unseen), drawn with replacement
    from the split's strings with a fixed seed: the same for every cell of a seed."""
    split = prompt_split(world, seed)
    rng = random.Random(seed * 7919 + 6)
    val = [rng.choice(split.validation) for _ in range(n)]
    seen = [rng.choice(split.test_seen) for _ in range(n)]
    unseen = [rng.choice(split.test_unseen) for _ in range(n)]
    return {
        "validation": ev.PromptSet(val, ev.encode_prompts(tokenizer, val)),
        "test": ev.PromptSet(
            seen + unseen,
            ev.encode_prompts(tokenizer, seen + unseen),
            {"seen": (0, n), "unseen": (n, 2 * n)},
        ),
    }


def make_data(plan: Plan, world, seed: int, noise: str, base, tokenizer, data_dir: Path) -> dict:
    """pairs.jsonl and prompts.jsonl of (world, seed, noise) on training prompts only."""
    split = prompt_split(world, seed)
    rng = random.Random(seed * 7919 + 2)  # the same prompts and samples for every noise setting
    prompts = [rng.choice(split.train) for _ in range(plan.pairs)]
    rollout, texts = ev.sample(
        base,
        tokenizer,
        ev.encode_prompts(tokenizer, prompts),
        world.max_new_tokens,
        seed * 7919 + 3,
        num_samples=2,
    )
    first, second = texts[0::2], texts[1::2]
    gold_a = world.gold_reward(prompts, first)
    gold_b = world.gold_reward(prompts, second)
    kept = [i for i in range(len(prompts)) if first[i] != second[i] and gold_a[i] != gold_b[i]]
    identical = sum(first[i] == second[i] for i in range(len(prompts)))
    # Pairs that tie on gold carry no preference; they are dropped, never coin-flipped.
    ties = len(prompts) - identical - len(kept)
    labels = bt_label_pairs(
        [gold_a[i] for i in kept],
        [gold_b[i] for i in kept],
        noise=noise_rate(noise),
        rng=random.Random(seed * 7919 + 4),
        temperature=LABEL_TEMPERATURE,
    )
    pairs, agree = [], 0
    for i, a_wins in zip(kept, labels):
        agree += (gold_a[i] > gold_b[i]) == a_wins
        chosen, rejected = (first[i], second[i]) if a_wins else (second[i], first[i])
        pairs.append({"prompt": prompts[i], "chosen": chosen, "rejected": rejected})
    write_jsonl(data_dir / "pairs.jsonl", pairs)
    write_jsonl(data_dir / "prompts.jsonl", [{"prompt": p} for p in prompts])
    return {
        "pairs": len(pairs),
        "sampled": len(prompts),
        "identical_dropped": identical,
        "gold_ties_dropped": ties,
        "label_agreement_with_gold": agree / len(kept) if kept else None,
        "noise": noise,
        "flip_rate": flip_rate(noise),
        "tokens_generated": sum(len(c) for c in rollout.completion_ids),
    }


# --- stages 4 and 5: trainer settings --------------------------------------------------------------


def reward_settings(plan: Plan, seed: int) -> dict[str, Any]:
    # logging_steps: a run stopped early never reaches a QUIET log line, and `tokens_trained`
    # reads the logged throughput: log at every evaluation so the cost is counted.
    return dict(
        **{**common_settings(seed), "logging_steps": REWARD_EVAL_STEPS},
        max_steps=plan.reward_max_steps,
        batch_size=16,
        lr=REWARD_LR,
        warmup_steps=10,
        eval_fraction=0.15,
        eval_steps=REWARD_EVAL_STEPS,
        early_stopping_patience=REWARD_PATIENCE,
    )


def ensemble_settings(plan: Plan, seed: int) -> dict[str, Any]:
    """`reward_settings` for K members (seeds seed..seed+K-1, the same held-out pairs)."""
    return {**reward_settings(plan, seed), "ensemble": plan.ensemble_size}


def checkpoint_every(max_steps: int, points: int) -> int:
    return max(1, max_steps // points)


def method_settings(
    plan: Plan, method: str, value: float, lr: float, seed: int, noise, world
) -> dict[str, Any]:
    """The trainer settings the lab chooses for one cell (paths are added by the caller)."""
    m = METHODS[method]
    settings = {**common_settings(seed), **m.fixed, m.knob: value, "lr": lr, "save_total_limit": 0}
    if m.kind == OFFLINE:
        every = checkpoint_every(plan.offline_steps, plan.eval_points)
        settings.update(
            max_steps=plan.offline_steps,
            batch_size=16,
            warmup_steps=10,
            save_steps=every,
            logging_steps=every,
        )
        if method in ("cdpo", "robust"):
            # Conservative/robust DPO take the label flip rate: the lab knows it.
            settings["label_smoothing"] = flip_rate(noise) or 0.1
        if method in ("dpo", "ipo", "cdpo", "robust", "hinge"):
            settings["precompute_ref"] = True
    else:
        assert m.kind == ONLINE
        settings.update(
            max_steps=plan.online_steps,
            batch_size=32,
            warmup_steps=3,
            max_new_tokens=world.max_new_tokens,
            generation_batch_size=64,
            reward_batch_size=64,
            save_steps=checkpoint_every(plan.online_steps, plan.eval_points),
        )
    return settings


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, checkpoint folder) of a finished run, in order; the final model is the last
    point (step None -> the run's max step), read from run_dir itself."""
    root = run_dir / "checkpoints"
    found = sorted(
        (
            (int(p.name.split("-")[1]), p)
            for p in root.glob("step-*")
            if (p / "trainer_state.json").is_file()
        ),
        key=lambda x: x[0],
    )
    return found


def load_checkpoint_weights(model, folder: Path) -> None:
    """Load a policy's weights from an accelerate checkpoint. Accelerate numbers the model files
    in the order the models were prepared: a frozen reference (prepared first, by
    `build_reference`) is `model.safetensors`, so the trained module, prepared last by
    `Engine.setup`, is the highest-numbered file; the policy sits under some prefix
    (`policy.` for PPO, none for DPO)."""
    from safetensors.torch import load_file

    files = sorted(
        folder.glob("model*.safetensors"), key=lambda p: int(p.stem.partition("_")[2] or 0)
    )
    state = load_file(str(files[-1]))
    wanted = model.state_dict()
    for prefix in ("", "policy.", "model.", "module.", "policy.model."):
        sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        missing = [k for k in wanted if k not in sub]
        if not missing or missing == ["lm_head.weight"]:  # a tied head may be stored once
            model.load_state_dict({k: sub.get(k, wanted[k]) for k in wanted})
            if missing:
                model.tie_weights()
            return
    raise RuntimeError(f"{folder}: no prefix of the checkpoint's tensors matches the policy")
