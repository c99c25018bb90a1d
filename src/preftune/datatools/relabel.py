"""AI-feedback relabelling: a reward source scores both replies of every pair and decides
which is chosen (RLAIF, Bai et al. 2022 "Constitutional AI"; Lee et al. 2023).

The pair is written in the order the reward source prefers, with `margin` = the score
difference (chosen minus rejected, so >= 0), and the report counts the labels that flipped.
With `keep_agreement` the disagreeing pairs are dropped instead of flipped (a filter that
keeps only the pairs the source and the original labels agree on).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from preftune.datatools.io import located_rows, source_name, where
from preftune.datatools.pairs import BadRow, detect_stream_format, row_pairs

BATCH = 64  # pairs scored per call of the reward source


def score_pairs(reward, pairs: list) -> tuple[list[float], list[float]]:
    """(scores of the chosen replies, scores of the rejected replies) of `pairs` (Pair objects),
    in one call of the reward source."""
    prompts = [p.prompt for p in pairs] * 2
    completions = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    scores = reward(prompts, completions).tolist()
    return scores[: len(pairs)], scores[len(pairs) :]


def scored_pairs(
    rows: Iterable[dict], reward, *, source: str, bad: dict, batch_size: int = BATCH
) -> Iterator[tuple[object, str, float, float]]:
    """(Pair, where, chosen score, rejected score) for every pair training would use; rows it
    would skip are counted in `bad` by reason."""
    fmt, columns = detect_stream_format(rows, source)
    has_margin = "margin" in columns
    stream = located_rows(rows, source)
    while True:
        batch = []
        for row, origin in itertools.islice(stream, batch_size):
            try:
                batch.extend((p, where(origin)) for p in row_pairs(row, fmt, has_margin=has_margin))
            except BadRow as e:
                bad[e.reason] = bad.get(e.reason, 0) + 1
        if not batch:
            return
        chosen, rejected = score_pairs(reward, [p for p, _ in batch])
        for (pair, location), c, r in zip(batch, chosen, rejected):
            yield pair, location, c, r


@dataclass
class RelabelReport:
    source: str
    reward: str
    keep_agreement: bool
    n_pairs: int = 0
    n_written: int = 0
    agreed: int = 0
    flipped: int = 0  # written in the other order (or dropped, with keep_agreement)
    ties: int = 0  # equal scores: kept in the original order with margin 0
    bad_rows: dict | None = None


def relabel(
    rows: Iterable[dict],
    reward,
    *,
    keep_agreement: bool = False,
    source: str | None = None,
    batch_size: int = BATCH,
) -> tuple[Iterator[dict], RelabelReport]:
    """Pairs in the order `reward` prefers, with its margin. Returns a generator of paired
    rows and a report complete once it is exhausted."""
    source = source or source_name(rows)
    report = RelabelReport(source, getattr(reward, "name", "reward"), keep_agreement, bad_rows={})

    def generate() -> Iterator[dict]:
        for pair, location, c, r in scored_pairs(
            rows, reward, source=source, bad=report.bad_rows, batch_size=batch_size
        ):
            report.n_pairs += 1
            row = {"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected}
            if c > r:
                report.agreed += 1
            elif c == r:
                report.ties += 1
            else:
                report.flipped += 1
                if keep_agreement:
                    continue
                row["chosen"], row["rejected"] = pair.rejected, pair.chosen
            row.update(margin=abs(c - r), reward_chosen=max(c, r), reward_rejected=min(c, r))
            if pair.subset is not None:
                row["subset"] = pair.subset
            report.n_written += 1
            yield row

    return generate(), report
