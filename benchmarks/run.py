"""preftune against TRL on every trainer: same model, data and batch, side by side in one run.

    python benchmarks/run.py                      # every workload, preftune and TRL alternately
    python benchmarks/run.py --quick              # smoke run: 3 steps each, one repeat
    python benchmarks/run.py --workloads dpo-ref grpo --repeats 2
    python benchmarks/run.py --workloads sampler grpo --baseline-src ../main/src  # vs another tree
    nice -n 10 python benchmarks/run.py --json results.json

Setup (identical for both): a Llama-style model with hidden 256, 4 layers, vocabulary 8,000
(random weights, saved once and loaded by both), the byte-level `tiny` tokenizer, synthetic
text with 46-character prompts and 94-character completions (47 and 95 tokens with BOS/EOS),
batch 8 (pairs for DPO/reward, examples for KTO, 2 prompts x 4 samples for GRPO/RLOO), max
length 256, AdamW, 2 torch threads. Both read the same JSONL files.

Workloads (`--workloads`):
- dpo-ref: sigmoid DPO (beta 0.1), fp32, reference model run every step;
- dpo-pre: the same with reference log-probs precomputed before training;
- dpo-bf16: dpo-ref under bf16 autocast (preftune `--mixed-precision bf16`, TRL `bf16=True`);
- kto: KTO (beta 0.1), fp32, reference every step, 8 labelled examples per step;
- reward: Bradley-Terry reward model (a one-output sequence classifier on the same backbone);
- grpo: GRPO, 2 prompts x 4 samples, 64 new tokens, no KL term (both libraries' default);
- rloo: RLOO, 2 prompts x 4 samples, 64 new tokens, KL coefficient 0.05 (reference per step);
- sampler: generation alone, 8 rows x 64 new tokens: preftune's `generate` against
  transformers' `model.generate` (what TRL calls), tokens/s.
PPO is not measured: TRL 1.16 has no PPO trainer (TRL 1.10's experimental one needs an
environment of its own).

Each (workload, implementation) runs in a fresh subprocess; implementations alternate
(preftune, TRL, preftune, TRL, ...) so that load from other processes hits both alike; the
table reports the median over `--repeats`. A step is timed from the end of one optimizer step
to the end of the next (preftune: wrapping `Engine.optimizer_step`; TRL: a
`TrainerCallback.on_step_end`); the median step after `--warmup` steps is reported, as tokens/s
(real tokens of the batch per step / median step time) for the offline workloads and s/step
for the online ones. Peak memory: the subprocess's RSS high-water mark (`ru_maxrss`).
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

HIDDEN, LAYERS, VOCAB = 256, 4, 8000
PROMPT_CHARS, COMPLETION_CHARS = 46, 94  # + BOS and + EOS: 47 and 95 tokens (byte tokenizer)
BATCH, MAX_LENGTH, BETA, LR = 8, 256, 0.1, 5e-6
PROMPTS_PER_STEP, GENERATIONS, NEW_TOKENS = 2, 4, 64
THREADS = int(os.environ.get("BENCH_THREADS", "2"))
SEQ_TOKENS = PROMPT_CHARS + 1 + COMPLETION_CHARS + 1

WORKLOADS = {
    # name: (unit, tokens per step or None for s/step, description)
    "dpo-ref": ("tokens/s", 2 * BATCH * SEQ_TOKENS, "DPO, reference run every step (fp32)"),
    "dpo-pre": ("tokens/s", 2 * BATCH * SEQ_TOKENS, "DPO, precomputed reference (fp32)"),
    "dpo-bf16": ("tokens/s", 2 * BATCH * SEQ_TOKENS, "DPO, bf16 autocast, reference every step"),
    "kto": ("tokens/s", BATCH * SEQ_TOKENS, "KTO, reference every step (fp32)"),
    "reward": ("tokens/s", 2 * BATCH * SEQ_TOKENS, "reward model (Bradley-Terry, fp32)"),
    "grpo": ("s/step", None, "GRPO (2 prompts x 4 samples, 64 new tokens)"),
    "rloo": ("s/step", None, "RLOO (2 prompts x 4 samples, 64 new tokens)"),
    "sampler": ("tokens/s", None, "sampling alone (8 rows x 64 new tokens)"),
}

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


def make_assets(folder: Path, n_rows: int) -> None:
    """The model folder (weights + tokenizer), the JSONL files and the reward function."""
    from preftune.models.tiny import build_tiny_model, build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok, hidden_size=HIDDEN, num_layers=LAYERS, vocab_size=VOCAB, seed=0)
    model.save_pretrained(folder / "model")
    tok.save_pretrained(folder / "model")
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz     "

    def text(n: int) -> str:
        return "".join(rng.choice(letters) for _ in range(n)).replace("  ", " x")[:n]

    with open(folder / "pairs.jsonl", "w") as pairs, open(folder / "kto.jsonl", "w") as kto:
        for i in range(n_rows):
            row = {"prompt": text(PROMPT_CHARS), "chosen": text(COMPLETION_CHARS),
                   "rejected": text(COMPLETION_CHARS)}
            pairs.write(json.dumps(row) + "\n")
            kto.write(json.dumps({"prompt": row["prompt"], "completion": row["chosen"],
                                  "label": i % 2 == 0}) + "\n")
    (folder / "reward_fn.py").write_text(REWARD_FN)


# --- preftune workers ------------------------------------------------------------------------

def _stamp_optimizer_steps() -> list[float]:
    import preftune.engine.engine as engine_mod

    stamps: list[float] = []
    original = engine_mod.Engine.optimizer_step

    def timed(self):
        norm = original(self)
        stamps.append(time.perf_counter())
        return norm

    engine_mod.Engine.optimizer_step = timed
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
    stamps = _stamp_optimizer_steps()
    gen_times = _time_generation()
    model, out = str(folder / "model"), str(folder / f"out-preftune-{workload}")
    common = ["--model", model, "--output-dir", out, "--overwrite", "--max-steps", str(steps),
              "--lr", str(LR), "--dtype", "float32", "--no-gradient-checkpointing",
              "--save-steps", "0", "--logging-steps", str(steps), "--lr-scheduler", "linear",
              "--max-length", str(MAX_LENGTH), "--max-prompt-length", "128"]
    mp = ["--mixed-precision", "bf16" if workload == "dpo-bf16" else "no"]
    pairs = str(folder / "pairs.jsonl")
    if workload.startswith("dpo"):
        argv = ["dpo", "--data", pairs, "--batch-size", str(BATCH), "--loss", "dpo",
                "--beta", str(BETA)] + (["--precompute-ref"] if workload == "dpo-pre" else [])
    elif workload == "kto":
        argv = ["kto", "--data", str(folder / "kto.jsonl"), "--batch-size", str(BATCH),
                "--beta", str(BETA)]
    elif workload == "reward":
        argv = ["reward", "--data", pairs, "--batch-size", str(BATCH)]
    else:  # grpo, rloo
        argv = [workload, "--data", pairs, "--reward-fn", f"{folder / 'reward_fn.py'}:reward",
                "--prompts-per-step", str(PROMPTS_PER_STEP), "--num-generations", str(GENERATIONS),
                "--max-new-tokens", str(NEW_TOKENS), "--temperature", "1.0", "--top-p", "1.0",
                "--kl-coef", "0.0" if workload == "grpo" else "0.05"]
    baseline = rss_mb()
    if main(argv + common + mp) != 0:
        raise SystemExit(f"preftune {workload} failed")
    return {"stamps": stamps, "generation_s": gen_times, "baseline_rss_mb": baseline,
            "peak_rss_mb": peak_rss_mb()}


def worker_sampler(impl: str, folder: Path, steps: int) -> dict:
    """Generation alone: `steps` rounds of 8 rows x 64 new tokens, EOS never stops a row."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from preftune.generation.sampling import SamplingConfig, generate

    torch.set_num_threads(THREADS)
    tok = AutoTokenizer.from_pretrained(str(folder / "model"))
    model = AutoModelForCausalLM.from_pretrained(str(folder / "model"), dtype=torch.float32)
    prompts = [json.loads(line)["prompt"] for line in open(folder / "pairs.jsonl")][:PROMPTS_PER_STEP]
    prompt_ids = [tok(p)["input_ids"] for p in prompts]
    baseline = rss_mb()
    stamps = [time.perf_counter()]
    n_tokens = []
    for step in range(steps):
        gen = torch.Generator().manual_seed(step)
        if impl == "preftune":
            ro = generate(model, tok, prompt_ids, SamplingConfig(max_new_tokens=NEW_TOKENS,
                          stop_at_eos=False), num_samples=GENERATIONS, generator=gen)
            n_tokens.append(sum(ro.completion_lengths))
        else:
            torch.manual_seed(step)
            rows = [p for p in prompt_ids for _ in range(GENERATIONS)]
            width = max(map(len, rows))
            ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in rows])
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=(ids != tok.pad_token_id).long(),
                                     do_sample=True, max_new_tokens=NEW_TOKENS,
                                     min_new_tokens=NEW_TOKENS, temperature=1.0, top_p=1.0,
                                     top_k=0, pad_token_id=tok.pad_token_id)
            n_tokens.append(int((out.shape[1] - width) * out.shape[0]))
        stamps.append(time.perf_counter())
    return {"stamps": stamps, "tokens": n_tokens, "baseline_rss_mb": baseline,
            "peak_rss_mb": peak_rss_mb()}


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
            stamps.append(time.perf_counter())

    original_generate = transformers.GenerationMixin.generate

    def timed_generate(self, *args, **kwargs):
        t0 = time.perf_counter()
        out = original_generate(self, *args, **kwargs)
        gen_times.append(time.perf_counter() - t0)
        return out

    transformers.GenerationMixin.generate = timed_generate
    model_dir = str(folder / "model")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    common = dict(output_dir=str(folder / f"out-trl-{workload}"), max_steps=steps,
                  learning_rate=LR, lr_scheduler_type="linear", use_cpu=True,
                  bf16=workload == "dpo-bf16", fp16=False, gradient_checkpointing=False,
                  model_init_kwargs={"dtype": torch.float32}, save_strategy="no", report_to=[],
                  logging_steps=steps, disable_tqdm=True, dataloader_num_workers=0, seed=0,
                  max_grad_norm=1.0, weight_decay=0.0)
    baseline = rss_mb()
    if workload.startswith("dpo"):
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(per_device_train_batch_size=BATCH, beta=BETA, loss_type=["sigmoid"],
                         max_length=MAX_LENGTH, precompute_ref_log_probs=workload == "dpo-pre",
                         **common)
        data = load_dataset("json", data_files=str(folder / "pairs.jsonl"), split="train")
        trainer = DPOTrainer(model=model_dir, args=args, train_dataset=data,
                             processing_class=tokenizer, callbacks=[Stamp()])
    elif workload == "kto":
        from trl import KTOConfig, KTOTrainer

        args = KTOConfig(per_device_train_batch_size=BATCH, beta=BETA, max_length=MAX_LENGTH,
                         **common)
        data = load_dataset("json", data_files=str(folder / "kto.jsonl"), split="train")
        trainer = KTOTrainer(model=model_dir, args=args, train_dataset=data,
                             processing_class=tokenizer, callbacks=[Stamp()])
    elif workload == "reward":
        from trl import RewardConfig, RewardTrainer

        args = RewardConfig(per_device_train_batch_size=BATCH, max_length=MAX_LENGTH, **common)
        data = load_dataset("json", data_files=str(folder / "pairs.jsonl"), split="train")
        trainer = RewardTrainer(model=model_dir, args=args, train_dataset=data,
                                processing_class=tokenizer, callbacks=[Stamp()])
    else:  # grpo, rloo
        import importlib.util

        import trl

        spec = importlib.util.spec_from_file_location("reward_fn", folder / "reward_fn.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        Config = trl.GRPOConfig if workload == "grpo" else trl.RLOOConfig
        Trainer = trl.GRPOTrainer if workload == "grpo" else trl.RLOOTrainer
        args = Config(per_device_train_batch_size=PROMPTS_PER_STEP * GENERATIONS,
                      num_generations=GENERATIONS, max_completion_length=NEW_TOKENS,
                      temperature=1.0, top_p=1.0, beta=0.0 if workload == "grpo" else 0.05,
                      **common)
        data = load_dataset("json", data_files=str(folder / "pairs.jsonl"), split="train")
        trainer = Trainer(model=model_dir, reward_funcs=module.reward, args=args,
                          train_dataset=data, processing_class=tokenizer, callbacks=[Stamp()])
    trainer.train()
    return {"stamps": stamps, "generation_s": gen_times, "baseline_rss_mb": baseline,
            "peak_rss_mb": peak_rss_mb()}


# --- driver ----------------------------------------------------------------------------------

def run_worker(workload: str, impl: str, folder: Path, steps: int,
               baseline_src: str | None = None) -> dict:
    """One fresh process; impl "baseline" is preftune imported from `baseline_src`."""
    cmd = [sys.executable, __file__, "--worker", "preftune" if impl == "baseline" else impl,
           "--worker-workload", workload, "--folder", str(folder), "--steps", str(steps)]
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "TOKENIZERS_PARALLELISM": "false"}
    if impl == "baseline":
        env["PYTHONPATH"] = os.pathsep.join([baseline_src] + [
            p for p in env.get("PYTHONPATH", "").split(os.pathsep)
            if p and Path(p).resolve() != (Path(__file__).resolve().parents[1] / "src")])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{impl} {workload} worker failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarise(workload: str, raw: dict, warmup: int) -> dict:
    unit, tokens, _ = WORKLOADS[workload]
    stamps = raw["stamps"]
    if len(stamps) <= warmup + 1:
        raise SystemExit(f"{workload}: only {len(stamps)} steps timed; need more than "
                         f"--warmup + 1 = {warmup + 1}")
    intervals = [b - a for a, b in zip(stamps[warmup:], stamps[warmup + 1:])]
    step_s = statistics.median(intervals)  # robust to a neighbour's burst on a shared machine
    row = {"step_s": step_s, "peak_rss_mb": raw["peak_rss_mb"],
           "train_rss_mb": raw["peak_rss_mb"] - raw["baseline_rss_mb"]}
    if workload == "sampler":
        row["value"] = statistics.median(raw["tokens"]) / step_s
    elif unit == "tokens/s":
        row["value"] = tokens / step_s
    else:
        row["value"] = step_s
    gen = raw.get("generation_s") or []
    if len(gen) > warmup:
        row["generation_s"] = statistics.median(gen[warmup:])
    return row


