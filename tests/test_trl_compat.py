"""TRL's names as aliases: a TRL-style command line or YAML file resolves to the same config as
the preftune-named one; an alias whose TRL meaning differs is translated (checked against the
arithmetic done here by hand) or refused with its reason; TRL options preftune lacks are
refused by name; the README's table is the one the code uses."""

from __future__ import annotations

import dataclasses
import re
import shlex
from pathlib import Path

import pytest
import yaml

from preftune import trl_compat
from preftune.cli import COMMANDS, build_parser, main
from preftune.config import build_config, config_to_dict, save_config
from preftune.errors import PreftuneError

ROOT = Path(__file__).resolve().parents[1]


def resolve(command: str, argv: list[str]):
    parser, cls, _ = build_parser(command)
    return build_config(cls, parser.parse_args(argv))


def refusal(command: str, argv: list[str]) -> str:
    with pytest.raises(PreftuneError) as info:
        resolve(command, argv)
    return str(info.value)


# --- the same resolved config.yaml ---------------------------------------------------------------

TRL_DPO = (
    "--model_name_or_path tiny --dataset_name demo --dataset_train_split train "
    "--output_dir {out} --per_device_train_batch_size 4 --gradient_accumulation_steps 2 "
    "--learning_rate 5e-7 --num_train_epochs 2 --max_steps -1 --warmup_ratio 0.1 "
    "--lr_scheduler_type linear --logging_steps 5 --save_steps 100 --save_total_limit 3 "
    "--seed 42 --bf16 false --gradient_checkpointing --max_length 256 "
    "--max_prompt_length 128 --beta 0.2 --loss_type robust --label_smoothing 0.1 "
    "--use_peft --lora_r 8 --lora_alpha 16 --report_to none --precompute_ref_log_probs"
)
PREFTUNE_DPO = (
    "--model tiny --data demo --split train --output-dir {out} --batch-size 4 "
    "--grad-accum 2 --lr 5e-7 --epochs 2 --max-steps 0 --warmup-ratio 0.1 "
    "--lr-scheduler linear --logging-steps 5 --save-steps 100 --save-total-limit 3 "
    "--seed 42 --mixed-precision no --gradient-checkpointing --max-length 256 "
    "--max-prompt-length 128 --beta 0.2 --loss robust --label-smoothing 0.1 "
    "--lora --lora-r 8 --lora-alpha 16 --precompute-ref"
)


def test_trl_command_line_and_yaml_give_the_preftune_config(tmp_path):
    out = str(tmp_path / "run")
    preftune = resolve("dpo", PREFTUNE_DPO.format(out=out).split())
    trl_cli = resolve("dpo", TRL_DPO.format(out=out).split())
    # The same keys as a TRL-style YAML file (dashes accepted too), TRL's list-valued loss_type.
    tokens = TRL_DPO.format(out=out).split()
    trl_yaml = {
        "model_name_or_path": "tiny",
        "dataset_name": "demo",
        "dataset_train_split": "train",
        "output_dir": out,
        "per-device-train-batch-size": 4,
        "gradient_accumulation_steps": 2,
        "learning_rate": "5e-7",
        "num_train_epochs": 2,
        "max_steps": -1,
        "warmup_ratio": 0.1,
        "lr_scheduler_type": "linear",
        "logging_steps": 5,
        "save_steps": 100,
        "save_total_limit": 3,
        "seed": 42,
        "bf16": False,
        "gradient_checkpointing": True,
        "max_length": 256,
        "max_prompt_length": 128,
        "beta": 0.2,
        "loss_type": ["robust"],
        "label_smoothing": 0.1,
        "use_peft": True,
        "lora_r": 8,
        "lora_alpha": 16,
        "report_to": ["none"],
        "precompute_ref_log_probs": True,
    }
    assert len(trl_yaml) == sum(t.startswith("--") for t in tokens)  # every flag has its key
    path = tmp_path / "trl.yaml"
    # PyYAML reads 5e-7 as a string unless quoted this way; TRL recipes write it unquoted.
    path.write_text(yaml.safe_dump(trl_yaml).replace("'5e-7'", "5e-7"))
    from_yaml = resolve("dpo", ["--config", str(path)])

    files = []
    for name, cfg in (("preftune", preftune), ("trl-cli", trl_cli), ("trl-yaml", from_yaml)):
        save_config(cfg, tmp_path / f"{name}.yaml", extra={"command": "dpo"})
        files.append((tmp_path / f"{name}.yaml").read_text())
    assert files[0] == files[1] == files[2]
    saved = yaml.safe_load(files[0])
    assert saved["lr"] == 5e-7 and saved["loss"] == "robust" and saved["max_steps"] == 0
    assert saved["mixed_precision"] == "no" and saved["report_to"] == "" and saved["lora"]


