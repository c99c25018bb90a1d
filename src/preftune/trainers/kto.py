"""`preftune kto`: Kahneman-Tversky optimisation on unpaired desirable/undesirable examples.

Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization". Data is
(prompt, completion, label); paired data is split into a desirable (chosen) and an undesirable
(rejected) example per pair.

One training step, per micro-batch of B examples:
1. mismatched pairs (x_i, y_{i+1}) built inside the batch (a rotation by one), the paper's
   estimator of KL(π ‖ π_ref) (Sec. 4.2);
2. reference log-probs of the B matched and B mismatched sequences (one no-grad forward);
3. the policy on the mismatched sequences without gradients, then z0 = max(0, mean of
   log π − log π_ref over the mismatched pairs), the mean taken over all processes first;
4. the policy on the matched sequences, the KTO loss (Eq. 8), summed; the engine divides by
   the global number of examples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from preftune.config import TrainConfig, arg
from preftune.data.collate import collate_unpaired, fewer_tokens, pad_sequences
from preftune.data.tokenize import tokenize_unpaired
from preftune.engine.engine import Engine
from preftune.engine.loop import train_offline
from preftune.errors import PreftuneError
from preftune.losses.kto import kto_loss
from preftune.models.packing import pack_sequences, pair_groups
from preftune.models.logprobs import CompletionLogProbs
from preftune.trainers import reference as ref_lib
from preftune.trainers.common import load_policy, train_eval_examples, truncation


@dataclass
class KTOConfig(TrainConfig):
    data: str = arg(
        "demo",
        "Unpaired feedback (prompt, completion, label with true = "
        "desirable) or preference pairs, split into a desirable and an undesirable "
        "example each. `demo` is a built-in sample of 300 HH-RLHF pairs.",
    )
    lr: float = arg(5e-6, "Peak learning rate (AdamW).")
    beta: float = arg(0.1, "β: the strength of the KL penalty (the value function's scale).")
    desirable_weight: float = arg(1.0, "λ_D: the weight of desirable examples' losses.")
    undesirable_weight: float = arg(
        1.0,
        "λ_U: the weight of undesirable examples' losses. The "
        "paper advises λ_D·n_D / (λ_U·n_U) in [1, 4/3].",
    )
    ref_model: str = arg(
        "",
        "Reference model (folder or hub name); default: the initial "
        "policy (with LoRA, the base model with the adapters disabled).",
    )

    def check(self) -> None:
        if not self.beta > 0:
            raise PreftuneError(f"beta: got {self.beta!r}, expected a number > 0")
        for name in ("desirable_weight", "undesirable_weight"):
            if not getattr(self, name) > 0:
                raise PreftuneError(f"{name}: got {getattr(self, name)!r}, expected a number > 0")
        if self.batch_size < 2:
            raise PreftuneError(
                f"batch_size: got {self.batch_size}, expected an integer >= 2: "
                "KTO estimates its reference point from mismatched pairs inside "
                "each micro-batch"
            )


def _mismatched(features: list[dict], max_length: int) -> list[dict]:
    """Prompt i with the completion of example i+1 (mod B): Ethayarajh et al. 2024, Sec. 4.2."""
    out = []
    for i, f in enumerate(features):
        g = features[(i + 1) % len(features)]
        prompt = f["input_ids"][: f["prompt_length"]]
        completion = g["input_ids"][g["prompt_length"] :][: max(1, max_length - len(prompt))]
        mask = [0] * len(prompt) + [1] * len(completion)
        mask[0] = 0  # position 0 has no context
        out.append({"input_ids": prompt + completion, "completion_mask": mask})
    return out


def collate_kto(features: list[dict], pad_id: int, max_length: int, *, pack: bool = False) -> dict:
    """Matched rows (input_ids, ..., label) plus the mismatched rows under a "kl_" prefix.

    `pack`: also "packed" and "kl_packed" (each set padding-free), and "ref_*" rows for the
    reference: matched then mismatched, example i's two sequences sharing prompt i in one row;
    each only where it holds fewer tokens than the padded rows it replaces."""
    batch = collate_unpaired(features, pad_id)
    mismatched = _mismatched(features, max_length)
    kl = pad_sequences(mismatched, pad_id)
    batch.update({f"kl_{k}": v for k, v in kl.items()})
    if pack:  # each packed layout only where it holds fewer tokens than its padded rows
        matched = [
            {"input_ids": f["input_ids"], "completion_mask": f["completion_mask"]} for f in features
        ]
        for key, seqs, ids in (
            ("packed", matched, batch["input_ids"]),
            ("kl_packed", mismatched, batch["kl_input_ids"]),
        ):
            packed = pack_sequences(seqs, pad_id=pad_id, padding_free=True)
            if fewer_tokens(packed, ids):
                batch[key] = packed
        both = matched + mismatched
        n = len(features)
        packed = pack_sequences(both, pair_groups(n), pad_id=pad_id, padding_free=True)
        if packed.input_ids.numel() < batch["input_ids"].numel() + kl["input_ids"].numel():
            batch.update({f"ref_{k}": v for k, v in pad_sequences(both, pad_id).items()})
            batch["ref_packed"] = packed
    return batch


class KTOObjective:
    """Mean KTO loss over the examples of the global batch.

    Metrics (same names as the DPO trainer; "chosen" = desirable, "rejected" = undesirable):
    rewards/chosen, rewards/rejected: β·(log π − log π_ref) averaged over each class;
    rewards/margins: their difference within a micro-batch holding both classes;
    rewards/accuracies: fraction of examples on the right side of the reference point
    (desirable above z0, undesirable below); logps/chosen, logps/rejected; kl/chosen: log π −
    log π_ref on desirable completions; kl/z0: the reference point.
    """

    def __init__(self, cfg: KTOConfig, engine: Engine, reference: ref_lib.Reference):
        self.cfg = cfg
        self.engine = engine
        self.reference = reference

    def units(self, batch) -> float:
        return float(batch["input_ids"].shape[0])

    def __call__(self, module, batch):
        cfg, b = self.cfg, batch["input_ids"].shape[0]
        matched = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        mismatched = (
            batch["kl_input_ids"],
            batch["kl_attention_mask"],
            batch["kl_completion_mask"],
        )
        packed = {"packed": batch["packed"]} if "packed" in batch else {}
        kl_packed = {"packed": batch["kl_packed"]} if "kl_packed" in batch else {}
        # 1-2. reference log-probs of matched and mismatched sequences
        if "ref_packed" in batch:  # one forward, example i's two sequences sharing prompt i
            both = (
                batch["ref_input_ids"],
                batch["ref_attention_mask"],
                batch["ref_completion_mask"],
            )
            ref_both = self.reference(module, *both, packed=batch["ref_packed"]).seq_logps
            ref_matched, ref_mismatched = ref_both[:b], ref_both[b:]
        else:
            ref_matched = self.reference(module, *matched).seq_logps
            ref_mismatched = self.reference(module, *mismatched).seq_logps
        # 3. z0: no gradient flows through it, so the mismatched forward runs without one.
        with torch.no_grad():
            policy_mismatched = module(*mismatched, **kl_packed).seq_logps
        kl_sum = (policy_mismatched - ref_mismatched).sum()
        # Mean over every process's micro-batch *before* the clamp (Sec. 4.2).
        z0 = max(0.0, self.engine.global_sum(kl_sum) / self.engine.global_sum(b))
        z0 = torch.tensor(z0, dtype=torch.float32, device=kl_sum.device)
        # 4. policy on the matched sequences, the loss (Eq. 8)
        logps = module(*matched, **packed).seq_logps
        losses, raw = kto_loss(
            logps,
            ref_matched,
            batch["label"],
            z0,
            beta=cfg.beta,
            desirable_weight=cfg.desirable_weight,
            undesirable_weight=cfg.undesirable_weight,
        )
        return losses.sum(), self._metrics(raw, logps.detach() - ref_matched, batch["label"], z0)

    def _metrics(self, raw, log_ratio, label, z0):
        desirable = label.bool()
        nan = torch.full_like(raw["rewards"], float("nan"))
        # NaN marks "not this class": the metric window averages finite values only.
        chosen = torch.where(desirable, raw["rewards"], nan)
        rejected = torch.where(desirable, nan, raw["rewards"])
        margin = chosen.nanmean() - rejected.nanmean()  # NaN unless both classes are present
        right_side = torch.where(desirable, log_ratio > z0, log_ratio < z0).float()
        return {
            "rewards/chosen": chosen,
            "rewards/rejected": rejected,
            "rewards/margins": margin.reshape(1),
            "rewards/accuracies": right_side,
            "logps/chosen": torch.where(desirable, raw["logps"], nan),
            "logps/rejected": torch.where(desirable, nan, raw["logps"]),
            "kl/chosen": torch.where(desirable, log_ratio, nan),
            "kl/z0": z0.reshape(1),
        }


def run_kto(cfg: KTOConfig) -> dict:
    engine = Engine(cfg, "kto")
    policy, tokenizer = load_policy(cfg)
    train_examples, eval_examples = train_eval_examples(cfg, "unpaired", log=engine.print)
    trunc = truncation(cfg)
    train_set, report = tokenize_unpaired(tokenizer, train_examples, trunc)
    engine.print(f"train: {report.summary()}")
    if not train_set:
        raise PreftuneError(
            f"{cfg.data}: no example is left after tokenization and truncation "
            f"({report.summary()}); raise max_length"
        )
    eval_set = tokenize_unpaired(tokenizer, eval_examples, trunc)[0] if eval_examples else None
    labels = [f["label"] for f in train_set]
    n_d, n_u = sum(labels), len(labels) - sum(labels)
    if n_d == 0 or n_u == 0:
        raise PreftuneError(
            f"{cfg.data}: the training data has {n_d} desirable and {n_u} "
            "undesirable examples; KTO needs both (label true and false)"
        )
    ratio = cfg.desirable_weight * n_d / (cfg.undesirable_weight * n_u)
    if not 1.0 <= ratio <= 4 / 3:
        engine.print(
            f"note: desirable_weight*n_desirable / (undesirable_weight*n_undesirable) = "
            f"{ratio:.2f}; Ethayarajh et al. 2024 advise a value in [1, 4/3]"
        )

    reference = ref_lib.build_reference(cfg, engine, policy, tokenizer)
    engine.print(f"reference: {reference.kind}")

    module = CompletionLogProbs(policy)
    engine.setup(module, engine.planned_steps(len(train_set)))
    pad_id = tokenizer.pad_token_id
    metrics = train_offline(
        engine,
        engine.model,
        train_set,
        lambda f: collate_kto(f, pad_id, cfg.max_length, pack=cfg.packing == "auto"),
        KTOObjective(cfg, engine, reference),
        eval_set=eval_set,
    )
    engine.save_pretrained(engine.unwrap().policy, tokenizer, prefix="policy.")
    engine.finish(
        {"metrics": metrics, "train_examples": len(train_set), "desirable": n_d, "undesirable": n_u}
    )
    engine.print(f"saved the model to {engine.output_dir}")
    return metrics