def machine() -> dict:
    import torch
    import transformers

    flags = set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                flags |= {f for f in line.split(":", 1)[1].split()
                          if f == "avx512_bf16" or f.startswith("amx")}
    except OSError:
        pass
    model = platform.processor()
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        import trl
        trl_version = trl.__version__
    except ImportError:
        trl_version = "not installed"
    return {"cpu": model, "cores": os.cpu_count(), "bf16_flags": sorted(flags) or ["none"],
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "load_average": os.getloadavg(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "trl": trl_version, "threads": THREADS}


def fmt(workload: str, row: dict | None) -> str:
    if row is None:
        return "-"
    unit = WORKLOADS[workload][0]
    value = f"{row['value']:,.0f} tokens/s" if unit == "tokens/s" else f"{row['value']:.2f} s/step"
    extra = f", gen {row['generation_s']:.2f} s" if "generation_s" in row else ""
    return f"{value}{extra}, {row['peak_rss_mb']:,.0f} MB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--impl", choices=("preftune", "trl", "both"), default="both")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the timing")
    parser.add_argument("--repeats", type=int, default=1, help="runs per implementation (median)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 steps, warm-up 1")
    parser.add_argument("--baseline-src", metavar="DIR",
                        help="also run preftune imported from this src folder (e.g. a checkout "
                        "of an earlier commit), as a third column: the speed-up over it")
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
        else:
            result = worker_trl(args.worker_workload, folder, args.steps)
        print(json.dumps(result))
        return

    impls = ["preftune", "trl"] if args.impl == "both" else [args.impl]
    if args.baseline_src:
        impls.append("baseline")
    report = {"machine": machine(), "setup": {
        "hidden": HIDDEN, "layers": LAYERS, "vocab": VOCAB, "prompt_tokens": PROMPT_CHARS + 1,
        "completion_tokens": COMPLETION_CHARS + 1, "batch": BATCH, "max_length": MAX_LENGTH,
        "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats}, "results": {}}
    print(f"machine: {json.dumps(report['machine'])}")
    print(f"setup: {json.dumps(report['setup'])}", flush=True)
    with tempfile.TemporaryDirectory(prefix="preftune-bench-") as tmp:
        folder = Path(tmp)
        make_assets(folder, n_rows=max(args.steps * BATCH, 64))
        for workload in args.workloads:
            runs: dict[str, list[dict]] = {impl: [] for impl in impls}
            for _ in range(args.repeats):
                for impl in impls:  # alternate: preftune, TRL, preftune, TRL, ...
                    row = summarise(workload, run_worker(workload, impl, folder, args.steps,
                                                         args.baseline_src), args.warmup)
                    runs[impl].append(row)
                    print(f"  {workload:8s} {impl:8s} {fmt(workload, row)}", flush=True)
            rows = {impl: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
                    for impl, rs in runs.items()}
            faster = WORKLOADS[workload][0] == "tokens/s"
            ratios = {}
            for other in ("trl", "baseline"):
                if "preftune" in rows and other in rows:
                    p, t = rows["preftune"], rows[other]
                    ratios[other] = {
                        "speed": p["value"] / t["value"] if faster else t["value"] / p["value"],
                        "peak_rss": p["peak_rss_mb"] / t["peak_rss_mb"]}
            if "trl" in ratios:
                rows["ratios"] = ratios["trl"]
            if "baseline" in ratios:
                rows["ratios_vs_baseline"] = ratios["baseline"]
            report["results"][workload] = rows
    print()
    base = " baseline | speed vs baseline |" if args.baseline_src else ""
    print("| workload | preftune | TRL | speed ratio | memory ratio |" + base)
    print("| --- | --- | --- | --- | --- |" + (" --- | --- |" if base else ""))
    for workload, rows in report["results"].items():
        r, b = rows.get("ratios"), rows.get("ratios_vs_baseline")
        line = (f"| {WORKLOADS[workload][2]} | {fmt(workload, rows.get('preftune'))} | "
                f"{fmt(workload, rows.get('trl'))} | "
                + (f"{r['speed']:.2f}x | {r['peak_rss']:.2f}x |" if r else "- | - |"))
        if base:
            line += f" {fmt(workload, rows.get('baseline'))} | " + (f"{b['speed']:.2f}x |" if b else "- |")
        print(line)
    if args.json:
        tmp_path = Path(args.json).with_suffix(".tmp")
        tmp_path.write_text(json.dumps(report, indent=2))
        os.replace(tmp_path, args.json)


if __name__ == "__main__":
    main()