def test_trl_command_runs_end_to_end_with_the_same_config_yaml(tmp_path):
    """A real run: the config.yaml it writes equals the preftune-named command's."""
    out = tmp_path / "run"
    argv = (
        "sft --model_name_or_path tiny --dataset_name demo --per_device_train_batch_size 2 "
        "--learning_rate 1e-3 --max_steps 1 --max_length 64 --logging_steps 1 "
        f"--report_to none --output_dir {out}"
    ).split()
    assert main(argv) == 0
    written = (out / "config.yaml").read_text()
    expected = resolve(
        "sft",
        f"--model tiny --data demo --batch-size 2 --lr 1e-3 --max-steps 1 "
        f"--max-length 64 --logging-steps 1 --output-dir {out}".split(),
    )
    save_config(expected, tmp_path / "expected.yaml", extra={"command": "sft"})
    assert written == (tmp_path / "expected.yaml").read_text()


def test_readme_trl_and_preftune_commands_differ_in_one_word(tmp_path):
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Coming from TRL") :]
    trl = re.search(r"^trl dpo .*$", section, re.MULTILINE).group(0)
    ours = re.search(r"^preftune dpo .*$", section, re.MULTILINE).group(0)
    trl_words, our_words = shlex.split(trl), shlex.split(ours)
    assert trl_words[1:] == our_words[1:] and trl_words[0] != our_words[0]
    cfg = resolve("dpo", our_words[2:])
    assert (cfg.model, cfg.batch_size, cfg.grad_accum, cfg.lr, cfg.lora) == (
        "Qwen/Qwen2.5-0.5B-Instruct",
        8,
        2,
        5e-7,
        True,
    )
    # The README's TRL YAML file is the same run.
    block = re.search(r"```yaml\n# dpo.yaml\n(.*?)```", section, re.DOTALL).group(1)
    path = tmp_path / "dpo.yaml"
    path.write_text(block)
    assert config_to_dict(resolve("dpo", ["--config", str(path)])) == config_to_dict(cfg)


# --- translations, checked by hand ---------------------------------------------------------------


