"""`preftune sft`: supervised fine-tuning on demonstrations, loss on completion tokens only."""

from __future__ import annotations

from dataclasses import dataclass


from preftune.config import TrainConfig, arg
from preftune.data.collate import collate_sft
from preftune.data.tokenize import tokenize_sft
from preftune.engine.engine import Engine
from preftune.engine.loop import train_offline
from preftune.losses.sft import nll_loss
from preftune.models.logprobs import CompletionLogProbs
from preftune.trainers.common import load_policy, train_eval_examples, truncation


@dataclass
class SFTConfig(TrainConfig):
    data: str = arg(
        "demo",
        "Demonstrations: prompt/completion, text, chat messages, or "
        "preference data (its chosen responses are used). `demo` is a built-in "
        "sample of 300 HH-RLHF dialogues.",
    )
    lr: float = arg(2e-4, "Peak learning rate (AdamW).")


class SFTObjective:
    """Mean negative log-likelihood over all completion tokens of the global batch."""

    def units(self, batch) -> float:
        return float(batch["completion_mask"].sum())

    def __call__(self, module, batch):
        packed = {"packed": batch["packed"]} if "packed" in batch else {}  # padding-free rows
        out = module(
            batch["input_ids"], batch["attention_mask"], batch["completion_mask"], **packed
        )
        loss_sum, n_tokens = nll_loss(out.token_logps, batch["completion_mask"])
        per_example_nll = -out.seq_logps / out.n_tokens.clamp(min=1)
        return loss_sum, {"nll/per_token": per_example_nll.detach()}


def run_sft(cfg: SFTConfig) -> dict:
    engine = Engine(cfg, "sft")
    model, tokenizer = load_policy(cfg)
    train_examples, eval_examples = train_eval_examples(cfg, "sft", log=engine.print)
    trunc = truncation(cfg)
    train_set, report = tokenize_sft(tokenizer, train_examples, trunc)
    engine.print(report.summary())
    eval_set = tokenize_sft(tokenizer, eval_examples, trunc)[0] if eval_examples else None

    module = CompletionLogProbs(model)
    engine.setup(module, engine.planned_steps(len(train_set)))
    pad_id = tokenizer.pad_token_id
    pack = cfg.packing == "auto"
    metrics = train_offline(
        engine,
        engine.model,
        train_set,
        lambda f: collate_sft(f, pad_id, pack=pack),
        SFTObjective(),
        eval_set=eval_set,
    )
    engine.save_pretrained(engine.unwrap().policy, tokenizer, prefix="policy.")
    engine.finish({"metrics": metrics, "train_examples": len(train_set)})
    engine.print(f"saved the model to {engine.output_dir}")
    return metrics
