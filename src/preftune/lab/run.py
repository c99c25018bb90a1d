"""`preftune lab`: every method side by side on worlds with a known gold reward.

Stages, for every world and seed (each stage reads top to bottom in `run_lab`):

1. base policy: `run_sft` on a JSONL corpus written from the world's demonstrations; cached
   under `cache_dir` by a hash of its settings (trained in a temporary folder, then renamed);
2. preference data: two completions per training prompt sampled from the base policy, labelled
   by Bradley-Terry on the gold reward with the chosen label noise (`bt_label_pairs`); plus the
   held-out prompts and one reference sample of the base policy per held-out prompt;
3. a reward model (`run_reward`) on those pairs: the proxy reward of the online methods;
4. cells: the base policy itself, best-of-N, then every method at every value of its main knob,
   each trained by the same `run_*` function and config a user runs, then evaluated
   (`lab.evaluate`) on the held-out prompts.

Every finished cell writes its result JSON atomically under `<output_dir>/cells/`, with a key
that hashes every setting it depends on; a rerun skips cells whose result exists with the same
key, so an interrupted lab resumes where it stopped, and a changed setting reruns exactly the
cells it affects. A cell's trainer output folder is overwritten when the cell runs again.
At the end `lab.report` writes report.md, frontier.png, overoptimization.png and results.json.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import random
import shutil
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from preftune.config import arg
from preftune.errors import PreftuneError
from preftune.lab import evaluate as ev
from preftune.lab.worlds import NOISE_PRESETS, WORLDS, bt_label_pairs, get_world
from preftune.utils import atomic_write_json, atomic_write_text

LAB_FORMAT = 2  # bump when a change makes old cell results incomparable
# Temperature of the Bradley-Terry draw that labels the pairs. Gold gaps are O(1) in both
# worlds; at temperature 1 the draw alone disagreed with the gold argmax on ~20% of pairs, so
# with the "human" preset's 30% flips only ~58% of labels agreed with the gold reward (measured)
# instead of the ~70% the preset stands for. At 0.1 the flip rate sets the disagreement.
LABEL_TEMPERATURE = 0.1
MAX_LENGTH = 96  # prompt <= 41 tokens (BOS + 40 bytes), completion <= 49 (48 bytes + EOS)
MAX_PROMPT_LENGTH = 44
QUIET = 10**9  # logging_steps: trainers log once, at their last step

# --- the methods -------------------------------------------------------------------------------
# name -> (kind, trainer module, config class, run function, knob, fixed trainer settings).
# kind: offline (trained on the pairs), online (trained against the reward model), inference
# (best-of-N, evaluated directly). The knob is the setting swept to trace a frontier.
METHODS: dict[str, tuple[str, str, str, str, str, dict[str, Any]]] = {
    "dpo": ("offline", "preftune.trainers.dpo", "DPOConfig", "run_dpo", "beta", {"loss": "dpo"}),
    "ipo": ("offline", "preftune.trainers.dpo", "DPOConfig", "run_dpo", "beta", {"loss": "ipo"}),
    "cdpo": ("offline", "preftune.trainers.dpo", "DPOConfig", "run_dpo", "beta", {"loss": "cdpo"}),
    "robust": ("offline", "preftune.trainers.dpo", "DPOConfig", "run_dpo", "beta",
               {"loss": "robust"}),
    "hinge": ("offline", "preftune.trainers.dpo", "DPOConfig", "run_dpo", "beta",
              {"loss": "hinge"}),
    "simpo": ("offline", "preftune.trainers.dpo", "DPOConfig", "run_dpo", "beta",
              {"loss": "simpo"}),
    "orpo": ("offline", "preftune.trainers.dpo", "DPOConfig", "run_dpo", "beta", {"loss": "orpo"}),
    "cpo": ("offline", "preftune.trainers.dpo", "DPOConfig", "run_dpo", "beta", {"loss": "cpo"}),
    "kto": ("offline", "preftune.trainers.kto", "KTOConfig", "run_kto", "beta", {}),
    # Online methods sample the same number of completions per rollout (32).
    "ppo": ("online", "preftune.trainers.ppo", "PPOConfig", "run_ppo", "kl_coef",
            {"prompts_per_step": 32, "num_generations": 1}),
    "grpo": ("online", "preftune.trainers.grpo", "GRPOConfig", "run_grpo", "kl_coef",
             {"prompts_per_step": 8, "num_generations": 4}),
    "rloo": ("online", "preftune.trainers.rloo", "RLOOConfig", "run_rloo", "kl_coef",
             {"prompts_per_step": 8, "num_generations": 4}),
    "online_dpo": ("online", "preftune.trainers.online_dpo", "OnlineDPOConfig", "run_online_dpo",
                   "beta", {"prompts_per_step": 16, "num_generations": 2}),
    "best_of_n": ("inference", "", "", "", "n", {}),
}
DEFAULT_METHODS = ("dpo", "ipo", "kto", "orpo", "simpo", "ppo", "grpo", "rloo", "online_dpo",
                   "best_of_n")
REWARD_MODEL_METHODS = tuple(m for m, spec in METHODS.items()
                             if spec[0] in ("online", "inference"))

# Knob values per method: (default grid, quick grid). β of the DPO family is the inverse
# temperature of the implicit reward; SimPO's β scales a length-normalised reward (its paper
# uses 2-2.5); ORPO's β is λ, the weight of its odds-ratio term; the RL methods sweep their KL
# coefficient; best-of-N its N.
SWEEPS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "dpo": ((0.03, 0.1, 0.3), (0.1,)),
    "ipo": ((0.1, 1.0), (0.3,)),
    "cdpo": ((0.03, 0.1, 0.3), (0.1,)),
    "robust": ((0.03, 0.1, 0.3), (0.1,)),
    "hinge": ((0.03, 0.1, 0.3), (0.1,)),
    "kto": ((0.03, 0.3), (0.1,)),
    "simpo": ((0.5, 2.0), (2.0,)),
    "orpo": ((0.1, 0.5), (0.5,)),
    "cpo": ((0.03, 0.1, 0.3), (0.1,)),
    "ppo": ((0.02, 0.2), (0.05,)),
    "grpo": ((0.0, 0.1), (0.05,)),
    "rloo": ((0.02, 0.2), (0.05,)),
    "online_dpo": ((0.1, 0.3), (0.1,)),
    "best_of_n": ((1, 2, 4, 8, 16), (1, 4, 16)),
}

# Learning rates the lab uses for the tiny policy (the trainers' defaults suit real models).
SFT_LR = 3e-3
OFFLINE_LR = 5e-4
ONLINE_LR = 5e-4
REWARD_LR = 1e-3

# Rough cost of each stage in seconds on 2 CPU cores, for the ETA before anything was measured.
PRIOR_SECONDS = {"base": 40.0, "data": 4.0, "reward_model": 10.0, "eval": 2.0,
                 "inference": 4.0, "offline": 8.0, "online": 15.0}


@dataclass
class LabConfig:
    """Settings of `preftune lab`. Grid settings left empty (or 0) take the preset's value:
    the default comparison, or the reduced grid of --quick."""

    quick: bool = arg(False, "Run the reduced grid (one world, one seed, one value per method, "
                      "fewer steps): about 3 minutes on 2 CPU cores.")
    worlds: list[str] = arg([], "Worlds to run, of: " + ", ".join(WORLDS) + " (default: "
                            "review arithmetic; quick: review).")
    methods: list[str] = arg([], "Methods to compare, of: " + ", ".join(METHODS) + " (default: "
                             + " ".join(DEFAULT_METHODS) + ").")
    seeds: list[int] = arg([], "Seeds; each seed trains its own base policy, data, reward model "
                           "and methods (default: 0 1; quick: 0).")
    sweep: list[str] = arg([], "Knob values per method, e.g. `dpo=0.05,0.2 ppo=0.1 "
                           "best_of_n=1,4,16` (β for the DPO family, KTO and online DPO; the KL "
                           "coefficient for PPO, GRPO, RLOO; N for best-of-N). Unlisted methods "
                           "keep the preset's values.")
    pairs: int = arg(0, "Preference pairs per world and seed, sampled from the base policy "
                     "(default: 1024; quick: 384).")
    noise: str = arg("human", "Label noise: a flip rate in [0, 0.5], `human` (0.3, annotators "
                     "agree about 70% of the time), `gpt4` (0.2) or `none` (the gold argmax).")
    eval_prompts: int = arg(0, "Held-out prompts per evaluation (default: 128; quick: 64).")
    model: str = arg("tiny-64x2", "Architecture of the base policy: `tiny-<hidden>x<layers>`, "
                     "trained from scratch on the world's corpus.")
    sft_steps: int = arg(0, "SFT steps of the base policy (default: 1000; quick: 500).")
    offline_steps: int = arg(0, "Optimizer steps of each offline method, 16 pairs per step "
                             "(default: 100; quick: 40).")
    online_steps: int = arg(0, "Rollouts of each online method, 32 completions per rollout "
                            "(default: 30; quick: 15).")
    output_dir: str = arg("runs/lab", "Report folder; finished cells are kept in it and skipped "
                          "when the lab runs again with the same settings.")
    cache_dir: str = arg("", "Where trained base policies are cached (default: "
                         "$XDG_CACHE_HOME/preftune/lab or ~/.cache/preftune/lab).")
    restart: bool = arg(False, "Run every cell again instead of resuming (cached base policies "
                        "are still reused).")
    threads: int = arg(1, "CPU threads torch uses while the lab runs (0: torch's default). The "
                       "tiny models gain little from more, and on a busy machine several "
                       "threads per process can run many times slower.")

    def validate(self) -> None:
        for name in self.worlds:
            get_world(name)
        for name in self.methods:
            if name not in METHODS:
                raise PreftuneError(f"methods: unknown method {name!r}; choose from "
                                    + ", ".join(METHODS))
            if not method_available(name):
                raise PreftuneError(f"methods: {name} needs {METHODS[name][1]}, which is not "
                                    "installed in this preftune")
        if len(set(self.seeds)) != len(self.seeds):
            raise PreftuneError(f"seeds: got {self.seeds}, expected distinct integers")
        if any(s < 0 for s in self.seeds):
            raise PreftuneError(f"seeds: got {self.seeds}, expected integers >= 0")
        parse_sweep(self.sweep)
        noise_rate(self.noise)
        for name in ("pairs", "eval_prompts", "sft_steps", "offline_steps", "online_steps"):
            if getattr(self, name) < 0:
                raise PreftuneError(f"{name}: got {getattr(self, name)}, expected an integer "
                                    ">= 0 (0: the preset's value)")
        if 0 < self.pairs < 64:
            raise PreftuneError(f"pairs: got {self.pairs}, expected at least 64 (the methods "
                                "train on batches of 16-32 pairs)")
        if 0 < self.eval_prompts < 8:
            raise PreftuneError(f"eval_prompts: got {self.eval_prompts}, expected at least 8")
        from preftune.models.tiny import parse_tiny_spec

        if not self.model.startswith("tiny") or parse_tiny_spec(self.model) is None:
            raise PreftuneError(f"model: got {self.model!r}, expected `tiny` or "
                                "`tiny-<hidden>x<layers>` (the lab trains its base policy from "
                                "scratch on the world's corpus)")
        if not self.output_dir:
            raise PreftuneError("output_dir: expected a folder for the report")
        if self.threads < 0:
            raise PreftuneError(f"threads: got {self.threads}, expected an integer >= 0")


def noise_rate(noise: str) -> float | str:
    """`noise` as bt_label_pairs takes it: a preset name or a float in [0, 0.5]."""
    if noise in NOISE_PRESETS or noise == "none":
        return noise
    try:
        value = float(noise)
    except ValueError:
        raise PreftuneError(f"noise: got {noise!r}, expected a number in [0, 0.5] or one of: "
                            "none, " + ", ".join(NOISE_PRESETS)) from None
    if not 0 <= value <= 0.5:
        raise PreftuneError(f"noise: got {noise}, expected a flip rate in [0, 0.5]")
    return value


def flip_rate(noise: str) -> float:
    """The label flip rate `noise` stands for (0 for `none`)."""
    rate = noise_rate(noise)
    if rate == "none":
        return 0.0
    return NOISE_PRESETS[rate] if isinstance(rate, str) else float(rate)


def parse_sweep(entries: list[str]) -> dict[str, tuple[float, ...]]:
    out: dict[str, tuple[float, ...]] = {}
    for entry in entries:
        method, sep, values = entry.partition("=")
        method = method.strip().replace("-", "_")
        if not sep or method not in METHODS:
            raise PreftuneError(f"sweep: {entry!r} is not METHOD=V1,V2,... with METHOD one of "
                                + ", ".join(METHODS))
        try:
            parsed = tuple(float(v) for v in values.split(",") if v.strip())
        except ValueError:
            raise PreftuneError(f"sweep: {entry!r} has a value that is not a number") from None
        if not parsed:
            raise PreftuneError(f"sweep: {entry!r} lists no values")
        if method == "best_of_n" and any(v < 1 or v != int(v) for v in parsed):
            raise PreftuneError(f"sweep: {entry!r}: N must be integers >= 1")
        if method != "best_of_n" and any(v < 0 for v in parsed):
            raise PreftuneError(f"sweep: {entry!r}: values must be >= 0")
        out[method] = tuple(int(v) for v in parsed) if method == "best_of_n" else parsed
    return out


def method_available(name: str) -> bool:
    module = METHODS[name][1]
    if not module:
        return True
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


@dataclass
class Plan:
    """The resolved grid: every value concrete."""

    quick: bool
    worlds: list[str]
    methods: list[str]
    seeds: list[int]
    sweeps: dict[str, list[float]]
    pairs: int
    noise: str
    eval_prompts: int
    model: str
    sft_steps: int
    sft_examples: int
    offline_steps: int
    online_steps: int
    reward_steps: int
    left_out: dict[str, str] = field(default_factory=dict)  # method -> why


def resolve(cfg: LabConfig) -> Plan:
    q = cfg.quick
    left_out = {}
    if cfg.methods:
        methods = list(dict.fromkeys(cfg.methods))
    else:
        methods = []
        for m in DEFAULT_METHODS:
            if method_available(m):
                methods.append(m)
            else:
                left_out[m] = f"its trainer ({METHODS[m][1]}) is not available"
    overrides = parse_sweep(cfg.sweep)
    sweeps = {m: list(overrides.get(m, SWEEPS[m][1] if q else SWEEPS[m][0])) for m in methods}
    return Plan(
        quick=q,
        worlds=list(dict.fromkeys(cfg.worlds)) or (["review"] if q else ["review", "arithmetic"]),
        methods=methods,
        seeds=list(cfg.seeds) or ([0] if q else [0, 1]),
        sweeps=sweeps,
        pairs=cfg.pairs or (384 if q else 1024),
        noise=cfg.noise,
        eval_prompts=cfg.eval_prompts or (64 if q else 128),
        model=cfg.model,
        sft_steps=cfg.sft_steps or (500 if q else 1000),
        sft_examples=8000,
        offline_steps=cfg.offline_steps or (40 if q else 100),
        online_steps=cfg.online_steps or (15 if q else 30),
        reward_steps=60 if q else 150,
        left_out=left_out,
    )


# --- small helpers ---------------------------------------------------------------------------

def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def default_cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "preftune" / "lab"


def _fmt_time(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _value_label(method: str, value: float) -> str:
    knob = METHODS[method][4]
    return f"{'β' if knob == 'beta' else knob}={value:g}"


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


class Progress:
    """One line per stage on stderr: stage, method, cell k/N, elapsed time and an ETA.

    The ETA prices the cells still to run at the mean measured duration of their kind (or the
    prior guess, scaled by how fast this machine has been so far, for kinds not yet seen).
    """

    def __init__(self, todo: list[str], stream=None):
        self.todo = list(todo)  # kinds of the cells still to run, in order
        self.total = len(todo)
        self.done = 0
        self.start = time.perf_counter()
        self.measured: dict[str, list[float]] = {}
        self.stream = stream or sys.stderr

    def eta(self) -> float:
        spent_prior = sum(PRIOR_SECONDS[k] * len(v) for k, v in self.measured.items())
        spent = sum(sum(v) for v in self.measured.values())
        speed = spent / spent_prior if spent_prior else 1.0
        left = 0.0
        for kind in self.todo:
            seen = self.measured.get(kind)
            left += sum(seen) / len(seen) if seen else PRIOR_SECONDS[kind] * speed
        return left

    def begin(self, kind: str, what: str) -> float:
        elapsed = time.perf_counter() - self.start
        print(f"lab [{self.done + 1}/{self.total}] {_fmt_time(elapsed)} elapsed, "
              f"~{_fmt_time(self.eta())} left | {what}", file=self.stream, flush=True)
        return time.perf_counter()

    def end(self, kind: str, t0: float) -> None:
        self.measured.setdefault(kind, []).append(time.perf_counter() - t0)
        if kind in self.todo:
            self.todo.remove(kind)
        self.done += 1


@contextlib.contextmanager
def _captured_output(log_path: Path):
    """Trainer output (data reports, progress bars, warnings) goes to the cell's log file."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log, contextlib.redirect_stderr(log), \
            contextlib.redirect_stdout(log):
        yield


