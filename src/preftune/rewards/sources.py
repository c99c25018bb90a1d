"""Reward sources: score (prompts, completions, extra columns) -> a 1D float tensor.

Three sources, all called the same way, `source(prompts, completions, **extra_columns)`:
- `FunctionReward`: a python function the user names as "module:function" or "file.py:function";
- `ModelReward`: a sequence classifier with one output (a reward model from `preftune reward`);
- `CombinedReward`: a weighted sum of sources, which also reports each component for logging;
- `EnsembleReward`: K reward models (a folder written by `preftune reward --ensemble K`) read
  as one reward through their mean, minimum, or mean minus a multiple of their spread.

Every source also has `score_with_components(...) -> (total, {name: scores})`, so trainers can
log `rewards/<name>` whatever the source is. `apply_penalties` adds the missing-EOS and length
penalties that the online trainers apply on top of any source.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import os
import sys
import threading
from collections.abc import Callable, Sequence

import torch

from preftune.errors import PreftuneError


class RewardSource:
    """Interface shared by the sources (subclasses implement `score_with_components`)."""

    name: str = "reward"

    def __call__(self, prompts: list, completions: list, **extra_columns) -> torch.Tensor:
        return self.score_with_components(prompts, completions, **extra_columns)[0]

    def score_with_components(self, prompts, completions, **extra_columns):
        raise NotImplementedError


# --------------------------------------------------------------------------- python functions


def load_function(spec: str) -> Callable:
    """Import "package.module:function" or "path/to/file.py:function" and return the callable."""
    if not isinstance(spec, str) or ":" not in spec:
        raise PreftuneError(
            f"reward function {spec!r} must look like 'module:function' or 'path/to/file.py:function'"
        )
    where, _, attr = spec.rpartition(":")  # rpartition: a Windows drive letter keeps its colon
    if not where or not attr:
        raise PreftuneError(
            f"reward function {spec!r} must look like 'module:function' or 'path/to/file.py:function'"
        )
    is_file = where.endswith(".py") or os.sep in where or "/" in where
    module = _import_file(where, spec) if is_file else _import_module(where, spec)
    if not hasattr(module, attr):
        available = sorted(
            n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
        )
        raise PreftuneError(
            f"reward function {spec!r}: {where!r} has no attribute {attr!r} "
            f"(callables it defines: {', '.join(available[:20]) or 'none'})"
        )
    fn = getattr(module, attr)
    if not callable(fn):
        raise PreftuneError(
            f"reward function {spec!r}: {attr!r} is a {type(fn).__name__}, not a callable"
        )
    return fn


def _import_module(name: str, spec: str):
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise PreftuneError(f"reward function {spec!r}: cannot import module {name!r}: {e}") from e
    except Exception as e:  # the module itself is broken
        raise PreftuneError(
            f"reward function {spec!r}: importing {name!r} raised {type(e).__name__}: {e}"
        ) from e


def _import_file(path: str, spec: str):
    if not os.path.isfile(path):
        raise PreftuneError(f"reward function {spec!r}: file {path!r} does not exist")
    # A unique module name per path, so two files both called rewards.py do not collide.
    module_name = f"_preftune_reward_{abs(hash(os.path.abspath(path)))}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise PreftuneError(f"reward function {spec!r}: cannot import {path!r} as a python file")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # dataclasses/pickle inside the file look themselves up here
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[module_name]
        raise PreftuneError(
            f"reward function {spec!r}: cannot import {path!r}: {type(e).__name__}: {e}"
        ) from e
    return module


class FunctionReward(RewardSource):
    """Calls `fn(prompts, completions, **extra_columns)` and checks what comes back.

    Extra columns (e.g. a reference `answer` per row) are passed by name; a function without
    `**kwargs` receives only the columns it names as parameters.
    """

    def __init__(self, fn: Callable, name: str | None = None, timeout: float = 0.0):
        if not callable(fn):
            raise PreftuneError(f"FunctionReward needs a callable, got {type(fn).__name__}")
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "reward_fn")
        self._wanted = _accepted_keywords(fn)
        self.timeout = timeout  # seconds per call; 0: no limit

    @classmethod
    def from_spec(cls, spec: str, timeout: float = 0.0) -> "FunctionReward":
        return cls(load_function(spec), name=spec.rpartition(":")[2], timeout=timeout)

    def score_with_components(self, prompts, completions, **extra_columns):
        if self._wanted is not None:
            extra_columns = {k: v for k, v in extra_columns.items() if k in self._wanted}
        try:
            out = _call_with_timeout(
                self.fn,
                (prompts, completions),
                extra_columns,
                self.timeout,
                f"reward function {self.name!r}",
            )
        except _Timeout:
            raise
        except Exception as e:
            raise PreftuneError(
                f"reward function {self.name!r} raised {type(e).__name__}: {e}"
            ) from e
        scores = _as_scores(out, len(completions), f"reward function {self.name!r}")
        return scores, {self.name: scores}


def _call_with_timeout(fn: Callable, args: tuple, kwargs: dict, timeout: float, who: str):
    """fn(*args, **kwargs), or a PreftuneError when it has not returned within `timeout` s.

    The call runs in a daemon thread (a Python function cannot be interrupted from outside):
    a hung call is left behind, and the run stops with the error instead of waiting forever.
    """
    if not timeout:
        return fn(*args, **kwargs)
    result: dict = {}

    def target():
        try:
            result["value"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001  (re-raised in the caller's thread)
            result["error"] = e

    thread = threading.Thread(target=target, daemon=True, name="preftune-reward")
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise _Timeout(
            f"{who} did not return within {timeout:g} s (--reward-timeout); it may "
            "hang (a lock, a network call without a timeout), or raise the limit"
        )
    if "error" in result:
        raise result["error"]
    return result["value"]


class _Timeout(PreftuneError):
    pass


def _accepted_keywords(fn) -> set[str] | None:
    """Parameter names `fn` accepts beyond the first two, or None if it takes **kwargs."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # some builtins have no signature: pass everything
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _as_scores(out, n: int, who: str) -> torch.Tensor:
    """Validate a source's output: exactly n finite numbers -> float32 tensor [n] on CPU."""
    if isinstance(out, torch.Tensor):
        scores = out.detach().to("cpu")
    elif (
        isinstance(out, (str, bytes, dict, set))
        or not isinstance(out, Sequence)
        and not hasattr(out, "__array__")
    ):
        raise PreftuneError(
            f"{who} must return a list, array or tensor of {n} numbers (one per completion), "
            f"got {type(out).__name__}"
        )
    else:
        values = list(out) if isinstance(out, Sequence) else out
        try:
            scores = torch.as_tensor(values, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as e:
            bad = (
                next((v for v in values if not _is_number(v)), None)
                if isinstance(values, list)
                else None
            )
            detail = f"; e.g. {bad!r} ({type(bad).__name__})" if bad is not None else f" ({e})"
            raise PreftuneError(
                f"{who} must return {n} numbers, got a {type(out).__name__} with non-numbers{detail}"
            ) from e
    if scores.dim() == 2 and scores.shape[-1] == 1:  # [n, 1], e.g. a model's raw logits
        scores = scores.squeeze(-1)
    if scores.dim() != 1 or scores.shape[0] != n:
        got = f"shape {tuple(scores.shape)}" if scores.dim() != 1 else f"length {scores.shape[0]}"
        raise PreftuneError(
            f"{who} must return {n} numbers (one per completion), got a {type(out).__name__} of {got}"
        )
    if scores.is_complex() or not (scores.is_floating_point() or scores.dtype in _REAL_DTYPES):
        raise PreftuneError(
            f"{who} must return real numbers, got a {type(out).__name__} of dtype {scores.dtype}"
        )
    scores = scores.float()
    bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
    if bad:
        shown = ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else "")
        raise PreftuneError(
            f"{who} returned {len(bad)} non-finite (NaN or inf) scores of {n}, at indices {shown}"
        )
    return scores


