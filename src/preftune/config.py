"""Typed run configurations: one dataclass per command, the CLI and `--help` come from them.

A command's config is composed of settings blocks (`ModelSettings`, `DataSettings`,
`LengthSettings`, `RunSettings`, `OptimSettings`, `LoggingSettings`, ... and, next to their
owners, the rollout's and the updates' blocks), so that it has exactly the flags it uses; every
block checks its own fields in `check()`, and `Settings.validate()` runs them all.

Every field is documented where it is declared (`arg(default, help)`). A run's settings are
resolved in one order: the dataclass defaults, then a YAML file (`--config FILE`), then the
command-line flags. `validate()` refuses bad settings before any model loads, naming the field
and what it accepts. The resolved config is written next to every run as `config.yaml`.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from preftune import trl_compat
from preftune.errors import PreftuneError


def arg(
    default: Any,
    help: str,
    *,
    choices: tuple | None = None,
    positional: bool = False,
    finite: bool = True,
) -> Any:
    """A config field with its documentation (shown by `--help`) and allowed values.

    `positional`: a list given as the command's positional arguments (`preftune plot A B`).
    Every number must be finite (`check_finite`, run for every command) unless the field
    opts out with `finite=False`.
    """
    metadata = {"help": help, "choices": choices, "positional": positional, "finite": finite}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


class Settings:
    """Base of every config block and of every config composed from blocks.

    A block is a small dataclass of the fields of one concern (the model, the data, the
    optimisation, ...) with a `check()` for its own fields; a command's config inherits the
    blocks it uses, so that its fields (`cfg.lr`), flags and YAML keys stay flat and it has
    exactly the flags it uses. A config composed of blocks adds in its own `check()` the rules
    that join two blocks, and the command's own rules.
    """

    # Settings other commands have and this one does not, with the reason, named when a YAML
    # file gives one (a file written for another command); a flag is refused by argparse.
    ABSENT_SETTINGS: ClassVar[dict[str, str]] = {}

    def check(self) -> None:
        """The rules of this class's own fields (each class in the MRO has its own)."""

    def validate(self) -> None:
        """The one validation path: the choices of every field, then the `check()` of every
        class in the config's MRO that defines one, bases first (the blocks, then the rules
        that join them, then the command's own)."""
        check_choices(self)
        for klass in reversed(type(self).__mro__):
            own = vars(klass).get("check")
            if own is not None:
                own(self)


def check_choices(cfg: Any) -> None:
    """Refuse a value outside its field's `choices` (YAML and the Python API bypass argparse)."""
    for f in dataclasses.fields(cfg):
        choices = f.metadata.get("choices")
        if choices and getattr(cfg, f.name) not in choices:
            shown = ", ".join(repr(c) if c == "" else str(c) for c in choices)  # eval-rm's ""
            raise PreftuneError(f"{f.name}: got {getattr(cfg, f.name)!r}, expected one of {shown}")


# --- the blocks -------------------------------------------------------------------------------


@dataclass
class ModelSettings(Settings):
    """The model a command loads."""

    model: str = arg(
        "tiny",
        "Model to train: a local folder, a hub name, or `tiny` (a small "
        "Llama-style model with random weights and a byte-level tokenizer).",
    )
    dtype: str = arg(
        "auto",
        "Weights dtype when loading the model.",
        choices=("auto", "float32", "bfloat16", "float16"),
    )
    chat_template: str = arg("", "Jinja chat template file overriding the tokenizer's own.")


