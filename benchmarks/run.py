"""preftune against TRL on every trainer: same model, data and batch, side by side in one run.

    python benchmarks/run.py                      # every workload, preftune and TRL alternately
    python benchmarks/run.py --quick              # smoke run: 4 steps each, one repeat
    python benchmarks/run.py --workloads dpo-ref grpo --repeats 2
    python benchmarks/run.py --workloads sampler grpo --baseline-src ../main/src  # vs another tree
    python benchmarks/run.py --workloads ppo --trl110-python /path/to/venv-trl110/bin/python
    python benchmarks/run.py --shape qwen2-0.5b --workloads dpo-ref --assets /tmp/qwen2-shape
    python benchmarks/run.py --peak-tflops 989 --workloads dpo-ref reward   # GPU: adds MFU
    nice -n 10 python benchmarks/run.py --json results.json

Setup (identical for both): a Llama-style model with hidden 256, 4 layers, vocabulary 8,000
(random weights, saved once and loaded by both; `--shape qwen2-0.5b`: Qwen2-0.5B's
architecture, batch 4, each library's default gradient checkpointing), the byte-level `tiny`
tokenizer, synthetic text with 46-character prompts and 94-character completions (47 and 95
tokens with BOS/EOS), batch 8 (pairs for DPO/reward, examples for KTO, 2 prompts x 4 samples
for GRPO/RLOO, 8 prompts x 1 sample for PPO), max length 256, AdamW, 2 torch threads
(BENCH_THREADS). Both read the same files.

Workloads (`--workloads`):
- dpo-ref: sigmoid DPO (beta 0.1), fp32, reference model run every step;
- dpo-pre: the same with reference log-probs precomputed before training;
- dpo-bf16: dpo-ref under bf16 autocast (preftune `--mixed-precision bf16`, TRL `bf16=True`);
- kto: KTO (beta 0.1), fp32, reference every step, 8 labelled examples per step;
- reward: Bradley-Terry reward model (a one-output sequence classifier on the same backbone);
- grpo: GRPO, 2 prompts x 4 samples, 64 new tokens, no KL term (both libraries' default);
- rloo: RLOO, 2 prompts x 4 samples, 64 new tokens, KL coefficient 0.05 (reference per step);
- ppo: PPO against TRL 1.10's experimental PPOTrainer (TRL 1.16 has none; it runs under
  `--trl110-python`): 8 prompts x 1 completion of up to 64 tokens per iteration, 4 PPO epochs
  x 2 minibatches, a reward model and a value model (both the same backbone with a one-output
  head, seed 1), k1 KL in the reward (0.05), GAE(1.0, 0.95); s/iteration;
- sampler: generation alone, 8 rows x 64 new tokens: preftune's `generate` against
  transformers' `model.generate` (what TRL calls), tokens/s.

Each (workload, implementation) runs in a fresh subprocess; implementations alternate
(preftune, TRL, preftune, TRL, ...) so that load from other processes hits both alike; the
table reports the median over `--repeats`. A step is timed from the end of one optimizer step
to the end of the next (preftune: wrapping `Engine.optimizer_step`; TRL: a
`TrainerCallback.on_step_end`; PPO: one whole iteration, rollout and updates, on both sides);
the median step after `--warmup` steps is reported, as tokens/s (real tokens of the batch per
step / median step time) for the offline workloads and s/step for the online ones. Peak
memory: the subprocess's RSS high-water mark (`ru_maxrss`) at the end of the last step (what
comes after training, e.g. saving the model, is not counted); on a GPU also
`torch.cuda.max_memory_allocated`, which the memory ratio then uses.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT_CHARS, COMPLETION_CHARS = 46, 94  # + BOS and + EOS: 47 and 95 tokens (byte tokenizer)
BATCH, MAX_LENGTH, BETA, LR = 8, 256, 0.1, 5e-6
PROMPTS_PER_STEP, GENERATIONS, NEW_TOKENS = 2, 4, 64
PPO_PROMPTS, PPO_EPOCHS, PPO_MINIBATCHES = 8, 4, 2  # 1 completion per prompt, 64 new tokens
THREADS = int(os.environ.get("BENCH_THREADS", "2"))
SEQ_TOKENS = PROMPT_CHARS + 1 + COMPLETION_CHARS + 1
TRL110_PYTHON = "/work/venv-trl110/bin/python"  # a venv with trl==1.10.0 (PPO; see README)

# Model shapes (`--shape`; `--hidden`, `--layers`, ... override single fields). "tiny" is the
# default benchmark model; "qwen2-0.5b" is Qwen2-0.5B's architecture (Qwen2 with q/k/v biases,
# tied input and output embeddings) with random weights.
SHAPES = {
    "tiny": dict(
        arch="llama",
        hidden=256,
        layers=4,
        heads=4,
        kv_heads=4,
        intermediate=None,
        vocab=8000,
        tied=False,
    ),
    "qwen2-0.5b": dict(
        arch="qwen2",
        hidden=896,
        layers=24,
        heads=14,
        kv_heads=2,
        intermediate=4864,
        vocab=151936,
        tied=True,
    ),
}
SHAPE_BATCH = {"tiny": BATCH, "qwen2-0.5b": 4}  # pairs (rows) per step unless --batch

WORKLOADS = {
    # name: (unit, real tokens per step as a function of the batch, or None; description)
    "dpo-ref": ("tokens/s", lambda b: 2 * b * SEQ_TOKENS, "DPO, reference run every step (fp32)"),
    "dpo-pre": ("tokens/s", lambda b: 2 * b * SEQ_TOKENS, "DPO, precomputed reference (fp32)"),
    "dpo-bf16": (
        "tokens/s",
        lambda b: 2 * b * SEQ_TOKENS,
        "DPO, bf16 autocast, reference every step",
    ),
    "kto": ("tokens/s", lambda b: b * SEQ_TOKENS, "KTO, reference every step (fp32)"),
    "reward": ("tokens/s", lambda b: 2 * b * SEQ_TOKENS, "reward model (Bradley-Terry, fp32)"),
    "grpo": ("s/step", None, "GRPO (2 prompts x 4 samples, 64 new tokens)"),
    "rloo": ("s/step", None, "RLOO (2 prompts x 4 samples, 64 new tokens)"),
    "ppo": (
        "s/iteration",
        None,
        "PPO (8 prompts x 1 sample, 64 new tokens, 4 epochs x 2 minibatches), vs TRL 1.10",
    ),
    "sampler": ("tokens/s", None, "sampling alone (8 rows x 64 new tokens)"),
}
# Model passes per real token, for MFU: (trained passes, forward-only passes). A trained pass
# costs 3 forwards (forward + backward); the reference model is one forward.
# (KTO is left out: its KL term's extra forwards over mismatched pairs differ between the two.)
PASSES = {"dpo-ref": (1, 1), "dpo-pre": (1, 0), "dpo-bf16": (1, 1), "reward": (1, 0)}

REWARD_FN = '''
def reward(prompts, completions, **kwargs):
    """Count of the letter a: a cheap, deterministic reward both libraries call alike."""
    return [float(c.count("a")) for c in completions]
'''


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


STEP_PEAKS: list[float] = []  # the RSS high-water mark at each timed step's end


def stamp(stamps: list[float]) -> None:
    """End of a timed step: its time, and the memory high-water mark so far (so that what a
    library does after training, e.g. preftune saving the final model, is not counted)."""
    stamps.append(time.perf_counter())
    STEP_PEAKS.append(peak_rss_mb())


def memory(baseline: float) -> dict:
    return {
        "baseline_rss_mb": baseline,
        "peak_rss_mb": STEP_PEAKS[-1] if STEP_PEAKS else peak_rss_mb(),
        "end_peak_rss_mb": peak_rss_mb(),
        "cuda_peak_mb": cuda_peak_mb(),
    }


def build_model(shape: dict, tokenizer):
    """A causal LM of `shape` with random weights (seed 0), float32."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from preftune.models.tiny import build_tiny_model

    if shape["arch"] == "llama":
        return build_tiny_model(
            tokenizer,
            hidden_size=shape["hidden"],
            num_layers=shape["layers"],
            num_heads=shape["heads"],
            num_kv_heads=shape["kv_heads"],
            intermediate_size=shape["intermediate"],
            vocab_size=shape["vocab"],
            seed=0,
        )
    # Qwen2-0.5B's config, apart from the sizes: q/k/v biases, RMSNorm eps 1e-6, RoPE base 1e6.
    config = Qwen2Config(
        vocab_size=shape["vocab"],
        hidden_size=shape["hidden"],
        intermediate_size=shape["intermediate"] or 4 * shape["hidden"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        rope_theta=1_000_000.0,
        tie_word_embeddings=shape["tied"],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).float().eval()
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def make_assets(folder: Path, n_rows: int, shape: dict, reward_model: bool) -> None:
    """The model folder (weights + tokenizer), the JSONL files, the reward function, and for
    PPO a reward model: the same backbone with a one-output score head (random, seed 1)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from preftune.models.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    model = build_model(shape, tok)
    model.save_pretrained(folder / "model")
    tok.save_pretrained(folder / "model")
    del model
    if reward_model:
        torch.manual_seed(1)
        rm = AutoModelForSequenceClassification.from_pretrained(
            folder / "model", num_labels=1, dtype=torch.float32
        )
        rm.config.pad_token_id = tok.pad_token_id
        rm.save_pretrained(folder / "reward_model")
        tok.save_pretrained(folder / "reward_model")
        del rm
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz     "

    def text(n: int) -> str:
        return "".join(rng.choice(letters) for _ in range(n)).replace("  ", " x")[:n]

    with open(folder / "pairs.jsonl", "w") as pairs, open(folder / "kto.jsonl", "w") as kto:
        for i in range(n_rows):
            row = {
                "prompt": text(PROMPT_CHARS),
                "chosen": text(COMPLETION_CHARS),
                "rejected": text(COMPLETION_CHARS),
            }
            pairs.write(json.dumps(row) + "\n")
            kto.write(
                json.dumps(
                    {"prompt": row["prompt"], "completion": row["chosen"], "label": i % 2 == 0}
                )
                + "\n"
            )
    (folder / "reward_fn.py").write_text(REWARD_FN)


def load_settings(folder: Path) -> dict:
    """What the driver decided for every worker (batch, library defaults), from bench.json."""
    return json.loads((folder / "bench.json").read_text())


def cuda_peak_mb() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.max_memory_allocated() / 2**20


# --- preftune workers ------------------------------------------------------------------------


def _stamp_optimizer_steps() -> list[float]:
    import preftune.engine.engine as engine_mod

    stamps: list[float] = []
    original = engine_mod.Engine.optimizer_step

    def timed(self):
        norm = original(self)
        stamp(stamps)
        return norm

    engine_mod.Engine.optimizer_step = timed
    return stamps


def _stamp_iterations() -> list[float]:
    """The end of each online training iteration (rollout + all its updates): PPO's unit."""
    import preftune.trainers.online as online_mod

    stamps: list[float] = []
    original = online_mod.end_iteration

    def timed(*args, **kwargs):
        out = original(*args, **kwargs)
        stamp(stamps)
        return out

    online_mod.end_iteration = timed
    return stamps


def _time_generation() -> list[float]:
    """Seconds spent in preftune's sampler per call (the online trainers' generation time)."""
    import importlib

    spent: list[float] = []
    # The module that calls the sampler: trainers/rollout.py (trainers/online.py before it).
    for name in ("preftune.trainers.rollout", "preftune.trainers.online"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "generate"):
            break
    else:
        return spent
    original = module.generate

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        out = original(*args, **kwargs)
        spent.append(time.perf_counter() - t0)
        return out

    module.generate = timed
    return spent


def worker_preftune(workload: str, folder: Path, steps: int) -> dict:
    import torch

    from preftune.cli import main

    torch.set_num_threads(THREADS)
    settings = load_settings(folder)
    batch = settings["batch"]
    stamps = _stamp_iterations() if workload == "ppo" else _stamp_optimizer_steps()
    gen_times = _time_generation()
    model, out = str(folder / "model"), str(folder / f"out-preftune-{workload}")
    common = [
        "--model",
        model,
        "--output-dir",
        out,
        "--overwrite",
        "--max-steps",
        str(steps),
        "--lr",
        str(LR),
        "--dtype",
        "float32",
        "--save-steps",
        "0",
        "--logging-steps",
        str(steps),
        "--max-length",
        str(MAX_LENGTH),
        "--max-prompt-length",
        "128",
    ]
    if not settings["library_defaults"]:  # like for like; else preftune's own defaults
        common += ["--no-gradient-checkpointing", "--lr-scheduler", "linear"]
    mp = ["--mixed-precision", "bf16" if workload == "dpo-bf16" else "no"]
    pairs = str(folder / "pairs.jsonl")
    if workload.startswith("dpo"):
        argv = [
            "dpo",
            "--data",
            pairs,
            "--batch-size",
            str(batch),
            "--loss",
            "dpo",
            "--beta",
            str(BETA),
        ] + (["--precompute-ref"] if workload == "dpo-pre" else [])
    elif workload == "kto":
        argv = [
            "kto",
            "--data",
            str(folder / "kto.jsonl"),
            "--batch-size",
            str(batch),
            "--beta",
            str(BETA),
        ]
    elif workload == "reward":
        argv = ["reward", "--data", pairs, "--batch-size", str(batch)]
    elif workload == "ppo":
        # Settings named as in TRL 1.10's PPOConfig (worker_trl110), all stated explicitly.
        rm = str(folder / "reward_model")
        argv = [
            "ppo",
            "--data",
            pairs,
            "--reward-model",
            rm,
            "--value-model",
            rm,
            "--prompts-per-step",
            str(PPO_PROMPTS),
            "--num-generations",
            "1",
            "--batch-size",
            str(PPO_PROMPTS),
            "--num-minibatches",
            str(PPO_MINIBATCHES),
            "--ppo-epochs",
            str(PPO_EPOCHS),
            "--max-new-tokens",
            str(NEW_TOKENS),
            "--temperature",
            "1.0",
            "--top-p",
            "1.0",
            "--kl-coef",
            "0.05",
            "--kl-estimator",
            "k1",
            "--kl-penalty",
            "reward",
            "--clip-eps",
            "0.2",
            "--value-clip-eps",
            "0.2",
            "--vf-coef",
            "0.1",
            "--gamma",
            "1.0",
            "--lam",
            "0.95",
            "--no-whiten-rewards",
            "--whiten-advantages",
            "--loss-aggregation",
            "token",
            "--missing-eos-penalty",
            "0.0",
            "--max-grad-norm",
            "0",
        ]  # TRL 1.10's PPO loop never clips gradients
    else:  # grpo, rloo
        argv = [
            workload,
            "--data",
            pairs,
            "--reward-fn",
            f"{folder / 'reward_fn.py'}:reward",
            "--prompts-per-step",
            str(PROMPTS_PER_STEP),
            "--num-generations",
            str(GENERATIONS),
            "--max-new-tokens",
            str(NEW_TOKENS),
            "--temperature",
            "1.0",
            "--top-p",
            "1.0",
            "--kl-coef",
            "0.0" if workload == "grpo" else "0.05",
        ]
    baseline = rss_mb()
    if main(argv + common + mp) != 0:
        raise SystemExit(f"preftune {workload} failed")
    return {"stamps": stamps, "generation_s": gen_times, **memory(baseline)}


def worker_sampler(impl: str, folder: Path, steps: int) -> dict:
    """Generation alone: `steps` rounds of 8 rows x 64 new tokens, EOS never stops a row."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from preftune.generation.sampling import SamplingConfig, generate

    torch.set_num_threads(THREADS)
    tok = AutoTokenizer.from_pretrained(str(folder / "model"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(str(folder / "model"), dtype=torch.float32)
    model.to(device)
    prompts = [json.loads(line)["prompt"] for line in open(folder / "pairs.jsonl")][
        :PROMPTS_PER_STEP
    ]
    prompt_ids = [tok(p)["input_ids"] for p in prompts]
    baseline = rss_mb()
    stamps = [time.perf_counter()]
    n_tokens = []
    for step in range(steps):
        gen = torch.Generator().manual_seed(step)
        if impl == "preftune":
            ro = generate(
                model,
                tok,
                prompt_ids,
                SamplingConfig(max_new_tokens=NEW_TOKENS, stop_at_eos=False),
                num_samples=GENERATIONS,
                generator=gen,
            )
            n_tokens.append(sum(ro.completion_lengths))
        else:
            torch.manual_seed(step)
            rows = [p for p in prompt_ids for _ in range(GENERATIONS)]
            width = max(map(len, rows))
            ids = torch.tensor(
                [[tok.pad_token_id] * (width - len(r)) + r for r in rows], device=device
            )
            with torch.no_grad():
                out = model.generate(
                    input_ids=ids,
                    attention_mask=(ids != tok.pad_token_id).long(),
                    do_sample=True,
                    max_new_tokens=NEW_TOKENS,
                    min_new_tokens=NEW_TOKENS,
                    temperature=1.0,
                    top_p=1.0,
                    top_k=0,
                    pad_token_id=tok.pad_token_id,
                )
            n_tokens.append(int((out.shape[1] - width) * out.shape[0]))
        stamp(stamps)
    return {"stamps": stamps, "tokens": n_tokens, **memory(baseline)}


# --- TRL workers -----------------------------------------------------------------------------


def worker_trl(workload: str, folder: Path, steps: int) -> dict:
    import torch
    import transformers
    from datasets import load_dataset
    from transformers import AutoTokenizer, TrainerCallback

    torch.set_num_threads(THREADS)
    stamps: list[float] = []
    gen_times: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamp(stamps)

    original_generate = transformers.GenerationMixin.generate

    def timed_generate(self, *args, **kwargs):
        t0 = time.perf_counter()
        out = original_generate(self, *args, **kwargs)
        gen_times.append(time.perf_counter() - t0)
        return out

    transformers.GenerationMixin.generate = timed_generate
    settings = load_settings(folder)
    batch = settings["batch"]
    model_dir = str(folder / "model")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    common = dict(
        output_dir=str(folder / f"out-trl-{workload}"),
        max_steps=steps,
        learning_rate=LR,
        use_cpu=not torch.cuda.is_available(),
        bf16=workload == "dpo-bf16",
        fp16=False,
        model_init_kwargs={"dtype": torch.float32},
        save_strategy="no",
        report_to=[],
        logging_steps=steps,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
        max_grad_norm=1.0,
        weight_decay=0.0,
    )
    if not settings["library_defaults"]:  # like for like; else TRL's own (checkpointing on)
        common.update(lr_scheduler_type="linear", gradient_checkpointing=False)
    baseline = rss_mb()
    if workload.startswith("dpo"):
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(
            per_device_train_batch_size=batch,
            beta=BETA,
            loss_type=["sigmoid"],
            max_length=MAX_LENGTH,
            precompute_ref_log_probs=workload == "dpo-pre",
            **common,
        )
        data = load_dataset("json", data_files=str(folder / "pairs.jsonl"), split="train")
        trainer = DPOTrainer(
            model=model_dir,
            args=args,
            train_dataset=data,
            processing_class=tokenizer,
            callbacks=[Stamp()],
        )
    elif workload == "kto":
        from trl import KTOConfig, KTOTrainer

        args = KTOConfig(
            per_device_train_batch_size=batch, beta=BETA, max_length=MAX_LENGTH, **common
        )
        data = load_dataset("json", data_files=str(folder / "kto.jsonl"), split="train")
        trainer = KTOTrainer(
            model=model_dir,
            args=args,
            train_dataset=data,
            processing_class=tokenizer,
            callbacks=[Stamp()],
        )
    elif workload == "reward":
        from trl import RewardConfig, RewardTrainer

        args = RewardConfig(per_device_train_batch_size=batch, max_length=MAX_LENGTH, **common)
        data = load_dataset("json", data_files=str(folder / "pairs.jsonl"), split="train")
        trainer = RewardTrainer(
            model=model_dir,
            args=args,
            train_dataset=data,
            processing_class=tokenizer,
            callbacks=[Stamp()],
        )
    else:  # grpo, rloo
        import importlib.util

        import trl

        spec = importlib.util.spec_from_file_location("reward_fn", folder / "reward_fn.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        Config = trl.GRPOConfig if workload == "grpo" else trl.RLOOConfig
        Trainer = trl.GRPOTrainer if workload == "grpo" else trl.RLOOTrainer
        args = Config(
            per_device_train_batch_size=PROMPTS_PER_STEP * GENERATIONS,
            num_generations=GENERATIONS,
            max_completion_length=NEW_TOKENS,
            temperature=1.0,
            top_p=1.0,
            beta=0.0 if workload == "grpo" else 0.05,
            **common,
        )
        data = load_dataset("json", data_files=str(folder / "pairs.jsonl"), split="train")
        trainer = Trainer(
            model=model_dir,
            reward_funcs=module.reward,
            args=args,
            train_dataset=data,
            processing_class=tokenizer,
            callbacks=[Stamp()],
        )
    trainer.train()
    return {"stamps": stamps, "generation_s": gen_times, **memory(baseline)}


def worker_trl110_ppo(folder: Path, steps: int) -> dict:
    """TRL 1.10's experimental PPOTrainer (run under --trl110-python): the same policy,
    reference, value and reward models and PPO settings as `worker_preftune(\"ppo\")`."""
    import torch
    import transformers
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        TrainerCallback,
    )
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    torch.set_num_threads(THREADS)
    stamps: list[float] = []
    gen_times: list[float] = []

    class Stamp(TrainerCallback):  # PPOTrainer calls on_step_end once per PPO iteration
        def on_step_end(self, args, state, control, **kwargs):
            stamp(stamps)

    original_generate = transformers.GenerationMixin.generate

    def timed_generate(self, *args, **kwargs):
        t0 = time.perf_counter()
        out = original_generate(self, *args, **kwargs)
        gen_times.append(time.perf_counter() - t0)
        return out

    transformers.GenerationMixin.generate = timed_generate
    model_dir, rm_dir = str(folder / "model"), str(folder / "reward_model")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    f32 = {"dtype": torch.float32}
    baseline = rss_mb()
    policy = AutoModelForCausalLM.from_pretrained(model_dir, **f32)
    ref = AutoModelForCausalLM.from_pretrained(model_dir, **f32)
    value = AutoModelForSequenceClassification.from_pretrained(rm_dir, **f32)
    reward = AutoModelForSequenceClassification.from_pretrained(rm_dir, **f32)
    prompts = [json.loads(line)["prompt"] for line in open(folder / "pairs.jsonl")]
    data = Dataset.from_dict({"input_ids": [tokenizer(p)["input_ids"] for p in prompts]})
    args = PPOConfig(
        output_dir=str(folder / "out-trl110-ppo"),
        total_episodes=steps * PPO_PROMPTS,
        per_device_train_batch_size=PPO_PROMPTS,
        gradient_accumulation_steps=1,
        num_mini_batches=PPO_MINIBATCHES,
        num_ppo_epochs=PPO_EPOCHS,
        local_rollout_forward_batch_size=64,
        response_length=NEW_TOKENS,
        temperature=1.0,
        stop_token="eos",
        missing_eos_penalty=None,
        kl_coef=0.05,
        kl_estimator="k1",
        cliprange=0.2,
        cliprange_value=0.2,
        vf_coef=0.1,
        gamma=1.0,
        lam=0.95,
        whiten_rewards=False,
        num_sample_generations=0,
        learning_rate=LR,
        lr_scheduler_type="linear",
        use_cpu=not torch.cuda.is_available(),
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        save_strategy="no",
        report_to=[],
        logging_steps=steps,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
        weight_decay=0.0,
    )
    trainer = PPOTrainer(
        args=args,
        processing_class=tokenizer,
        model=policy,
        ref_model=ref,
        reward_model=reward,
        value_model=value,
        train_dataset=data,
        eval_dataset=data.select(range(PPO_PROMPTS)),
        callbacks=[Stamp()],
    )
    trainer.train()
    return {"stamps": stamps, "generation_s": gen_times, **memory(baseline)}


# --- driver ----------------------------------------------------------------------------------


def run_worker(
    workload: str,
    impl: str,
    folder: Path,
    steps: int,
    baseline_src: str | None = None,
    trl110_python: str | None = None,
) -> dict:
    """One fresh process; impl "baseline" is preftune imported from `baseline_src`; TRL's PPO
    runs under `trl110_python` (TRL 1.16 has no PPOTrainer)."""
    python = trl110_python if (impl == "trl" and workload == "ppo") else sys.executable
    cmd = [
        python,
        __file__,
        "--worker",
        "preftune" if impl == "baseline" else impl,
        "--worker-workload",
        workload,
        "--folder",
        str(folder),
        "--steps",
        str(steps),
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(THREADS),
        "TOKENIZERS_PARALLELISM": "false",
        "TRL_EXPERIMENTAL_SILENCE": "1",
    }
    if impl == "baseline":
        env["PYTHONPATH"] = os.pathsep.join(
            [baseline_src]
            + [
                p
                for p in env.get("PYTHONPATH", "").split(os.pathsep)
                if p and Path(p).resolve() != (Path(__file__).resolve().parents[1] / "src")
            ]
        )
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{impl} {workload} worker failed:\n{proc.stderr[-4000:]}")
    return {
        **json.loads(proc.stdout.strip().splitlines()[-1]),
        "wall_s": time.perf_counter() - t0,
    }  # the whole process: loading, steps, saving


def model_flops_per_token(config: dict, seq_len: int) -> tuple[float, float]:
    """(training, forward-only) FLOPs per token of a decoder (Chowdhery et al. 2022, PaLM,
    App. B: 6N + 12·L·H·Q·T for training, a third of it forward), from the model's
    config.json: N counts the matmul weights of the layers and of the output head (not the
    embedding lookup, norms or biases)."""
    h, layers = config["hidden_size"], config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or h // heads
    attn = 2 * h * heads * head_dim + 2 * h * kv * head_dim  # q and o; k and v
    n = layers * (attn + 3 * h * config["intermediate_size"]) + h * config["vocab_size"]
    train = 6 * n + 12 * layers * h * seq_len
    return train, train / 3


def mfu(workload: str, row: dict, config: dict, peak_tflops: float) -> float | None:
    """Model FLOPs utilisation: model FLOPs per token x tokens/s / the device's peak FLOPs."""
    if workload not in PASSES:
        return None
    train, forward = model_flops_per_token(config, SEQ_TOKENS)
    trained, forward_only = PASSES[workload]
    return (trained * train + forward_only * forward) * row["value"] / (peak_tflops * 1e12)


def summarise(workload: str, raw: dict, warmup: int, batch: int) -> dict:
    unit, tokens, _ = WORKLOADS[workload]
    stamps = raw["stamps"]
    if len(stamps) <= warmup + 1:
        raise SystemExit(
            f"{workload}: only {len(stamps)} steps timed; need more than "
            f"--warmup + 1 = {warmup + 1}"
        )
    intervals = [b - a for a, b in zip(stamps[warmup:], stamps[warmup + 1 :])]
    step_s = statistics.median(intervals)  # robust to a neighbour's burst on a shared machine
    row = {
        "step_s": step_s,
        "peak_rss_mb": raw["peak_rss_mb"],
        "train_rss_mb": raw["peak_rss_mb"] - raw["baseline_rss_mb"],
        "end_peak_rss_mb": raw["end_peak_rss_mb"],
        "wall_s": raw["wall_s"],
    }
    if raw.get("cuda_peak_mb") is not None:
        row["cuda_peak_mb"] = raw["cuda_peak_mb"]
    if workload == "sampler":
        row["value"] = statistics.median(raw["tokens"]) / step_s
    elif unit == "tokens/s":
        row["value"] = tokens(batch) / step_s
    else:
        row["value"] = step_s
    gen = raw.get("generation_s") or []
    if len(gen) > warmup:
        row["generation_s"] = statistics.median(gen[warmup:])
    return row


def machine(trl110_python: str | None) -> dict:
    import torch
    import transformers

    flags = set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                flags |= {
                    f
                    for f in line.split(":", 1)[1].split()
                    if f == "avx512_bf16" or f.startswith("amx")
                }
    except OSError:
        pass
    model = platform.processor()
    try:
        model = next(
            line.split(":", 1)[1].strip()
            for line in open("/proc/cpuinfo")
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    try:
        import trl

        trl_version = trl.__version__
    except ImportError:
        trl_version = "not installed"
    info = {
        "cpu": model,
        "cores": os.cpu_count(),
        "bf16_flags": sorted(flags) or ["none"],
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "load_average": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl_version,
        "threads": THREADS,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    if trl110_python:
        proc = subprocess.run(
            [
                trl110_python,
                "-c",
                "import torch, transformers, trl; print("
                "trl.__version__, transformers.__version__, torch.__version__)",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        info["trl110_env"] = proc.stdout.strip() or f"broken: {proc.stderr.strip()[-200:]}"
    return info


def fmt(workload: str, row: dict | None) -> str:
    if row is None:
        return "-"
    unit = WORKLOADS[workload][0]
    value = f"{row['value']:,.0f} tokens/s" if unit == "tokens/s" else f"{row['value']:.2f} {unit}"
    extra = f", gen {row['generation_s']:.2f} s" if "generation_s" in row else ""
    gpu = f", GPU {row['cuda_peak_mb']:,.0f} MB" if "cuda_peak_mb" in row else ""
    mfu_text = f", MFU {100 * row['mfu']:.1f}%" if row.get("mfu") is not None else ""
    return f"{value}{extra}, {row['peak_rss_mb']:,.0f} MB{gpu}{mfu_text}"


def resolve_shape(args) -> dict:
    """`--shape` with the single-field overrides applied."""
    shape = dict(SHAPES[args.shape])
    for field in ("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab"):
        if getattr(args, field) is not None:
            shape[field] = getattr(args, field)
    if shape["hidden"] % shape["heads"] or shape["heads"] % shape["kv_heads"]:
        raise SystemExit(
            f"--shape: hidden {shape['hidden']} must be a multiple of heads "
            f"{shape['heads']}, and heads of kv-heads {shape['kv_heads']}"
        )
    return shape


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--impl", choices=("preftune", "trl", "both"), default="both")
    parser.add_argument(
        "--steps", type=int, default=12, help="optimizer steps per run (PPO: iterations)"
    )
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the timing")
    parser.add_argument("--repeats", type=int, default=1, help="runs per implementation (median)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 steps, warm-up 1")
    parser.add_argument(
        "--baseline-src",
        metavar="DIR",
        help="also run preftune imported from this src folder (e.g. a checkout "
        "of an earlier commit), as a third column: the speed-up over it",
    )
    parser.add_argument(
        "--trl110-python",
        metavar="PATH",
        default=TRL110_PYTHON if Path(TRL110_PYTHON).exists() else None,
        help="a Python with trl==1.10.0 for TRL's side of `ppo` (default: "
        f"{TRL110_PYTHON} where it exists; without one TRL's PPO is skipped)",
    )
    parser.add_argument(
        "--shape",
        choices=list(SHAPES),
        default="tiny",
        help="model shape (random weights): `tiny` (hidden 256, 4 layers, "
        "vocabulary 8,000) or `qwen2-0.5b` (Qwen2-0.5B's architecture)",
    )
    for name in ("hidden", "layers", "heads", "kv-heads", "intermediate", "vocab"):
        parser.add_argument(f"--{name}", type=int, help=f"override the shape's {name}")
    parser.add_argument(
        "--batch",
        type=int,
        help="pairs (DPO, reward) or examples (KTO) per step (default 8; 4 "
        "with --shape qwen2-0.5b)",
    )
    parser.add_argument(
        "--library-defaults",
        action=argparse.BooleanOptionalAction,
        help="each library's own defaults for gradient checkpointing (TRL: on, "
        "preftune: off) and the LR schedule, instead of like-for-like settings "
        "(default: on with --shape qwen2-0.5b, off otherwise)",
    )
    parser.add_argument(
        "--peak-tflops",
        type=float,
        help="the device's peak dense TFLOP/s at the run's precision (e.g. 989 "
        "for an H100 SXM in bf16): adds model FLOPs utilisation (MFU) to the "
        "DPO and reward rows of a GPU run",
    )
    parser.add_argument(
        "--assets",
        metavar="DIR",
        help="keep the model, reward model and data in this folder instead of a "
        "temporary one, and reuse them when they were made for the same shape "
        "and row count (the qwen2-0.5b weights take a minute and 2 GB)",
    )
    parser.add_argument("--json", metavar="FILE", help="also write the results here")
    parser.add_argument("--worker", choices=("preftune", "trl"), help=argparse.SUPPRESS)
    parser.add_argument("--worker-workload", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.steps, args.warmup, args.repeats = 4, 1, 1

    if args.worker:
        folder = Path(args.folder)
        if args.worker_workload == "sampler":
            result = worker_sampler(args.worker, folder, args.steps)
        elif args.worker == "preftune":
            result = worker_preftune(args.worker_workload, folder, args.steps)
        elif args.worker_workload == "ppo":
            result = worker_trl110_ppo(folder, args.steps)
        else:
            result = worker_trl(args.worker_workload, folder, args.steps)
        print(json.dumps(result))
        return

    import torch

    shape = resolve_shape(args)
    batch = args.batch or SHAPE_BATCH.get(args.shape, BATCH)
    library_defaults = (
        args.shape == "qwen2-0.5b" if args.library_defaults is None else args.library_defaults
    )
    on_gpu = torch.cuda.is_available()
    impls = ["preftune", "trl"] if args.impl == "both" else [args.impl]
    if args.baseline_src:
        impls.append("baseline")
    trl110 = args.trl110_python if "ppo" in args.workloads else None
    if "ppo" in args.workloads and "trl" in impls and not trl110:
        print(
            f"ppo: no --trl110-python (and no {TRL110_PYTHON}): TRL's PPO is skipped; see "
            "benchmarks/README.md for its environment",
            flush=True,
        )
    report = {
        "machine": machine(trl110),
        "setup": {
            "shape": args.shape,
            **shape,
            "prompt_tokens": PROMPT_CHARS + 1,
            "completion_tokens": COMPLETION_CHARS + 1,
            "batch": batch,
            "max_length": MAX_LENGTH,
            "library_defaults": library_defaults,
            "steps": args.steps,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "peak_tflops": args.peak_tflops,
        },
        "results": {},
    }
    print(f"machine: {json.dumps(report['machine'])}")
    print(f"setup: {json.dumps(report['setup'])}", flush=True)
    with tempfile.TemporaryDirectory(prefix="preftune-bench-") as tmp:
        folder = Path(args.assets or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        made_for = {
            "shape": shape,
            "rows": max(args.steps * max(batch, PPO_PROMPTS), 64),
            "reward_model": "ppo" in args.workloads,
        }
        stamp = folder / "assets.json"
        old = json.loads(stamp.read_text()) if stamp.exists() else None
        if not (
            old
            and old["shape"] == shape
            and old["rows"] >= made_for["rows"]
            and (old["reward_model"] or not made_for["reward_model"])
        ):
            make_assets(
                folder, n_rows=made_for["rows"], shape=shape, reward_model=made_for["reward_model"]
            )
            stamp.write_text(json.dumps(made_for))
        (folder / "bench.json").write_text(
            json.dumps({"batch": batch, "library_defaults": library_defaults})
        )
        config = json.loads((folder / "model" / "config.json").read_text())
        for workload in args.workloads:
            todo = [i for i in impls if not (i == "trl" and workload == "ppo" and not trl110)]
            runs: dict[str, list[dict]] = {impl: [] for impl in todo}
            for _ in range(args.repeats):
                for impl in todo:  # alternate: preftune, TRL, preftune, TRL, ...
                    raw = run_worker(workload, impl, folder, args.steps, args.baseline_src, trl110)
                    if len(raw["stamps"]) <= args.warmup + 1:  # a smoke run: nothing to time
                        print(
                            f"  {workload:8s} {impl:8s} {len(raw['stamps'])} step(s), too few "
                            f"to time after --warmup {args.warmup}; peak RSS "
                            f"{raw['peak_rss_mb']:,.0f} MB at the last step, "
                            f"{raw['end_peak_rss_mb']:,.0f} MB by the end",
                            flush=True,
                        )
                        continue
                    row = summarise(workload, raw, args.warmup, batch)
                    if on_gpu and args.peak_tflops:  # MFU means little on a CPU: GPU runs only
                        row["mfu"] = mfu(workload, row, config, args.peak_tflops)
                    runs[impl].append(row)
                    print(
                        f"  {workload:8s} {impl:8s} {fmt(workload, row)} "
                        f"({row['wall_s']:.0f} s in all)",
                        flush=True,
                    )
            rows = {
                impl: {
                    k: statistics.median(r[k] for r in rs) if rs[0][k] is not None else None
                    for k in rs[0]
                }
                for impl, rs in runs.items()
                if rs
            }
            faster = WORKLOADS[workload][0] == "tokens/s"
            memory = "cuda_peak_mb" if on_gpu else "peak_rss_mb"
            ratios = {}
            for other in ("trl", "baseline"):
                if "preftune" in rows and other in rows:
                    p, t = rows["preftune"], rows[other]
                    ratios[other] = {
                        "speed": p["value"] / t["value"] if faster else t["value"] / p["value"],
                        "peak_rss": p["peak_rss_mb"] / t["peak_rss_mb"],
                    }
                    if on_gpu:
                        ratios[other]["peak_gpu"] = p[memory] / t[memory]
            if "trl" in ratios:
                rows["ratios"] = ratios["trl"]
            if "baseline" in ratios:
                rows["ratios_vs_baseline"] = ratios["baseline"]
            report["results"][workload] = rows
    print()
    mem_key, mem_name = ("peak_gpu", "GPU memory") if on_gpu else ("peak_rss", "memory")
    base = " baseline | speed vs baseline |" if args.baseline_src else ""
    print(f"| workload | preftune | TRL | speed ratio | {mem_name} ratio |" + base)
    print("| --- | --- | --- | --- | --- |" + (" --- | --- |" if base else ""))
    for workload, rows in report["results"].items():
        r, b = rows.get("ratios"), rows.get("ratios_vs_baseline")
        line = (
            f"| {WORKLOADS[workload][2]} | {fmt(workload, rows.get('preftune'))} | "
            f"{fmt(workload, rows.get('trl'))} | "
            + (f"{r['speed']:.2f}x | {r[mem_key]:.2f}x |" if r else "- | - |")
        )
        if base:
            line += f" {fmt(workload, rows.get('baseline'))} | " + (
                f"{b['speed']:.2f}x |" if b else "- |"
            )
        print(line)
    if args.json:
        tmp_path = Path(args.json).with_suffix(".tmp")
        tmp_path.write_text(json.dumps(report, indent=2))
        os.replace(tmp_path, args.json)


if __name__ == "__main__":
    main()
