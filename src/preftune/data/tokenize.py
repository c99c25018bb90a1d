"""Chat templates, tokenization and the one truncation policy every trainer uses.

Policy, for each example (and shared by chosen/rejected of a pair, which share the prompt):

1. Render prompt and completion to text. Two strings are used as they are (concatenated, no
   template). Message lists go through the tokenizer's chat template:
   prompt_text = template(prompt, add_generation_prompt=True) and
   completion_text = template(prompt + completion)[len(prompt_text):]; the template must render
   the prompt as a prefix of the whole conversation.
2. Tokenize separately: the prompt with the tokenizer's leading special tokens (BOS; not
   doubled when the template already wrote it), the completion without special tokens, then
   append EOS to the completion unless it already ends with it.
3. If the prompt is longer than `max_prompt_length`, cut it: "keep_end" keeps its last tokens
   (after the BOS token, which stays first), "keep_start" keeps its first tokens; "error"
   refuses the data instead, naming the example and its length.
4. Cut the completion from the right to fit `max_length`. An example with no completion token
   left to learn from is dropped and counted in the report.

Because `max_prompt_length < max_length` (checked by `TruncationConfig.validate`), some of the
completion always fits; examples are dropped only when no completion token can be trained on
(an empty prompt without BOS and a one-token completion: position 0 is never a completion
token, since nothing precedes it) or when truncation makes the sequences of a pair (or of a
ranking) identical, which would carry no preference signal.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from preftune.data.formats import Pair, PromptExample, Ranked, SFTExample, Text, Unpaired
from preftune.errors import PreftuneError

PROGRESS_MIN_EXAMPLES = 2000
PROMPT_TRUNCATION = ("keep_end", "keep_start", "error")


class PromptTooLong(PreftuneError):
    """A prompt over the limit under prompt_truncation="error"."""


@dataclass
class TruncationConfig:
    max_length: int = 512  # tokens of prompt + completion
    max_prompt_length: int | None = None  # tokens of the prompt; None = max_length // 2
    prompt_truncation: str = (
        "keep_end"  # "keep_end" | "keep_start": which part of a long prompt to keep
    )

    def __post_init__(self):
        self.validate()

    @property
    def prompt_limit(self) -> int:
        if self.max_prompt_length is None:
            return self.max_length // 2
        return self.max_prompt_length

    def validate(self) -> "TruncationConfig":
        if not isinstance(self.max_length, int) or self.max_length < 2:
            raise PreftuneError(f"max_length must be an integer >= 2, got {self.max_length!r}")
        if self.max_prompt_length is not None and (
            not isinstance(self.max_prompt_length, int) or self.max_prompt_length < 1
        ):
            raise PreftuneError(
                f"max_prompt_length must be a positive integer, got {self.max_prompt_length!r}"
            )
        if self.prompt_limit >= self.max_length:
            raise PreftuneError(
                f"max_prompt_length ({self.prompt_limit}) must be smaller than max_length "
                f"({self.max_length}), otherwise a long prompt leaves no room for the completion"
            )
        if self.prompt_truncation not in PROMPT_TRUNCATION:
            raise PreftuneError(
                f"prompt_truncation must be one of {', '.join(PROMPT_TRUNCATION)}, got "
                f"{self.prompt_truncation!r}"
            )
        return self


@dataclass
class TokenizeReport:
    n_examples: int = 0  # examples in
    n_prompt_truncated: int = 0
    n_completion_truncated: int = 0  # examples with at least one completion cut
    n_dropped: dict[str, int] = field(default_factory=dict)  # reason -> examples dropped

    @property
    def n_kept(self) -> int:
        return self.n_examples - sum(self.n_dropped.values())

    def drop(self, reason: str) -> None:
        self.n_dropped[reason] = self.n_dropped.get(reason, 0) + 1

    def summary(self) -> str:
        text = (
            f"{self.n_examples} examples, {self.n_kept} kept; prompt truncated in "
            f"{self.n_prompt_truncated}, completion truncated in {self.n_completion_truncated}"
        )
        if self.n_dropped:
            text += "; dropped " + ", ".join(f"{k}: {v}" for k, v in sorted(self.n_dropped.items()))
        return text


# --- chat templates -------------------------------------------------------------------------


def load_chat_template(path: str | Path) -> str:
    """Read a Jinja chat template file."""
    p = Path(path)
    if not p.is_file():
        raise PreftuneError(f"chat template {str(path)!r}: no such file")
    text = p.read_text(encoding="utf-8")
    if not text.strip():
        raise PreftuneError(f"chat template {str(path)!r}: the file is empty")
    return text


def set_chat_template(tokenizer, path: str | Path) -> None:
    """Install the Jinja template in `path` on the tokenizer, after checking that it renders."""
    tokenizer.chat_template = load_chat_template(path)
    probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    try:
        render(tokenizer, probe[:1], probe[1:])
    except PreftuneError as e:
        raise PreftuneError(f"chat template {str(path)!r}: {e}") from None
    except Exception as e:  # Jinja syntax or runtime errors
        raise PreftuneError(f"chat template {str(path)!r} does not render: {e}") from None


def _apply_template(tokenizer, messages: list, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def render(tokenizer, prompt: Text, completion: Text | None) -> tuple[str, str]:
    """(prompt, completion) -> (prompt_text, completion_text); see the module docstring."""
    if isinstance(prompt, str) and (completion is None or isinstance(completion, str)):
        return prompt, completion or ""
    if not isinstance(prompt, list) or not (completion is None or isinstance(completion, list)):
        raise PreftuneError(
            "prompt and completion must both be strings or both message lists, got "
            f"{type(prompt).__name__} and {type(completion).__name__}"
        )
    if not getattr(tokenizer, "chat_template", None):
        raise PreftuneError(
            "the data has chat messages but the tokenizer has no chat template; pass a Jinja "
            "template file with --chat-template"
        )
    prompt_text = _apply_template(tokenizer, prompt, add_generation_prompt=True)
    if completion is None:
        return prompt_text, ""
    full = _apply_template(tokenizer, prompt + completion, add_generation_prompt=False)
    if not full.startswith(prompt_text):
        raise PreftuneError(
            "the chat template does not render the prompt (with the generation prompt) as a "
            "prefix of the whole conversation, so the completion tokens cannot be located; "
            f"prompt renders as {prompt_text[-60:]!r}, conversation as "
            f"{full[: len(prompt_text)][-60:]!r}... Pass a template with --chat-template"
        )
    return prompt_text, full[len(prompt_text) :]


# --- tokenization ---------------------------------------------------------------------------


class _Tokens:
    """Tokenizer facts computed once: leading special tokens, EOS."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.eos = tokenizer.eos_token_id
        if self.eos is None:
            raise PreftuneError(
                "the tokenizer has no eos_token; set one (e.g. in tokenizer_config.json)"
            )
        # Leading special tokens the tokenizer adds (BOS, if any); trailing ones (e.g. a
        # BERT-style [SEP]) are not wanted in a prompt that a completion follows.
        probe = "a"
        with_special = tokenizer(probe, add_special_tokens=True)["input_ids"]
        plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
        k = 0
        while k + len(plain) <= len(with_special) and with_special[k : k + len(plain)] != plain:
            k += 1
        self.prefix = list(with_special[:k]) if k + len(plain) <= len(with_special) else []

    def encode(self, text: str) -> list[int]:
        if not text:
            return []
        # verbose=False: texts longer than the model are expected here; truncation follows.
        return list(self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])

    def prompt_ids(self, text: str) -> list[int]:
        ids = self.encode(text)
        if self.prefix and ids[: len(self.prefix)] == self.prefix:
            return ids  # the chat template already wrote the BOS token
        return self.prefix + ids

    def completion_ids(self, text: str) -> list[int]:
        ids = self.encode(text)
        if not ids or ids[-1] != self.eos:
            ids.append(self.eos)
        return ids