@dataclass
class ModelTrainingSettings(Settings):
    """How the trained model is held: autocast precision, activation checkpointing, LoRA."""

    mixed_precision: str = arg(
        "auto",
        "Autocast precision: `auto` is bf16 on CUDA devices "
        "that support it, and on CPUs with native bf16 (avx512_bf16 or "
        "AMX) when a startup probe measures bf16 at least 1.3x faster "
        "than float32; otherwise no autocast.",
        choices=("auto", "no", "bf16", "fp16"),
    )
    gradient_checkpointing: bool = arg(
        False, "Recompute activations in the backward pass to save memory."
    )
    lora: bool = arg(False, "Train LoRA adapters (peft) instead of all weights.")
    lora_r: int = arg(16, "LoRA rank.")
    lora_alpha: int = arg(32, "LoRA scaling alpha.")
    lora_dropout: float = arg(0.0, "LoRA dropout.")
    lora_target_modules: str = arg(
        "all-linear",
        "Modules that get adapters: `all-linear` or a comma-separated list of module names.",
    )

    def check(self) -> None:
        _require(self.lora_r >= 1, "lora_r", self.lora_r, "an integer >= 1")
        _require(
            0 <= self.lora_dropout < 1, "lora_dropout", self.lora_dropout, "a number in [0, 1)"
        )
        if not self.lora:
            changed = [
                f.name
                for f in dataclasses.fields(ModelTrainingSettings)
                if f.name.startswith("lora_") and getattr(self, f.name) != f.default
            ]
            if changed:
                raise PreftuneError(
                    f"{', '.join(changed)} set but lora is off, so "
                    f"{'they have' if len(changed) > 1 else 'it has'} no effect; "
                    "add --lora or drop " + ", ".join("--" + c.replace("_", "-") for c in changed)
                )


@dataclass
class DataSettings(Settings):
    """Where the rows come from and what a malformed row does."""

    data: str = arg(
        "",
        "Training data: a JSONL/JSON/Parquet/CSV file or folder, or a dataset "
        "name for `datasets.load_dataset`.",
    )
    split: str = arg("train", "Dataset split to read when `data` is a hub dataset name.")
    columns: str = arg(
        "",
        "Column mapping from your names to preftune's, e.g. "
        "`prompt=question,chosen=good,rejected=bad`.",
    )
    on_bad_row: str = arg(
        "skip",
        "What to do with a malformed row (empty text, chosen equal "
        "to rejected, wrong type, ...) inside otherwise good data: skip it "
        "and report the count and the first one, or stop with an error "
        "naming its file and line.",
        choices=("skip", "error"),
    )


@dataclass
class LengthSettings(Settings):
    """Token budgets: `max_prompt_length = 0` means half of `max_length` in every command
    (`prompt_limit`)."""

    max_length: int = arg(512, "Maximum tokens of prompt + completion.")
    max_prompt_length: int = arg(0, "Maximum prompt tokens (0: half of `max_length`).")
    prompt_truncation: str = arg(
        "keep_end",
        "A prompt over max_prompt_length keeps its end "
        "(the latest turns), keeps its start, or stops the run with "
        "an error naming the example.",
        choices=("keep_end", "keep_start", "error"),
    )

    def check(self) -> None:
        _require(self.max_length >= 8, "max_length", self.max_length, "an integer >= 8")
        _require(
            0 <= self.max_prompt_length < self.max_length,
            "max_prompt_length",
            self.max_prompt_length,
            f"an integer in [0, max_length={self.max_length})",
        )

    @property
    def prompt_limit(self) -> int:
        return prompt_limit(self.max_prompt_length, self.max_length)


@dataclass
class EvalSettings(Settings):
    """Held-out evaluation during training (the offline commands)."""

    eval_data: str = arg("", "Held-out data (same formats as `data`).")
    eval_fraction: float = arg(
        0.0, "Hold out this fraction of `data` for evaluation when no `eval_data` is given."
    )
    eval_steps: int = arg(0, "Evaluate on held-out data every this many steps (0: at the end).")

    def check(self) -> None:
        _require(
            0 <= self.eval_fraction < 1, "eval_fraction", self.eval_fraction, "a number in [0, 1)"
        )
        _require(self.eval_steps >= 0, "eval_steps", self.eval_steps, "an integer >= 0")
        if self.eval_data and self.eval_fraction:
            raise PreftuneError(
                "eval_data and eval_fraction were both given: pass one of them "
                "(eval_fraction splits `data`; eval_data is a separate file)"
            )
        if not self.eval_data and not self.eval_fraction and self.eval_steps:
            raise PreftuneError(
                f"eval_steps={self.eval_steps} but there is no held-out data to "
                "evaluate on; pass --eval-data FILE or --eval-fraction, or drop "
                "--eval-steps"
            )


