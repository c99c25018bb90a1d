"""`preftune eval-rm`: evaluate any reward on preference pairs.

Three kinds of reward, each turned into two arrays r_chosen[i], r_rejected[i]:
- a sequence classifier with one output (`preftune reward`'s, or any in the transformers
  layout): `--model DIR`;
- a causal-LM policy through its implicit reward β·Σ_t [log π(y_t|x, y_<t) − log π_ref(...)]
  (Rafailov et al. 2023, Eq. 5; scored as RewardBench does, Lambert et al. 2024):
  `--model POLICY --ref-model REF`; or reference-free, β·log π(y|x) summed or averaged over
  the completion tokens: `--model POLICY --reference-free [--logprob-agg mean]`;
- a python function `fn(prompts, completions) -> scores`: `--model module:function` or
  `--model path/to/file.py:function`.

Models see exactly what `preftune reward` trains on: the same data conversion, tokenization,
truncation (by default read from the `config.yaml` the training run left next to the model)
and right-padded batches. The statistics are pure functions in `evaluation.stats`.

Also: a reward-model ensemble (`preftune reward --ensemble K`), read as one reward through
`--ensemble-agg`, with each member's accuracy and the members' disagreement; and the three-way
head of `preftune reward --loss three-way` (a pair classifier, no reward per reply).

Ties (`tie` labels, arena `winner: tie`, equal ranked scores) are kept out of the pairwise
accuracy and evaluated three ways (P(win), P(tie), P(lose): log loss, accuracy, calibration;
`evaluation.ties`). A tie-aware model gives the probabilities itself; for a reward without a tie
outcome a margin threshold is fitted on `--tie-fit-fraction` of the pairs, and every model's
three-way numbers are on the remaining pairs, so that they compare on the same pairs.

`--best-of-k` evaluates something else: prompts with several completions and a gold score
(`evaluation.best_of_k`).

Outputs in `--output-dir`: results.json, scores.jsonl (one line per pair), reliability.png,
rewards.png, ties_reliability.png (with ties), config.yaml; the accuracy table is printed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from preftune.config import DataSettings, _require, arg, prompt_limit, save_config
from preftune.data import formats
from preftune.data.collate import collate_pairs
from preftune.data.loading import load_rows, parse_column_map
from preftune.data.tokenize import (
    TokenizeReport,
    TruncationConfig,
    set_chat_template,
    tokenize_pairs,
)
from preftune.errors import PreftuneError
from preftune.evaluation import stats
from preftune.evaluation.plots import reliability_diagram, reward_distributions
from preftune.evaluation.report import format_table
from preftune.models.loading import (
    _resolve,
    _torch_dtype,
    check_same_tokenizer,
    load_causal_lm,
    load_tokenizer,
)
from preftune.models.logprobs import completion_logprobs
from preftune.rewards.sources import FunctionReward, check_ensemble_settings
from preftune.trainers.common import resolve_data_source
from preftune.trainers.reward import check_max_length, ensure_eos
from preftune.utils import atomic_write_json, atomic_write_text

REWARD_KINDS = ("classifier", "three_way", "ensemble", "implicit", "reference_free", "function")
RESULT_FILES = ("results.json", "scores.jsonl", "reliability.png", "rewards.png")


@dataclass
class EvalRMConfig(DataSettings):
    """Settings of `preftune eval-rm` (an evaluation, not a training run): the data block
    (`data`, `split`, `columns`, `on_bad_row`) and its own."""

    # --- the reward --------------------------------------------------------------------------
    model: str = arg(
        "",
        "The reward to evaluate: a reward model folder (or hub id in the "
        "offline cache) in the transformers sequence-classification layout; a "
        "causal-LM policy with --ref-model or --reference-free; or a python "
        "function as `module:function` or `path/to/file.py:function`, called as "
        "fn(prompts, completions) and returning one number per completion (the "
        "file is imported and run with your user's rights).",
    )
    ref_model: str = arg(
        "",
        "Reference model of a DPO-trained policy: the reward is then the "
        "implicit reward beta * sum_t log pi(y_t|..)/pi_ref(y_t|..).",
    )
    reference_free: bool = arg(
        False,
        "Score a policy by beta * its own log-prob of the completion, with no reference model.",
    )
    logprob_agg: str = arg(
        "sum",
        "How a policy's per-token log-probs (or log-ratios) are "
        "combined: summed over the completion, or averaged (length-"
        "normalised, as in SimPO).",
        choices=("sum", "mean"),
    )
    beta: float = arg(
        1.0,
        "Scale of a policy's implicit reward (the beta it was trained with "
        "makes sigma(r_c - r_r) its own preference probability, for calibration).",
    )
    dtype: str = arg(
        "auto",
        "Weights dtype when loading models.",
        choices=("auto", "float32", "bfloat16", "float16"),
    )
    device: str = arg(
        "auto",
        "Where models run: `auto` is CUDA when available, else the CPU.",
        choices=("auto", "cpu", "cuda"),
    )
    seed: int = arg(0, "Seed (only matters for models built at random, like `tiny`).")

    # --- data --------------------------------------------------------------------------------
    data: str = arg(
        "",
        "Preference pairs: paired (prompt, chosen, rejected [, subset]), "
        "implicit pairs (chosen, rejected) or ranked rows (split into all pairs).",
    )
    max_length: int = arg(
        0,
        "Maximum tokens of prompt + completion (0: the value the reward "
        "model was trained with, read from its config.yaml, else 512).",
    )
    max_prompt_length: int = arg(
        0,
        "Maximum prompt tokens (0: as trained; there, and for a "
        "model without config.yaml, 0 is half of max_length).",
    )
    prompt_truncation: str = arg(
        "",
        "Which part of a long prompt survives truncation (empty: as trained, else keep_end).",
        choices=("", "keep_end", "keep_start"),
    )
    chat_template: str = arg("", "Jinja chat template file overriding the tokenizer's own.")
    batch_size: int = arg(16, "Pairs scored per forward pass.")

    # --- statistics --------------------------------------------------------------------------
    ties: str = arg(
        "wrong",
        "How a pair with equal rewards counts: as wrong, or as half right.",
        choices=stats.TIE_MODES,
    )
    confidence: float = arg(0.95, "Confidence level of the Wilson intervals.")
    n_bins: int = arg(10, "Bins of the reliability diagram and of the calibration error.")
    section_weights: str = arg(
        "",
        "Weights of the `subset` sections for a weighted accuracy "
        "row, e.g. `chat=1,safety=2` (subsets not named get weight 0).",
    )
    tie_fit_fraction: float = arg(
        0.3,
        "With tied pairs in the data: this fraction of the pairs "
        "(drawn with `seed`) fits the margin-threshold tie baseline "
        "of rewards without a tie outcome; the three-way numbers of "
        "every reward are on the other pairs.",
    )

    # --- ensembles ---------------------------------------------------------------------------
    ensemble_agg: str = arg(
        "mean",
        "How an ensemble's members are combined (Coste et al. "
        "2023): mean, min, mean-minus-std, mean-minus-var.",
        choices=("mean", "min", "mean-minus-std", "mean-minus-var"),
    )
    ensemble_coef: float = arg(
        1.0,
        "The multiple of the members' std (variance) subtracted by "
        "mean-minus-std (mean-minus-var).",
    )

    # --- best-of-K ---------------------------------------------------------------------------
    best_of_k: bool = arg(
        False,
        "Best-of-K evaluation instead of pairs: `data` holds prompts "
        "with several `completions` each and a gold source; the gold score "
        "of the reward's pick among K completions, against K, beside the "
        "oracle's and a random pick.",
    )
    gold_fn: str = arg(
        "",
        "With best_of_k: the gold score, a python function `module:function` "
        "called as fn(prompts, completions, **columns). Default: 1 when the "
        "completion, stripped, equals the row's `answer` column, else 0.",
    )
    k_values: list[int] = arg(
        [],
        "With best_of_k: the K values (default 1, 2, 4, ... up to "
        "the fewest completions of a prompt).",
    )

    # --- output ------------------------------------------------------------------------------
    output_dir: str = arg(
        "", "Where results.json, scores.jsonl and the plots go (default: runs/eval-rm)."
    )
    overwrite: bool = arg(False, "Replace the results already in `output_dir`.")

    def check(self) -> None:
        if not self.model:
            raise PreftuneError(
                "model: no reward given; pass --model (a reward model folder, a "
                "policy with --ref-model, or module:function)"
            )
        if not self.data:
            raise PreftuneError("data: no evaluation data given; pass --data FILE")
        _require(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        _require(0 < self.confidence < 1, "confidence", self.confidence, "a number in (0, 1)")
        _require(self.n_bins >= 1, "n_bins", self.n_bins, "an integer >= 1")
        _require(
            self.max_length == 0 or self.max_length >= 8,
            "max_length",
            self.max_length,
            "0 (as trained) or an integer >= 8",
        )
        _require(
            self.max_prompt_length >= 0,
            "max_prompt_length",
            self.max_prompt_length,
            "an integer >= 0",
        )
        if self.max_length and self.max_prompt_length >= self.max_length:
            raise PreftuneError(
                f"max_prompt_length: got {self.max_prompt_length}, expected an "
                f"integer in [0, max_length={self.max_length})"
            )
        _require(math.isfinite(self.beta) and self.beta > 0, "beta", self.beta, "a number > 0")
        if self.ref_model and self.reference_free:
            raise PreftuneError(
                "ref_model and reference_free were both given: --ref-model scores "
                "log-ratios against a reference, --reference-free the policy alone; "
                "pass one"
            )
        kind = self.reward_kind
        if kind in ("classifier", "function", "ensemble"):
            for name, value, default in (
                ("logprob_agg", self.logprob_agg, "sum"),
                ("beta", self.beta, 1.0),
            ):
                if value != default:
                    raise PreftuneError(
                        f"{name} only applies to a policy's implicit reward "
                        "(--ref-model or --reference-free); a "
                        f"{kind} reward would ignore it"
                    )
        if kind == "function":
            for name in ("max_length", "max_prompt_length", "prompt_truncation", "chat_template"):
                if getattr(self, name):
                    raise PreftuneError(
                        f"{name}: a python-function reward reads the raw text, "
                        "not tokens; drop the setting"
                    )
        parse_section_weights(self.section_weights)
        _require(
            0 < self.tie_fit_fraction < 1,
            "tie_fit_fraction",
            self.tie_fit_fraction,
            "a number in (0, 1)",
        )
        check_ensemble_settings(
            self.ensemble_agg, self.ensemble_coef, kind == "ensemble", self.model
        )
        if not self.best_of_k and (self.gold_fn or self.k_values):
            raise PreftuneError("gold_fn and k_values only apply to --best-of-k")
        if self.best_of_k:
            if kind in ("implicit", "reference_free"):
                raise PreftuneError(
                    "best_of_k scores completions with a reward model, an "
                    "ensemble or a python function, not a policy's implicit reward"
                )
            if any(k < 1 for k in self.k_values):
                raise PreftuneError(f"k_values: got {self.k_values}, expected integers >= 1")

    @property
    def reward_kind(self) -> str:
        from preftune.rewards.sources import is_ensemble

        if looks_like_function(self.model):
            if self.ref_model or self.reference_free:
                raise PreftuneError(
                    f"model {self.model!r} is a python function; --ref-model and "
                    "--reference-free only apply to a policy model"
                )
            return "function"
        if is_ensemble(self.model):
            if self.ref_model or self.reference_free:
                raise PreftuneError(
                    f"{self.model!r} is a reward-model ensemble; --ref-model and "
                    "--reference-free only apply to a policy model"
                )
            return "ensemble"
        if self.ref_model:
            return "implicit"
        if self.reference_free:
            return "reference_free"
        return "classifier"


def looks_like_function(spec: str) -> bool:
    """`module:function` or `file.py:function` (a hub id or folder has no colon, or exists)."""
    if ":" not in spec or os.path.exists(os.path.expanduser(spec)):
        return False
    where, _, attr = spec.rpartition(":")
    return bool(where) and attr.isidentifier()


def parse_section_weights(spec: str) -> dict[str, float] | None:
    if not spec.strip():
        return None
    weights: dict[str, float] = {}
    for item in spec.split(","):
        name, sep, value = (part.strip() for part in item.partition("="))
        try:
            weight = float(value)
        except ValueError:
            weight = float("nan")
        if not sep or not name or not math.isfinite(weight) or weight < 0:
            raise PreftuneError(
                f"section_weights: item {item.strip()!r} is not of the form "
                "subset=weight with a finite weight >= 0 (e.g. `chat=1,safety=2`)"
            )
        if name in weights:
            raise PreftuneError(f"section_weights: subset {name!r} is given twice")
        weights[name] = weight
    return weights


# --- data ------------------------------------------------------------------------------------


def read_pairs(cfg: EvalRMConfig, log) -> list:
    column_map = parse_column_map(cfg.columns) if cfg.columns else None
    rows = load_rows(resolve_data_source(cfg.data), split=cfg.split, column_map=column_map)
    pairs, report = formats.to_pairs(rows, cfg.data, on_bad_row=cfg.on_bad_row, ties="keep")
    log(report.summary())
    return pairs


def training_truncation(model_dir: str) -> dict:
    """max_length etc. from the config.yaml that `preftune reward` wrote next to the model."""
    path = Path(os.path.expanduser(model_dir)) / "config.yaml"
    if not path.is_file():
        return {}
    try:
        saved = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        return {}
    if not isinstance(saved, dict):
        return {}
    return {
        k: saved[k] for k in ("max_length", "max_prompt_length", "prompt_truncation") if k in saved
    }


def resolve_truncation(cfg: EvalRMConfig, model_dir: str, log):
    trained = training_truncation(model_dir)
    max_length = cfg.max_length or int(trained.get("max_length", 512))
    # 0 here: as trained; 0 there: half of max_length, as in every command (`prompt_limit`)
    prompt = prompt_limit(
        cfg.max_prompt_length or int(trained.get("max_prompt_length", 0)), max_length
    )
    how = cfg.prompt_truncation or trained.get("prompt_truncation", "keep_end")
    if prompt >= max_length:
        raise PreftuneError(
            f"max_prompt_length ({prompt}) must be smaller than max_length ({max_length})"
        )
    source = " (as trained)" if trained else ""
    log(f"truncation{source}: max_length {max_length}, max_prompt_length {prompt}, {how}")
    return TruncationConfig(max_length=max_length, max_prompt_length=prompt, prompt_truncation=how)


def tokenize_each(
    tokenizer, pairs: list, trunc, log
) -> tuple[list[dict], list[int], dict[str, int]]:
    """Tokenize pair by pair so that every feature keeps the index of its pair.

    -> (features, index of each feature's pair, {reason: pairs dropped}).
    """
    features, index = [], []
    total = TokenizeReport(n_examples=len(pairs))
    for i, pair in enumerate(_progress(pairs, "tokenize", len(pairs) > 2000)):
        feats, report = tokenize_pairs(tokenizer, [pair], trunc, progress=False)
        if feats:
            features.append(feats[0])
            index.append(i)
        total.n_prompt_truncated += report.n_prompt_truncated
        total.n_completion_truncated += report.n_completion_truncated
        for reason, n in report.n_dropped.items():
            total.n_dropped[reason] = total.n_dropped.get(reason, 0) + n
    log(total.summary())
    return features, index, dict(total.n_dropped)


def _progress(items, desc: str, show: bool = True):
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, disable=not (show and sys.stderr.isatty()), dynamic_ncols=True)


def _device(cfg: EvalRMConfig) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise PreftuneError("device: cuda was asked for but no CUDA device is available")
        return torch.device("cuda")
    return torch.device("cpu")


def _batches(features: list[dict], batch_size: int):
    """Batches of similar lengths (sorted), each with the positions of its features."""
    order = sorted(
        range(len(features)),
        key=lambda i: (
            -max(len(features[i]["chosen_input_ids"]), len(features[i]["rejected_input_ids"]))
        ),
    )
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def completion_lengths(features: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Completion tokens (after truncation) of the chosen and rejected sequences."""
    return (
        np.array([sum(f["chosen_completion_mask"]) for f in features], dtype=np.float64),
        np.array([sum(f["rejected_completion_mask"]) for f in features], dtype=np.float64),
    )


# --- the three scorers -------------------------------------------------------------------------


@torch.no_grad()
def score_classifier(
    model, features: list[dict], pad_id: int, batch_size: int, device: torch.device
) -> tuple[np.ndarray, np.ndarray]:
    """r(x, y) of a one-output sequence classifier for each pair's chosen and rejected rows."""
    r_c = np.empty(len(features))
    r_r = np.empty(len(features))
    batches = list(_batches(features, batch_size))
    for idx in _progress(batches, "scoring"):
        batch = collate_pairs([features[i] for i in idx], pad_id)
        logits = model(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
        ).logits
        rewards = logits.float().reshape(-1).cpu().numpy()
        r_c[idx], r_r[idx] = rewards[: len(idx)], rewards[len(idx) :]
    return r_c, r_r


@torch.no_grad()
def score_policy(
    policy,
    ref,
    features: list[dict],
    pad_id: int,
    batch_size: int,
    device: torch.device,
    *,
    agg: str,
    beta: float,
) -> tuple[np.ndarray, np.ndarray]:
    """β·Σ_t log π(y_t|·) − log π_ref(y_t|·) (Rafailov et al. 2023, Eq. 5), or β·log π without a
    reference; with agg="mean" divided by the completion's token count."""
    r_c = np.empty(len(features))
    r_r = np.empty(len(features))
    for idx in _progress(list(_batches(features, batch_size)), "scoring"):
        batch = collate_pairs([features[i] for i in idx], pad_id)
        args = [batch[k].to(device) for k in ("input_ids", "attention_mask", "completion_mask")]
        out = completion_logprobs(policy, *args)
        logps = out.seq_logps.double()
        if ref is not None:
            logps = logps - completion_logprobs(ref, *args).seq_logps.double()
        if agg == "mean":
            logps = logps / out.n_tokens.clamp(min=1).double()
        rewards = (beta * logps).cpu().numpy()
        r_c[idx], r_r[idx] = rewards[: len(idx)], rewards[len(idx) :]
    return r_c, r_r


def score_function(spec: str, pairs: list, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """fn(prompts, completions) on batches of chosen, then rejected, completions."""
    source = FunctionReward.from_spec(spec)
    r_c = np.empty(len(pairs))
    r_r = np.empty(len(pairs))
    for start in _progress(range(0, len(pairs), batch_size), "scoring"):
        chunk = pairs[start : start + batch_size]
        prompts = [p.prompt for p in chunk]
        r_c[start : start + len(chunk)] = (
            source(prompts, [p.chosen for p in chunk]).double().numpy()
        )
        r_r[start : start + len(chunk)] = (
            source(prompts, [p.rejected for p in chunk]).double().numpy()
        )
    return r_c, r_r


def _text_length(text) -> int:
    return len(text) if isinstance(text, str) else sum(len(m.get("content", "")) for m in text)


# --- loading models ------------------------------------------------------------------------------


def load_classifier(cfg: EvalRMConfig):
    """A one-output sequence classifier with its trained head; anything else is refused with
    what to pass instead."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    name = _resolve(cfg.model)
    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError, KeyError) as e:
        raise PreftuneError(f"cannot load {cfg.model!r} as a reward model: {e}") from None
    architectures = list(getattr(config, "architectures", None) or [])
    if architectures and not any(a.endswith("ForSequenceClassification") for a in architectures):
        causal = any(
            a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration"))
            for a in architectures
        )
        hint = (
            "it is a language model: to score a DPO-trained policy by its implicit reward "
            "pass its reference model with --ref-model REF, or --reference-free"
            if causal
            else "pass a reward model trained by `preftune reward`"
        )
        raise PreftuneError(
            f"{cfg.model!r} ({', '.join(architectures)}) has no reward head "
            f"(no ...ForSequenceClassification architecture); {hint}"
        )
    three_way = getattr(config, "preftune_head", None) == "three-way" and config.num_labels == 3
    if config.num_labels != 1 and not three_way:
        raise PreftuneError(
            f"{cfg.model!r} has num_labels={config.num_labels}; a reward model has "
            "one output (train one with `preftune reward`)"
        )
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            name, dtype=_torch_dtype(cfg.dtype), output_loading_info=True
        )
    except (OSError, ValueError, KeyError) as e:
        raise PreftuneError(f"cannot load {cfg.model!r} as a reward model: {e}") from None
    head = [k for k in info.get("missing_keys", ()) if k.split(".")[0] in ("score", "classifier")]
    if head:
        raise PreftuneError(
            f"{cfg.model!r} has no trained reward head ({', '.join(sorted(head))} "
            "missing: it would be random); pass a reward model trained by "
            "`preftune reward`, or a policy with --ref-model REF"
        )
    tokenizer = load_tokenizer(name)
    _prepare_tokenizer(tokenizer, cfg)
    ensure_eos(tokenizer)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id  # where a decoder reads its score
    return model.eval(), tokenizer, name


def load_policies(cfg: EvalRMConfig):
    policy, tokenizer = load_causal_lm(cfg.model, dtype=cfg.dtype, seed=cfg.seed)
    _prepare_tokenizer(tokenizer, cfg)
    ref = None
    if cfg.ref_model:
        ref, ref_tokenizer = load_causal_lm(cfg.ref_model, dtype=cfg.dtype, seed=cfg.seed)
        _prepare_tokenizer(ref_tokenizer, cfg)
        check_same_tokenizer(tokenizer, ref_tokenizer, f"ref_model {cfg.ref_model!r}")
    return policy.eval(), ref, tokenizer


def _prepare_tokenizer(tokenizer, cfg: EvalRMConfig) -> None:
    if cfg.chat_template:
        set_chat_template(tokenizer, cfg.chat_template)


# --- the run -----------------------------------------------------------------------------------


def _check_finite_rewards(
    r_c: np.ndarray, r_r: np.ndarray, pairs: list, index: list[int], who: str
) -> None:
    bad = [j for j in range(len(r_c)) if not (math.isfinite(r_c[j]) and math.isfinite(r_r[j]))]
    if bad:
        first = pairs[index[bad[0]]]
        prompt = first.prompt if isinstance(first.prompt, str) else first.prompt[-1]["content"]
        raise PreftuneError(
            f"{who} gave non-finite (NaN or inf) rewards for {len(bad)} of {len(r_c)} pairs, "
            f"first at pair {index[bad[0]] + 1} of the {len(pairs)} pairs read from the data "
            f"(prompt ...{prompt[-60:]!r}); "
            "the model's weights or dtype may be broken (try --dtype float32)"
        )


@dataclass
class Scored:
    """What a scorer hands the statistics: one entry per kept pair (`index` into the data)."""

    index: list[int]
    r_c: np.ndarray | None  # rewards of the first (preferred) replies; None for a 3-way head
    r_r: np.ndarray | None
    len_c: np.ndarray | None
    len_r: np.ndarray | None
    length_unit: str
    trunc: object = None
    dropped: dict = dataclasses.field(default_factory=dict)
    probs: np.ndarray | None = None  # [N, 3] P(win, tie, lose) of a tie-aware model
    tie_method: str = ""
    ensemble: dict | None = None


def score_model_dir(cfg: EvalRMConfig, pairs: list, log) -> Scored:
    """A sequence classifier (one output, maybe Rao-Kupper/Davidson) or a three-way head."""
    device = _device(cfg)
    model, tokenizer, name = load_classifier(cfg)
    trunc = resolve_truncation(cfg, name, log)
    check_max_length(trunc.max_length, model, tokenizer, repr(cfg.model))
    model = model.to(device)
    config = model.config
    if getattr(config, "preftune_head", None) == "three-way":
        probs, index, dropped = score_three_way(model, tokenizer, pairs, trunc, cfg, device, log)
        return Scored(
            index, None, None, None, None, "tokens", trunc, dropped, probs, "three-way head"
        )
    features, index, dropped = tokenize_each(tokenizer, pairs, trunc, log)
    if not features:
        raise PreftuneError(f"{cfg.data}: no pairs left to score after tokenization ({dropped})")
    r_c, r_r = score_classifier(model, features, tokenizer.pad_token_id, cfg.batch_size, device)
    len_c, len_r = completion_lengths(features)
    scored = Scored(index, r_c, r_r, len_c, len_r, "tokens", trunc, dropped)
    tie_model = getattr(config, "tie_model", None)
    if tie_model:
        from preftune.evaluation.ties import model_probabilities

        scored.probs = model_probabilities(r_c - r_r, tie_model, float(config.tie_parameter))
        letter = "theta" if tie_model == "rao-kupper" else "nu"
        scored.tie_method = f"{tie_model} ({letter} = {float(config.tie_parameter):.4g})"
    return scored


@torch.no_grad()
def score_three_way(model, tokenizer, pairs: list, trunc, cfg: EvalRMConfig, device, log):
    """P(win), P(tie), P(lose) of the first reply, averaged over both orders of the pair."""
    from preftune.data.collate import pad_sequences
    from preftune.data.tokenize import tokenize_sft
    from preftune.trainers.reward import joint_examples

    features, index, dropped = [], [], {}
    for i, pair in enumerate(pairs):
        (ab, _), (ba, _) = joint_examples(tokenizer, pair, trunc)
        feats, _ = tokenize_sft(tokenizer, [ab, ba], trunc, progress=False)
        if len(feats) == 2:
            features += feats
            index.append(i)
        else:
            dropped["no_completion_tokens"] = dropped.get("no_completion_tokens", 0) + 1
    if not features:
        raise PreftuneError(f"{cfg.data}: no pairs left to score after tokenization ({dropped})")
    probs = np.empty((len(features), 3))
    for start in _progress(range(0, len(features), cfg.batch_size), "scoring"):
        batch = pad_sequences(features[start : start + cfg.batch_size], tokenizer.pad_token_id)
        logits = model(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
        ).logits
        probs[start : start + len(logits)] = torch.softmax(logits.float(), -1).cpu().numpy()
    ab, ba = probs[0::2], probs[1::2]
    return (ab + ba[:, ::-1]) / 2, index, dropped  # B-first's "second wins" is A winning


def score_ensemble(cfg: EvalRMConfig, pairs: list, log) -> Scored:
    """Every member scored as a classifier; rewards aggregated per reply (`aggregate_ensemble`)."""
    from preftune.rewards.sources import aggregate_ensemble, ensemble_members

    members = []
    for path in ensemble_members(cfg.model):
        log(f"ensemble member {path}")
        members.append(
            score_model_dir(
                dataclasses.replace(cfg, model=path, ensemble_agg="mean", ensemble_coef=1.0),
                pairs,
                log,
            )
        )
    if any(m.index != members[0].index for m in members) or any(m.r_c is None for m in members):
        raise PreftuneError(
            f"the members of {cfg.model!r} kept different pairs after "
            "tokenization (different truncation settings?) or are not scalar "
            "reward models; an ensemble needs members trained alike"
        )
    k = len(members)
    both = torch.tensor(np.stack([np.concatenate([m.r_c, m.r_r]) for m in members]))
    total, std = aggregate_ensemble(both, cfg.ensemble_agg, cfg.ensemble_coef)
    n = len(members[0].index)
    first = members[0]
    scored = Scored(
        first.index,
        total[:n].numpy(),
        total[n:].numpy(),
        first.len_c,
        first.len_r,
        "tokens",
        first.trunc,
        first.dropped,
    )
    tie_models = {getattr(m, "tie_method", "").split(" ")[0] for m in members}
    if all(m.probs is not None for m in members) and len(tie_models) == 1:
        scored.probs = np.mean([m.probs for m in members], axis=0)
        scored.tie_method = f"mean of the {k} members' {tie_models.pop()} probabilities"
    scored.ensemble = {
        "members": k,
        "agg": cfg.ensemble_agg,
        "coef": cfg.ensemble_coef,
        "mean_member_std": float(std.mean()),
        "member_accuracy": [float(np.mean(m.r_c > m.r_r)) for m in members],
        "_member_rewards": (
            np.stack([m.r_c for m in members], 1),
            np.stack([m.r_r for m in members], 1),
        ),
        "_untied_member_outcomes": [m.r_c > m.r_r for m in members],
    }
    return scored


def score_pairs(cfg: EvalRMConfig, kind: str, pairs: list, log) -> Scored:
    if kind == "function":
        r_c, r_r = score_function(cfg.model, pairs, cfg.batch_size)
        len_c = np.array([_text_length(p.chosen) for p in pairs], dtype=np.float64)
        len_r = np.array([_text_length(p.rejected) for p in pairs], dtype=np.float64)
        return Scored(list(range(len(pairs))), r_c, r_r, len_c, len_r, "characters")
    if kind == "classifier":
        return score_model_dir(cfg, pairs, log)
    if kind == "ensemble":
        return score_ensemble(cfg, pairs, log)
    device = _device(cfg)
    policy, ref, tokenizer = load_policies(cfg)
    trunc = resolve_truncation(cfg, cfg.model, log)
    features, index, dropped = tokenize_each(tokenizer, pairs, trunc, log)
    if not features:
        raise PreftuneError(f"{cfg.data}: no pairs left to score after tokenization ({dropped})")
    r_c, r_r = score_policy(
        policy.to(device),
        ref.to(device) if ref is not None else None,
        features,
        tokenizer.pad_token_id,
        cfg.batch_size,
        device,
        agg=cfg.logprob_agg,
        beta=cfg.beta,
    )
    len_c, len_r = completion_lengths(features)
    return Scored(index, r_c, r_r, len_c, len_r, "tokens", trunc, dropped)


def evaluate_ties(cfg: EvalRMConfig, sc: Scored, tied: np.ndarray, out: Path, log) -> dict:
    """Three-way metrics on the pairs outside the fit split (see the module docstring)."""
    from preftune.evaluation import ties as tie_stats

    n = len(tied)
    order = np.random.default_rng(cfg.seed).permutation(n)
    n_fit = max(2, round(cfg.tie_fit_fraction * n)) if tied.any() else 0
    if tied.any() and n - n_fit < 1:
        raise PreftuneError(
            f"tie_fit_fraction={cfg.tie_fit_fraction} leaves no pair to evaluate ties on (of {n})"
        )
    fit_idx, test_idx = np.sort(order[:n_fit]), np.sort(order[n_fit:])
    labels = tied.astype(int)
    if sc.probs is not None:
        probs, method, fit = sc.probs, sc.tie_method, None
    else:
        diff = sc.r_c - sc.r_r
        if n_fit < 2 or not tied[fit_idx].any():
            raise PreftuneError(
                "the tie baseline needs tied pairs in the fit split; the data "
                f"has {int(tied.sum())} ties in {n} pairs (raise --tie-fit-fraction)"
            )
        fit = tie_stats.fit_margin_threshold(diff[fit_idx], tied[fit_idx])
        probs = tie_stats.threshold_probabilities(diff, fit)
        method = (
            f"margin threshold: P(tie) = {fit.p_inside:.3f} when |r_a - r_b| < "
            f"{fit.tau:.4g}, else {fit.p_outside:.3f} (fitted on {fit.n_fit} pairs)"
        )
    metrics = tie_stats.three_way_metrics(
        probs[test_idx], labels[test_idx], n_bins=cfg.n_bins, confidence=cfg.confidence
    )
    metrics.update(
        {
            "method": method,
            "n_fit": int(n_fit),
            "fit": dataclasses.asdict(fit) if fit is not None else None,
        }
    )
    tie_stats.reliability_plot(metrics, out / "ties_reliability.png")
    metrics["_probs"], metrics["_test"] = probs, test_idx
    return metrics


def run_eval_rm(cfg: EvalRMConfig) -> dict:
    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    if cfg.best_of_k:
        from preftune.evaluation.best_of_k import run_best_of_k

        return run_best_of_k(cfg, log)
    out = Path(cfg.output_dir or "runs/eval-rm")
    if not cfg.overwrite and any((out / f).exists() for f in RESULT_FILES):
        raise PreftuneError(
            f"output directory {out} already holds eval-rm results: pass "
            "--overwrite to replace them, or another --output-dir"
        )
    kind = cfg.reward_kind
    weights = parse_section_weights(cfg.section_weights)
    pairs = read_pairs(cfg, log)

    # Scoring: every kind ends in r_c, r_r (or a three-way head's probabilities) per kept pair.
    sc = score_pairs(cfg, kind, pairs, log)
    if sc.probs is not None and sc.r_c is None:
        kind = "three_way"
    index = sc.index
    tied = np.array([pairs[i].tie for i in index], dtype=bool)
    untied = ~tied
    if sc.r_c is not None:
        _check_finite_rewards(sc.r_c, sc.r_r, pairs, index, f"{kind} reward {cfg.model!r}")
    out.mkdir(parents=True, exist_ok=True)
    tie_results = None
    if tied.any() or sc.probs is not None:
        tie_results = evaluate_ties(cfg, sc, tied, out, log)
    if not untied.any():
        raise PreftuneError(
            f"{cfg.data}: every pair is a tie; the pairwise accuracy needs untied pairs"
        )

    # Pairwise statistics on the untied pairs (pure functions of the scores).
    subsets = [pairs[i].subset for i, t in zip(index, tied) if not t]
    has_subsets = any(s is not None for s in subsets)
    if weights is not None and not has_subsets:
        raise PreftuneError("section_weights were given but the data has no `subset` column")
    if has_subsets:
        subsets = [s if s is not None else "(none)" for s in subsets]
    if sc.r_c is not None:
        r_c, r_r = sc.r_c[untied], sc.r_r[untied]
    else:  # the three-way head: P(win) against P(lose) as the two "rewards"
        r_c, r_r = np.log(sc.probs[untied, 0]), np.log(sc.probs[untied, 2])
    outcomes = stats.pair_outcomes(r_c, r_r, ties=cfg.ties)
    rows = stats.accuracy_table(
        outcomes,
        subsets if has_subsets else None,
        section_weights=weights,
        confidence=cfg.confidence,
    )
    cal = stats.calibration(r_c, r_r, n_bins=cfg.n_bins)
    summary = stats.reward_summary(r_c, r_r)
    bias = None
    if sc.len_c is not None:
        bias = stats.length_bias(
            r_c, r_r, sc.len_c[untied], sc.len_r[untied], outcomes, confidence=cfg.confidence
        )
        bias["unit"] = sc.length_unit
    overall = rows[0]
    results = {
        "model": cfg.model,
        "ref_model": cfg.ref_model or None,
        "reward_kind": kind,
        "data": cfg.data,
        "n_pairs": int(untied.sum()),
        "n_tied_pairs": int(tied.sum()),
        "n_pairs_in_data": len(pairs),
        "dropped_after_tokenization": sc.dropped,
        "truncation": dataclasses.asdict(sc.trunc) if sc.trunc is not None else None,
        "ties": cfg.ties,
        "n_ties": int(np.sum(r_c == r_r)),
        "confidence": cfg.confidence,
        "accuracy": overall.accuracy,
        "ci_low": overall.ci_low,
        "ci_high": overall.ci_high,
        "table": [dataclasses.asdict(r) for r in rows],
        "warnings": [f"{r.name}: {r.warning}" for r in rows if r.warning],
        "calibration": {
            "ece": cal.ece,
            "n_bins": cfg.n_bins,
            "bins": [
                {
                    "low": float(cal.edges[b]),
                    "high": float(cal.edges[b + 1]),
                    "count": int(cal.counts[b]),
                    "confidence": cal.confidence[b],
                    "accuracy": cal.accuracy[b],
                }
                for b in range(cfg.n_bins)
            ],
        },
        "length_bias": bias,
        "rewards": summary,
        "files": {name: str(out / name) for name in RESULT_FILES},
    }
    if sc.ensemble is not None:
        member_outcomes = sc.ensemble.pop("_untied_member_outcomes")
        sc.ensemble["member_accuracy"] = [float(np.mean(o[untied])) for o in member_outcomes]
        results["ensemble"] = {k: v for k, v in sc.ensemble.items() if not k.startswith("_")}
    if tie_results is not None:
        probs, test_idx = tie_results.pop("_probs"), tie_results.pop("_test")
        results["ties_three_way"] = tie_results
        results["files"]["ties_reliability.png"] = str(out / "ties_reliability.png")

    # Outputs: JSON, one line per pair, the figures, the resolved settings.
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", results, strict=True)
    _write_scores(
        out / "scores.jsonl",
        index,
        pairs,
        sc,
        tied,
        outcomes,
        probs if tie_results is not None else None,
        set(test_idx.tolist()) if tie_results is not None else None,
    )
    reliability_diagram(cal, out / "reliability.png")
    reward_distributions(r_c, r_r, out / "rewards.png")
    save_config(cfg, out / "config.yaml", extra={"command": "eval-rm"})

    print(format_table(rows, confidence=cfg.confidence), end="")
    print(
        f"equal rewards: {results['n_ties']} (counted as {cfg.ties}); ECE {cal.ece:.3f}; "
        f"reward mean chosen {summary['mean_chosen']:.3g}, rejected {summary['mean_rejected']:.3g}"
    )
    if bias is not None:
        lb = bias
        print(
            f"length bias: accuracy {_fmt(lb['chosen_longer']['accuracy'])} when chosen is longer "
            f"(n={lb['chosen_longer']['n']}), {_fmt(lb['chosen_shorter']['accuracy'])} when shorter "
            f"(n={lb['chosen_shorter']['n']}); Spearman(reward, length) "
            f"{_fmt(lb['spearman_reward_length'], pct=False)}"
        )
    if sc.ensemble is not None:
        e = sc.ensemble
        print(
            f"ensemble of {e['members']} ({e['agg']}): member accuracies "
            f"{', '.join(_fmt(a) for a in e['member_accuracy'])}; mean std between members "
            f"{e['mean_member_std']:.4g}"
        )
    if tie_results is not None:
        t = tie_results
        print(
            f"win/tie/lose on {t['n']} pairs ({t['n_tied']} tied; {t['method']}): log loss "
            f"{t['log_loss']:.4f} (constant rates: {t['log_loss_constant']:.4f}), accuracy "
            f"{_fmt(t['accuracy'])} [{_fmt(t['ci_low'])}, {_fmt(t['ci_high'])}], tie recall "
            f"{_fmt(t['tie_recall'])}, ECE win {t['ece']['win']:.3f} tie {t['ece']['tie']:.3f}"
        )
    for warning in results["warnings"]:
        log(f"warning: {warning}")
    log(f"wrote {out / 'results.json'}, reliability.png, rewards.png")
    return results


def _fmt(x, pct: bool = True) -> str:
    if x is None:
        return "n/a"
    return f"{100 * x:.1f}%" if pct else f"{x:.3f}"


def _write_scores(path: Path, index, pairs, sc: Scored, tied, outcomes, probs, tie_test) -> None:
    """One line per scored pair; `outcome` (1 right, 0 wrong, 0.5 for equal rewards with
    --ties half) on untied pairs, P(win/tie/lose) where the three-way evaluation ran."""
    lines = []
    untied_outcomes = iter(outcomes)
    for j, i in enumerate(index):
        record = {"pair": i, "tie": bool(tied[j])}
        if sc.r_c is not None:
            record.update(reward_chosen=float(sc.r_c[j]), reward_rejected=float(sc.r_r[j]))
        if not tied[j]:
            record["outcome"] = float(next(untied_outcomes))
        if sc.ensemble is not None:
            member_c, member_r = sc.ensemble["_member_rewards"]
            record.update(
                member_rewards_chosen=member_c[j].tolist(),
                member_rewards_rejected=member_r[j].tolist(),
            )
        if pairs[i].subset is not None:
            record["subset"] = pairs[i].subset
        if probs is not None:
            record.update(
                p_win=float(probs[j, 0]),
                p_tie=float(probs[j, 1]),
                p_lose=float(probs[j, 2]),
                tie_split="eval" if j in tie_test else "fit",
            )
        lines.append(json.dumps(record))
    atomic_write_text(path, "\n".join(lines) + "\n")