def test_grpo_batch_settings_become_the_rollout(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    base = ["--reward-fn", "m:f", "--num_generations", "4"]
    # 4 per device x 2 processes x 2 steps per generation (= grad accum) = 16 completions
    # = 4 prompts x 4 generations; one optimizer step per rollout; micro-batches of 4 rows.
    cfg = resolve(
        "grpo", base + ["--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2"]
    )
    assert (cfg.prompts_per_step, cfg.batch_size, cfg.num_minibatches) == (4, 4, 1)
    assert not hasattr(cfg, "grad_accum")  # online commands accumulate no further
    # steps_per_generation 4 with grad accum 2: 4 x 2 x 4 = 32 completions = 8 prompts x 4,
    # and 4 / 2 = 2 optimizer steps per rollout.
    cfg = resolve(
        "grpo",
        base
        + [
            "--per_device_train_batch_size",
            "4",
            "--gradient_accumulation_steps",
            "2",
            "--steps_per_generation",
            "4",
        ],
    )
    assert (cfg.prompts_per_step, cfg.num_minibatches) == (8, 2)
    # generation_batch_size 48 = 4 x 2 x 6 steps: 48 / 4 = 12 prompts; 6 / 2 = 3 minibatches.
    cfg = resolve(
        "grpo",
        base
        + [
            "--per_device_train_batch_size",
            "4",
            "--gradient_accumulation_steps",
            "2",
            "--generation_batch_size",
            "48",
        ],
    )
    assert (cfg.prompts_per_step, cfg.num_minibatches) == (12, 3)
    # 3 x 2 x 1 = 6 completions cannot be split into groups of 4: refused, with the numbers.
    assert "not a multiple of num_generations=4" in refusal(
        "grpo", base + ["--per_device_train_batch_size", "3"]
    )
    # online DPO: one optimizer step per 4 x 2 processes x 3 accumulation = 24 prompts.
    cfg = resolve(
        "online-dpo",
        [
            "--reward-fn",
            "m:f",
            "--per_device_train_batch_size",
            "4",
            "--gradient_accumulation_steps",
            "3",
        ],
    )
    assert (cfg.prompts_per_step, cfg.batch_size) == (24, 4)
    assert "no exact preftune equivalent" in refusal(
        "ppo", ["--reward-fn", "m:f", "--per_device_train_batch_size", "4"]
    )


def test_translated_values():
    cfg = resolve(
        "grpo",
        [
            "--reward-fn",
            "m:f",
            "--loss_type",
            "dr_grpo",
            "--scale_rewards",
            "none",
            "--epsilon",
            "0.3",
            "--num_iterations",
            "2",
            "--max_completion_length",
            "24",
            "--beta",
            "0.04",
            "--use_bias_correction_kl",
            "false",
        ],
    )
    assert (
        cfg.loss_aggregation,
        cfg.scale_rewards,
        cfg.clip_eps,
        cfg.ppo_epochs,
        cfg.max_new_tokens,
        cfg.kl_coef,
    ) == ("constant", False, 0.3, 2, 24, 0.04)
    cfg = resolve(
        "dpo",
        [
            "--loss_type",
            "sigmoid",
            "--lr_scheduler_type",
            "constant_with_warmup",
            "--warmup_steps",
            "0.25",
            "--fp16",
            "--report_to",
            "wandb",
            "tensorboard",
            "--save_total_limit",
            "null",
        ],
    )
    assert (
        cfg.loss,
        cfg.lr_scheduler,
        cfg.warmup_ratio,
        cfg.warmup_steps,
        cfg.mixed_precision,
        cfg.report_to,
        cfg.save_total_limit,
    ) == ("dpo", "constant", 0.25, 0, "fp16", "wandb,tensorboard", 0)
    # TRL's IPO divides each log-ratio by its completion length: preftune's ipo_length_norm.
    cfg = resolve("dpo", ["--loss_type", "ipo", "--beta", "0.5"])
    assert (cfg.loss, cfg.ipo_length_norm, cfg.beta) == ("ipo", True, 0.5)
    assert resolve("dpo", ["--loss", "ipo"]).ipo_length_norm is False  # preftune's own: summed
    cfg = resolve("online-dpo", ["--reward-fn", "m:f", "--loss_type", "sigmoid", "--beta", "0.3"])
    assert (cfg.loss_type, cfg.beta) == ("dpo", 0.3)
    cfg = resolve("rloo", ["--reward-fn", "m:f", "--beta", "0.02"])
    assert cfg.kl_coef == 0.02 and cfg.kl_estimator == "k1"
    cfg = resolve("dpo", ["--model_name_or_path", "1e5", "--output_dir", "007"])
    assert (cfg.model, cfg.output_dir) == ("1e5", "007")  # text stays as typed
    cfg = resolve("reward", ["--center_rewards_coefficient", "0.01"])
    assert cfg.center_coef == 0.01
    cfg = resolve("sft", ["--dataset_text_field", "content"])
    assert cfg.columns == "text=content"
    # eval_strategy steps without eval_steps: transformers falls back to logging_steps.
    # (evaluating needs held-out data: --eval-steps without it is refused)
    cfg = resolve(
        "dpo",
        [
            "--eval_strategy",
            "steps",
            "--logging_steps",
            "7",
            "--save_strategy",
            "no",
            "--eval-fraction",
            "0.1",
        ],
    )
    assert (cfg.eval_steps, cfg.logging_steps, cfg.save_steps) == (7, 7, 0)


def test_translated_yaml_values(tmp_path):
    path = tmp_path / "trl.yaml"
    # YAML 1.1 reads `no` as false and `5e-7` as a string; both mean what TRL means.
    path.write_text(
        "save_strategy: no\nlearning_rate: 5e-7\nmodel_name_or_path: 1e5\n"
        "eval_strategy: steps\neval_steps: 20\nreport_to: [none]\n"
        "eval_fraction: 0.1\n"
    )  # evaluating needs held-out data
    cfg = resolve("dpo", ["--config", str(path)])
    assert (cfg.save_steps, cfg.lr, cfg.model, cfg.eval_steps, cfg.report_to) == (
        0,
        5e-7,
        "1e5",
        20,
        "",
    )


@pytest.mark.parametrize(
    "command, argv, expected",
    [
        ("rloo", "--reward-fn m:f --num_iterations 2", "clips the ratio of whole sequences"),
        ("dpo", "--loss_type sigmoid --label_smoothing 0.1", "TRL 1.x ignores it"),
        ("dpo", "--loss_type sigmoid sft", "got 2 values"),
        ("dpo", "--loss_type nca_pair", "'nca_pair' is not available"),
        ("grpo", "--reward-fn m:f --beta 0.04", "use_bias_correction_kl"),
        ("grpo", "--reward-fn m:f --loss_type bnpo", "each process's own token count"),
        ("grpo", "--reward-fn m:f --scale_rewards batch", "'batch'"),
        ("grpo", "--reward-fn m:f --num_iterations 2 --max_steps 10", "counts optimizer steps"),
        ("dpo", "--report_to all", "`all` means every tracker"),
        ("dpo", "--logging_steps 0.1", "fraction of the total steps"),
        ("dpo", "--lr_scheduler_type constant --warmup_ratio 0.1", "skips the warmup"),
        ("dpo", "--lr_scheduler_type cosine_with_restarts", "not available"),
        ("dpo", "--bf16 --fp16", "bf16 and fp16 are both true"),
        ("dpo", "--optim adafactor", "AdamW only"),
        ("sft", "--completion_only_loss false", "completion tokens only"),
        ("dpo", "--eval_strategy no --eval-fraction 0.1", "scores held-out data whenever"),
        ("dpo", "--save_strategy epoch", "'epoch'"),
    ],
)
def test_differing_meanings_are_refused_with_the_reason(command, argv, expected):
    message = refusal(command, argv.split())
    assert "command line" in message and expected in message


def test_trl_only_options_are_refused_by_name(tmp_path, capsys):
    assert main(["dpo", "--push_to_hub", "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "push_to_hub is a TRL option that preftune dpo does not have" in err
    assert "unrecognized arguments" not in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
    assert "applies to preftune" in refusal("reward", ["--beta", "0.1"])
    assert "has no such setting" in refusal("sft", ["--neftune-noise-alpha", "5"])
    # YAML: the same, naming the file.
    path = tmp_path / "trl.yaml"
    path.write_text("learning_rate: 1.0e-5\ntorch_compile: true\n")
    message = refusal("sft", ["--config", str(path)])
    assert str(path) in message and "torch_compile is a TRL option" in message


def test_alias_and_preftune_name_together_is_an_error(tmp_path):
    assert "learning_rate and lr were both given" in refusal(
        "sft", ["--lr", "1e-4", "--learning_rate", "1e-4"]
    )
    assert "given twice" in refusal("sft", ["--max-steps", "3", "--max_steps", "3"])
    path = tmp_path / "both.yaml"
    path.write_text("lr: 1.0e-4\nlearning_rate: 1.0e-4\n")
    message = refusal("sft", ["--config", str(path)])
    assert str(path) in message and "both given" in message
    # Across places the usual order holds: a flag overrides the YAML file.
    path.write_text("learning_rate: 1.0e-4\n")
    assert resolve("sft", ["--config", str(path), "--lr", "3e-4"]).lr == 3e-4


def test_help_stays_preftune_named():
    parser, _, _ = build_parser("dpo")
    text = parser.format_help()
    assert "--lr " in text and "--learning-rate" not in text  # TRL flags are hidden ...
    assert "TRL and transformers names are accepted" in text  # ... and announced


# --- the table --------------------------------------------------------------------------------


def test_every_alias_target_exists_where_it_applies():
    classes = {}
    for command, (module, name, _, _) in COMMANDS.items():
        import importlib

        cls = getattr(importlib.import_module(module), name)
        classes[command] = cls
        assert trl_compat.command_of(cls) == command
        fields = {f.name for f in dataclasses.fields(cls)}
        for alias in trl_compat.aliases_for(cls).values():
            for target in alias.target.split(","):
                target = target.strip()
                if not target.startswith("(") and not (
                    command == "online-dpo" and target == "num_minibatches"
                ):
                    assert target in fields, (command, alias.name, target)
    for alias in trl_compat.ALIASES:  # no row that applies nowhere
        assert any(
            alias.name in trl_compat.aliases_for(classes[c]) for c in alias.commands if c in classes
        ), alias.name


def test_readme_table_is_the_code_table():
    text = (ROOT / "README.md").read_text()
    start = text.index("<!-- trl-aliases:start -->") + len("<!-- trl-aliases:start -->")
    table = text[start : text.index("<!-- trl-aliases:end -->")].strip()
    assert table == trl_compat.markdown_table()


def test_trl_options_cover_the_installed_trl():
    trl = pytest.importorskip("trl")
    from transformers import TrainingArguments

    classes = [
        TrainingArguments,
        trl.DPOConfig,
        trl.KTOConfig,
        trl.RewardConfig,
        trl.SFTConfig,
        trl.GRPOConfig,
        trl.RLOOConfig,
        trl.ModelConfig,
        trl.ScriptArguments,
    ]
    names = {f.name for c in classes for f in dataclasses.fields(c) if not f.name.startswith("_")}
    assert names <= trl_compat.TRL_OPTIONS, sorted(names - trl_compat.TRL_OPTIONS)


def test_python_api_accepts_trl_names():
    from preftune import DPOConfig, load_config

    cfg = load_config(
        DPOConfig,
        learning_rate=1e-6,
        per_device_train_batch_size=2,
        loss_type=["sigmoid"],
        max_steps=3,
    )
    assert (cfg.lr, cfg.batch_size, cfg.loss, cfg.max_steps) == (1e-6, 2, "dpo", 3)
    assert config_to_dict(cfg) == config_to_dict(
        load_config(DPOConfig, lr=1e-6, batch_size=2, loss="dpo", max_steps=3)
    )
    with pytest.raises(PreftuneError, match="unknown setting 'lerning_rate'"):
        load_config(DPOConfig, lerning_rate=1e-6)