_REAL_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) or (
        hasattr(v, "__float__") and not isinstance(v, (str, bytes))
    )


# --------------------------------------------------------------------------- reward models


class ModelReward(RewardSource):
    """Scores prompt + completion with a sequence classifier that has one output.

    Text is the plain concatenation `prompt + completion`; conversational prompts (lists of
    `{role, content}`) are rendered with the tokenizer's chat template, the completion as the
    assistant turn. Rows are right-padded with the model's pad id (the classifier reads the score
    at the last non-pad token), so a row's score does not depend on its batch.
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        batch_size: int = 32,
        max_length: int = 512,
        name: str = "reward_model",
    ):
        num_labels = getattr(model.config, "num_labels", None)
        if num_labels != 1:
            raise PreftuneError(
                f"reward model must have a single output (num_labels=1), this one has num_labels={num_labels}; "
                "pass a reward model trained by `preftune reward`"
            )
        if batch_size < 1 or max_length < 2:
            raise PreftuneError(
                f"ModelReward: batch_size must be >= 1 and max_length >= 2, got {batch_size}, {max_length}"
            )
        if model.config.pad_token_id is None:
            if getattr(tokenizer, "pad_token_id", None) is None:
                raise PreftuneError(
                    "reward model: neither the model config nor the tokenizer defines a pad token; "
                    "set tokenizer.pad_token (e.g. to the EOS token) and model.config.pad_token_id"
                )
            # The classifier finds each row's last token by looking for this id.
            model.config.pad_token_id = tokenizer.pad_token_id
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.max_length, self.name = batch_size, max_length, name

    @classmethod
    def from_pretrained(
        cls, path: str, *, batch_size: int = 32, max_length: int = 512, device=None, dtype=None
    ) -> "ModelReward":
        from transformers import (
            AutoConfig,
            AutoModelForSequenceClassification,
            AutoTokenizer,
        )

        try:
            config = AutoConfig.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise PreftuneError(f"cannot load reward model {path!r}: {e}") from e
        architectures = getattr(config, "architectures", None) or []
        if architectures and not any(
            a.endswith("ForSequenceClassification") for a in architectures
        ):
            raise PreftuneError(
                f"{path!r} is a {', '.join(architectures)} checkpoint without a classification head; "
                "pass a reward model trained by `preftune reward`"
            )
        if config.num_labels != 1:
            raise PreftuneError(
                f"{path!r} has num_labels={config.num_labels}, a reward model has 1; "
                "pass a reward model trained by `preftune reward`"
            )
        kwargs = {"dtype": dtype} if dtype is not None else {}
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path, output_loading_info=True, **kwargs
        )
        missing = [
            k for k in info.get("missing_keys", []) if k.split(".")[0] in ("score", "classifier")
        ]
        if missing:
            raise PreftuneError(
                f"{path!r} has no trained classification head (missing {', '.join(missing)}); "
                "pass a reward model trained by `preftune reward`"
            )
        tokenizer = AutoTokenizer.from_pretrained(path)
        if device is not None:
            model.to(device)
        return cls(
            model, tokenizer, batch_size=batch_size, max_length=max_length, name="reward_model"
        )

    def score_with_components(self, prompts, completions, **extra_columns):
        if len(prompts) != len(completions):
            raise PreftuneError(
                f"reward model: {len(prompts)} prompts but {len(completions)} completions"
            )
        rows = [self._tokenize(p, c) for p, c in zip(prompts, completions)]
        pad_id = self.model.config.pad_token_id
        device = next(self.model.parameters()).device
        scores = torch.empty(len(rows), dtype=torch.float32)
        order = sorted(
            range(len(rows)), key=lambda i: len(rows[i])
        )  # similar lengths share a batch
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                for start in range(0, len(order), self.batch_size):
                    index = order[start : start + self.batch_size]
                    width = max(len(rows[i]) for i in index)
                    input_ids = torch.full((len(index), width), pad_id, dtype=torch.long)
                    attention_mask = torch.zeros((len(index), width), dtype=torch.long)
                    for j, i in enumerate(index):
                        input_ids[j, : len(rows[i])] = torch.tensor(rows[i])
                        attention_mask[j, : len(rows[i])] = 1
                    logits = self.model(
                        input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)
                    ).logits
                    scores[index] = logits.float().reshape(len(index)).cpu()
        finally:
            self.model.train(was_training)
        return scores, {self.name: scores}

    def _tokenize(self, prompt, completion) -> list[int]:
        if isinstance(prompt, list):  # conversation: render it with the chat template
            if not getattr(self.tokenizer, "chat_template", None):
                raise PreftuneError(
                    "reward model: prompts are conversations (lists of messages) but its tokenizer has no chat template"
                )
            answer = (
                completion
                if isinstance(completion, list)
                else [{"role": "assistant", "content": completion}]
            )
            text = self.tokenizer.apply_chat_template(prompt + answer, tokenize=False)
            add_special = False  # the template writes its own BOS
        else:
            text, add_special = prompt + completion, True
        ids = list(
            self.tokenizer(
                text, add_special_tokens=add_special, truncation=True, max_length=self.max_length
            )["input_ids"]
        )
        if not ids:
            raise PreftuneError(
                f"reward model: prompt + completion tokenized to nothing: {text[:80]!r}"
            )
        # `preftune reward` trains on completions that end with EOS (the data path appends it) and
        # the score is read at the last token: score the same layout. Without it a lab reward
        # model ordered its own held-out pairs right 73% of the time instead of 86% (measured).
        eos = self.tokenizer.eos_token_id
        if eos is not None and ids[-1] != eos:
            ids = ids[: self.max_length - 1] + [eos]
        return ids


# --------------------------------------------------------------------------- ensembles

ENSEMBLE_MANIFEST = "ensemble.json"  # written by `preftune reward --ensemble K`


def check_ensemble_settings(agg: str, coef: float, ensemble: bool, source: str) -> None:
    """Refuse ensemble settings that would be silently ignored: a coefficient the aggregation
    does not use, or any setting for a reward `source` that is not an ensemble folder."""
    if not (math.isfinite(coef) and coef >= 0):
        raise PreftuneError(f"ensemble_coef: got {coef}, expected a finite number >= 0")
    if agg not in ("mean-minus-std", "mean-minus-var") and coef != 1.0:
        raise PreftuneError(
            f"ensemble_coef only applies to ensemble_agg mean-minus-std or "
            f"mean-minus-var, not {agg}"
        )
    if (agg != "mean" or coef != 1.0) and not ensemble:
        raise PreftuneError(
            f"ensemble_agg/ensemble_coef need an ensemble: {source or '(none)'!r} "
            f"has no {ENSEMBLE_MANIFEST} (train one with `preftune reward "
            "--ensemble K`)"
        )


ENSEMBLE_AGGS = ("mean", "min", "mean-minus-std", "mean-minus-var")


def is_ensemble(path: str) -> bool:
    return bool(path) and os.path.isfile(os.path.join(os.path.expanduser(path), ENSEMBLE_MANIFEST))


def ensemble_members(path: str) -> list[str]:
    """The member folders named by an ensemble's manifest, checked to exist."""
    import json

    manifest = os.path.join(os.path.expanduser(path), ENSEMBLE_MANIFEST)
    try:
        with open(manifest) as f:
            members = json.load(f)["members"]
        paths = [os.path.join(os.path.expanduser(path), m["path"]) for m in members]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PreftuneError(
            f"{manifest}: not a readable ensemble manifest ({type(e).__name__}: {e}); "
            'expected {"members": [{"path": "member-0"}, ...]}'
        ) from None
    if len(paths) < 2:
        raise PreftuneError(
            f"{manifest}: an ensemble needs at least 2 members, it lists {len(paths)}"
        )
    missing = [p for p in paths if not os.path.isdir(p)]
    if missing:
        raise PreftuneError(f"{manifest}: member folder {missing[0]} does not exist")
    return paths


