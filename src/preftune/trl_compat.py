"""TRL's and transformers' setting names, accepted as aliases of preftune's.

A TRL user keeps their command line and YAML file and changes one word:
`trl dpo --model_name_or_path M --per_device_train_batch_size 8 ...` becomes
`preftune dpo --model_name_or_path M --per_device_train_batch_size 8 ...`.

Each row of `ALIASES` names a TRL (or `TrainingArguments`, `ModelConfig`, `ScriptArguments`)
setting, the commands it applies to, and how its value becomes preftune's. A row is one of:
- the same meaning under another name (`learning_rate` -> `lr`);
- a translation of TRL's convention into preftune's, exact by construction (`max_steps: -1`
  -> 0, `loss_type: sigmoid` -> `loss: dpo`, GRPO's per-device batch -> prompts per rollout);
- a refusal naming the reason, where preftune has the setting but not TRL's meaning of it
  (TRL's length-normalised IPO; GRPO's KL with the importance-ratio correction).
Any other TRL option (`TRL_OPTIONS`) is refused by name. An alias and its preftune name given
together in one place (the YAML file, or the command line) is an error. The table in the
README is generated from `ALIASES` (`markdown_table`), and a test keeps the two equal.

`config.py` calls three functions: `add_alias_arguments` (the flags), `resolve_yaml` (the
keys of a YAML file) and `resolve_namespace` (the flags given).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from preftune.errors import PreftuneError

OFFLINE = frozenset({"sft", "dpo", "kto", "reward"})
ONLINE = frozenset({"ppo", "grpo", "rloo", "online-dpo"})
TRAINING = OFFLINE | ONLINE
SAMPLING = ONLINE | {"best-of-n"}
EVERY = TRAINING | {"best-of-n", "eval-rm"}
# The online commands whose rollout size TRL sets with its per-device batch settings.
GROUPED = frozenset({"grpo", "rloo", "online-dpo"})

# Every field of TRL 1.16's configs (SFT, DPO, KTO, Reward, GRPO, RLOO, online DPO, ORPO, CPO),
# `ModelConfig`, `ScriptArguments` and transformers 5.24's `TrainingArguments`, plus names that
# older releases had. A name here that is not an alias of the command is refused by name.
TRL_OPTIONS = frozenset(
    """
