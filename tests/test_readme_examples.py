"""The README's Python examples run as written (tiny settings), and the run folders they leave,
one per family (offline preference, reward model, online RL), each hold curves.png and a
model card; `preftune plot` overlays two of them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from preftune.cli import main

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"
# The README's examples, by the run folder each writes: (command, metric its curves must show).
FAMILIES = {"runs/api-dpo": ("dpo", "rewards/margins"), "runs/api-reward": ("reward", "accuracy"),
            "runs/api-grpo": ("grpo", "reward/mean")}


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


@pytest.mark.slow  # three tiny training runs
def test_readme_python_examples_run_and_leave_card_and_curves(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = python_blocks()
    assert len(blocks) >= 3
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md python block {i + 1}", "exec"), {"__name__": "readme"})

    for folder, (command, metric) in FAMILIES.items():
        run = tmp_path / folder
        assert (run / "curves.png").read_bytes()[:8] == PNG, folder
        card = ModelCard.load(run / "README.md")
        assert card.data.library_name == "preftune" and command in card.data.tags
        assert card.data.datasets == ["Anthropic/hh-rlhf"]  # --data demo
        assert "from the base model `tiny`" in card.text
        summary = json.loads((run / "run_complete.json").read_text())
        final = summary["metrics"]
        assert f"| `{metric}` | {final[metric]:.4g} |" in card.text  # the run's own number
        for key, size in summary.items():
            if key.startswith("train_"):
                assert f"- {key.replace('_', ' ')}: {size}" in card.text
        logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert any(metric in row for row in logged)

    out = tmp_path / "cmp.png"
    assert main(["plot", "runs/api-dpo", "runs/api-reward", "--output", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG
