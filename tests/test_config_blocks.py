"""Configs composed of settings blocks: each command has exactly the flags of its blocks, and
one validation path runs every block's check for every command that composes the block."""

from __future__ import annotations

import dataclasses
import json
import importlib
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from preftune.cli import COMMANDS, build_parser, main
from preftune.config import (
    AccumulationSettings,
    DataSettings,
    EvalSettings,
    LengthSettings,
    LoggingSettings,
    ModelSettings,
    ModelTrainingSettings,
    OptimSettings,
    RunSettings,
    Settings,
    arg,
    build_config,
)
from preftune.errors import PreftuneError
from preftune.trainers.rollout import RewardSettings, SamplingSettings
from preftune.trainers.updates import ClippedUpdateSettings, KLSettings

OFFLINE = ("sft", "dpo", "kto", "reward")
ONLINE = ("ppo", "grpo", "rloo", "online-dpo")


def _config_class(command: str) -> type:
    module, name, _, _ = COMMANDS[command]
    return getattr(importlib.import_module(module), name)


def _names(block: type) -> set[str]:
    return {f.name for f in dataclasses.fields(block)}


def _flags_in_help(command: str) -> set[str]:
    parser, _, _ = build_parser(command)
    return set(re.findall(r"^  (--[a-z0-9-]+)", parser.format_help(), re.MULTILINE))


@pytest.mark.parametrize("command", OFFLINE + ONLINE + ("best-of-n",))
def test_the_flags_are_exactly_the_fields_of_the_blocks(command):
    cls = _config_class(command)
    fields = _names(cls)
    assert _flags_in_help(command) == {"--config"} | {
        "--" + name.replace("_", "-") for name in fields
    }
    blocks = [b for b in cls.__mro__ if dataclasses.is_dataclass(b)]
    held_out = _names(EvalSettings) | _names(AccumulationSettings)
    if command in ONLINE or command == "best-of-n":
        assert not fields & held_out and EvalSettings not in blocks
    else:
        assert held_out <= fields