accelerator_config activation_checkpointing activation_checkpointing_kwargs
activation_offloading adam_beta1 adam_beta2 adam_epsilon alpha assistant_only_loss
attn_implementation auto_find_batch_size average_tokens_across_devices batch_eval_metrics beta
bf16 bf16_full_eval bnb_4bit_quant_storage bnb_4bit_quant_type cache_implementation
cast_lm_head_to_fp32 center_rewards_coefficient chat_template_kwargs chat_template_path
completion_only_loss cpo_alpha data_seed dataloader_drop_last dataloader_in_order
dataloader_multiprocessing_context dataloader_num_workers dataloader_persistent_workers
dataloader_pin_memory dataloader_prefetch_factor dataset_config dataset_kwargs dataset_name
dataset_num_proc dataset_streaming dataset_test_split dataset_text_field dataset_train_split
ddp_backend ddp_broadcast_buffers ddp_bucket_cap_mb ddp_find_unused_parameters ddp_static_graph
ddp_timeout debug deepspeed delta desirable_weight disable_dropout disable_tqdm discopop_tau
do_eval do_predict do_train ds3_gather_for_generation dtype enable_jit_checkpoint entropy_coef
entropy_coef_delta entropy_coef_max entropy_coef_min entropy_target eos_token epsilon
epsilon_high eval_accumulation_steps eval_delay eval_do_concat_batches eval_on_start
eval_packing eval_steps eval_strategy eval_use_gather_object f_alpha_divergence_coef
f_divergence_type fp16 fp16_full_eval fsdp fsdp_config full_determinism generate_during_eval
generation_batch_size generation_kwargs gradient_accumulation_steps gradient_checkpointing
gradient_checkpointing_kwargs greater_is_better hub_always_push hub_model_id hub_private_repo
hub_revision hub_strategy hub_token ignore_bias_buffers ignore_data_skip
importance_sampling_level include_for_metrics include_num_input_tokens_seen is_encoder_decoder
label_names label_smoothing label_smoothing_factor ld_alpha learning_rate length_column_name
liger_kernel_config load_best_model_at_end load_in_4bit load_in_8bit local_rank log_completions
log_completions_hub_repo log_level log_level_replica log_multimodal log_on_each_node
log_unique_prompts logging_first_step logging_nan_inf_filter logging_steps logging_strategy
lora_alpha lora_dropout lora_modules_to_save lora_r lora_target_modules lora_target_parameters
lora_task_type loss_type loss_weights lr_scheduler_kwargs lr_scheduler_type
mask_truncated_completions max_completion_length max_grad_norm max_length max_new_tokens
max_steps max_tool_calling_iterations metric_for_best_model min_p missing_eos_penalty
model_init_kwargs model_name_or_path model_revision multi_objective_aggregation
neftune_noise_alpha normalize_advantages num_completions_to_print num_generations
num_generations_eval num_iterations num_train_epochs off_policy_mask_threshold optim optim_args
optim_target_modules output_dir packing packing_strategy pad_to_multiple_of pad_token
padding_free padding_value parallelism_config per_device_eval_batch_size
per_device_train_batch_size precompute_ref_batch_size precompute_ref_log_probs
prediction_loss_only project push_to_hub ref_model_mixup_alpha ref_model_sync_steps
remove_unused_columns repetition_penalty report_to restore_callback_states_from_checkpoint
resume_from_checkpoint reward_clip_range reward_model_path reward_weights router_aux_loss_coef
run_name sapo_temperature_neg sapo_temperature_pos save_on_each_node save_only_model save_steps
save_strategy save_total_limit scale_rewards seed shuffle_dataset simpo_gamma
skip_memory_metrics steps_per_generation sync_ref_model temperature tf32 top_entropy_quantile
top_k top_p torch_compile torch_compile_backend torch_compile_mode torch_empty_cache_steps
trackio_bucket_id trackio_space_id trackio_static_space_id train_sampling_strategy
transformers_continuous_batching_config truncation_mode trust_remote_code undesirable_weight
use_adaptive_entropy use_bias_correction_kl use_bnb_nested_quant use_cache use_cpu use_dora
use_liger_kernel use_peft use_rslora use_transformers_continuous_batching use_transformers_paged
use_vllm use_weighting vespo_k_neg vespo_k_pos vespo_lambda_neg vespo_lambda_pos
vllm_enable_sleep_mode vllm_gpu_memory_utilization vllm_group_port vllm_importance_sampling_cap
vllm_importance_sampling_clip_max vllm_importance_sampling_clip_min
vllm_importance_sampling_correction vllm_importance_sampling_mode vllm_max_model_length
vllm_mode vllm_model_impl vllm_server_base_url vllm_server_host vllm_server_port
vllm_server_timeout vllm_structured_outputs_regex vllm_tensor_parallel_size warmup_steps
weight_decay
warmup_ratio max_prompt_length torch_dtype evaluation_strategy
""".split()
)

# Why some TRL options have no preftune counterpart, and what to use instead.
REFUSAL_REASONS = {
    "per_device_eval_batch_size": "held-out data is scored with --batch-size",
    "dataset_test_split": "held-out data comes from --eval-data (read with the same --split) "
    "or --eval-fraction of the training data",
    "dataset_config": "pass a local file, a folder, or a dataset name without a config",
    "truncation_mode": "TRL 1.x cuts the whole sequence at max_length keeping its start; "
    "older TRL cut the prompt. preftune cuts the prompt to "
    "--max-prompt-length (keeping its end or start: --prompt-truncation), "
    "then the completion to fit --max-length",
    "resume_from_checkpoint": "use --resume (continues from the latest checkpoint in --output-dir)",
    "disable_dropout": "preftune leaves the model's dropout as its config sets it",
    "packing": "preftune does not pack sequences",
    "push_to_hub": "push the output folder (it holds a model card) with `hf upload`",
    "hub_model_id": "push the output folder (it holds a model card) with `hf upload`",
    "deepspeed": "use `accelerate launch` with a DeepSpeed or FSDP accelerate config",
    "fsdp": "use `accelerate launch` with an FSDP accelerate config",
    "ref_model_sync_steps": "the reference stays the initial policy (no TR-DPO sync)",
    "sync_ref_model": "the reference stays the initial policy (no TR-DPO sync)",
    "loss_weights": "preftune trains one loss per run (add an NLL term with --sft-weight)",
}


@dataclass
class Context:
    """What a converter may read: the command, the other aliases given in the same place, and
    the preftune settings known so far (defaults, then the YAML file, then the flags)."""

    command: str
    aliases: dict[str, Any]
    settings: dict[str, Any]
    where: str

    def refuse(self, name: str, why: str) -> PreftuneError:
        return PreftuneError(
            f"{self.where}: {name} (a TRL setting) is not accepted by "
            f"preftune {self.command}: {why}"
        )


Convert = Callable[[Any, Context], dict[str, Any]]


@dataclass(frozen=True)
class Alias:
    name: str  # TRL's name, with underscores
    target: str  # the preftune setting it sets, as shown in the README table
    commands: frozenset[str]
    meaning: str  # the README table's "how" column
    convert: Convert
    switch: bool = False  # `--name` alone means true, as with TRL's HfArgumentParser


def _same(target: str) -> Convert:
    return lambda value, ctx: {target: value}


def _one(value: Any, name: str, ctx: Context) -> Any:
    """TRL declares some settings as lists (DPO's loss_type, online DPO's beta); one value."""
    if isinstance(value, list):
        if len(value) != 1:
            raise ctx.refuse(name, f"got {len(value)} values {value}; preftune takes one")
        return value[0]
    return value


def _max_steps(value, ctx):
    if value == -1 or value is None:  # TrainingArguments: -1 means "use num_train_epochs"
        return {"max_steps": 0}
    if ctx.command in GROUPED and _iterations_per_rollout(ctx) != 1:
        raise ctx.refuse(
            "max_steps",
            "with num_iterations or steps_per_generation, TRL counts "
            "optimizer steps and preftune counts rollouts; give preftune's "
            "--max-steps as a number of rollouts",
        )
    return {"max_steps": value}


def _positive_count(name: str, target: str, *, none: int | None = None) -> Convert:
    def convert(value, ctx):
        if value is None and none is not None:
            return {target: none}
        if isinstance(value, float) and 0 < value < 1:
            raise ctx.refuse(
                name,
                f"{value} is a fraction of the total steps in transformers; "
                "preftune takes a number of steps",
            )
        return {target: value}

    return convert


def _report_to(value, ctx):
    items = value if isinstance(value, list) else [value]
    items = [str(i).strip() for item in items if item is not None for i in str(item).split(",")]
    if "all" in items:
        raise ctx.refuse(
            "report_to",
            "`all` means every tracker installed here; name them (tensorboard, wandb, mlflow)",
        )
    return {"report_to": ",".join(i for i in items if i and i != "none")}


def _precision(value, ctx):
    bf16, fp16 = ctx.aliases.get("bf16"), ctx.aliases.get("fp16")
    if bf16 and fp16:
        raise ctx.refuse("bf16", "bf16 and fp16 are both true; choose one")
    if bf16:
        return {"mixed_precision": "bf16"}
    if fp16:
        return {"mixed_precision": "fp16"}
    if bf16 is False and not fp16:  # bf16 false (and no fp16): 32-bit, no autocast
        return {"mixed_precision": "no"}
    return {}  # fp16 false alone: preftune's `auto` is not fp16 either


def _dtype(value, ctx):
    return {"dtype": "auto" if value is None else value}


def _scheduler(value, ctx):
    if value in ("linear", "cosine"):
        return {"lr_scheduler": value}
    if value == "constant_with_warmup":
        return {"lr_scheduler": "constant"}
    if value == "constant":
        warm = any(
            ctx.aliases.get(n) or ctx.settings.get(n) for n in ("warmup_steps", "warmup_ratio")
        )
        if warm:
            raise ctx.refuse(
                "lr_scheduler_type",
                "transformers' `constant` skips the warmup "
                "you set; preftune's constant schedule warms up first: pass "
                "constant_with_warmup, or drop the warmup",
            )
        return {"lr_scheduler": "constant"}
    raise ctx.refuse(
        "lr_scheduler_type",
        f"{value!r} is not available; preftune has linear, "
        "cosine, constant and constant_with_warmup",
    )


def _warmup_steps(value, ctx):
    if isinstance(value, float) and 0 < value < 1:  # transformers 5: a float below 1 is a ratio
        return {"warmup_ratio": value}
    return {"warmup_steps": int(value)}


def _optim(value, ctx):
    if value in ("adamw_torch", "adamw_torch_fused"):
        return {}  # preftune's optimizer is torch's AdamW (fused where the parameters allow)
    raise ctx.refuse(
        "optim",
        f"{value!r}: preftune trains with torch's AdamW only (adamw_torch / adamw_torch_fused)",
    )


def _adam_epsilon(value, ctx):
    if float(value) == 1e-8:
        return {}  # torch's AdamW default, which preftune uses
    raise ctx.refuse("adam_epsilon", f"{value}: preftune uses AdamW's eps = 1e-8")


def _max_length(value, ctx):
    if value is None:
        raise ctx.refuse(
            "max_length", "null (no truncation) is not available; give a number of tokens"
        )
    return {"max_length": value}


def _lora_targets(value, ctx):
    if value is None:
        raise ctx.refuse(
            "lora_target_modules",
            "null (peft's per-architecture default) is not "
            "available; name the modules or pass all-linear",
        )
    items = value if isinstance(value, list) else [value]
    return {"lora_target_modules": ",".join(str(v) for v in items)}


def _center(value, ctx):
    return {"center_coef": 0.0 if value is None else value}


def _missing_eos(value, ctx):
    return {"missing_eos_penalty": 0.0 if value is None else value}


COLOCATED_ONLY = "preftune runs vLLM colocated in the trainer process only"


def _use_vllm(value, ctx):
    mode = ctx.aliases.get("vllm_mode", "colocate")
    if value and mode != "colocate":
        raise ctx.refuse("vllm_mode", f"{mode!r}: {COLOCATED_ONLY}")
    return {"generator": "vllm" if value else "hf"}


def _text_field(value, ctx):
    if value == "text":
        return {}
    columns = ctx.settings.get("columns") or ""
    return {"columns": ",".join(c for c in (columns, f"text={value}") if c)}


def _eval_strategy(value, ctx):
    value = "no" if value is False else value  # YAML 1.1 reads `no` as false
    if value == "steps":  # transformers: eval_steps, else logging_steps
        steps = (
            ctx.aliases.get("eval_steps")
            or ctx.aliases.get("logging_steps")
            or ctx.settings.get("eval_steps")
            or ctx.settings.get("logging_steps")
        )
        return {"eval_steps": steps}
    if value == "no":
        if ctx.settings.get("eval_data") or ctx.settings.get("eval_fraction"):
            raise ctx.refuse(
                "eval_strategy",
                "`no` with held-out data: preftune scores "
                "held-out data whenever it is given; drop eval_data/eval_fraction",
            )
        return {}
    raise ctx.refuse(
        "eval_strategy",
        f"{value!r}: preftune evaluates every --eval-steps "
        "steps (TRL's `steps`), or only at the start and the end",
    )


def _save_strategy(value, ctx):
    value = "no" if value is False else value  # YAML 1.1 reads `no` as false
    if value == "steps":
        return {}
    if value == "no":
        return {"save_steps": 0}  # no checkpoints; the final model is saved either way
    raise ctx.refuse(
        "save_strategy",
        f"{value!r}: preftune checkpoints every --save-steps "
        "steps (TRL's `steps`) or not at all (`no`)",
    )


def _must_be(name: str, accepted: tuple, why: str) -> Convert:
    def convert(value, ctx):
        if value in accepted:
            return {}
        raise ctx.refuse(name, f"{value!r}: {why}")

    return convert


# --- loss_type, per command ---------------------------------------------------------------------

DPO_LOSSES = {"sigmoid": "dpo", "hinge": "hinge", "robust": "robust"}
DPO_LOSS_REFUSED = {
    "sigmoid_norm": "preftune has no length-normalised DPO with a reference; the "
    "reference-free simpo (--loss simpo) is the nearest",
    "sft": "TRL's sft term is the mean NLL over all chosen tokens of the batch; preftune's "
    "--sft-weight adds the mean per-token NLL of each pair (RPO)",
}


def _dpo_loss(value, ctx):
    value = _one(value, "loss_type", ctx)
    if value in DPO_LOSS_REFUSED:
        raise ctx.refuse("loss_type", f"{value!r}: {DPO_LOSS_REFUSED[value]}")
    if value == "ipo":  # TRL divides each log-ratio by its completion length
        return {"loss": "ipo", "ipo_length_norm": True}
    if value not in DPO_LOSSES:
        raise ctx.refuse(
            "loss_type",
            f"{value!r} is not available; TRL's sigmoid, hinge, ipo "
            "and robust are (preftune's own: --loss with dpo, ipo, cdpo, robust, "
            "hinge, simpo, orpo, cpo)",
        )
    smoothing = ctx.aliases.get("label_smoothing", ctx.settings.get("label_smoothing", 0.0))
    if value == "sigmoid" and smoothing:
        raise ctx.refuse(
            "label_smoothing",
            f"{smoothing} with loss_type sigmoid: TRL 1.x "
            "ignores it there and TRL 0.x made it conservative DPO. Pass "
            "--loss cdpo --label-smoothing for the latter, or drop it",
        )
    return {"loss": DPO_LOSSES[value]}


def _online_dpo_loss(value, ctx):
    # TRL's online DPO: sigmoid and ipo, both on summed log-ratios like preftune's.
    value = {"sigmoid": "dpo"}.get(value, value)
    if value not in ("dpo", "ipo"):
        raise ctx.refuse("loss_type", f"{value!r}: TRL's online DPO has sigmoid and ipo")
    return {"loss_type": value}


GRPO_AGGREGATION = {"grpo": "sequence", "dapo": "token", "dr_grpo": "constant"}


def _grpo_loss(value, ctx):
    if value == "bnpo":
        raise ctx.refuse(
            "loss_type",
            "bnpo normalises by each process's own token count; "
            "preftune normalises over all processes (TRL's dapo: "
            "--loss_type dapo or --loss-aggregation token)",
        )
    if value not in GRPO_AGGREGATION:
        raise ctx.refuse("loss_type", f"{value!r} is not available; grpo, dapo and dr_grpo are")
    return {"loss_aggregation": GRPO_AGGREGATION[value]}


def _scale_rewards(value, ctx):
    if value in (True, "group"):
        return {"scale_rewards": True}
    if value in (False, "none"):
        return {"scale_rewards": False}
    raise ctx.refuse(
        "scale_rewards",
        f"{value!r}: preftune scales by the group's std (group) or not at all (none)",
    )


# --- KL coefficients ---------------------------------------------------------------------------


def _grpo_beta(value, ctx):
    if value and ctx.aliases.get("use_bias_correction_kl", True) is not False:
        raise ctx.refuse(
            "beta",
            "TRL 1.x multiplies GRPO's k3 KL term by the importance ratio "
            "(use_bias_correction_kl, default true), which changes its gradient; "
            "preftune's --kl-coef uses plain k3 (Shao et al. 2024, Eq. 4). Add "
            "--use_bias_correction_kl false to accept that form",
        )
    if value and ctx.settings.get("kl_estimator", "k3") != "k3":
        raise ctx.refuse(
            "beta", f"TRL's GRPO KL is k3; you chose kl_estimator {ctx.settings['kl_estimator']}"
        )
    return {"kl_coef": value}


def _bias_correction(value, ctx):
    return {}  # checked together with beta in _grpo_beta


def _rloo_beta(value, ctx):
    if value and ctx.settings.get("kl_estimator", "k1") != "k1":
        raise ctx.refuse(
            "beta",
            "TRL's RLOO subtracts β times the summed k1 log-ratio; you "
            f"chose kl_estimator {ctx.settings['kl_estimator']}",
        )
    return {"kl_coef": value}


def _rloo_iterations(value, ctx):
    if value != 1:
        raise ctx.refuse(
            "num_iterations",
            f"{value}: reusing a rollout, TRL's RLOO clips the "
            "ratio of whole sequences and preftune's rloo clips per token; use "
            "preftune's --ppo-epochs knowing that",
        )
    return {"ppo_epochs": 1}


def _online_dpo_beta(value, ctx):
    return {"beta": _one(value, "beta", ctx)}


# --- batch sizes -------------------------------------------------------------------------------

BATCH_ALIASES = (
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "steps_per_generation",
    "generation_batch_size",
)


def world_size() -> int:
    """Processes of this run: `accelerate launch` and torchrun set WORLD_SIZE."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def _iterations_per_rollout(ctx: Context) -> int:
    """Optimizer steps TRL takes per rollout: num_iterations x steps_per_generation / grad accum."""
    a = ctx.aliases
    accum = a.get("gradient_accumulation_steps", 1)
    steps = a.get("steps_per_generation")
    if steps is None and a.get("generation_batch_size") is not None:
        per_step = a.get("per_device_train_batch_size", 8) * world_size()
        steps = a["generation_batch_size"] // max(per_step, 1)
    steps = accum if steps is None else steps
    return a.get("num_iterations", 1) * max(steps // max(accum, 1), 1)


def _online_batch(value, ctx):
    """TRL's GRPO/RLOO: one rollout is per_device x processes x steps_per_generation
    completions (steps_per_generation defaults to gradient_accumulation_steps), consumed in
    micro-batches of per_device rows, one optimizer step every gradient_accumulation_steps.
    TRL's online DPO: one optimizer step per per_device x processes x grad_accum prompts.
    Unset ones take TRL's defaults (per_device 8, grad_accum 1), since only together they say
    how large a rollout is."""
    a = ctx.aliases
    if ctx.command == "ppo":
        raise ctx.refuse(
            next(n for n in BATCH_ALIASES if n in a),
            "TRL's PPO batch settings have no exact preftune equivalent; use "
            "--prompts-per-step, --num-minibatches and --batch-size",
        )
    per_device = a.get("per_device_train_batch_size", 8)
    accum = a.get("gradient_accumulation_steps", 1)
    procs = world_size()
    if ctx.command == "online-dpo":
        for name in ("steps_per_generation", "generation_batch_size"):
            if name in a:
                raise ctx.refuse(name, "TRL's online DPO has no such setting")
        return {"prompts_per_step": per_device * procs * accum, "batch_size": per_device}
    if "steps_per_generation" in a and "generation_batch_size" in a:
        raise ctx.refuse(
            "generation_batch_size", "TRL refuses it together with steps_per_generation; give one"
        )
    if a.get("generation_batch_size") is not None:
        gen = a["generation_batch_size"]
        if gen % (per_device * procs):
            raise ctx.refuse(
                "generation_batch_size",
                f"{gen} is not a multiple of "
                f"per_device_train_batch_size x processes = {per_device * procs}",
            )
        steps = gen // (per_device * procs)
    else:
        steps = a.get("steps_per_generation") or accum
    generations = a.get("num_generations", ctx.settings.get("num_generations"))
    completions = per_device * procs * steps
    if completions % generations:
        raise ctx.refuse(
            "per_device_train_batch_size",
            f"a rollout of {completions} completions "
            f"(per device {per_device} x {procs} processes x {steps} steps per "
            f"generation) is not a multiple of num_generations={generations}",
        )
    if steps % accum:
        raise ctx.refuse(
            "steps_per_generation",
            f"{steps} is not a multiple of gradient_accumulation_steps={accum}",
        )
    return {
        "prompts_per_step": completions // generations,
        "batch_size": per_device,
        "num_minibatches": steps // accum,
    }


def _offline_batch(target: str) -> Convert:
    return lambda value, ctx: {target: value}


A = Alias
ALIASES: tuple[Alias, ...] = (
    # --- model and data -----------------------------------------------------------------------
    A("model_name_or_path", "model", EVERY, "same", _same("model")),
    A("dataset_name", "data", EVERY, "same (a hub name, or a local file or folder)", _same("data")),
    A("dataset_train_split", "split", EVERY, "same", _same("split")),
    A(
        "dataset_text_field",
        "columns",
        frozenset({"sft"}),
        "`X` becomes `--columns text=X` (`text` changes nothing)",
        _text_field,
    ),
    A("output_dir", "output_dir", EVERY, "same", _same("output_dir")),
    A("dtype", "dtype", EVERY, "same; null becomes `auto`", _dtype),
    A("torch_dtype", "dtype", EVERY, "the older name of `dtype`", _dtype),
    A(
        "chat_template_path",
        "chat_template",
        EVERY,
        "same for a Jinja file (a tokenizer folder is not accepted)",
        _same("chat_template"),
    ),
    # --- batch and schedule --------------------------------------------------------------------
    A(
        "per_device_train_batch_size",
        "batch_size",
        OFFLINE,
        "same: examples (pairs) per device per micro-batch",
        _offline_batch("batch_size"),
    ),
    A("gradient_accumulation_steps", "grad_accum", OFFLINE, "same", _offline_batch("grad_accum")),
    A(
        "per_device_train_batch_size",
        "prompts_per_step, batch_size, num_minibatches",
        GROUPED | {"ppo"},
        "translated with gradient_accumulation_steps, steps_per_generation, "
        "generation_batch_size and num_generations: prompts per rollout = per_device x processes "
        "x steps_per_generation / num_generations (online DPO: per_device x processes x "
        "grad_accum), batch_size = per_device, num_minibatches = steps_per_generation / "
        "grad_accum; refused for ppo",
        _online_batch,
    ),
    A(
        "gradient_accumulation_steps",
        "prompts_per_step, batch_size, num_minibatches",
        GROUPED | {"ppo"},
        "see per_device_train_batch_size",
        _online_batch,
    ),
    A(
        "steps_per_generation",
        "prompts_per_step, batch_size, num_minibatches",
        frozenset({"grpo", "rloo"}),
        "see per_device_train_batch_size",
        _online_batch,
    ),
    A(
        "generation_batch_size",
        "prompts_per_step, batch_size, num_minibatches",
        frozenset({"grpo", "rloo"}),
        "see per_device_train_batch_size",
        _online_batch,
    ),
    A("learning_rate", "lr", TRAINING, "same (AdamW peak learning rate)", _same("lr")),
    A("num_train_epochs", "epochs", TRAINING, "same", _same("epochs")),
    A(
        "max_steps",
        "max_steps",
        TRAINING,
        "same; -1 becomes 0 (use epochs). GRPO/RLOO with "
        "num_iterations or steps_per_generation: refused (TRL counts optimizer steps, preftune "
        "rollouts)",
        _max_steps,
    ),
    A(
        "warmup_ratio",
        "warmup_ratio",
        TRAINING,
        "same fraction; preftune rounds ratio x steps "
        "down where transformers rounds up, and its ramp starts at lr/(w+1) instead of 0",
        _same("warmup_ratio"),
    ),
    A(
        "warmup_steps",
        "warmup_steps",
        TRAINING,
        "same; a float below 1 is a ratio (transformers 5), as warmup_ratio",
        _warmup_steps,
    ),
    A(
        "lr_scheduler_type",
        "lr_scheduler",
        TRAINING,
        "linear, cosine, constant_with_warmup "
        "(preftune's constant); constant only without warmup; others refused",
        _scheduler,
    ),
    A("weight_decay", "weight_decay", TRAINING, "same", _same("weight_decay")),
    A("adam_beta1", "adam_beta1", TRAINING, "same", _same("adam_beta1")),
    A("adam_beta2", "adam_beta2", TRAINING, "same", _same("adam_beta2")),
    A(
        "adam_epsilon",
        "(AdamW eps)",
        TRAINING,
        "1e-8 (the value preftune uses) accepted; others refused",
        _adam_epsilon,
    ),
    A(
        "optim",
        "(optimizer)",
        TRAINING,
        "adamw_torch and adamw_torch_fused accepted (preftune's AdamW); others refused",
        _optim,
    ),
    A("max_grad_norm", "max_grad_norm", TRAINING, "same", _same("max_grad_norm")),
    A("seed", "seed", EVERY, "same", _same("seed")),
    A(
        "bf16",
        "mixed_precision",
        TRAINING,
        "true: bf16; false (without fp16): no",
        _precision,
        switch=True,
    ),
    A(
        "fp16",
        "mixed_precision",
        TRAINING,
        "true: fp16; both bf16 and fp16 true: refused",
        _precision,
        switch=True,
    ),
    A(
        "gradient_checkpointing",
        "gradient_checkpointing",
        TRAINING,
        "same",
        _same("gradient_checkpointing"),
        switch=True,
    ),
    A(
        "activation_checkpointing",
        "gradient_checkpointing",
        TRAINING,
        "transformers 5's name of gradient_checkpointing",
        _same("gradient_checkpointing"),
        switch=True,
    ),
    # --- logging and checkpoints -----------------------------------------------------------------
    A(
        "logging_steps",
        "logging_steps",
        TRAINING,
        "same; a fraction of the steps (< 1) refused",
        _positive_count("logging_steps", "logging_steps"),
    ),
    A(
        "save_steps",
        "save_steps",
        TRAINING,
        "same; a fraction of the steps (< 1) refused",
        _positive_count("save_steps", "save_steps"),
    ),
    A(
        "save_total_limit",
        "save_total_limit",
        TRAINING,
        "same; null (keep all) becomes 0",
        _positive_count("save_total_limit", "save_total_limit", none=0),
    ),
    A(
        "eval_steps",
        "eval_steps",
        OFFLINE,
        "same; null becomes 0 (at the end only)",
        _positive_count("eval_steps", "eval_steps", none=0),
    ),
    A(
        "eval_strategy",
        "eval_steps",
        OFFLINE,
        "steps: eval_steps (or logging_steps, as in "
        "transformers); no: accepted without held-out data; epoch refused",
        _eval_strategy,
    ),
    A(
        "evaluation_strategy",
        "eval_steps",
        OFFLINE,
        "the older name of eval_strategy",
        _eval_strategy,
    ),
    A(
        "save_strategy",
        "save_steps",
        TRAINING,
        "steps: save_steps; no: save_steps 0 (no "
        "checkpoints; the final model is saved); epoch refused",
        _save_strategy,
    ),
    A(
        "logging_strategy",
        "(logging)",
        TRAINING,
        "steps accepted; others refused",
        _must_be("logging_strategy", ("steps",), "preftune logs every --logging-steps steps"),
    ),
    A(
        "report_to",
        "report_to",
        TRAINING,
        "a list or comma-separated names; `none` becomes empty; `all` refused (name the trackers)",
        _report_to,
    ),
    # --- sequence lengths ----------------------------------------------------------------------
    A(
        "max_length",
        "max_length",
        EVERY,
        "same (prompt + completion tokens); null refused",
        _max_length,
    ),
    A(
        "max_prompt_length",
        "max_prompt_length",
        EVERY,
        "same (TRL 0.x's DPO name)",
        _same("max_prompt_length"),
    ),
    A(
        "max_completion_length",
        "max_new_tokens",
        SAMPLING,
        "same: most tokens sampled per completion",
        _same("max_new_tokens"),
    ),
    A(
        "max_new_tokens",
        "max_new_tokens",
        SAMPLING,
        "same (TRL's online DPO name)",
        _same("max_new_tokens"),
    ),
    # --- losses --------------------------------------------------------------------------------
    A("beta", "beta", frozenset({"dpo", "kto"}), "same (KL strength; orpo's λ)", _same("beta")),
    A(
        "beta",
        "beta",
        frozenset({"online-dpo"}),
        "same; TRL's list of one value accepted",
        _online_dpo_beta,
    ),
    A(
        "beta",
        "kl_coef",
        frozenset({"grpo"}),
        "0: same; > 0 only with use_bias_correction_kl "
        "false (TRL 1.x's default multiplies the KL term by the importance ratio)",
        _grpo_beta,
    ),
    A(
        "use_bias_correction_kl",
        "(checked with beta)",
        frozenset({"grpo"}),
        "false: TRL's KL term without the ratio, preftune's",
        _bias_correction,
    ),
    A(
        "beta",
        "kl_coef",
        frozenset({"rloo"}),
        "same (β times the summed k1 log-ratio, subtracted from the reward)",
        _rloo_beta,
    ),
    A(
        "loss_type",
        "loss",
        frozenset({"dpo"}),
        "sigmoid: dpo, hinge: hinge, robust: robust, "
        "ipo: ipo with ipo_length_norm (TRL divides each log-ratio by its length; preftune's "
        "own --loss ipo sums); sigmoid with label_smoothing refused (TRL 1.x ignores it, TRL "
        "0.x meant cdpo); sigmoid_norm, sft, several losses and TRL's other losses refused",
        _dpo_loss,
    ),
    A(
        "loss_type",
        "loss_type",
        frozenset({"online-dpo"}),
        "sigmoid: dpo; ipo: ipo (both sum log-ratios, as preftune does)",
        _online_dpo_loss,
    ),
    A(
        "loss_type",
        "(the KTO loss)",
        frozenset({"kto"}),
        "kto accepted; others refused",
        _must_be(
            "loss_type",
            ("kto",),
            "preftune's KTO is the loss of Ethayarajh et al. 2024 (TRL's `kto`) only",
        ),
    ),
    A(
        "loss_type",
        "(the SFT loss)",
        frozenset({"sft"}),
        "nll accepted; others refused",
        _must_be("loss_type", ("nll",), "preftune's SFT loss is the NLL (TRL's `nll`)"),
    ),
    A(
        "loss_type",
        "loss_aggregation",
        frozenset({"grpo"}),
        "grpo: sequence, dapo: token, dr_grpo: constant; bnpo refused (per-process token count)",
        _grpo_loss,
    ),
    A(
        "label_smoothing",
        "label_smoothing",
        frozenset({"dpo", "online-dpo"}),
        "same ε (robust; cdpo). See loss_type",
        _same("label_smoothing"),
    ),
    A(
        "desirable_weight",
        "desirable_weight",
        frozenset({"kto"}),
        "same",
        _same("desirable_weight"),
    ),
    A(
        "undesirable_weight",
        "undesirable_weight",
        frozenset({"kto"}),
        "same",
        _same("undesirable_weight"),
    ),
    A(
        "precompute_ref_log_probs",
        "precompute_ref",
        frozenset({"dpo"}),
        "same",
        _same("precompute_ref"),
        switch=True,
    ),
    A(
        "center_rewards_coefficient",
        "center_coef",
        frozenset({"reward"}),
        "same: coef x (r_chosen + r_rejected)² per pair; null becomes 0",
        _center,
    ),
    A(
        "completion_only_loss",
        "(SFT loss mask)",
        frozenset({"sft"}),
        "true or null accepted (preftune's SFT loss is on completion tokens only); false refused",
        _must_be(
            "completion_only_loss", (True, None), "preftune's SFT loss is on completion tokens only"
        ),
        switch=True,
    ),
    # --- sampling and RL -------------------------------------------------------------------------
    A(
        "num_generations",
        "num_generations",
        frozenset({"grpo", "rloo", "online-dpo", "ppo"}),
        "same (completions per prompt)",
        _same("num_generations"),
    ),
    A("temperature", "temperature", SAMPLING, "same", _same("temperature")),
    A("top_p", "top_p", SAMPLING, "same", _same("top_p")),
    A(
        "epsilon",
        "clip_eps",
        frozenset({"grpo", "rloo"}),
        "same (ε of the clipped ratio)",
        _same("clip_eps"),
    ),
    A(
        "num_iterations",
        "ppo_epochs",
        frozenset({"grpo"}),
        "same (μ: passes over each rollout)",
        _same("ppo_epochs"),
    ),
    A(
        "num_iterations",
        "ppo_epochs",
        frozenset({"rloo"}),
        "1: same; > 1 refused (TRL's RLOO clips the sequence's ratio, preftune's the tokens')",
        _rloo_iterations,
    ),
    A(
        "scale_rewards",
        "scale_rewards",
        frozenset({"grpo"}),
        "group/true: true; none/false: false; batch refused",
        _scale_rewards,
    ),
    A(
        "normalize_advantages",
        "normalize_advantages",
        frozenset({"rloo"}),
        "same",
        _same("normalize_advantages"),
        switch=True,
    ),
    A("reward_weights", "reward_weights", SAMPLING, "same", _same("reward_weights")),
    A(
        "reward_model_path",
        "reward_model",
        SAMPLING,
        "same (TRL's online DPO name)",
        _same("reward_model"),
    ),
    A("missing_eos_penalty", "missing_eos_penalty", SAMPLING, "same; null becomes 0", _missing_eos),
    A(
        "use_vllm",
        "generator",
        SAMPLING,
        "true: vllm (colocated); false: hf",
        _use_vllm,
        switch=True,
    ),
    A(
        "vllm_mode",
        "(generator)",
        SAMPLING,
        "colocate accepted; server refused",
        _must_be("vllm_mode", ("colocate",), COLOCATED_ONLY),
    ),
    A(
        "vllm_gpu_memory_utilization",
        "vllm_gpu_memory_utilization",
        SAMPLING,
        "same",
        _same("vllm_gpu_memory_utilization"),
    ),
    # --- LoRA (TRL's ModelConfig) ----------------------------------------------------------------
    A("use_peft", "lora", TRAINING, "same", _same("lora"), switch=True),
    A("lora_r", "lora_r", TRAINING, "same", _same("lora_r")),
    A("lora_alpha", "lora_alpha", TRAINING, "same", _same("lora_alpha")),
    A("lora_dropout", "lora_dropout", TRAINING, "same", _same("lora_dropout")),
    A(
        "lora_target_modules",
        "lora_target_modules",
        TRAINING,
        "a list or comma-separated names, or all-linear; null refused",
        _lora_targets,
    ),
)

# Names, paths and splits: a flag's value is kept as typed (`--output_dir 007`).
TEXT_ALIASES = frozenset(
    {
        "model_name_or_path",
        "dataset_name",
        "dataset_train_split",
        "dataset_text_field",
        "output_dir",
        "chat_template_path",
        "reward_model_path",
    }
)

# Applied before the others: the aliases whose translation reads other aliases' values.
_FIRST = (
    "num_generations",
    "num_iterations",
    "use_bias_correction_kl",
    "label_smoothing",
    "eval_steps",
    "logging_steps",
)


def command_of(cls: type) -> str:
    """Which command a config class belongs to, from the settings it has."""
    if cls.__module__ == "preftune.datatools.cli":  # the `preftune data` group: no TRL names
        return "data"
    names = {f.name for f in dataclasses.fields(cls)}
    for command, marker in (
        ("lab", "worlds"),
        ("plot", "runs"),
        ("eval-rm", "logprob_agg"),
        ("best-of-n", "prompts_per_batch"),
        ("ppo", "vf_coef"),
        ("grpo", "scale_rewards"),
        ("rloo", "normalize_advantages"),
        ("online-dpo", "prompts_per_step"),
        ("kto", "desirable_weight"),
        ("reward", "center_coef"),
        ("dpo", "simpo_gamma"),
    ):
        if marker in names:
            return command
    return "sft"


def aliases_for(cls: type) -> dict[str, Alias]:
    """TRL name -> alias, for the command of `cls`."""
    command = command_of(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    out = {}
    for a in ALIASES:
        first = a.target.split(",")[0].strip()
        if command in a.commands and (first.startswith("(") or first in fields):
            out[a.name] = a
    return out


def _dest(name: str) -> str:
    return f"trl:{name}"


def add_alias_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """A hidden flag for every TRL name, with underscores and with dashes.

    The dash spelling of a preftune setting stays preftune's (`--max-steps`); the underscore
    spelling of the same name is TRL's (`--max_steps -1`), translated like a YAML key.
    """
    fields = {f.name for f in dataclasses.fields(cls)}
    for name in sorted(TRL_OPTIONS | {a.name for a in ALIASES}):
        spellings = [f"--{name}"]
        if name not in fields:
            spellings.append("--" + name.replace("_", "-"))
        spellings = [s for s in dict.fromkeys(spellings) if s not in parser._option_string_actions]
        if spellings:
            parser.add_argument(
                *spellings,
                dest=_dest(name),
                nargs="*",
                default=argparse.SUPPRESS,
                help=argparse.SUPPRESS,
            )
    parser.epilog = ((parser.epilog + "\n") if parser.epilog else "") + (
        "TRL and transformers names are accepted too (e.g. --learning_rate, "
        "--per_device_train_batch_size); see the README's table."
    )


def _cli_value(tokens: list[str], alias: Alias | None, text: bool = False) -> Any:
    """A flag's tokens as a value: numbers, true/false, null; `text`: strings as given."""

    def parse(token: str) -> Any:
        if text:
            return token
        for kind in (int, float):
            try:
                return kind(token)
            except ValueError:
                pass
        low = token.lower()
        if low == "true":  # not yes/no: `--save_strategy no` is a word
            return True
        if low == "false":
            return False
        if low in ("null", "~"):
            return None
        return token

    if not tokens:
        return True if alias is None or alias.switch else None
    values = [parse(t) for t in tokens]
    return values[0] if len(values) == 1 else values


def _numeric(value: Any) -> Any:
    """`5e-7` is a string to YAML 1.1 (PyYAML); TRL recipes write it so."""
    if isinstance(value, str) and re.fullmatch(
        r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+", value.strip()
    ):
        return float(value)
    return value


def _is_text(cls: type, name: str) -> bool:
    """Whether preftune setting `name` of `cls` holds text (left as YAML read it)."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
            return kind.startswith("str")
    return False


def _refuse_unknown(name: str, cls: type, where: str) -> PreftuneError:
    command = command_of(cls)
    if name not in TRL_OPTIONS and all(a.name != name for a in ALIASES):
        import difflib

        fields = [f.name for f in dataclasses.fields(cls)]
        close = difflib.get_close_matches(name, fields, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return PreftuneError(f"{where}: unknown setting {name!r}{hint}")
    reason = REFUSAL_REASONS.get(name)
    if reason is None:
        elsewhere = sorted({c for a in ALIASES if a.name == name for c in a.commands})
        reason = (
            f"it applies to preftune {', '.join(elsewhere)} only"
            if elsewhere
            else "preftune has no such setting"
        )
    return PreftuneError(
        f"{where}: {name} is a TRL option that preftune {command} does not have ({reason})"
    )


def _translate(
    given: dict[str, Any],
    preftune_given: dict[str, Any],
    cls: type,
    known: dict[str, Any],
    where: str,
) -> dict[str, Any]:
    """Preftune settings from the TRL aliases given in one place."""
    table = aliases_for(cls)
    for name in given:
        if name not in table:
            raise _refuse_unknown(name, cls, where)
    ctx = Context(command_of(cls), dict(given), {**known, **preftune_given}, where)
    out: dict[str, Any] = {}
    source: dict[str, str] = {}
    order = sorted(given, key=lambda n: (n not in _FIRST, n))
    for name in order:
        alias = table[name]
        for target, value in alias.convert(given[name], ctx).items():
            if target in preftune_given and target == name:
                raise PreftuneError(
                    f"{where}: {name} was given twice, in preftune's spelling "
                    "and in TRL's: give it once"
                )
            if target in preftune_given:
                raise PreftuneError(
                    f"{where}: {name} and {target} were both given; {name} is "
                    f"TRL's name for preftune's {target}: give one of them"
                )
            if target in out and out[target] != value:
                raise PreftuneError(
                    f"{where}: {source[target]} and {name} both set {target} "
                    f"({out[target]!r} vs {value!r}); give one of them"
                )
            out[target] = value
            source[target] = name
            ctx.settings[target] = value
    return out


def _defaults(cls: type) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def resolve_yaml(raw: dict, cls: type, where: str) -> dict[str, Any]:
    """A YAML mapping with TRL keys replaced by preftune's (values still uncoerced).

    A key that is both a preftune and a TRL name (`max_steps`, `report_to`) is read with TRL's
    conventions, which only widen what preftune accepts (-1, null, a list).
    """
    fields = {f.name for f in dataclasses.fields(cls)}
    table = aliases_for(cls)
    preftune_given: dict[str, Any] = {}
    trl_given: dict[str, Any] = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        target = table[name].target if name in table else name
        if not _is_text(cls, target):
            value = _numeric(value)
        if name in table:
            trl_given[name] = value
        elif name in fields or name not in TRL_OPTIONS:
            preftune_given[key] = value  # unknown names are left to the caller's message
        else:
            raise _refuse_unknown(name, cls, where)
    normalised = {str(k).replace("-", "_"): v for k, v in preftune_given.items()}
    known = {**_defaults(cls), **normalised}
    return {**normalised, **_translate(trl_given, normalised, cls, known, where)}


def resolve_namespace(
    given: dict[str, Any],
    cls: type,
    earlier: dict[str, Any],
    coerce: Callable[[Any, str], Any],
    *,
    tokens: bool = True,
    where: str = "command line",
) -> dict[str, Any]:
    """The parsed flags with the TRL ones (`trl:<name>` destinations) turned into preftune's.

    `earlier` holds the settings from the YAML file; `coerce(value, name)` converts a value to
    the type of preftune setting `name`. `tokens`: the TRL values are argparse's lists of
    strings (else Python values, from `preftune.load_config`).
    """
    table = aliases_for(cls)
    trl_given = {}
    for key, value in given.items():
        if key.startswith("trl:"):
            name = key[len("trl:") :]
            alias = table.get(name)
            if not tokens:
                trl_given[name] = _numeric(value)
                continue
            if alias is not None and not value and not alias.switch:
                raise PreftuneError(f"{where}: --{name} needs a value")
            trl_given[name] = _cli_value(value, alias, name in TEXT_ALIASES)
    plain = {k: v for k, v in given.items() if not k.startswith("trl:")}
    if not trl_given:
        return plain
    known = {**_defaults(cls), **earlier, **plain}
    translated = _translate(
        trl_given, {k: v for k, v in plain.items() if k != "config"}, cls, known, where
    )
    return {**plain, **{k: coerce(v, k) for k, v in translated.items()}}


def markdown_table() -> str:
    """The README's alias table, one row per (TRL name, commands)."""
    rows = [
        "| TRL / transformers name | preftune setting | commands | how |",
        "| --- | --- | --- | --- |",
    ]
    for a in ALIASES:
        commands = (
            "training commands"
            if a.commands == TRAINING
            else "training commands, best-of-n, eval-rm"
            if a.commands == EVERY
            else ", ".join(sorted(a.commands))
        )
        rows.append(f"| `{a.name}` | `{a.target}` | {commands} | {a.meaning} |")
    return "\n".join(rows)