def aggregate_ensemble(
    scores: torch.Tensor, agg: str, coef: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Members' scores [K, N] -> (aggregated reward [N], members' std [N], population, ddof 0).

    Coste et al. 2023 ("Reward Model Ensembles Help Mitigate Overoptimization", ICLR 2024):
    `mean`; `min`, their worst-case optimisation (WCO), R = min_k R_k; `mean-minus-var`, their
    uncertainty-weighted optimisation (UWO), R = mean_k R_k − coef · Var_k R_k; and
    `mean-minus-std`, R = mean − coef · std, the same penalty on the rewards' own scale.
    """
    if agg not in ENSEMBLE_AGGS:
        raise PreftuneError(
            f"ensemble_agg: got {agg!r}, expected one of {', '.join(ENSEMBLE_AGGS)}"
        )
    if scores.dim() != 2 or scores.shape[0] < 2:
        raise PreftuneError(
            f"an ensemble needs scores of shape [K >= 2, N], got {tuple(scores.shape)}"
        )
    mean = scores.mean(0)
    std = scores.std(0, unbiased=False)
    if agg == "mean":
        total = mean
    elif agg == "min":
        total = scores.min(0).values  # Coste et al. 2023: WCO
    elif agg == "mean-minus-var":
        total = mean - coef * std**2  # Coste et al. 2023: UWO
    else:
        total = mean - coef * std
    return total, std


class EnsembleReward(RewardSource):
    """K reward models scored on the same texts and aggregated (`aggregate_ensemble`).

    Components, for logging: `ensemble_mean`, `ensemble_std` (the members' disagreement) and
    each member's score (`member_0`, ...).
    """

    name = "ensemble"

    def __init__(self, members: list[RewardSource], agg: str = "mean", coef: float = 1.0):
        if len(members) < 2:
            raise PreftuneError(f"an ensemble needs at least 2 members, got {len(members)}")
        if not math.isfinite(coef) or coef < 0:
            raise PreftuneError(f"ensemble_coef: got {coef!r}, expected a finite number >= 0")
        aggregate_ensemble(torch.zeros(2, 1), agg, coef)  # checks `agg`
        self.members, self.agg, self.coef = members, agg, float(coef)

    @classmethod
    def from_folder(
        cls,
        path: str,
        *,
        agg: str = "mean",
        coef: float = 1.0,
        batch_size: int = 32,
        max_length: int = 512,
        device=None,
        dtype=None,
    ) -> EnsembleReward:
        members = [
            ModelReward.from_pretrained(
                p, batch_size=batch_size, max_length=max_length, device=device, dtype=dtype
            )
            for p in ensemble_members(path)
        ]
        return cls(members, agg=agg, coef=coef)

    def score_with_components(self, prompts, completions, **extra_columns):
        scores = torch.stack([m(prompts, completions, **extra_columns) for m in self.members])
        total, std = aggregate_ensemble(scores, self.agg, self.coef)
        components = {"ensemble_mean": scores.mean(0), "ensemble_std": std}
        components.update({f"member_{i}": s for i, s in enumerate(scores)})
        return total, components


# --------------------------------------------------------------------------- combination


class CombinedReward(RewardSource):
    """total = sum_k weight_k * source_k; components are the unweighted scores per source."""

    name = "combined"

    def __init__(self, sources: list[tuple[RewardSource, float]]):
        if not sources:
            raise PreftuneError("CombinedReward needs at least one (source, weight) pair")
        self.sources: list[tuple[str, RewardSource, float]] = []
        seen: dict[str, int] = {}
        for source, weight in sources:
            if not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise PreftuneError(
                    f"reward weight for {source.name!r} must be a finite number, got {weight!r}"
                )
            seen[source.name] = seen.get(source.name, 0) + 1
            name = source.name if seen[source.name] == 1 else f"{source.name}_{seen[source.name]}"
            self.sources.append((name, source, float(weight)))

    def score_with_components(self, prompts, completions, **extra_columns):
        total = torch.zeros(len(completions), dtype=torch.float32)
        components: dict[str, torch.Tensor] = {}
        for name, source, weight in self.sources:
            scores = source(prompts, completions, **extra_columns)
            components[name] = scores
            total = total + weight * scores
        return total, components


def apply_penalties(
    rewards: torch.Tensor,
    finished: list[bool],
    lengths: list[int],
    *,
    missing_eos_penalty: float | None,
    length_penalty: float = 0.0,
) -> torch.Tensor:
    """rewards - missing_eos_penalty * [no EOS] - length_penalty * length (a new tensor).

    The missing-EOS penalty discourages truncated completions, which a reward model otherwise
    often scores well (Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO").
    """
    n = rewards.shape[0]
    if len(finished) != n or len(lengths) != n:
        raise PreftuneError(
            f"apply_penalties: {n} rewards but {len(finished)} finished flags and {len(lengths)} lengths"
        )
    for setting, value in (
        ("missing_eos_penalty", missing_eos_penalty),
        ("length_penalty", length_penalty),
    ):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise PreftuneError(
                f"{setting} is subtracted from the reward and must be a finite number >= 0, got {value!r}"
            )
    out = rewards.float().clone()
    if missing_eos_penalty:
        unfinished = ~torch.tensor(finished, dtype=torch.bool, device=out.device)
        out = out - missing_eos_penalty * unfinished.float()
    if length_penalty:
        out = out - length_penalty * torch.tensor(lengths, dtype=torch.float32, device=out.device)
    return out


def parse_reward_spec(
    reward_model: str | None,
    reward_fn: list[str] | None,
    weights: list[float] | None,
    *,
    batch_size: int = 32,
    max_length: int = 512,
    device=None,
    ensemble_agg: str = "mean",
    ensemble_coef: float = 1.0,
    timeout: float = 0.0,
) -> RewardSource:
    """Build the reward source from the CLI settings: the reward model (if any) first, then the
    functions in order; `weights` gives one weight per source (default all 1).

    A reward-model folder holding an ensemble (`preftune reward --ensemble K`) becomes an
    `EnsembleReward` aggregated by `ensemble_agg` / `ensemble_coef`."""
    sources: list[RewardSource] = []
    if reward_model and is_ensemble(reward_model):
        sources.append(
            EnsembleReward.from_folder(
                reward_model,
                agg=ensemble_agg,
                coef=ensemble_coef,
                batch_size=batch_size,
                max_length=max_length,
                device=device,
            )
        )
    elif reward_model:
        sources.append(
            ModelReward.from_pretrained(
                reward_model, batch_size=batch_size, max_length=max_length, device=device
            )
        )
    for spec in reward_fn or []:
        sources.append(FunctionReward.from_spec(spec, timeout=timeout))
    if not sources:
        raise PreftuneError(
            "no reward source: set reward_model (a path) and/or reward_fn ('module:function')"
        )
    if weights is None:
        return sources[0] if len(sources) == 1 else CombinedReward([(s, 1.0) for s in sources])
    if len(weights) != len(sources):
        names = ", ".join(s.name for s in sources)
        raise PreftuneError(
            f"reward weights: got {len(weights)} weights for {len(sources)} reward sources ({names}); "
            "give one weight per source, the reward model first, then the functions in order"
        )
    return CombinedReward(list(zip(sources, weights)))