def _trainer(method_or_module: str):
    """(config class, run function) of a method, or of `sft`/`reward`."""
    if method_or_module == "sft":
        from preftune.trainers.sft import SFTConfig, run_sft
        return SFTConfig, run_sft
    if method_or_module == "reward":
        from preftune.trainers.reward import RewardConfig, run_reward
        return RewardConfig, run_reward
    _, module, config_name, run_name, _, _ = METHODS[method_or_module]
    mod = importlib.import_module(module)
    return getattr(mod, config_name), getattr(mod, run_name)


def _common_settings(seed: int) -> dict[str, Any]:
    return dict(max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT_LENGTH, seed=seed,
                logging_steps=QUIET, save_steps=0, overwrite=True, report_to="")


def _offline_tokens_trained(run_dir: Path) -> int:
    """Tokens (prompt + completion, no padding) through forward+backward, from metrics.jsonl.

    The engine logs `tokens_per_s` and `step_time_s` over each logging window; their product
    times the window's steps is the window's token count.
    """
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

def base_policy(plan: Plan, world, seed: int, cache_dir: Path, log_dir: Path) -> tuple[Path, str]:
    """The SFT policy of (world, seed), trained once and cached by the hash of its settings."""
    settings = {"lab_format": LAB_FORMAT, "world": world.name, "model": plan.model,
                "steps": plan.sft_steps, "corpus": plan.sft_examples, "lr": SFT_LR,
                "batch_size": 32, "max_length": MAX_LENGTH, "seed": seed}
    key = _hash(settings)
    final = cache_dir / f"base-{world.name}-{key}"
    if (final / "lab_base.json").is_file():
        return final, key
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".tmp-base-{world.name}-{key}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    corpus = world.make_corpus(plan.sft_examples, random.Random(seed * 7919 + 1))
    corpus_path = cache_dir / f".tmp-corpus-{world.name}-{key}-{os.getpid()}.jsonl"
    _write_jsonl(corpus_path, [{"prompt": p, "completion": c} for p, c in corpus])
    config_cls, run = _trainer("sft")
    cfg = config_cls(model=plan.model, data=str(corpus_path), output_dir=str(tmp),
                     max_steps=plan.sft_steps, batch_size=32, lr=SFT_LR, warmup_steps=20,
                     **_common_settings(seed))
    cfg.validate()
    try:
        t0 = time.perf_counter()
        with _captured_output(log_dir / f"base-{world.name}-seed{seed}.log"):
            metrics = run(cfg)
        atomic_write_json(tmp / "lab_base.json", {
            "settings": settings, "metrics": metrics, "wall_time_s": time.perf_counter() - t0,
            "tokens_trained": _offline_tokens_trained(tmp)})
        try:
            os.replace(tmp, final)
        except OSError:  # another lab finished the same base policy first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        corpus_path.unlink(missing_ok=True)
    return final, key


