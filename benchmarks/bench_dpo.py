"""DPO speed and memory: preftune against TRL's DPOTrainer, same model, data and batch.

    python benchmarks/bench_dpo.py                 # both settings, both implementations
    python benchmarks/bench_dpo.py --mode on-the-fly --steps 12
    python benchmarks/bench_dpo.py --impl preftune --steps 3   # one side only (a smoke run)

Setup (identical for both): a Llama-style model with hidden 256, 4 layers, vocabulary 8,000
(random weights, saved once and loaded by both), the byte-level `tiny` tokenizer, synthetic
pairs with 47-token prompts (BOS included) and 95-token completions (EOS included), 8 pairs per
step, max length 256, float32, no gradient checkpointing, no mixed precision, AdamW, sigmoid
DPO loss with β = 0.1, 2 torch threads. Both read the same JSONL file of text pairs.

Two like-for-like settings (`--mode`):
- on-the-fly: each step runs the reference model forward (TRL: a second model loaded from
  the same folder; preftune: a frozen copy of the initial policy);
- precomputed: reference log-probs computed once before training (preftune
  `--precompute-ref`; TRL `precompute_ref_log_probs=True`); no reference forward while training.

Measures, each implementation in a fresh subprocess run one after the other:
- steady-state tokens/s: real (non-pad) tokens of chosen + rejected sequences per optimizer
  step (2,272) divided by the median wall time of the steps after `--warmup` (each step timed
  from the end of one optimizer step to the end of the next: preftune by wrapping
  `Engine.optimizer_step`, TRL by a `TrainerCallback.on_step_end`); the median, because a
  shared machine's neighbours make single steps slow; the mean is reported too;
- peak memory: the process's RSS high-water mark (`ru_maxrss`) at the end of training, and the
  same minus the RSS after imports (what training itself added on top of the libraries).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HIDDEN, LAYERS, VOCAB = 256, 4, 8000
PROMPT_CHARS, COMPLETION_CHARS = 46, 94  # + BOS and + EOS: 47 and 95 tokens (byte tokenizer)
BATCH_PAIRS, MAX_LENGTH, BETA, LR = 8, 256, 0.1, 5e-6
THREADS = int(os.environ.get("BENCH_THREADS", "2"))


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def make_assets(folder: Path, n_pairs: int) -> tuple[Path, Path]:
    """The model folder (weights + tokenizer) and the JSONL pairs both implementations read."""
    import torch

    from preftune.models.tiny import build_tiny_model, build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok, hidden_size=HIDDEN, num_layers=LAYERS, vocab_size=VOCAB, seed=0)
    model_dir = folder / "model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz     "
    data = folder / "pairs.jsonl"
    with open(data, "w") as f:
        for _ in range(n_pairs):
            text = lambda n: "".join(rng.choice(letters) for _ in range(n)).replace("  ", " x")[:n]
            f.write(json.dumps({"prompt": text(PROMPT_CHARS), "chosen": text(COMPLETION_CHARS),
                                "rejected": text(COMPLETION_CHARS)}) + "\n")
    del model, torch
    return model_dir, data


def tokens_per_step() -> int:
    return BATCH_PAIRS * 2 * (PROMPT_CHARS + 1 + COMPLETION_CHARS + 1)


# --- workers (one fresh process each) --------------------------------------------------------

def worker_preftune(model_dir: Path, data: Path, out: Path, steps: int, precompute: bool) -> dict:
    import torch

    import preftune.engine.engine as engine_mod
    from preftune.cli import main

    torch.set_num_threads(THREADS)
    baseline = rss_mb()
    stamps: list[float] = []
    original = engine_mod.Engine.optimizer_step

    def timed(self):
        norm = original(self)
        stamps.append(time.perf_counter())
        return norm

    engine_mod.Engine.optimizer_step = timed
    argv = ["dpo", "--model", str(model_dir), "--data", str(data), "--output-dir", str(out),
            "--overwrite", "--max-steps", str(steps), "--batch-size", str(BATCH_PAIRS),
            "--max-length", str(MAX_LENGTH), "--max-prompt-length", "128",
            "--loss", "dpo", "--beta", str(BETA), "--lr", str(LR), "--dtype", "float32",
            "--mixed-precision", "no", "--no-gradient-checkpointing", "--save-steps", "0",
            "--logging-steps", str(steps), "--lr-scheduler", "linear"]
    if precompute:
        argv.append("--precompute-ref")
    if main(argv) != 0:
        raise SystemExit("preftune dpo failed")
    settings = ("one forward for chosen+rejected, LM head on completion positions only, "
                + ("precomputed reference log-probs (--precompute-ref)" if precompute
                   else "frozen reference copy run per step"))
    return {"stamps": stamps, "baseline_rss_mb": baseline, "peak_rss_mb": peak_rss_mb(),
            "settings": settings}


def worker_trl(model_dir: Path, data: Path, out: Path, steps: int, precompute: bool) -> dict:
    import torch
    from datasets import load_dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(THREADS)
    baseline = rss_mb()
    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

    dataset = load_dataset("json", data_files=str(data), split="train")
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    args = DPOConfig(
        output_dir=str(out), per_device_train_batch_size=BATCH_PAIRS, max_steps=steps,
        learning_rate=LR, lr_scheduler_type="linear", beta=BETA, loss_type=["sigmoid"],
        max_length=MAX_LENGTH, use_cpu=True, bf16=False, fp16=False,
        gradient_checkpointing=False, precompute_ref_log_probs=precompute,
        model_init_kwargs={"dtype": torch.float32}, save_strategy="no", report_to=[],
        logging_steps=steps, disable_tqdm=True, dataloader_num_workers=0, seed=0,
        max_grad_norm=1.0, weight_decay=0.0,
    )
    trainer = DPOTrainer(model=str(model_dir), args=args, train_dataset=dataset,
                         processing_class=tokenizer, callbacks=[Stamp()])
    first = trainer.train_dataset[0]
    keys = {k: len(v) for k, v in first.items() if isinstance(v, list)}
    trainer.train()
    settings = ("TRL DPOTrainer defaults (fused_lm_head log-probs), "
                + ("precompute_ref_log_probs=True" if precompute
                   else "reference model loaded from the same folder, run per step"))
    return {"stamps": stamps, "baseline_rss_mb": baseline, "peak_rss_mb": peak_rss_mb(),
            "settings": settings, "first_example_lengths": keys}


# --- driver ----------------------------------------------------------------------------------

def run_worker(impl: str, folder: Path, steps: int, precompute: bool) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, "--folder", str(folder),
           "--steps", str(steps)] + (["--precompute"] if precompute else [])
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{impl} worker failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarise(result: dict, warmup: int) -> dict:
    stamps = result["stamps"]
    if len(stamps) <= warmup:
        raise SystemExit(f"only {len(stamps)} steps timed; need more than --warmup={warmup}")
    start = max(warmup, 1) - 1
    intervals = sorted(b - a for a, b in zip(stamps[start:], stamps[start + 1:]))
    # The median step: robust to a neighbour's burst of CPU use on a shared machine.
    median = intervals[len(intervals) // 2]
    return {"tokens_per_s": tokens_per_step() / median,
            "step_s": median,
            "mean_tokens_per_s": tokens_per_step() * len(intervals) / sum(intervals),
            "peak_rss_mb": result["peak_rss_mb"],
            "train_rss_mb": result["peak_rss_mb"] - result["baseline_rss_mb"],
            "settings": result["settings"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=("on-the-fly", "precomputed", "both"), default="both")
    parser.add_argument("--impl", choices=("preftune", "trl", "both"), default="both")
    parser.add_argument("--steps", type=int, default=24, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the timing")
    parser.add_argument("--json", metavar="FILE", help="also write the results here")
    parser.add_argument("--worker", choices=("preftune", "trl"), help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--precompute", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        folder = Path(args.folder)
        fn = worker_preftune if args.worker == "preftune" else worker_trl
        out = folder / f"run-{args.worker}-{int(args.precompute)}"
        result = fn(folder / "model", folder / "pairs.jsonl", out, args.steps, args.precompute)
        print(json.dumps(result))
        return

    modes = ["on-the-fly", "precomputed"] if args.mode == "both" else [args.mode]
    impls = ["preftune", "trl"] if args.impl == "both" else [args.impl]
    report = {"setup": {"hidden": HIDDEN, "layers": LAYERS, "vocab": VOCAB,
                        "prompt_tokens": PROMPT_CHARS + 1, "completion_tokens": COMPLETION_CHARS + 1,
                        "pairs_per_step": BATCH_PAIRS, "max_length": MAX_LENGTH, "dtype": "float32",
                        "threads": THREADS, "steps": args.steps, "warmup": args.warmup,
                        "tokens_per_step": tokens_per_step()}, "results": {}}
    print(f"setup: {json.dumps(report['setup'])}")
    with tempfile.TemporaryDirectory(prefix="bench-dpo-") as tmp:
        folder = Path(tmp)
        make_assets(folder, n_pairs=args.steps * BATCH_PAIRS)
        for mode in modes:
            rows = {}
            for impl in impls:
                raw = run_worker(impl, folder, args.steps, mode == "precomputed")
                rows[impl] = summarise(raw, args.warmup)
                if "first_example_lengths" in raw:
                    rows[impl]["first_example_lengths"] = raw["first_example_lengths"]
                r = rows[impl]
                print(f"[{mode}] {impl:8s} {r['tokens_per_s']:8.0f} tokens/s  "
                      f"{r['step_s']:6.3f} s/step  peak RSS {r['peak_rss_mb']:7.0f} MiB  "
                      f"(+{r['train_rss_mb']:.0f} MiB over imports)  -- {r['settings']}",
                      flush=True)
            if len(rows) == 2:
                p, t = rows["preftune"], rows["trl"]
                rows["ratios"] = {
                    "tokens_per_s (preftune/trl)": p["tokens_per_s"] / t["tokens_per_s"],
                    "peak_rss (preftune/trl)": p["peak_rss_mb"] / t["peak_rss_mb"],
                    "train_rss (preftune/trl)": p["train_rss_mb"] / max(t["train_rss_mb"], 1e-9),
                }
                ratio = rows["ratios"]
                print(f"[{mode}] ratios: tokens/s x{ratio['tokens_per_s (preftune/trl)']:.2f}, "
                      f"peak RSS x{ratio['peak_rss (preftune/trl)']:.2f}, "
                      f"RSS added by training x{ratio['train_rss (preftune/trl)']:.2f} "
                      "(target: tokens/s >= 2x, memory <= 0.7x)", flush=True)
            report["results"][mode] = rows
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