def _cut_prompt(ids: list[int], limit: int, how: str, prefix: list[int]) -> tuple[list[int], bool]:
    if len(ids) <= limit:
        return ids, False
    if how == "error":
        raise PromptTooLong(f"a prompt is {len(ids)} tokens long, over max_prompt_length={limit}")
    if how == "keep_start":
        return ids[:limit], True
    keep = prefix if prefix and ids[: len(prefix)] == prefix and len(prefix) < limit else []
    tail = limit - len(keep)
    return keep + ids[len(ids) - tail :], True


def _sequence(prompt_ids: list[int], completion_ids: list[int], max_length: int):
    """-> (sequence feature, completion truncated?) or (None, _) if no completion token remains."""
    room = max_length - len(prompt_ids)
    cut = len(completion_ids) > room
    completion_ids = completion_ids[:room]
    input_ids = prompt_ids + completion_ids
    mask = [0] * len(prompt_ids) + [1] * len(completion_ids)
    if mask:
        mask[0] = 0  # position 0 has no context to be predicted from
    if sum(mask) == 0:
        return None, cut
    return {"input_ids": input_ids, "completion_mask": mask, "prompt_length": len(prompt_ids)}, cut


def _progress(items: list, progress: bool | None, desc: str) -> Iterable:
    if progress is None:
        progress = len(items) > PROGRESS_MIN_EXAMPLES and sys.stderr.isatty()
    if not progress:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="ex")


