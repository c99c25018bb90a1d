"""Rated completions -> preference pairs with a margin.

Two layouts of rated data:
- `scores`: {"prompt", "completions": [text, ...], "scores": [number, ...]} (preftune's ranked
  format);
- UltraFeedback's: {"prompt", "completions": [{"response": text, "overall_score": number,
  "annotations": {aspect: {"Rating": "4", ...}, ...}}, ...]} (Cui et al. 2023, aspects
  helpfulness, honesty, instruction_following, truthfulness; ratings stored as strings).

The rating of a completion is `overall` (overall_score, or scores), `mean` (the mean of its
aspect ratings: the "fine-grained" score that Ivison et al. 2024, "Unpacking DPO and PPO", found
better than the overall one) or one ASPECT's rating. A rating that is not a number ("N/A",
text) is never guessed at: the completion is left out and reported by row, completion and
aspect. Pairing: best-vs-random (chosen = the best-rated, rejected = a random other one, as in
the Zephyr UltraFeedback-binarized set, Tunstall et al. 2023), best-vs-worst, or all pairs.
A pair whose rating difference is 0 (a tie) or below `min_margin` is dropped and counted.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from preftune.datatools.io import located_rows, source_name, where
from preftune.errors import PreftuneError

PAIRINGS = ("best-vs-random", "best-vs-worst", "all")
_NUMBER = re.compile(r"\s*[-+]?(\d+(\.\d*)?|\.\d+)\s*")
_TEXT_KEYS = ("response", "text", "content", "completion")
EXAMPLES = 20


def parse_rating(value) -> float | None:
    """A rating as a float: a number, or a string that is exactly a number ("4", " 4.5 ");
    None for anything else ("N/A", "4 stars", None, NaN)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str) and _NUMBER.fullmatch(value):
        return float(value)
    return None


def _completion_text(completion):
    if isinstance(completion, (str, list)):
        return completion
    if isinstance(completion, dict):
        for key in _TEXT_KEYS:
            if isinstance(completion.get(key), (str, list)):
                return completion[key]
    return None


def completion_rating(completion, score, rating: str) -> tuple[float | None, str, object]:
    """(rating or None, the field read, its raw value) for one completion."""
    if score is not None or not isinstance(completion, dict):  # the `scores` layout
        return parse_rating(score), "scores", score
    if rating == "overall":
        raw = completion.get("overall_score")
        return parse_rating(raw), "overall_score", raw
    annotations = completion.get("annotations")
    if not isinstance(annotations, dict) or not annotations:
        return None, "annotations", annotations
    aspects = sorted(annotations) if rating == "mean" else [rating]
    values = []
    for aspect in aspects:
        entry = annotations.get(aspect)
        # One annotation per aspect ({"Rating": "4", ...}); some releases hold a list of them.
        entries = entry if isinstance(entry, list) and entry else [entry]
        ratings = []
        for one in entries:
            raw = one.get("Rating") if isinstance(one, dict) else one
            value = parse_rating(raw)
            if value is None:
                return None, f"annotations.{aspect}.Rating", raw
            ratings.append(value)
        values.append(sum(ratings) / len(ratings))
    return sum(values) / len(values), "annotations", None


@dataclass
class BinarizeReport:
    source: str
    rating: str
    pairs: str
    min_margin: float
    seed: int
    n_rows: int = 0
    n_rows_used: int = 0  # rows that gave at least one pair
    n_pairs: int = 0
    ties_dropped: int = 0  # candidate pairs with equal ratings
    below_min_margin_dropped: int = 0  # candidate pairs with 0 < margin < min_margin
    rows_with_fewer_than_two_rated: int = 0
    bad_rows: dict = field(default_factory=dict)  # reason -> count (no prompt, no completions)
    bad_ratings: int = 0  # completions left out because a rating is not a number
    bad_rating_examples: list = field(default_factory=list)