@pytest.mark.parametrize("command", ONLINE)
def test_online_commands_refuse_held_out_flags_as_unknown(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--eval-data", "x.jsonl", "--reward-fn", "m:f"])
    assert exc.value.code == 2
    assert "unrecognized arguments: --eval-data x.jsonl" in capsys.readouterr().err


@pytest.mark.parametrize("command", OFFLINE)
def test_offline_commands_take_held_out_flags(command):
    parser, cls, _ = build_parser(command)
    cfg = build_config(cls, parser.parse_args(["--eval-data", "x.jsonl", "--grad-accum", "3"]))
    assert (cfg.eval_data, cfg.grad_accum) == ("x.jsonl", 3)


@pytest.mark.parametrize(
    "key, value, why",
    [
        ("grad_accum", 2, "grad_accum=2: online trainers split each rollout into micro-batches"),
        ("eval_fraction", 0.1, "eval_fraction=0.1: online trainers have no held-out evaluation"),
        ("eval_steps", 0, "eval_steps is a TRL option that preftune grpo does not have"),
        ("eval_data", "x.jsonl", "eval_data='x.jsonl': online trainers have no held-out"),
    ],
)
def test_a_yaml_key_another_command_has_is_refused_with_the_reason(tmp_path, key, value, why):
    parser, cls, _ = build_parser("grpo")
    path = tmp_path / "c.yaml"
    path.write_text(f"{key}: {value}\nreward_fn: [m:f]\n")
    with pytest.raises(PreftuneError, match=re.escape(why)):
        build_config(cls, parser.parse_args(["--config", str(path)]))
    path.write_text("lerning_rate_typo: 1\nlr: 0.1\n")  # the plain unknown-key error stays
    with pytest.raises(PreftuneError, match="unknown setting 'lerning_rate_typo'"):
        build_config(cls, parser.parse_args(["--config", str(path)]))


# --- one validation path ------------------------------------------------------------------------

# A block, one wrong value of one of its fields, and the words of the block's own error.
BAD_VALUE = [
    (ModelTrainingSettings, {"lora_r": 0}, "lora_r: got 0"),
    (ModelTrainingSettings, {"lora_alpha": 8}, "lora_alpha set but lora is off"),
    (LengthSettings, {"max_length": 64, "max_prompt_length": 64}, "max_prompt_length: got 64"),
    (RunSettings, {"seed": -1}, "seed: got -1"),
    (OptimSettings, {"adam_beta2": 1.0}, "adam_beta2: got 1.0"),
    (LoggingSettings, {"report_to": "nope"}, "unknown tracker 'nope'"),
    (EvalSettings, {"eval_steps": 5}, "eval_steps=5 but there is no held-out data"),
    (AccumulationSettings, {"grad_accum": 0}, "grad_accum: got 0"),
    (RewardSettings, {"reward_batch_size": 0}, "reward_batch_size: got 0"),
    (SamplingSettings, {"top_p": 0.0}, "top_p: got 0.0"),
    (ClippedUpdateSettings, {"clip_eps": 0.0}, "clip_eps: got 0.0"),
    (KLSettings, {"kl_coef": -1.0}, "kl_coef: got -1.0"),
]
TRAINING_COMMANDS = OFFLINE + ONLINE + ("best-of-n",)


def _valid(cls: type, **overrides):
    needs_reward = issubclass(cls, RewardSettings)
    return cls(**({"reward_fn": ["m:f"]} if needs_reward else {}), **overrides)


@pytest.mark.parametrize("command", TRAINING_COMMANDS)
def test_the_defaults_pass(command):
    _valid(_config_class(command)).validate()


@pytest.mark.parametrize(
    "block, bad, message", BAD_VALUE, ids=[f"{b.__name__}-{next(iter(v))}" for b, v, _ in BAD_VALUE]
)
def test_a_blocks_check_fires_for_every_command_composing_it(block, bad, message):
    composing = [c for c in TRAINING_COMMANDS if issubclass(_config_class(c), block)]
    assert composing  # every block is used by some command
    for command in composing:
        with pytest.raises(PreftuneError, match=re.escape(message)):
            _valid(_config_class(command), **bad).validate()
    expected = {
        ModelTrainingSettings: OFFLINE + ONLINE,
        EvalSettings: OFFLINE,
        AccumulationSettings: OFFLINE,
        RewardSettings: ONLINE + ("best-of-n",),
        KLSettings: ("ppo", "grpo", "rloo"),
    }
    if block in expected:
        assert set(composing) == set(expected[block])


def test_validate_runs_each_check_once_blocks_before_the_rules_that_join_them():
    calls = []

    @dataclass
    class First(Settings):
        a: int = arg(1, "a")

        def check(self):
            calls.append("First")

    @dataclass
    class Second(Settings):
        b: int = arg(2, "b")

        def check(self):
            calls.append("Second")

    @dataclass
    class Both(Second, First):
        def check(self):
            calls.append("Both")

    @dataclass
    class Command(Both):
        c: str = arg("x", "c", choices=("x", "y"))

        def check(self):
            calls.append("Command")

    Command().validate()
    assert calls == ["First", "Second", "Both", "Command"]
    calls.clear()
    with pytest.raises(PreftuneError, match="c: got 'z', expected one of x, y"):
        Command(c="z").validate()  # the choices of every field come first
    assert calls == []


def test_max_prompt_length_zero_is_half_of_max_length_in_every_command():
    for command in TRAINING_COMMANDS:
        cfg = _valid(_config_class(command), max_length=256, max_prompt_length=0)
        assert cfg.prompt_limit == 128
        assert (
            _valid(_config_class(command), max_length=256, max_prompt_length=100).prompt_limit
            == 100
        )
    for block in (ModelSettings, DataSettings):  # the model and data blocks of best-of-n, too
        assert issubclass(_config_class("best-of-n"), block)


def test_a_run_written_with_the_old_online_settings_resumes(tmp_path):
    """config.yaml of an online run from before the blocks held grad_accum and eval_*; --resume
    reads it (keys the command no longer has are not compared)."""
    data = tmp_path / "p.jsonl"
    data.write_text("".join(f'{{"prompt": "Question {i}"}}\n' for i in range(8)))
    out = tmp_path / "run"
    args = [
        "grpo",
        "--model",
        "tiny",
        "--data",
        str(data),
        "--output-dir",
        str(out),
        "--reward-fn",
        f"{Path(__file__).parent / 'rewards_for_tests.py'}:lowercase_fraction",
        "--max-new-tokens",
        "8",
        "--max-length",
        "64",
        "--prompts-per-step",
        "4",
        "--num-generations",
        "2",
        "--batch-size",
        "8",
        "--save-steps",
        "1",
        "--no-curves",
    ]
    assert main([*args, "--max-steps", "1"]) == 0
    saved = (out / "config.yaml").read_text()
    assert "grad_accum" not in saved and "eval_steps" not in saved
    (out / "config.yaml").write_text(
        saved + "grad_accum: 1\neval_data: ''\neval_fraction: 0.0\neval_steps: 0\n"
    )
    assert main([*args, "--max-steps", "2", "--resume"]) == 0
    steps = [
        json.loads(line)["step"]
        for line in (out / "metrics.jsonl").read_text().splitlines()
        if '"reward/mean"' in line
    ]
    assert steps == [1, 2]
