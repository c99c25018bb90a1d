"""Reward-model early stopping (`early_stopping_patience`): the lab trains its reward models to
convergence and keeps the weights with the lowest held-out loss."""

import json
import random

import pytest
import torch

from preftune.errors import PreftuneError
from preftune.trainers.reward import RewardConfig, run_reward


def _noise_pairs(path, n=96, seed=0):
    """Pairs whose labels are coin flips: held-out loss can only get worse once the model
    starts memorising the training pairs."""
    rng = random.Random(seed)

    def word():
        return "".join(rng.choice("abcdefgh") for _ in range(rng.randint(3, 8)))

    rows = [
        {"prompt": f"q{i}:", "chosen": " " + word(), "rejected": " " + word()} for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _cfg(tmp_path, **kw):
    data = tmp_path / "pairs.jsonl"
    _noise_pairs(data)
    settings = dict(
        model="tiny",
        data=str(data),
        output_dir=str(tmp_path / "rm"),
        max_steps=300,
        batch_size=8,
        lr=1e-2,
        warmup_steps=0,
        eval_fraction=0.25,
        eval_steps=5,
        early_stopping_patience=2,
        max_length=32,
        logging_steps=5,
        save_steps=0,
        seed=0,
        overwrite=True,
    )
    settings.update(kw)
    return RewardConfig(**settings)


def test_stops_early_and_keeps_the_best_weights(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from preftune.data.collate import collate_pairs
    from preftune.data.tokenize import tokenize_pairs
    from preftune.trainers.common import train_eval_examples, truncation
    from preftune.trainers.reward import PairwiseRewardObjective, RewardModule

    cfg = _cfg(tmp_path)
    cfg.validate()
    metrics = run_reward(cfg)
    stopped, best = metrics["early_stopping/stopped_step"], metrics["early_stopping/best_step"]
    assert stopped < cfg.max_steps
    # Patience 2 at one evaluation per 5 steps: it stops 2 evaluations after the best one.
    assert stopped == best + 2 * cfg.eval_steps
    logged = [json.loads(line) for line in (tmp_path / "rm" / "metrics.jsonl").open()]
    evals = {r["step"]: r["eval/loss"] for r in logged if "eval/loss" in r}
    assert max(evals) == stopped and min(evals, key=evals.get) == best
    assert metrics["eval/loss"] == pytest.approx(evals[best])

    # The saved model is the best one: its held-out loss, recomputed, is the best loss.
    model = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "rm"))
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "rm"))
    _, held_out = train_eval_examples(cfg, "pairs", log=lambda *a: None)
    features, _ = tokenize_pairs(tokenizer, held_out, truncation(cfg))
    with torch.no_grad():
        loss_sum, _ = PairwiseRewardObjective()(
            RewardModule(model).eval(), collate_pairs(features, tokenizer.pad_token_id)
        )
    assert float(loss_sum) / len(features) == pytest.approx(evals[best], rel=1e-4)


def test_early_stopping_needs_held_out_evaluation(tmp_path):
    with pytest.raises(PreftuneError, match="early_stopping_patience"):
        _cfg(tmp_path, eval_steps=0).validate()
    # no held-out data: refused already for eval_steps itself (the engine's own check)
    with pytest.raises(PreftuneError, match="no held-out data to evaluate on"):
        _cfg(tmp_path, eval_fraction=0.0).validate()
    with pytest.raises(PreftuneError, match="early_stopping_patience"):
        _cfg(tmp_path, early_stopping_patience=-1).validate()