def binarize(
    rows: Iterable[dict],
    *,
    rating: str = "overall",
    pairs: str = "best-vs-random",
    min_margin: float = 0.0,
    seed: int = 0,
    source: str | None = None,
    bad_ratings: list | None = None,
) -> tuple[Iterator[dict], BinarizeReport]:
    """Rated rows -> paired rows {prompt, chosen, rejected, margin, chosen_rating,
    rejected_rating}. Returns a generator and a report complete once it is exhausted;
    `bad_ratings` receives one record per rating that is not a number.

    best-vs-random draws the rejected completion with `random.Random(f"{seed}-{n}").choice`
    over the other rated completions of the n-th row (1-based), so a row's pair does not
    depend on the rows around it. On equal best ratings the first completion is chosen; for
    best-vs-worst the rejected one is the first lowest-rated of the others.
    """
    if pairs not in PAIRINGS:
        raise PreftuneError(f"pairs: got {pairs!r}, expected one of {', '.join(PAIRINGS)}")
    if not rating:
        raise PreftuneError("rating: expected overall, mean or an aspect name")
    if not (math.isfinite(min_margin) and min_margin >= 0):
        raise PreftuneError(f"min_margin: got {min_margin}, expected a number >= 0")
    source = source or source_name(rows)
    report = BinarizeReport(source, rating, pairs, min_margin, seed)

    def bad_row(reason: str) -> None:
        report.bad_rows[reason] = report.bad_rows.get(reason, 0) + 1

    def generate() -> Iterator[dict]:
        for n, (row, origin) in enumerate(located_rows(rows, source), start=1):
            report.n_rows += 1
            prompt = row.get("prompt")
            completions = row.get("completions")
            if not isinstance(prompt, (str, list)) or not prompt:
                bad_row("no_prompt")
                continue
            if not isinstance(completions, list):
                bad_row("no_completions")
                continue
            scores = row.get("scores")
            if scores is not None and (
                not isinstance(scores, list) or len(scores) != len(completions)
            ):
                bad_row("scores_do_not_match_completions")
                continue
            if scores is None and any(not isinstance(c, dict) for c in completions):
                bad_row("no_ratings")  # plain completions need a `scores` list
                continue
            if scores is not None and rating != "overall":
                raise PreftuneError(
                    f"{where(origin)}: rating={rating!r} needs per-aspect "
                    "annotations, but this row has a `scores` list; use "
                    "--rating overall"
                )
            rated = []  # (index, text, rating, completion)
            for i, completion in enumerate(completions):
                value, field_name, raw = completion_rating(
                    completion, None if scores is None else scores[i], rating
                )
                if value is None:
                    report.bad_ratings += 1
                    record = {
                        "row": where(origin),
                        "completion": i,
                        "field": field_name,
                        "value": raw
                        if isinstance(raw, (str, int, float, type(None)))
                        else repr(raw),
                    }
                    if len(report.bad_rating_examples) < EXAMPLES:
                        report.bad_rating_examples.append(record)
                    if bad_ratings is not None:
                        bad_ratings.append(record)
                    continue
                text = _completion_text(completion)
                if text is None:
                    bad_row("completion_without_text")
                    continue
                rated.append((i, text, value, completion))
            if len(rated) < 2:
                report.rows_with_fewer_than_two_rated += 1
                continue
            made = 0
            for hi, lo in _candidate_pairs(rated, pairs, random.Random(f"{seed}-{n}")):
                margin = hi[2] - lo[2]
                if margin == 0:
                    report.ties_dropped += 1
                    continue
                if margin < min_margin:
                    report.below_min_margin_dropped += 1
                    continue
                made += 1
                out = {
                    "prompt": prompt,
                    "chosen": hi[1],
                    "rejected": lo[1],
                    "margin": margin,
                    "chosen_rating": hi[2],
                    "rejected_rating": lo[2],
                }
                for key in ("model",):  # which system wrote each reply, when the data says
                    if isinstance(hi[3], dict) and key in hi[3]:
                        out[f"chosen_{key}"], out[f"rejected_{key}"] = hi[3][key], lo[3].get(key)
                for key in ("subset", "source", "id"):
                    if key in row:
                        out[key] = row[key]
                yield out
            report.n_pairs += made
            report.n_rows_used += bool(made)

    return generate(), report


def _candidate_pairs(rated: list, pairs: str, rng: random.Random) -> list[tuple]:
    """(higher-rated, lower-rated) candidates; ties come out with the first-listed one first."""
    best = max(rated, key=lambda c: c[2])  # max/min return the first of equals
    others = [c for c in rated if c is not best]
    if pairs == "best-vs-worst":
        return [(best, min(others, key=lambda c: c[2]))]
    if pairs == "best-vs-random":
        return [(best, rng.choice(others))]
    out = []
    for a in range(len(rated)):
        for b in range(a + 1, len(rated)):
            x, y = rated[a], rated[b]
            out.append((x, y) if x[2] >= y[2] else (y, x))
    return out