@dataclass
class RunSettings(Settings):
    """The output folder of a run and its seed."""

    output_dir: str = arg(
        "",
        "Where the run writes config, metrics, checkpoints and the final "
        "model (default: runs/<command>).",
    )
    overwrite: bool = arg(False, "Replace a different run already in `output_dir`.")
    seed: int = arg(0, "Seed for weights of `tiny`, data order, sampling and dropout.")

    def check(self) -> None:
        _require(0 <= self.seed < 2**32, "seed", self.seed, "an integer in [0, 2**32)")


@dataclass
class OptimSettings(Settings):
    """How long to train and how each step updates the weights (AdamW, schedule, clipping)."""

    max_steps: int = arg(0, "Optimizer steps to run (0: use `epochs`).")
    epochs: float = arg(1.0, "Passes over the training data when `max_steps` is 0.")
    batch_size: int = arg(8, "Examples per device per micro-batch (a pair counts as one).")
    lr: float = arg(5e-5, "Peak learning rate (AdamW).")
    weight_decay: float = arg(0.0, "AdamW weight decay.")
    adam_beta1: float = arg(0.9, "AdamW beta1.")
    adam_beta2: float = arg(0.999, "AdamW beta2.")
    lr_scheduler: str = arg(
        "cosine", "Learning-rate schedule after warmup.", choices=("cosine", "linear", "constant")
    )
    warmup_ratio: float = arg(0.0, "Fraction of the steps spent warming up linearly.")
    warmup_steps: int = arg(0, "Warmup steps (overrides `warmup_ratio` when > 0).")
    max_grad_norm: float = arg(1.0, "Clip the global gradient norm to this (0: no clipping).")
    nan_policy: str = arg(
        "fail",
        "What a NaN or infinite loss or gradient norm does: `fail` "
        "stops the run at that step without saving a model (the checkpoints "
        "stay intact); `skip-step` skips that update and goes on (and fails "
        "after 10 such steps in a row).",
        choices=("fail", "skip-step"),
    )

    def check(self) -> None:
        _require(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        _require(self.max_steps >= 0, "max_steps", self.max_steps, "an integer >= 0")
        _require(self.epochs > 0, "epochs", self.epochs, "a number > 0")
        _require(self.lr > 0, "lr", self.lr, "a number > 0")
        _require(self.weight_decay >= 0, "weight_decay", self.weight_decay, "a number >= 0")
        _require(0 <= self.adam_beta1 < 1, "adam_beta1", self.adam_beta1, "a number in [0, 1)")
        _require(0 <= self.adam_beta2 < 1, "adam_beta2", self.adam_beta2, "a number in [0, 1)")
        _require(
            0 <= self.warmup_ratio < 1, "warmup_ratio", self.warmup_ratio, "a number in [0, 1)"
        )
        _require(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, "an integer >= 0")
        _require(self.max_grad_norm >= 0, "max_grad_norm", self.max_grad_norm, "a number >= 0")


@dataclass
class AccumulationSettings(Settings):
    """Gradient accumulation over micro-batches (the offline commands; the online ones split
    each rollout into minibatches themselves)."""

    grad_accum: int = arg(1, "Micro-batches accumulated per optimizer step.")

    def check(self) -> None:
        _require(self.grad_accum >= 1, "grad_accum", self.grad_accum, "an integer >= 1")


@dataclass
class LoggingSettings(Settings):
    """What a training run records (metrics, trackers, checkpoints) and how it resumes."""

    resume: bool = arg(False, "Continue from the latest checkpoint in `output_dir`.")
    allow_data_change: bool = arg(
        False,
        "Let --resume continue on training data that differs "
        "from the data the checkpoint was trained on.",
    )
    logging_steps: int = arg(10, "Log training metrics every this many steps.")
    save_steps: int = arg(500, "Write a checkpoint every this many steps (0: only at the end).")
    save_total_limit: int = arg(2, "Keep at most this many checkpoints (0: keep all).")
    report_to: str = arg(
        "",
        "Extra trackers through accelerate, comma-separated: "
        "tensorboard, wandb, mlflow. `metrics.jsonl` is always written.",
    )
    curves: bool = arg(
        True,
        "Draw `curves.png` from metrics.jsonl at the end of the run "
        "(about a second of matplotlib; the lab turns it off for its many "
        "short runs).",
    )

    def check(self) -> None:
        _require(self.logging_steps >= 1, "logging_steps", self.logging_steps, "an integer >= 1")
        _require(self.save_steps >= 0, "save_steps", self.save_steps, "an integer >= 0")
        _require(
            self.save_total_limit >= 0, "save_total_limit", self.save_total_limit, "an integer >= 0"
        )
        trackers = [t for t in self.report_to.split(",") if t.strip()]
        for tracker in trackers:
            if tracker.strip() not in ("tensorboard", "wandb", "mlflow"):
                raise PreftuneError(
                    f"report_to: unknown tracker {tracker.strip()!r}; "
                    "expected a comma-separated list of tensorboard, wandb, mlflow"
                )


# --- the configs composed of them -------------------------------------------------------------
# Dataclass fields come in reverse MRO order: the last base's fields first.


@dataclass
class TrainingSettings(
    LoggingSettings,
    OptimSettings,
    RunSettings,
    LengthSettings,
    DataSettings,
    ModelTrainingSettings,
    ModelSettings,
):
    """The blocks of every training command, offline and online (`trainers/online.py`)."""

    def check(self) -> None:
        if self.overwrite and self.resume:
            raise PreftuneError(
                "overwrite and resume were both given: --resume continues the "
                "run in output_dir, --overwrite replaces it; pass one"
            )


@dataclass
class TrainConfig(EvalSettings, AccumulationSettings, TrainingSettings):
    """Settings of the offline training commands (sft, dpo, kto, reward): every training
    block, plus gradient accumulation and held-out evaluation, and how their batches are laid
    out."""

    packing: str = arg(
        "auto",
        "Pack batches to skip repeated and padding tokens: each "
        "preference pair (or ranking) shares its common prefix (the prompt) in "
        "one row, several sequences share a row instead of padding; exact to "
        "float rounding. `auto`: where the model is verified for it (Llama, "
        "Mistral, Qwen2/3 with sdpa or eager attention) and the packed rows "
        "hold fewer tokens, else padded rows; `off`: always padded rows.",
        choices=("auto", "off"),
    )


def prompt_limit(max_prompt_length: int, max_length: int) -> int:
    """The effective maximum prompt length in tokens, for every command: `max_prompt_length`,
    or half of `max_length` when it is 0."""
    return max_prompt_length or max_length // 2


def _require(ok: bool, name: str, value: Any, expected: str) -> None:
    if not ok:
        raise PreftuneError(f"{name}: got {value!r}, expected {expected}")


# --- dataclass -> argparse, YAML ------------------------------------------------------------


def _field_type(cls: type, f: dataclasses.Field) -> type:
    hints = typing.get_type_hints(cls)
    tp = hints[f.name]
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = args[0]
    return tp


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field; defaults are suppressed so that only given flags override YAML."""
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help="YAML file of settings; flags given on the command line win.",
    )
    for f in dataclasses.fields(cls):
        tp = _field_type(cls, f)
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f.metadata.get("help", "")
        if default not in ("", None) and not isinstance(default, bool):
            help_text += f" (default: {default})"
        if f.metadata.get("positional"):
            parser.add_argument(f.name, nargs="+", metavar=f.name.upper(), help=help_text)
            continue
        kwargs: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS, help=help_text)
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif tp in (list, typing.List) or typing.get_origin(tp) is list:
            item = (typing.get_args(tp) or (str,))[0]
            kwargs.update(nargs="+", type=item, metavar=item.__name__.upper())
        else:
            kwargs.update(type=tp, metavar=tp.__name__.upper())
            if f.metadata.get("choices"):
                kwargs["choices"] = f.metadata["choices"]
                kwargs.pop("metavar")
        parser.add_argument(flag, **kwargs)
    trl_compat.add_alias_arguments(parser, cls)  # TRL's names: --learning_rate, ...


def _coerce(cls: type, f: dataclasses.Field, value: Any, where: str) -> Any:
    tp = _field_type(cls, f)
    if value is None:
        return None
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads `1e-3` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif typing.get_origin(tp) is list or tp is list:
        item = (typing.get_args(tp) or (str,))[0]
        values = value if isinstance(value, list) else [value]
        try:
            return [item(v) for v in values]
        except (TypeError, ValueError):
            pass
    else:
        return value
    raise PreftuneError(
        f"{where}: {f.name} is {value!r} ({type(value).__name__}), "
        f"expected {getattr(tp, '__name__', tp)}"
    )


def load_yaml_config(path: str | Path, cls: type) -> dict[str, Any]:
    """Read a YAML mapping of field names to values, naming the file and key of any problem."""
    path = Path(path)
    if not path.is_file():
        raise PreftuneError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}" if mark else str(path)
        raise PreftuneError(f"{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise PreftuneError(
            f"{path}: expected a mapping of setting names to values, got {type(raw).__name__}"
        )
    raw = trl_compat.resolve_yaml(raw, cls, str(path))  # TRL's keys become preftune's
    fields_by_name = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name in getattr(cls, "ABSENT_SETTINGS", {}) and name not in fields_by_name:
            raise PreftuneError(f"{path}: {name}={value!r}: {cls.ABSENT_SETTINGS[name]}")
        if name not in fields_by_name:
            close = difflib.get_close_matches(name, fields_by_name, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise PreftuneError(f"{path}: unknown setting {key!r}{hint}")
        values[name] = _coerce(cls, fields_by_name[name], value, str(path))
    return values


def build_config(cls: type, namespace: argparse.Namespace) -> Any:
    """Defaults, then the YAML file, then the flags given; then validate."""
    given = vars(namespace).copy()
    values: dict[str, Any] = {}
    config_file = given.pop("config", None)
    if config_file:
        values.update(load_yaml_config(config_file, cls))
    fields_by_name = {f.name: f for f in dataclasses.fields(cls)}
    given = trl_compat.resolve_namespace(  # TRL's flags become preftune's
        given, cls, values, lambda v, name: _coerce(cls, fields_by_name[name], v, "command line")
    )
    names = set(fields_by_name)
    values.update({k: v for k, v in given.items() if k in names})
    cfg = cls(**values)
    check_finite(cfg)
    cfg.validate()
    return cfg


def check_finite(cfg: Any) -> None:
    """Refuse NaN and infinity in every float setting (argparse and YAML accept `inf`, `nan`)
    unless the field opts out with `arg(..., finite=False)`."""
    for f in dataclasses.fields(cfg):
        if not f.metadata.get("finite", True):
            continue
        value = getattr(cfg, f.name)
        values = value if isinstance(value, list) else [value]
        for v in values:
            if isinstance(v, float) and not math.isfinite(v):
                raise PreftuneError(f"{f.name}: got {value!r}, expected a finite number")


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | Path, extra: dict[str, Any] | None = None) -> None:
    """Write the resolved config as YAML, atomically."""
    # Imported here: preftune.utils imports torch, and `preftune --help` should not wait for it.
    from preftune.utils import atomic_write_text

    data = {**config_to_dict(cfg), **(extra or {})}
    atomic_write_text(Path(path), yaml.safe_dump(data, sort_keys=False))