# --- stage 2: preference data and held-out prompts -------------------------------------------

def make_data(plan: Plan, world, seed: int, base, tokenizer, data_dir: Path, base_key: str
              ) -> dict:
    """pairs.jsonl, prompts.jsonl and heldout.json of (world, seed); returns their statistics."""
    rng = random.Random(seed * 7919 + 2)
    prompts = world.make_prompts(plan.pairs, rng)
    rollout, texts = ev.sample(base, tokenizer, ev.encode_prompts(tokenizer, prompts),
                               world.max_new_tokens, seed * 7919 + 3, num_samples=2)
    first, second = texts[0::2], texts[1::2]
    gold_a = world.gold_reward(prompts, first)
    gold_b = world.gold_reward(prompts, second)
    labels = bt_label_pairs(gold_a, gold_b, noise=noise_rate(plan.noise),
                            rng=random.Random(seed * 7919 + 4), temperature=LABEL_TEMPERATURE)
    pairs, identical, agree, decided = [], 0, 0, 0
    for p, a, b, ga, gb, a_wins in zip(prompts, first, second, gold_a, gold_b, labels):
        if a == b:
            identical += 1  # no preference signal; the trainers would drop it too
            continue
        if ga != gb:
            decided += 1
            agree += (ga > gb) == a_wins
        chosen, rejected = (a, b) if a_wins else (b, a)
        pairs.append({"prompt": p, "chosen": chosen, "rejected": rejected})
    _write_jsonl(data_dir / "pairs.jsonl", pairs)
    _write_jsonl(data_dir / "prompts.jsonl", [{"prompt": p} for p in prompts])

    held_out = world.make_prompts(plan.eval_prompts, random.Random(seed * 7919 + 5))
    ids = ev.encode_prompts(tokenizer, held_out)
    _, reference_texts = ev.sample(base, tokenizer, ids, world.max_new_tokens, seed * 7919 + 6)
    atomic_write_json(data_dir / "heldout.json", {
        "prompts": held_out, "reference_completions": reference_texts,
        "reference_gold": world.gold_reward(held_out, reference_texts)})
    return {"pairs": len(pairs), "identical_dropped": identical,
            "label_agreement_with_gold": agree / decided if decided else None,
            "gold_tied_pairs": len(pairs) - decided, "noise": plan.noise,
            "flip_rate": flip_rate(plan.noise), "base_key": base_key}


