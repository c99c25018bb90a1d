"""The model card: huggingface_hub's parser (offline) reads its front matter, which names the
base model, the data set and the method; its command reproduces the run's settings; its
numbers are the run's."""

from __future__ import annotations

import shlex

from huggingface_hub import ModelCard

from preftune.cli import build_parser
from preftune.config import build_config, config_to_dict
from preftune.engine.model_card import equivalent_command, write_model_card
from preftune.trainers.dpo import DPOConfig
from preftune.trainers.grpo import GRPOConfig


def _summary():
    return {
        "metrics": {
            "loss": 0.61234,
            "rewards/margins": 0.25,
            "eval/loss": 0.65,
            "eval/rewards/accuracies": 0.625,
            "lr": 1e-6,
        },
        "train_pairs": 1234,
        "loss": "ipo",
    }


def test_card_parses_and_names_base_model_data_and_method(tmp_path):
    cfg = DPOConfig(
        model="Qwen/Qwen2.5-0.5B-Instruct",
        data="trl-lib/ultrafeedback_binarized",
        loss="ipo",
        beta=0.5,
        lora=True,
        eval_fraction=0.1,
        output_dir=str(tmp_path),
    )
    path = write_model_card(tmp_path, "dpo", cfg, _summary())
    card = ModelCard.load(path)  # a local file: no network
    assert card.data.base_model == "Qwen/Qwen2.5-0.5B-Instruct"
    assert card.data.datasets == ["trl-lib/ultrafeedback_binarized"]
    assert card.data.library_name == "preftune"
    assert {"preftune", "dpo", "ipo", "lora"} <= set(card.data.tags)
    text = card.text
    assert "- train pairs: 1234" in text
    assert "| `loss` | 0.6123 |" in text and "| `rewards/margins` | 0.25 |" in text
    held = text[text.index("Held-out metrics") :]
    assert "| `rewards/accuracies` | 0.625 |" in held and "| `loss` | 0.65 |" in held
    assert "held-out data: 0.1 of the training data" in text
    assert "AutoPeftModelForCausalLM.from_pretrained" in text
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # atomic: no leftovers


def test_local_model_and_demo_data(tmp_path):
    local = tmp_path / "my-sft"
    local.mkdir()
    cfg = DPOConfig(model=str(local), data="demo", output_dir=str(tmp_path / "out"))
    card = ModelCard.load(write_model_card(tmp_path, "dpo", cfg, _summary()))
    assert card.data.base_model is None  # a local folder is not a Hub id ...
    assert f"from the base model `{local}`" in card.text  # ... but the card names it
    assert card.data.datasets == ["Anthropic/hh-rlhf"]  # the built-in demo sample


def test_card_command_reproduces_the_settings(tmp_path):
    for command, cfg in (
        (
            "dpo",
            DPOConfig(
                model="tiny",
                loss="robust",
                label_smoothing=0.1,
                lora=True,
                gradient_checkpointing=True,
                max_steps=7,
                lr=3e-6,
                output_dir=str(tmp_path / "a"),
            ),
        ),
        (
            "grpo",
            GRPOConfig(
                reward_fn=["r.py:f", "m:g"],
                reward_weights=[1.0, 0.5],
                scale_rewards=False,
                num_generations=4,
                output_dir="o b",
            ),
        ),
    ):
        words = shlex.split(equivalent_command(command, cfg))
        assert words[:2] == ["preftune", command]
        parser, cls, _ = build_parser(command)
        again = build_config(cls, parser.parse_args(words[2:]))
        assert config_to_dict(again) == config_to_dict(cfg)


def test_no_curves_skips_the_picture_but_not_the_card(tmp_path):
    from preftune.engine.model_card import write_run_outputs

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5, "lr": 1e-6}\n')
    write_run_outputs(tmp_path, "dpo", DPOConfig(data="demo", curves=False), _summary())
    assert not (tmp_path / "curves.png").exists()
    assert "![training curves]" not in (tmp_path / "README.md").read_text()
    write_run_outputs(tmp_path, "dpo", DPOConfig(data="demo"), _summary())
    assert (tmp_path / "curves.png").exists()
    assert "![training curves](curves.png)" in (tmp_path / "README.md").read_text()
