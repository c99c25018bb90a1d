"""Dataset formats: detect them from column names and normalise rows into typed examples.

Formats (columns; extra columns are allowed):

    language_modeling   text
    prompt_completion   prompt, completion
    conversational      messages
    arena               prompt, response_a, response_b, winner   (winner: a, b or tie)
    paired              prompt, chosen, rejected         (+ margin, subset, tie)
    implicit_paired     chosen, rejected                 (prompt = their common prefix; + tie)
    unpaired            prompt, completion, label
    ranked              prompt, completions, scores
    prompt_only         prompt

A prompt or completion is either a string or a list of {"role", "content"} messages.

Each converter (`to_sft`, `to_pairs`, `to_unpaired`, `to_ranked`, `to_prompts`) returns the
examples and a `DataReport`. A bad row (missing field, wrong type, empty text, chosen ==
rejected, malformed messages, non-boolean label, bad ranking) raises a `PreftuneError` naming
the row and field with `on_bad_row="error"`, or is counted under its reason with "skip".

Ties: a pair with `tie` true, two completions of a ranked row with equal scores, or an arena
row with `winner: tie` is a tied pair (`Pair.tie`, its two replies in `chosen`/`rejected` in no
particular order). `to_pairs(..., ties="keep")` returns them (the tie-aware reward losses);
`ties="drop"` (the default, for Bradley-Terry and DPO, which have no tie outcome) leaves them
out and counts them in `DataReport.n_ties`, never turning a tie into a coin-flipped preference.
`to_sft` and `to_unpaired` skip tied pairs (reason "tie"); `to_ranked` gives them equal scores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Union

from preftune.errors import PreftuneError

Messages = list  # list of {"role": str, "content": str}
Text = Union[str, Messages]

# Detection order: the most specific column sets first.
FORMATS: dict[str, tuple[str, ...]] = {
    "arena": ("prompt", "response_a", "response_b", "winner"),
    "ranked": ("prompt", "completions", "scores"),
    "unpaired": ("prompt", "completion", "label"),
    "paired": ("prompt", "chosen", "rejected"),
    "implicit_paired": ("chosen", "rejected"),
    "prompt_completion": ("prompt", "completion"),
    "conversational": ("messages",),
    "language_modeling": ("text",),
    "prompt_only": ("prompt",),
}
ASSISTANT_MARKERS = ("Assistant:",)  # HH layout "\n\nHuman: ...\n\nAssistant: ..."
# Arena `winner` values: preftune's a/b/tie, and Chatbot Arena's own (lmsys arena conversation
# dumps: model_a, model_b, tie, "tie (bothbad)"); matched case-insensitively.
ARENA_WINNERS = {
    "a": "a",
    "b": "b",
    "tie": "tie",
    "model_a": "a",
    "model_b": "b",
    "tie (bothbad)": "tie",
    "tie_bothbad": "tie",
}
TIE_MODES = ("drop", "keep")


@dataclass
class SFTExample:
    prompt: Text
    completion: Text
    origin: str | None = field(default=None, compare=False, repr=False)  # "file, line N"


@dataclass
class Pair:
    prompt: Text
    chosen: Text
    rejected: Text
    margin: float | None = None
    subset: str | None = None
    tie: bool = False  # a tie: neither reply preferred (chosen/rejected are just the two replies)
    origin: str | None = field(default=None, compare=False, repr=False)  # "file, line N"


@dataclass
class Unpaired:
    prompt: Text
    completion: Text
    label: bool
    origin: str | None = field(default=None, compare=False, repr=False)  # "file, line N"


@dataclass
class Ranked:
    prompt: Text
    completions: list
    scores: list[float]
    origin: str | None = field(default=None, compare=False, repr=False)  # "file, line N"


@dataclass
class PromptExample:
    prompt: Text
    extra: dict = field(default_factory=dict)
    origin: str | None = field(default=None, compare=False, repr=False)  # "file, line N"


@dataclass
class DataReport:
    """What a converter did with a data source."""

    source: str
    format: str
    n_rows: int = 0
    n_kept: int = 0  # rows that produced examples
    n_examples: int = 0  # examples produced (a ranked row gives several pairs, ...)
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> number of rows
    first_problem: dict[str, str] = field(default_factory=dict)  # reason -> first message
    n_ties: int = 0  # tied pairs met (kept or dropped, as `ties` says)
    ties: str = "drop"

    def summary(self) -> str:
        text = f"{self.source}: format {self.format}, {self.n_rows} rows, {self.n_kept} kept"
        if self.n_examples != self.n_kept:
            text += f" ({self.n_examples} examples)"
        if self.n_ties and self.ties == "drop":
            text += (
                f"; {self.n_ties} tied pairs dropped (Bradley-Terry and DPO have no tie "
                "outcome; reward --loss rao-kupper, davidson or three-way learns from them)"
            )
        elif self.n_ties:
            text += f"; {self.n_ties} of the pairs are ties"
        if self.skipped:
            reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items()))
            text += f"; skipped {sum(self.skipped.values())} ({reasons})"
            first = next(iter(self.first_problem.values()), None)
            if first:
                text += f"; first: {first}"
        return text


class _TieRow(Exception):
    """A row that holds only tied pairs, which the caller asked to drop (not a bad row)."""


class _BadRow(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


def detect_format(rows: list[dict], source: str) -> str:
    """Name the format of `rows` from their columns (the union over all rows)."""
    if not rows:
        raise PreftuneError(f"{source}: no rows")
    columns: set[str] = set()
    for row in rows:
        columns.update(row)
    for name, needed in FORMATS.items():
        if all(c in columns for c in needed):
            return name
    accepted = "; ".join(f"{name} ({', '.join(cols)})" for name, cols in FORMATS.items())
    raise PreftuneError(
        f"{source}: unrecognised columns {sorted(columns)}; accepted formats: {accepted}. "
        "Rename columns with a column map, e.g. 'prompt=question'"
    )


# --- field checks -----------------------------------------------------------------------


def _get(row: dict, name: str) -> Any:
    value = row.get(name)
    if value is None:
        raise _BadRow("missing_field", f"field {name!r} is missing or null")
    return value


def _check_messages(value: Any, name: str) -> list:
    if not isinstance(value, list) or not value:
        raise _BadRow("malformed_messages", f"field {name!r} must be a non-empty message list")
    for i, m in enumerate(value):
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise _BadRow(
                "malformed_messages",
                f"field {name!r}, message {i}: expected {{'role': str, 'content': str}}, "
                f"got {_short(m)}",
            )
    return value


def _check_text(value: Any, name: str, *, allow_messages: bool = True) -> Text:
    """A non-empty string, or (if allowed) a well-formed message list with some content."""
    if isinstance(value, str):
        if not value.strip():
            raise _BadRow("empty_text", f"field {name!r} is empty")
        return value
    if allow_messages and isinstance(value, list):
        _check_messages(value, name)
        if not any(m["content"].strip() for m in value):
            raise _BadRow("empty_text", f"field {name!r} has only empty messages")
        return value
    expected = "a string or a message list" if allow_messages else "a string"
    raise _BadRow("wrong_type", f"field {name!r} must be {expected}, got {_short(value)}")


def _check_completion(value: Any, name: str, prompt: Text) -> Text:
    value = _check_text(value, name)
    if isinstance(prompt, list) != isinstance(value, list):
        raise _BadRow(
            "wrong_type",
            f"field {name!r} must be of the same kind as 'prompt' (both strings or both "
            f"message lists), got {type(value).__name__} with a {type(prompt).__name__} prompt",
        )
    if isinstance(value, list) and value[0]["role"] != "assistant":
        raise _BadRow(
            "malformed_messages",
            f"field {name!r} must start with an assistant message, got role {value[0]['role']!r}",
        )
    return value


def _check_label(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise _BadRow(
        "bad_label",
        f"field 'label' must be a boolean (true/false, 1/0), got {_short(value)}",
    )


def _check_number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _BadRow("wrong_type", f"field {name!r} must be a finite number, got {_short(value)}")
    return float(value)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# --- per-format row readers ---------------------------------------------------------------


def _split_conversation(row: dict) -> tuple[list, list]:
    """messages -> (messages before the last assistant turn, [last assistant message])."""
    messages = _check_messages(_get(row, "messages"), "messages")
    if messages[-1]["role"] != "assistant":
        raise _BadRow(
            "malformed_messages",
            f"field 'messages' must end with an assistant message, got role "
            f"{messages[-1]['role']!r}",
        )
    if len(messages) < 2:
        raise _BadRow("malformed_messages", "field 'messages' has no prompt before the reply")
    if not messages[-1]["content"].strip():
        raise _BadRow("empty_text", "field 'messages': the last assistant message is empty")
    return messages[:-1], messages[-1:]


def _read_pair(row: dict, fmt: str, has_margin: bool) -> Pair:
    if fmt == "paired":
        prompt = _check_text(_get(row, "prompt"), "prompt")
        chosen = _check_completion(_get(row, "chosen"), "chosen", prompt)
        rejected = _check_completion(_get(row, "rejected"), "rejected", prompt)
    else:
        prompt, chosen, rejected = _implicit(row)
    if chosen == rejected:
        raise _BadRow("chosen_equals_rejected", "fields 'chosen' and 'rejected' are identical")
    margin = _check_number(_get(row, "margin"), "margin") if has_margin else None
    subset = row.get("subset")
    if subset is not None and not isinstance(subset, str):
        raise _BadRow("wrong_type", f"field 'subset' must be a string, got {_short(subset)}")
    tie = _check_tie(row["tie"]) if row.get("tie") is not None else False
    return Pair(prompt, chosen, rejected, margin=margin, subset=subset, tie=tie)


def _check_tie(value: Any) -> bool:
    try:
        return _check_label(value)
    except _BadRow:
        raise _BadRow(
            "bad_tie", f"field 'tie' must be a boolean (true/false, 1/0), got {_short(value)}"
        ) from None


def _read_arena(row: dict, has_margin: bool) -> Pair:
    """prompt, response_a, response_b, winner -> a Pair with the winner as `chosen`."""
    prompt = _check_text(_get(row, "prompt"), "prompt")
    a = _check_completion(_get(row, "response_a"), "response_a", prompt)
    b = _check_completion(_get(row, "response_b"), "response_b", prompt)
    winner = _get(row, "winner")
    key = winner.strip().lower() if isinstance(winner, str) else None
    if key not in ARENA_WINNERS:
        raise _BadRow(
            "bad_winner",
            f"field 'winner' must be one of {', '.join(ARENA_WINNERS)}, got {_short(winner)}",
        )
    if a == b:
        raise _BadRow(
            "chosen_equals_rejected", "fields 'response_a' and 'response_b' are identical"
        )
    margin = _check_number(_get(row, "margin"), "margin") if has_margin else None
    subset = row.get("subset")
    if subset is not None and not isinstance(subset, str):
        raise _BadRow("wrong_type", f"field 'subset' must be a string, got {_short(subset)}")
    outcome = ARENA_WINNERS[key]
    chosen, rejected = (b, a) if outcome == "b" else (a, b)
    return Pair(prompt, chosen, rejected, margin=margin, subset=subset, tie=outcome == "tie")


def _implicit(row: dict) -> tuple[Text, Text, Text]:
    chosen = _check_text(_get(row, "chosen"), "chosen")
    rejected = _check_text(_get(row, "rejected"), "rejected")
    if isinstance(chosen, list) != isinstance(rejected, list):
        raise _BadRow(
            "wrong_type", "fields 'chosen' and 'rejected' must both be strings or message lists"
        )
    if chosen == rejected:
        raise _BadRow("chosen_equals_rejected", "fields 'chosen' and 'rejected' are identical")
    try:
        prompt, c, r = split_implicit_prompt(chosen, rejected)
    except ValueError as e:
        raise _BadRow("no_common_prompt", str(e)) from None
    for name, part in (("chosen", c), ("rejected", r)):
        text = part if isinstance(part, str) else "".join(m["content"] for m in part)
        if not text.strip():
            raise _BadRow("empty_text", f"field {name!r} has an empty reply after the prompt")
    return prompt, c, r


def _read_ranked(row: dict) -> Ranked:
    prompt = _check_text(_get(row, "prompt"), "prompt")
    completions = _get(row, "completions")
    scores = _get(row, "scores")
    if not isinstance(completions, list) or not isinstance(scores, list):
        raise _BadRow("wrong_type", "fields 'completions' and 'scores' must be lists")
    if len(completions) != len(scores) or len(completions) < 2:
        raise _BadRow(
            "bad_ranking",
            f"fields 'completions' and 'scores' must be lists of the same length >= 2, got "
            f"{len(completions)} completions and {len(scores)} scores",
        )
    completions = [
        _check_completion(c, f"completions[{i}]", prompt) for i, c in enumerate(completions)
    ]
    scores = [_check_number(s, f"scores[{i}]") for i, s in enumerate(scores)]
    return Ranked(prompt, completions, scores)


def _ranked_to_pairs(ex: Ranked, mode: str, subset: str | None) -> list[Pair]:
    """All pairs (or best vs worst); completions with equal scores give tied pairs."""
    k = len(ex.completions)
    if mode == "best_worst":
        best = max(range(k), key=lambda i: ex.scores[i])
        worst = min(range(k), key=lambda i: ex.scores[i])
        if best == worst:  # all scores equal
            best, worst = 0, k - 1
        index_pairs = [(best, worst)]
    else:  # every pair; the higher-scored completion is chosen
        index_pairs = [
            (i, j) if ex.scores[i] >= ex.scores[j] else (j, i)
            for i in range(k)
            for j in range(i + 1, k)
        ]
    pairs = []
    for hi, lo in index_pairs:
        tie = ex.scores[hi] == ex.scores[lo]
        if ex.completions[hi] == ex.completions[lo]:
            if tie:
                continue  # the same text twice, scored the same: nothing to compare
            raise _BadRow(
                "chosen_equals_rejected",
                f"fields 'completions[{hi}]' and 'completions[{lo}]' are identical",
            )
        pairs.append(
            Pair(ex.prompt, ex.completions[hi], ex.completions[lo], subset=subset, tie=tie)
        )
    if not pairs:
        raise _BadRow("bad_ranking", "fields 'completions': all completions are the same text")
    return pairs


# --- the converter loop -------------------------------------------------------------------


def _convert(rows, source, on_bad_row, purpose, accepted, make) -> tuple[list, DataReport]:
    """Run `make(row, fmt) -> list of examples` over rows, collecting bad rows."""
    if on_bad_row not in ("error", "skip"):
        raise PreftuneError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    fmt = detect_format(rows, source)
    if fmt not in accepted:
        raise PreftuneError(
            f"{source}: format {fmt} ({', '.join(FORMATS[fmt])}) cannot be used for {purpose}; "
            f"accepted formats: "
            + "; ".join(f"{name} ({', '.join(FORMATS[name])})" for name in accepted)
        )
    where = getattr(rows, "where", None)
    report = DataReport(source=source, format=fmt, n_rows=len(rows))
    out: list = []
    for i, row in enumerate(rows):
        try:
            examples = make(row, fmt)
        except _TieRow:
            report.skipped["tie"] = report.skipped.get("tie", 0) + 1
            continue
        except _BadRow as bad:
            location = where(i) if where else f"{source}, row {i + 1}"
            message = f"{location}: {bad.message}"
            if on_bad_row == "error":
                raise PreftuneError(
                    message + " (use on_bad_row='skip' to skip such rows)"
                ) from None
            report.skipped[bad.reason] = report.skipped.get(bad.reason, 0) + 1
            report.first_problem.setdefault(bad.reason, message)
            continue
        report.n_kept += 1
        location = where(i) if where else f"{source}, row {i + 1}"
        for ex in examples:  # so that later messages (tokenization) can name the file and line
            ex.origin = location
        out.extend(examples)
    report.n_examples = len(out)
    if not out:
        raise PreftuneError(f"no usable rows in {source}: {report.summary()}")
    return out, report


def _columns(rows) -> set[str]:
    columns: set[str] = set()
    for row in rows:
        columns.update(row)
    return columns


def to_sft(rows, source: str, *, on_bad_row: str = "error") -> tuple[list[SFTExample], DataReport]:
    """Rows -> SFT examples. Preference data gives SFT on the chosen replies."""

    def make(row, fmt):
        if fmt == "language_modeling":
            return [SFTExample("", _check_text(_get(row, "text"), "text", allow_messages=False))]
        if fmt == "prompt_completion":
            prompt = _check_text(_get(row, "prompt"), "prompt")
            return [
                SFTExample(prompt, _check_completion(_get(row, "completion"), "completion", prompt))
            ]
        if fmt == "conversational":
            return [SFTExample(*_split_conversation(row))]
        pair = _read_pair(row, fmt, has_margin=False)
        if pair.tie:
            raise _TieRow()  # no preferred reply to imitate
        return [SFTExample(pair.prompt, pair.chosen)]

    accepted = (
        "language_modeling",
        "prompt_completion",
        "conversational",
        "paired",
        "implicit_paired",
    )
    return _convert(rows, source, on_bad_row, "SFT", accepted, make)


def to_pairs(
    rows,
    source: str,
    *,
    on_bad_row: str = "error",
    ranked_pairs: str = "all",
    ties: str = "drop",
) -> tuple[list[Pair], DataReport]:
    """Rows -> preference pairs (arena, paired, implicit_paired, or ranked expanded to pairs).

    `ties="drop"` leaves tied pairs out and counts them (report.n_ties); "keep" returns them
    with `tie=True`. A row whose pairs are all dropped ties is skipped under reason "tie".
    """
    if ranked_pairs not in ("all", "best_worst"):
        raise PreftuneError(f"ranked_pairs must be 'all' or 'best_worst', got {ranked_pairs!r}")
    if ties not in TIE_MODES:
        raise PreftuneError(f"ties must be one of {', '.join(TIE_MODES)}, got {ties!r}")
    has_margin = "margin" in _columns(rows)
    n_ties = 0

    def make(row, fmt):
        nonlocal n_ties
        if fmt == "ranked":
            subset = row.get("subset") if isinstance(row.get("subset"), str) else None
            pairs = _ranked_to_pairs(_read_ranked(row), ranked_pairs, subset)
        elif fmt == "arena":
            pairs = [_read_arena(row, has_margin)]
        else:
            pairs = [_read_pair(row, fmt, has_margin)]
        tied = sum(p.tie for p in pairs)
        n_ties += tied
        if ties == "drop" and tied:
            pairs = [p for p in pairs if not p.tie]
            if not pairs:
                raise _TieRow()
        return pairs

    try:
        out, report = _convert(
            rows,
            source,
            on_bad_row,
            "preference pairs",
            ("arena", "paired", "implicit_paired", "ranked"),
            make,
        )
    except PreftuneError as e:
        if n_ties and ties == "drop":
            raise PreftuneError(
                f"{e}; all {n_ties} usable pairs are ties, which Bradley-Terry "
                "and DPO cannot learn from (use reward --loss rao-kupper, "
                "davidson or three-way)"
            ) from None
        raise
    report.n_ties, report.ties = n_ties, ties
    return out, report


def to_unpaired(
    rows, source: str, *, on_bad_row: str = "error"
) -> tuple[list[Unpaired], DataReport]:
    """Rows -> (prompt, completion, label) examples; a pair gives a True and a False example."""

    def make(row, fmt):
        if fmt == "unpaired":
            prompt = _check_text(_get(row, "prompt"), "prompt")
            completion = _check_completion(_get(row, "completion"), "completion", prompt)
            return [Unpaired(prompt, completion, _check_label(_get(row, "label")))]
        pair = _read_pair(row, fmt, has_margin=False)
        if pair.tie:
            raise _TieRow()  # neither reply is desirable rather than undesirable
        return [
            Unpaired(pair.prompt, pair.chosen, True),
            Unpaired(pair.prompt, pair.rejected, False),
        ]

    return _convert(
        rows,
        source,
        on_bad_row,
        "unpaired feedback",
        ("unpaired", "paired", "implicit_paired"),
        make,
    )


def to_ranked(rows, source: str, *, on_bad_row: str = "error") -> tuple[list[Ranked], DataReport]:
    """Rows -> ranked lists; a pair is a list of two with scores [1, 0]."""

    def make(row, fmt):
        if fmt == "ranked":
            return [_read_ranked(row)]
        pair = _read_pair(row, fmt, has_margin=False)
        return [Ranked(pair.prompt, [pair.chosen, pair.rejected], [0.0 if pair.tie else 1.0, 0.0])]

    return _convert(
        rows, source, on_bad_row, "rankings", ("ranked", "paired", "implicit_paired"), make
    )


def to_prompts(
    rows, source: str, *, on_bad_row: str = "error"
) -> tuple[list[PromptExample], DataReport]:
    """Rows -> prompts for generation; the columns not used for the prompt go into `extra`."""

    def make(row, fmt):
        if fmt == "conversational":
            messages = _check_messages(_get(row, "messages"), "messages")
            if messages[-1]["role"] == "assistant":
                messages = messages[:-1]  # generate the last assistant turn anew
            if not messages:
                raise _BadRow(
                    "malformed_messages", "field 'messages' has no prompt before the reply"
                )
            return [PromptExample(messages, {k: v for k, v in row.items() if k != "messages"})]
        if fmt == "implicit_paired":
            prompt, _, _ = _implicit(row)
            extra = {k: v for k, v in row.items() if k not in ("chosen", "rejected")}
            return [PromptExample(prompt, extra)]
        prompt = _check_text(_get(row, "prompt"), "prompt")
        return [PromptExample(prompt, {k: v for k, v in row.items() if k != "prompt"})]

    accepted = (
        "prompt_only",
        "arena",
        "paired",
        "implicit_paired",
        "unpaired",
        "prompt_completion",
        "ranked",
        "conversational",
    )
    return _convert(rows, source, on_bad_row, "prompts", accepted, make)


# --- implicit prompts -----------------------------------------------------------------------


def split_implicit_prompt(chosen: Text, rejected: Text) -> tuple[Text, Text, Text]:
    """Split two whole dialogues that share their prompt into (prompt, chosen, rejected).

    Strings: the longest common prefix, cut right after the last assistant marker inside it
    (HH layout: the prompt ends with "\\n\\nAssistant:", the replies keep their leading space);
    without a marker, backed off to the last whitespace so no word is split.
    Message lists: the longest common prefix of messages, backed off to end before an
    assistant message. Raises ValueError when the two share nothing or are identical.
    """
    if chosen == rejected:
        raise ValueError("chosen and rejected are identical, no reply to compare")
    if isinstance(chosen, str) and isinstance(rejected, str):
        n = 0
        limit = min(len(chosen), len(rejected))
        while n < limit and chosen[n] == rejected[n]:
            n += 1
        common = chosen[:n]
        cut = max((common.rfind(m) + len(m) if m in common else -1) for m in ASSISTANT_MARKERS)
        if cut < 0:
            # No marker: split before the last whitespace so the replies start with it.
            cut = max(common.rfind(ch) for ch in (" ", "\n", "\t"))
        if cut <= 0 or not common[:cut].strip():
            raise ValueError("chosen and rejected share no prompt (no common prefix)")
        return chosen[:cut], chosen[cut:], rejected[cut:]
    if isinstance(chosen, list) and isinstance(rejected, list):
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        # The replies must start with an assistant message in both dialogues.
        while n > 0 and not (
            n < len(chosen)
            and n < len(rejected)
            and chosen[n].get("role") == "assistant"
            and rejected[n].get("role") == "assistant"
        ):
            n -= 1
        if n == 0:
            raise ValueError(
                "chosen and rejected share no prompt (no common messages before an assistant "
                "message)"
            )
        return chosen[:n], chosen[n:], rejected[n:]
    raise ValueError("chosen and rejected must both be strings or both message lists")