def load_held_out(data_dir: Path, tokenizer) -> ev.EvalPrompts:
    data = json.loads((data_dir / "heldout.json").read_text())
    return ev.EvalPrompts(prompts=data["prompts"],
                          prompt_ids=ev.encode_prompts(tokenizer, data["prompts"]),
                          reference_gold=data["reference_gold"])


# --- stage 3 and 4: trainer settings of each cell ---------------------------------------------

def reward_settings(plan: Plan, seed: int) -> dict[str, Any]:
    return dict(max_steps=plan.reward_steps, batch_size=16, lr=REWARD_LR, warmup_steps=10,
                eval_fraction=0.1, **_common_settings(seed))


def method_settings(plan: Plan, method: str, value: float, seed: int, world) -> dict[str, Any]:
    """The trainer settings the lab chooses for one cell (paths are added by the caller)."""
    kind, _, _, _, knob, fixed = METHODS[method]
    settings = {**_common_settings(seed), **fixed, knob: value}
    if kind == "offline":
        settings.update(max_steps=plan.offline_steps, batch_size=16, lr=OFFLINE_LR,
                        warmup_steps=10)
        if method in ("cdpo", "robust"):
            # Conservative/robust DPO take the label flip rate: the lab knows it.
            settings["label_smoothing"] = flip_rate(plan.noise) or 0.1
        if method in ("dpo", "ipo", "cdpo", "robust", "hinge"):
            settings["precompute_ref"] = True
    elif kind == "online":
        settings.update(max_steps=plan.online_steps, batch_size=32, lr=ONLINE_LR,
                        warmup_steps=3, max_new_tokens=world.max_new_tokens,
                        generation_batch_size=64, reward_batch_size=64)
    return settings


