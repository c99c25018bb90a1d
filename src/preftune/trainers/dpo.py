"""`preftune dpo`: direct preference optimisation and its family on (prompt, chosen, rejected).

Losses (pure functions in `preftune.losses.preference`): dpo, ipo, cdpo, robust, hinge need a
reference policy; simpo, orpo, cpo are reference-free and never load or run one.

One training step, per micro-batch:
1. reference log-probs of chosen and rejected: looked up (precomputed), or one no-grad forward
   of the frozen reference (or of the LoRA base with adapters off);
2. one policy forward over [chosen rows; rejected rows] (LM head on completion tokens only);
3. the per-pair loss (+ an optional NLL term on the chosen completion), summed; the engine
   divides by the global number of pairs.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass

import torch

from preftune.config import TrainConfig, arg
from preftune.data.collate import collate_pairs
from preftune.data.tokenize import tokenize_pairs
from preftune.engine.engine import Engine
from preftune.engine.loop import train_offline
from preftune.errors import PreftuneError
from preftune.losses.preference import (
    PREFERENCE_LOSSES,
    REFERENCE_FREE,
    add_sft_term,
    check_preference_hparams,
    preference_loss,
)
from preftune.models.logprobs import CompletionLogProbs
from preftune.models.packing import pair_groups
from preftune.trainers import reference as ref_lib
from preftune.trainers.common import load_policy, train_eval_examples, truncation

DEFAULT_SIMPO_GAMMA = 0.5


@dataclass
class DPOConfig(TrainConfig):
    data: str = arg(
        "demo",
        "Preference pairs: prompt/chosen/rejected, chosen/rejected whole "
        "dialogues (the prompt is their common prefix, e.g. HH-RLHF), or rankings. "
        "`demo` is a built-in sample of 300 HH-RLHF pairs.",
    )
    lr: float = arg(5e-6, "Peak learning rate (AdamW).")
    loss: str = arg(
        "dpo",
        "Preference loss: dpo (Rafailov et al. 2023), ipo (Azar et al. "
        "2023), cdpo (conservative DPO, label smoothing), robust (Chowdhury et al. "
        "2024), hinge (SLiC-HF), simpo (Meng et al. 2024, reference-free), orpo "
        "(Hong et al. 2024, reference-free), cpo (Xu et al. 2024, reference-free).",
        choices=PREFERENCE_LOSSES,
    )
    beta: float = arg(
        0.1,
        "β: the strength of the KL penalty (inverse temperature of the "
        "implicit reward); for orpo, λ, the weight of the odds-ratio term.",
    )
    label_smoothing: float = arg(
        0.0, "ε in [0, 0.5): the assumed rate of flipped preference labels (cdpo, robust only)."
    )
    simpo_gamma: float = arg(
        DEFAULT_SIMPO_GAMMA,
        "γ: SimPO's target margin between the length-normalised rewards (simpo only).",
    )
    ipo_length_norm: bool = arg(
        False,
        "ipo only: divide each log-ratio by its completion's "
        "length (TRL's IPO; 1/(2β) becomes a per-token margin) instead "
        "of summing (Azar et al. 2023, Eq. 17).",
    )
    sft_weight: float = arg(
        0.0,
        "Weight of an NLL term on the chosen completion (mean per "
        "token), added to the preference loss as in RPO and Llama 3 "
        "(not with orpo/cpo, which already include one).",
    )
    ref_model: str = arg(
        "",
        "Reference model (folder or hub name); default: the initial "
        "policy (with LoRA, the base model with the adapters disabled).",
    )
    precompute_ref: bool = arg(
        False,
        "Compute the reference log-probs of the whole data set "
        "once before training, cache them in the output directory "
        "(reused by --resume) and hold no reference model while "
        "training.",
    )

    def check(self) -> None:
        check_preference_hparams(
            self.loss, self.beta, self.label_smoothing, self.simpo_gamma, sft_weight=self.sft_weight
        )
        if self.loss in REFERENCE_FREE:
            for name, given in (
                ("ref_model", bool(self.ref_model)),
                ("precompute_ref", self.precompute_ref),
            ):
                if given:
                    raise PreftuneError(
                        f"{name} is set but loss={self.loss!r} is reference-free and uses no "
                        f"reference model; drop --{name.replace('_', '-')} or choose one of "
                        + ", ".join(l for l in PREFERENCE_LOSSES if l not in REFERENCE_FREE)
                    )
        if self.simpo_gamma != DEFAULT_SIMPO_GAMMA and self.loss != "simpo":
            raise PreftuneError(
                f"simpo_gamma={self.simpo_gamma} has no effect with "
                f"loss={self.loss!r}; it is used only by simpo"
            )
        if self.ipo_length_norm and self.loss != "ipo":
            raise PreftuneError(
                f"ipo_length_norm has no effect with loss={self.loss!r}; it is used only by ipo"
            )


def collate_pairs_with_ref(features: list[dict], pad_id: int, *, pack: bool = False) -> dict:
    """`collate_pairs`, passing precomputed reference log-probs through when present."""
    batch = collate_pairs(features, pad_id, pack=pack)
    if "ref_chosen_logps" in features[0]:
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            batch[key] = torch.tensor([f[key] for f in features], dtype=torch.float32)
    return batch


class DPOObjective:
    """Mean preference loss over the pairs of the global batch.

    Metrics per pair (same names in every trainer): rewards/chosen, rewards/rejected (the
    implicit reward β·(log π − log π_ref); the method's own score for simpo/orpo/cpo, see
    `preference_loss`), rewards/margins, rewards/accuracies, logps/chosen, logps/rejected,
    kl/chosen (log π − log π_ref on the chosen completion; reference-based losses only).
    """

    def __init__(self, cfg: DPOConfig, reference: ref_lib.Reference | None):
        self.cfg = cfg
        self.reference = reference  # None: reference-free loss, or precomputed log-probs

    def units(self, batch) -> float:
        return float(batch["num_pairs"])

    def __call__(self, module, batch):
        cfg, n = self.cfg, batch["num_pairs"]
        ids, attn, cmask = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
        packed = {"packed": batch["packed"]} if "packed" in batch else {}  # shared-prefix rows
        # 1. reference (before the policy forward: its activations are gone before ours grow)
        ref_chosen = ref_rejected = None
        if cfg.loss not in REFERENCE_FREE:
            if "ref_chosen_logps" in batch:
                ref_chosen, ref_rejected = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
            else:
                ref = self.reference(module, ids, attn, cmask, **packed).seq_logps
                ref_chosen, ref_rejected = ref[:n], ref[n:]
        # 2. policy: chosen and rejected rows in one forward pass
        out = module(ids, attn, cmask, **packed)
        chosen, rejected = out.seq_logps[:n], out.seq_logps[n:]
        lengths = out.n_tokens.clamp(min=1).to(chosen.dtype)
        # 3. loss
        losses, metrics = preference_loss(
            chosen,
            rejected,
            ref_chosen,
            ref_rejected,
            loss_type=cfg.loss,
            beta=cfg.beta,
            label_smoothing=cfg.label_smoothing,
            simpo_gamma=cfg.simpo_gamma,
            chosen_lengths=lengths[:n],
            rejected_lengths=lengths[n:],
            ipo_length_normalize=cfg.ipo_length_norm,
        )
        if cfg.sft_weight:
            losses = add_sft_term(losses, chosen, lengths[:n], cfg.sft_weight)
        return losses.sum(), metrics


def _tokenize(tokenizer, examples, cfg, what: str, log):
    features, report = tokenize_pairs(tokenizer, examples, truncation(cfg))
    log(f"{what}: {report.summary()}")
    if examples and not features:
        raise PreftuneError(
            f"{what}: no pair is left after tokenization and truncation ({report.summary()}); "
            f"raise max_length (now {cfg.max_length}) or lower max_prompt_length"
        )
    return features


def precompute_reference(
    engine: Engine,
    cfg: TrainConfig,
    reference: ref_lib.Reference,
    policy,
    *,
    splits: dict[str, list[dict]],
    pad_id: int,
) -> None:
    """Attach ref_chosen_logps/ref_rejected_logps to every pair of every split (cached on disk)."""
    identity = {
        "reference": cfg.ref_model or cfg.model,
        "seed": cfg.seed,
        "dtype": cfg.dtype,
        "lora_base": reference.kind == "adapters",
    }
    seqs = {
        f"{split}/{side}": [
            {"input_ids": f[f"{side}_input_ids"], "completion_mask": f[f"{side}_completion_mask"]}
            for f in feats
        ]
        for split, feats in splits.items()
        for side in ("chosen", "rejected")
    }
    key = ref_lib.fingerprint(identity, [s for name in sorted(seqs) for s in seqs[name]])
    pack = cfg.packing == "auto"

    def compute():
        model = reference.model if reference.model is not None else reference.policy
        model.to(engine.accelerator.device)
        was_training = model.training
        model.eval()
        forward = CompletionLogProbs(policy)  # run with its adapters off when kind == adapters

        def score(*batch, **kwargs):
            return reference(forward, *batch, **kwargs).seq_logps

        out = {}
        for split, feats in splits.items():
            if not feats:
                continue
            # chosen_i and rejected_i in one batch, sharing their common prefix when packed
            both = seqs[f"{split}/chosen"] + seqs[f"{split}/rejected"]
            n = len(feats)
            logps = ref_lib.sequence_logps(
                engine,
                score,
                both,
                pad_id,
                2 * cfg.batch_size,
                groups=pair_groups(n),
                pack=pack,
            )
            out[f"{split}/chosen"], out[f"{split}/rejected"] = logps[:n], logps[n:]
        model.train(was_training)
        return out

    cached = ref_lib.cached_logps(engine, engine.output_dir / ref_lib.CACHE_FILE, key, compute)
    for split, feats in splits.items():
        for side in ("chosen", "rejected"):
            values = cached[f"{split}/{side}"].tolist() if feats else []
            for f, v in zip(feats, values):
                f[f"ref_{side}_logps"] = v


def run_dpo(cfg: DPOConfig) -> dict:
    engine = Engine(cfg, "dpo")
    policy, tokenizer = load_policy(cfg)
    train_examples, eval_examples = train_eval_examples(cfg, "pairs", log=engine.print)
    train_set = _tokenize(tokenizer, train_examples, cfg, "train", engine.print)
    eval_set = (
        _tokenize(tokenizer, eval_examples, cfg, "eval", engine.print) if eval_examples else None
    )
    pad_id = tokenizer.pad_token_id

    # The reference: none (reference-free losses), precomputed, the LoRA base, or a frozen model.
    reference = None
    if cfg.loss not in REFERENCE_FREE:
        reference = ref_lib.build_reference(
            cfg, engine, policy, tokenizer, precompute=cfg.precompute_ref
        )
        if cfg.precompute_ref:
            precompute_reference(
                engine,
                cfg,
                reference,
                policy,
                pad_id=pad_id,
                splits={"train": train_set, "eval": eval_set or []},
            )
            reference = None
            gc.collect()
            engine.print("reference log-probs precomputed; training holds no reference model")
        engine.print(f"reference: {'precomputed' if reference is None else reference.kind}")

    module = CompletionLogProbs(policy)
    engine.setup(module, engine.planned_steps(len(train_set)))
    metrics = train_offline(
        engine,
        engine.model,
        train_set,
        lambda f: collate_pairs_with_ref(f, pad_id, pack=cfg.packing == "auto"),
        DPOObjective(cfg, reference),
        eval_set=eval_set,
    )
    engine.save_pretrained(engine.unwrap().policy, tokenizer, prefix="policy.")
    engine.finish({"metrics": metrics, "train_pairs": len(train_set), "loss": cfg.loss})
    engine.print(f"saved the model to {engine.output_dir}")
    return metrics
