"""The model card (`README.md`) written into every training run's output folder.

Like the cards transformers' and TRL's trainers write: the Hub's YAML front matter
(`base_model`, `datasets` where known, `library_name: preftune`, `tags` with the method), then
the command that reproduces the run, the resolved settings, the data size after filtering, the
final training and held-out metrics, the curves and how to load the model. Built with
`huggingface_hub`'s `ModelCardData`, written atomically once the run is complete.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import shlex
from pathlib import Path
from typing import Any

import yaml

CARD_FILE = "README.md"
DEMO_DATASET = "Anthropic/hh-rlhf"  # `--data demo` is a sample of it
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# What the final folder holds, by command: (transformers class, what it is).
LOADERS = {
    "reward": ("AutoModelForSequenceClassification", "a reward model (one score per sequence)"),
}


def _hub_id(name: str) -> str | None:
    """`name` when it reads as a Hub repository id and is not a local path."""
    if name and _HUB_ID.match(name) and not Path(name).exists():
        return name
    return None


def equivalent_command(command: str, cfg: Any) -> str:
    """`preftune COMMAND` with every setting that differs from the command's default."""
    parts = ["preftune", command]
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        if value == default or f.name in ("overwrite", "resume"):
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag if value else "--no-" + f.name.replace("_", "-"))
        elif isinstance(value, list):
            parts += [flag, *map(str, value)]
        else:
            parts += [flag, str(value)]
    return " ".join(shlex.quote(p) for p in parts)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def _metrics_table(metrics: dict[str, Any], held_out: bool) -> list[str]:
    rows = {
        k[len("eval/") :] if held_out else k: v
        for k, v in metrics.items()
        if k.startswith("eval/") == held_out and isinstance(v, (int, float))
    }
    if not rows:
        return []
    return [
        "| metric | value |",
        "| --- | --- |",
        *(f"| `{k}` | {_fmt(v)} |" for k, v in sorted(rows.items())),
    ]


def model_card(
    command: str, cfg: Any, summary: dict[str, Any], output_dir: str | os.PathLike
) -> str:
    """The text of the card: YAML front matter, then Markdown."""
    from huggingface_hub import ModelCardData

    from preftune.config import config_to_dict

    settings = config_to_dict(cfg)
    base = settings.get("model", "")
    data = settings.get("data", "")
    method = {
        "dpo": settings.get("loss"),
        "online-dpo": settings.get("loss_type"),
        "reward": settings.get("loss"),
    }.get(command)
    tags = ["preftune", command] + ([method] if method and method != command else [])
    if command == "reward":
        tags.append("reward-model")
    if settings.get("lora"):
        tags.append("lora")
    datasets = [d for d in (DEMO_DATASET if data == "demo" else _hub_id(data),) if d]
    card_data = ModelCardData(
        base_model=_hub_id(base), datasets=datasets or None, library_name="preftune", tags=tags
    )

    name = Path(output_dir).resolve().name
    method_text = f"`preftune {command}`" + (f" (loss `{method}`)" if method else "")
    lines = [
        "---",
        card_data.to_yaml(),
        "---",
        "",
        f"# {name}",
        "",
        f"Trained with {method_text} from the base model `{base}` on `{data}`.",
        "",
    ]

    lines += [
        "## Command",
        "",
        "```bash",
        equivalent_command(command, cfg),
        "```",
        "",
        "## Settings",
        "",
        "The resolved settings (also in `config.yaml`):",
        "",
        "```yaml",
        yaml.safe_dump(settings, sort_keys=False).rstrip(),
        "```",
        "",
    ]

    sizes = {
        k: v
        for k, v in summary.items()
        if isinstance(v, int) and not isinstance(v, bool) and k != "finished_at"
    }
    lines += ["## Data", ""]
    if sizes:
        lines += [
            "After validation, filtering and truncation:",
            "",
            *(f"- {k.replace('_', ' ')}: {v}" for k, v in sizes.items()),
        ]
    if "rollouts" in sizes and settings.get("prompts_per_step"):
        prompts = sizes["rollouts"] * settings["prompts_per_step"]
        lines += [
            (
                f"- prompts sampled: {prompts} (rollouts x prompts_per_step), "
                f"completions: {prompts * settings.get('num_generations', 1)}"
            )
        ]
    held_source = settings.get("eval_data") or (
        f"{settings['eval_fraction']:g} of the training data"
        if settings.get("eval_fraction")
        else ""
    )
    lines += [f"- held-out data: {held_source or 'none'}", ""]

    metrics = summary.get("metrics") or {}
    lines += ["## Results", ""]
    final, held = _metrics_table(metrics, False), _metrics_table(metrics, True)
    lines += (
        ["Training metrics at the last logging step:", "", *final, ""]
        if final
        else ["No training metrics were logged.", ""]
    )
    if held:
        lines += ["Held-out metrics at the end:", "", *held, ""]
    if (Path(output_dir) / "curves.png").exists() or summary.get("curves"):
        lines += ["![training curves](curves.png)", ""]
    lines += ["Every logged step is in `metrics.jsonl`.", ""]

    lines += ["## How to load", ""] + _how_to_load(command, settings, output_dir)
    return "\n".join(lines) + "\n"


def _how_to_load(command: str, settings: dict[str, Any], output_dir) -> list[str]:
    path = str(output_dir)
    cls, what = LOADERS.get(command, ("AutoModelForCausalLM", "a causal language model"))
    if settings.get("lora"):
        peft_cls = (
            "AutoPeftModelForSequenceClassification"
            if command == "reward"
            else "AutoPeftModelForCausalLM"
        )
        code = [
            f"from peft import {peft_cls}",
            "from transformers import AutoTokenizer",
            "",
            f"model = {peft_cls}.from_pretrained({path!r})  # LoRA adapter on its base",
            f"tokenizer = AutoTokenizer.from_pretrained({path!r})",
        ]
    else:
        code = [
            f"from transformers import {cls}, AutoTokenizer",
            "",
            f"model = {cls}.from_pretrained({path!r})",
            f"tokenizer = AutoTokenizer.from_pretrained({path!r})",
        ]
    lines = [
        f"The folder holds {what} in the transformers layout (safetensors):",
        "",
        "```python",
        *code,
        "```",
        "",
    ]
    if command == "ppo":
        lines += ["The value model is in `value_model/`.", ""]
    return lines


def write_model_card(
    output_dir: str | os.PathLike, command: str, cfg: Any, summary: dict[str, Any]
) -> Path:
    """Write `README.md` into `output_dir` atomically."""
    from preftune.utils import atomic_write_text

    path = Path(output_dir) / CARD_FILE
    atomic_write_text(path, model_card(command, cfg, summary, output_dir))
    return path


def write_run_outputs(
    output_dir: str | os.PathLike, command: str, cfg: Any, summary: dict[str, Any]
) -> None:
    """The end of every training run: `curves.png`, then the card that shows it."""
    from preftune.engine.curves import write_curves

    if getattr(cfg, "curves", True):
        write_curves(output_dir)
    write_model_card(output_dir, command, cfg, summary)