class _Encoder:
    """Tokenize a prompt once and any number of completions after it, under one policy."""

    def __init__(self, tokenizer, trunc: TruncationConfig, report: TokenizeReport):
        trunc.validate()
        self.tokens = _Tokens(tokenizer)
        self.tokenizer = tokenizer
        self.trunc = trunc
        self.report = report
        self.index = 0  # 1-based number of the example being encoded, for error messages

    def sequences(self, prompt: Text, completions: list[Text], origin: str | None = None):
        """-> list of sequence features (None for a completion with nothing left)."""
        prompt_text = None
        completion_texts = []
        for completion in completions:
            p_text, c_text = render(self.tokenizer, prompt, completion)
            if prompt_text is not None and p_text != prompt_text:  # same prompt, same template
                raise PreftuneError("the chat template renders the same prompt differently")
            prompt_text = p_text
            completion_texts.append(c_text)
        self.index += 1
        try:
            prompt_ids, prompt_cut = _cut_prompt(
                self.tokens.prompt_ids(prompt_text),
                self.trunc.prompt_limit,
                self.trunc.prompt_truncation,
                self.tokens.prefix,
            )
        except PromptTooLong as exc:
            where = f"{origin} (example {self.index})" if origin else f"example {self.index}"
            raise PreftuneError(
                f"{where}: {exc} (prompt_truncation=error; use "
                "keep_end or keep_start to truncate instead)"
            ) from None
        self.report.n_prompt_truncated += prompt_cut
        features, any_cut = [], False
        for text in completion_texts:
            feature, cut = _sequence(
                prompt_ids, self.tokens.completion_ids(text), self.trunc.max_length
            )
            features.append(feature)
            any_cut |= cut
        self.report.n_completion_truncated += any_cut
        return features


def tokenize_sft(tokenizer, examples: list[SFTExample], trunc: TruncationConfig, progress=None):
    """SFT examples -> (sequence features, report)."""
    report = TokenizeReport(n_examples=len(examples))
    enc = _Encoder(tokenizer, trunc, report)
    features = []
    for ex in _progress(examples, progress, "tokenize"):
        (seq,) = enc.sequences(ex.prompt, [ex.completion], getattr(ex, "origin", None))
        if seq is None:
            report.drop("no_completion_tokens")
            continue
        features.append(seq)
    return features, report


