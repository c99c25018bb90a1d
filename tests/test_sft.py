"""SFT end to end on real HH-RLHF dialogues: held-out loss drops, the saved model reloads
with transformers and generates; LoRA and TensorBoard logging work."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from preftune.cli import main

FIXTURE = Path(__file__).parent / "fixtures" / "hh_sample.jsonl"


def _metrics(out: Path) -> list[dict]:
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


def test_sft_on_hh_chosen_dialogues_learns_and_reloads(tmp_path):
    out = tmp_path / "sft"
    assert (
        main(
            [
                "sft",
                "--model",
                "tiny",
                "--data",
                str(FIXTURE),
                "--eval-fraction",
                "0.2",
                "--output-dir",
                str(out),
                "--max-steps",
                "30",
                "--batch-size",
                "8",
                "--max-length",
                "128",
                "--lr",
                "3e-3",
                "--logging-steps",
                "10",
                "--warmup-steps",
                "3",
            ]
        )
        == 0
    )
    evals = [m for m in _metrics(out) if "eval/loss" in m]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 30
    # Byte-level tiny model from random weights: ln(263) ~ 5.6 nats at the start.
    assert evals[-1]["eval/loss"] < evals[0]["eval/loss"] - 1.0
    train = [m for m in _metrics(out) if "loss" in m]
    assert {"lr", "grad_norm", "tokens_per_s", "examples_per_s", "step_time_s"} <= set(train[0])

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("\n\nHuman: How are you?\n\nAssistant:", return_tensors="pt").input_ids
    with torch.no_grad():
        generated = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert generated.shape[1] > ids.shape[1]
    assert isinstance(tokenizer.decode(generated[0, ids.shape[1] :]), str)
    assert (out / "model.safetensors").is_file() and (out / "run_complete.json").is_file()


def test_sft_lora_saves_an_adapter_that_loads(tmp_path):
    from peft import PeftModel

    from preftune.models.tiny import build_tiny_model, build_tiny_tokenizer

    out = tmp_path / "lora"
    assert (
        main(
            [
                "sft",
                "--model",
                "tiny",
                "--data",
                str(FIXTURE),
                "--output-dir",
                str(out),
                "--max-steps",
                "3",
                "--batch-size",
                "4",
                "--max-length",
                "96",
                "--lora",
                "--lora-r",
                "4",
                "--lr",
                "1e-2",
            ]
        )
        == 0
    )
    assert (out / "adapter_model.safetensors").is_file()
    base = build_tiny_model(build_tiny_tokenizer(), seed=0)
    model = PeftModel.from_pretrained(base, out)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(float(p.abs().sum()) > 0 for p in lora_b)  # the adapters trained


def test_sft_reports_to_tensorboard(tmp_path):
    out = tmp_path / "tb"
    assert (
        main(
            [
                "sft",
                "--model",
                "tiny",
                "--data",
                str(FIXTURE),
                "--output-dir",
                str(out),
                "--max-steps",
                "2",
                "--batch-size",
                "4",
                "--max-length",
                "96",
                "--report-to",
                "tensorboard",
                "--logging-steps",
                "1",
            ]
        )
        == 0
    )
    assert list(out.rglob("events.out.tfevents.*"))


def test_sft_on_chat_messages_with_a_custom_template(tmp_path):
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Say {i}."},
                {"role": "assistant", "content": f"{i} it is."},
            ]
        }
        for i in range(8)
    ]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    template = tmp_path / "t.jinja"
    template.write_text(
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    out = tmp_path / "chat"
    assert (
        main(
            [
                "sft",
                "--data",
                str(data),
                "--chat-template",
                str(template),
                "--output-dir",
                str(out),
                "--max-steps",
                "2",
                "--batch-size",
                "4",
                "--max-length",
                "64",
            ]
        )
        == 0
    )
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert "[assistant]" in tokenizer.chat_template  # the override is saved with the model
    assert (
        main(
            [
                "sft",
                "--data",
                str(data),
                "--chat-template",
                str(tmp_path / "none.jinja"),
                "--output-dir",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
