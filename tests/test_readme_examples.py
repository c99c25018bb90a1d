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
FAMILIES = {
    "runs/api-dpo": ("dpo", "rewards/margins"),
    "runs/api-reward": ("reward", "rewards/accuracies"),
    "runs/api-grpo": ("grpo", "reward/mean"),
}


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL)


@pytest.mark.slow  # three tiny training runs
def test_readme_python_examples_run_and_leave_card_and_curves(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = python_blocks()
    assert len(blocks) >= 3
    for i, block in enumerate(blocks):
        # The README's own examples, executed as written: that is the point of this test.
        exec(
            compile(block, f"README.md python block {i + 1}", "exec"),  # noqa: S102
            {"__name__": "readme"},
        )

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


def test_python_api_exports_every_command_lazily():
    import subprocess
    import sys

    import preftune
    from preftune.cli import COMMANDS

    for module, config_name, run_name, _ in COMMANDS.values():
        for name in (config_name, run_name):
            assert name in preftune.__all__
            assert getattr(preftune, name) is getattr(__import__(module, fromlist=[name]), name)
    assert set(preftune.__all__) == set(preftune._EXPORTS) | {"load_config", "__version__"}
    # `import preftune` alone loads neither torch nor a trainer.
    code = (
        "import sys, preftune; "
        "print(sorted(m for m in ('torch', 'preftune.trainers.dpo') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