def tokenize_unpaired(tokenizer, examples: list[Unpaired], trunc: TruncationConfig, progress=None):
    """Unpaired examples -> (sequence features with "label", report)."""
    report = TokenizeReport(n_examples=len(examples))
    enc = _Encoder(tokenizer, trunc, report)
    features = []
    for ex in _progress(examples, progress, "tokenize"):
        (seq,) = enc.sequences(ex.prompt, [ex.completion], getattr(ex, "origin", None))
        if seq is None:
            report.drop("no_completion_tokens")
            continue
        features.append({**seq, "label": bool(ex.label)})
    return features, report


def tokenize_pairs(tokenizer, examples: list[Pair], trunc: TruncationConfig, progress=None):
    """Pairs -> (pair features, report). Chosen and rejected share one truncated prompt."""
    report = TokenizeReport(n_examples=len(examples))
    enc = _Encoder(tokenizer, trunc, report)
    features = []
    for ex in _progress(examples, progress, "tokenize"):
        chosen, rejected = enc.sequences(
            ex.prompt, [ex.chosen, ex.rejected], getattr(ex, "origin", None)
        )
        if chosen is None or rejected is None:
            report.drop("no_completion_tokens")
            continue
        if chosen["input_ids"] == rejected["input_ids"]:
            report.drop("identical_after_truncation")
            continue
        feature = {
            "chosen_input_ids": chosen["input_ids"],
            "chosen_completion_mask": chosen["completion_mask"],
            "rejected_input_ids": rejected["input_ids"],
            "rejected_completion_mask": rejected["completion_mask"],
            "prompt_length": chosen["prompt_length"],
        }
        if ex.margin is not None:
            feature["margin"] = float(ex.margin)
        if ex.subset is not None:
            feature["subset"] = ex.subset
        features.append(feature)
    return features, report


def tokenize_ranked(tokenizer, examples: list[Ranked], trunc: TruncationConfig, progress=None):
    """Ranked lists -> (features {"sequences": [sequence, ...], "scores": [...]}, report)."""
    report = TokenizeReport(n_examples=len(examples))
    enc = _Encoder(tokenizer, trunc, report)
    features = []
    for ex in _progress(examples, progress, "tokenize"):
        seqs = enc.sequences(ex.prompt, list(ex.completions), getattr(ex, "origin", None))
        if any(s is None for s in seqs):
            report.drop("no_completion_tokens")
            continue
        if len({tuple(s["input_ids"]) for s in seqs}) < len(seqs):
            report.drop("identical_after_truncation")
            continue
        features.append({"sequences": seqs, "scores": [float(s) for s in ex.scores]})
    return features, report


def tokenize_prompts(
    tokenizer,
    examples: list[PromptExample],
    max_prompt_length: int,
    prompt_truncation: str = "keep_end",
    progress=None,
):
    """Prompts for generation -> (features {"prompt_ids", "prompt", "extra"}, report)."""
    if not isinstance(max_prompt_length, int) or max_prompt_length < 1:
        raise PreftuneError(
            f"max_prompt_length must be a positive integer, got {max_prompt_length!r}"
        )
    if prompt_truncation not in PROMPT_TRUNCATION:
        raise PreftuneError(
            f"prompt_truncation must be one of {', '.join(PROMPT_TRUNCATION)}, got "
            f"{prompt_truncation!r}"
        )
    tokens = _Tokens(tokenizer)
    report = TokenizeReport(n_examples=len(examples))
    features = []
    for index, ex in enumerate(_progress(examples, progress, "tokenize"), start=1):
        prompt_text, _ = render(tokenizer, ex.prompt, None)
        try:
            ids, cut = _cut_prompt(
                tokens.prompt_ids(prompt_text), max_prompt_length, prompt_truncation, tokens.prefix
            )
        except PromptTooLong as exc:
            origin = getattr(ex, "origin", None)
            where = f"{origin} (prompt {index})" if origin else f"prompt {index}"
            raise PreftuneError(f"{where}: {exc}") from None
        report.n_prompt_truncated += cut
        if not ids:
            report.drop("empty_prompt")
            continue
        features.append({"prompt_ids": ids, "prompt": ex.prompt, "extra": dict(ex.extra)})
    return features, report