# --- the run -----------------------------------------------------------------------------------

@dataclass
class Cell:
    world: str
    seed: int
    method: str  # "base", "reward_model", a method name
    value: float | None
    kind: str  # base, data, reward_model, eval, offline, online, inference

    @property
    def name(self) -> str:
        if self.value is None or self.method == "best_of_n":
            return self.method
        return f"{self.method}-{self.value:g}"

    def describe(self) -> str:
        where = f"{self.world} seed {self.seed}"
        if self.kind == "base":
            return f"{where} | base policy (SFT)"
        if self.kind == "data":
            return f"{where} | preference data"
        if self.kind == "reward_model":
            return f"{where} | reward model"
        if self.kind == "eval":
            return f"{where} | evaluate base policy"
        if self.kind == "inference":
            return f"{where} | best-of-N"
        return f"{where} | train {self.method} {_value_label(self.method, self.value)}"


def run_lab(cfg: LabConfig) -> dict:
    import torch

    from transformers.utils import logging as hf_logging

    threads = torch.get_num_threads()
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    # The lab's own progress line is the output; the trainers' output goes to each cell's log.
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        return _run_lab(cfg)
    finally:
        torch.set_num_threads(threads)
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _run_lab(cfg: LabConfig) -> dict:
    plan = resolve(cfg)
    out = Path(cfg.output_dir)
    cache_dir = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "lab_config.json", {"config": asdict(cfg), "plan": asdict(plan)})
    for m, why in plan.left_out.items():
        print(f"lab: {m} is left out: {why}", file=sys.stderr)

    # Cells in run order: per world and seed, the stages, then the grid.
    cells: list[Cell] = []
    for world in plan.worlds:
        for seed in plan.seeds:
            cells.append(Cell(world, seed, "base", None, "base"))
            cells.append(Cell(world, seed, "data", None, "data"))
            if any(m in REWARD_MODEL_METHODS for m in plan.methods):
                cells.append(Cell(world, seed, "reward_model", None, "reward_model"))
            cells.append(Cell(world, seed, "base_policy", None, "eval"))
            for m in plan.methods:
                if METHODS[m][0] == "inference":
                    cells.append(Cell(world, seed, m, None, "inference"))
                else:
                    cells += [Cell(world, seed, m, v, METHODS[m][0]) for v in plan.sweeps[m]]

    runner = _Runner(plan, cfg, out, cache_dir)
    todo = [c.kind for c in cells if cfg.restart or not runner.finished(c)]
    progress = Progress(todo)
    t_start = time.perf_counter()
    failures: list[dict] = []
    for cell in cells:
        if not cfg.restart and runner.finished(cell):
            continue
        t0 = progress.begin(cell.kind, cell.describe())
        try:
            runner.run(cell)
        except (KeyboardInterrupt, PreftuneError):
            raise
        except Exception as exc:  # a bug in one method must not lose the other cells
            log = runner.log_path(cell)
            with open(log, "a") as f:
                traceback.print_exc(file=f)
            failures.append({"cell": cell.describe(), "error": f"{type(exc).__name__}: {exc}",
                             "log": str(log)})
            print(f"lab: FAILED {cell.describe()}: {type(exc).__name__}: {exc} (log: {log})",
                  file=sys.stderr, flush=True)
        progress.end(cell.kind, t0)

    from preftune.lab import report

    results = runner.collect(cells, failures, wall_time_s=time.perf_counter() - t_start)
    report.write_report(results, out)
    print(f"lab: done in {_fmt_time(time.perf_counter() - progress.start)}; report in "
          f"{out / 'report.md'}", file=sys.stderr, flush=True)
    if failures:
        raise PreftuneError(f"{len(failures)} lab cell(s) failed (the report covers the rest; "
                            "rerun to retry only them): "
                            + "; ".join(f"{f['cell']}: {f['error']} (log {f['log']})"
                                        for f in failures))
    return results


class _Runner:
    """Runs cells and knows where their results live."""

    def __init__(self, plan: Plan, cfg: LabConfig, out: Path, cache_dir: Path):
        self.plan, self.cfg, self.out, self.cache_dir = plan, cfg, out, cache_dir
        self._models: dict[tuple[str, int], tuple[Any, Any]] = {}  # base policies in memory
        self._proxies: dict[tuple[str, int], Any] = {}
        self._keys: dict[tuple[str, int, str], str] = {}

    # --- where things are ---------------------------------------------------------------------

    def cell_dir(self, world: str, seed: int) -> Path:
        return self.out / "cells" / world / f"seed{seed}"

    def result_path(self, cell: Cell) -> Path:
        return self.cell_dir(cell.world, cell.seed) / f"{cell.name}.json"

    def run_dir(self, cell: Cell) -> Path:
        return self.out / "runs" / cell.world / f"seed{cell.seed}" / cell.name

    def data_dir(self, world: str, seed: int) -> Path:
        return self.out / "data" / world / f"seed{seed}"

    def log_path(self, cell: Cell) -> Path:
        return self.out / "logs" / cell.world / f"seed{cell.seed}" / f"{cell.name}.log"

    # --- keys: a hash of everything a cell's result depends on -------------------------------

    def base_key(self, world: str, seed: int) -> str:
        # Only the settings; the cached folder is found by the same hash (see base_policy).
        k = (world, seed, "base")
        if k not in self._keys:
            p = self.plan
            self._keys[k] = _hash({"lab_format": LAB_FORMAT, "world": world, "model": p.model,
                                   "steps": p.sft_steps, "corpus": p.sft_examples, "lr": SFT_LR,
                                   "batch_size": 32, "max_length": MAX_LENGTH, "seed": seed})
        return self._keys[k]

    def data_key(self, world: str, seed: int) -> str:
        p = self.plan
        return _hash({"base": self.base_key(world, seed), "pairs": p.pairs, "noise": p.noise,
                      "eval_prompts": p.eval_prompts})

    def reward_key(self, world: str, seed: int) -> str:
        return _hash({"data": self.data_key(world, seed),
                      "settings": reward_settings(self.plan, seed)})

    def key(self, cell: Cell) -> str:
        world, seed = cell.world, cell.seed
        if cell.kind == "base":
            return self.base_key(world, seed)
        if cell.kind == "data":
            return self.data_key(world, seed)
        if cell.kind == "reward_model":
            return self.reward_key(world, seed)
        parts: dict[str, Any] = {"data": self.data_key(world, seed), "eval": ev.KL_ESTIMATOR}
        if cell.kind == "inference":
            parts.update(rm=self.reward_key(world, seed), ns=self.plan.sweeps[cell.method])
        elif cell.kind in ("offline", "online"):
            parts["settings"] = method_settings(self.plan, cell.method, cell.value, seed,
                                                get_world(world))
            parts["method"] = cell.method
        if cell.kind == "online" or (cell.kind in ("eval", "offline")
                                     and self._has_reward_model()):
            parts["rm"] = self.reward_key(world, seed)  # the proxy column of the evaluation
        return _hash(parts)

    def _has_reward_model(self) -> bool:
        return any(m in REWARD_MODEL_METHODS for m in self.plan.methods)

    def finished(self, cell: Cell) -> bool:
        path = self.result_path(cell)
        if not path.is_file():
            return False
        try:
            saved = json.loads(path.read_text())
        except json.JSONDecodeError:
            return False
        if saved.get("key") != self.key(cell):
            return False
        if cell.kind == "base":  # the cache may have been cleared since
            return (self._base_path(cell.world, cell.seed) / "lab_base.json").is_file()
        return True

    def _base_path(self, world: str, seed: int) -> Path:
        return self.cache_dir / f"base-{world}-{self.base_key(world, seed)}"

    # --- shared models ----------------------------------------------------------------------

    def base(self, world: str, seed: int):
        if (world, seed) not in self._models:
            from preftune.models import load_causal_lm

            path = self._base_path(world, seed)
            if not (path / "lab_base.json").is_file():
                base_policy(self.plan, get_world(world), seed, self.cache_dir,
                            self.out / "logs" / world / f"seed{seed}")
            self._models[(world, seed)] = load_causal_lm(str(path))
        return self._models[(world, seed)]

    def proxy(self, world: str, seed: int):
        if not self._has_reward_model():
            return None
        if (world, seed) not in self._proxies:
            from preftune.rewards import ModelReward

            rm_dir = self.out / "runs" / world / f"seed{seed}" / "reward_model"
            self._proxies[(world, seed)] = ModelReward.from_pretrained(
                str(rm_dir), batch_size=64, max_length=MAX_LENGTH)
        return self._proxies[(world, seed)]

    # --- running one cell ---------------------------------------------------------------------

    def run(self, cell: Cell) -> None:
        world = get_world(cell.world)
        result: dict[str, Any] = {"key": self.key(cell), "world": cell.world, "seed": cell.seed,
                                  "method": cell.method, "kind": cell.kind}
        if cell.kind == "base":
            path, _ = base_policy(self.plan, world, cell.seed, self.cache_dir,
                                  self.log_path(cell).parent)
            info = json.loads((path / "lab_base.json").read_text())
            result.update(path=str(path), **info)
        elif cell.kind == "data":
            model, tokenizer = self.base(cell.world, cell.seed)
            result.update(make_data(self.plan, world, cell.seed, model, tokenizer,
                                    self.data_dir(cell.world, cell.seed),
                                    self.base_key(cell.world, cell.seed)))
        elif cell.kind == "reward_model":
            result.update(self._train_reward_model(cell))
        elif cell.kind == "eval":
            model, tokenizer = self.base(cell.world, cell.seed)
            held_out = load_held_out(self.data_dir(cell.world, cell.seed), tokenizer)
            result["value"] = None
            result["eval"] = ev.evaluate_policy(model, model, tokenizer, world, held_out,
                                                self.proxy(cell.world, cell.seed),
                                                seed=EVAL_SEED)
            result["train"] = {"wall_time_s": 0.0, "tokens_trained": 0, "tokens_generated": 0}
        elif cell.kind == "inference":
            model, tokenizer = self.base(cell.world, cell.seed)
            held_out = load_held_out(self.data_dir(cell.world, cell.seed), tokenizer)
            ns = [int(n) for n in self.plan.sweeps[cell.method]]
            by_n = ev.evaluate_best_of_n(model, tokenizer, world, held_out,
                                         self.proxy(cell.world, cell.seed), ns,
                                         seed=EVAL_SEED + 1)
            result["points"] = [{"value": n, "eval": r,
                                 "train": {"wall_time_s": 0.0, "tokens_trained": 0,
                                           "tokens_generated": 0}}
                                for n, r in by_n.items()]
        else:
            result.update(self._train_and_evaluate(cell, world))
        atomic_write_json(self.result_path(cell), result)

    def _train_reward_model(self, cell: Cell) -> dict:
        run_dir = self.out / "runs" / cell.world / f"seed{cell.seed}" / "reward_model"
        config_cls, run = _trainer("reward")
        settings = reward_settings(self.plan, cell.seed)
        cfg = config_cls(model=str(self._base_path(cell.world, cell.seed)),
                         data=str(self.data_dir(cell.world, cell.seed) / "pairs.jsonl"),
                         output_dir=str(run_dir), **settings)
        cfg.validate()
        self._proxies.pop((cell.world, cell.seed), None)
        t0 = time.perf_counter()
        with _captured_output(self.log_path(cell)):
            metrics = run(cfg)
        gold_accuracy = self._reward_model_gold_accuracy(cell)
        return {"settings": settings, "metrics": metrics,
                "eval_accuracy": metrics.get("eval/rewards/accuracies",
                                             metrics.get("eval/accuracy")),
                "gold_accuracy": gold_accuracy,
                "wall_time_s": time.perf_counter() - t0,
                "tokens_trained": _offline_tokens_trained(run_dir)}

    def _reward_model_gold_accuracy(self, cell: Cell) -> float | None:
        """How often the reward model orders two fresh base-policy samples of a held-out prompt
        the way the gold reward does (pairs with equal gold left out)."""
        world = get_world(cell.world)
        base, tokenizer = self.base(cell.world, cell.seed)
        held_out = load_held_out(self.data_dir(cell.world, cell.seed), tokenizer)
        _, texts = ev.sample(base, tokenizer, held_out.prompt_ids, world.max_new_tokens,
                             EVAL_SEED + 2, num_samples=2)
        prompts = [p for p in held_out.prompts for _ in range(2)]
        gold = world.gold_reward(prompts, texts)
        proxy = self.proxy(cell.world, cell.seed)(prompts, texts).tolist()
        right = [(gold[i] > gold[i + 1]) == (proxy[i] > proxy[i + 1])
                 for i in range(0, len(gold), 2) if gold[i] != gold[i + 1]]
        return sum(right) / len(right) if right else None

    def _train_and_evaluate(self, cell: Cell, world) -> dict:
        from preftune.models import load_causal_lm

        kind = METHODS[cell.method][0]
        run_dir = self.run_dir(cell)
        data_dir = self.data_dir(cell.world, cell.seed)
        settings = method_settings(self.plan, cell.method, cell.value, cell.seed, world)
        paths: dict[str, Any] = {"model": str(self._base_path(cell.world, cell.seed)),
                                 "output_dir": str(run_dir)}
        if kind == "offline":
            paths["data"] = str(data_dir / "pairs.jsonl")
        else:
            paths["data"] = str(data_dir / "prompts.jsonl")
            paths["reward_model"] = str(self.out / "runs" / cell.world / f"seed{cell.seed}"
                                        / "reward_model")
        config_cls, run = _trainer(cell.method)
        cfg = config_cls(**paths, **settings)
        cfg.validate()
        t0 = time.perf_counter()
        with _captured_output(self.log_path(cell)):
            metrics = run(cfg)
        wall = time.perf_counter() - t0

        train = {"wall_time_s": wall, "metrics": metrics}
        if kind == "offline":
            train["tokens_trained"] = _offline_tokens_trained(run_dir)
            train["tokens_generated"] = 0
        else:
            rows = cfg.max_steps * cfg.prompts_per_step * cfg.num_generations
            length = float(metrics.get("completion/length", 0.0))
            _, tokenizer = self.base(cell.world, cell.seed)
            prompt_tokens = sum(len(p) for p in ev.encode_prompts(
                tokenizer, [json.loads(l)["prompt"] for l in
                            (data_dir / "prompts.jsonl").read_text().splitlines()[:256]]))
            prompt_tokens /= min(256, self.plan.pairs)
            passes = getattr(cfg, "ppo_epochs", 1)
            train["tokens_generated"] = int(round(rows * length))
            # Estimate: rows x (mean prompt tokens + mean completion length) x passes.
            train["tokens_trained"] = int(round(rows * (prompt_tokens + length) * passes))

        policy, _ = load_causal_lm(str(run_dir))
        base, tokenizer = self.base(cell.world, cell.seed)
        held_out = load_held_out(data_dir, tokenizer)
        evaluation = ev.evaluate_policy(policy, base, tokenizer, world, held_out,
                                        self.proxy(cell.world, cell.seed), seed=EVAL_SEED)
        return {"value": cell.value, "knob": METHODS[cell.method][4], "settings": settings,
                "train": train, "eval": evaluation}

    # --- collecting the results ---------------------------------------------------------------

    def collect(self, cells: list[Cell], failures: list[dict], wall_time_s: float) -> dict:
        import platform

        import torch

        finished = []
        for cell in cells:
            if self.finished(cell):
                finished.append(json.loads(self.result_path(cell).read_text()))
        return {
            "lab_format": LAB_FORMAT,
            "config": asdict(self.cfg),
            "plan": asdict(self.plan),
            "worlds": {name: get_world(name).description for name in self.plan.worlds},
            "kl_estimator": ev.KL_ESTIMATOR,
            "best_of_n_kl": ev.BON_KL_BOUND,
            "eval_seed": EVAL_SEED,
            "environment": {"python": platform.python_version(), "torch": torch.__version__,
                            "threads": torch.get_num_threads(), "cpus": os.cpu_count()},
            "wall_time_s": wall_time_s,
            "cells": finished,
            "failures": failures,
        }


EVAL_SEED = 12345  # the sampling seed of every evaluation: common random numbers across cells
