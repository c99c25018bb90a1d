"""Preference pairs one row at a time, by the same rules training applies.

Training converts a whole list at once (`data.formats.to_pairs`); a streaming pass needs the
same check row by row. These helpers call the very row readers `to_pairs` uses, so a row that
training would skip is counted here under the same reason (empty_text, chosen_equals_rejected,
no_common_prompt, wrong_type, bad_ranking, malformed_messages).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

from preftune.data.formats import (
    FORMATS,
    Pair,
    _BadRow,  # the row readers' "skip this row, for this reason" signal
    _ranked_to_pairs,
    _read_pair,
    _read_ranked,
    detect_format,
)
from preftune.errors import PreftuneError

PAIR_FORMATS = ("paired", "implicit_paired", "ranked")
DETECT_ROWS = 1000  # rows read to detect the format of a stream

BadRow = _BadRow


def detect_stream_format(
    rows: Iterable[dict], source: str, accepted=PAIR_FORMATS
) -> tuple[str, set]:
    """(format, columns) of the first `DETECT_ROWS` rows (training looks at all rows; a stream
    cannot afford a pass just for this), refused unless the format is one of `accepted`.
    `rows` must be re-iterable (a list, a Dataset, a RowStream): this reads its head."""
    head = list(itertools.islice(iter(rows), DETECT_ROWS))
    fmt = detect_format(head, source)
    columns = set().union(*head)
    if fmt not in accepted:
        raise PreftuneError(
            f"{source}: format {fmt} ({', '.join(FORMATS[fmt])}) is not preference data; "
            "accepted formats: "
            + "; ".join(f"{name} ({', '.join(FORMATS[name])})" for name in accepted)
        )
    return fmt, columns


def row_pairs(
    row: dict, fmt: str, *, has_margin: bool = False, ranked_pairs: str = "all"
) -> list[Pair]:
    """The pairs training would make of one row; raises BadRow (with `.reason`) otherwise."""
    if fmt == "ranked":
        subset = row.get("subset") if isinstance(row.get("subset"), str) else None
        return _ranked_to_pairs(_read_ranked(row), ranked_pairs, subset)
    return [_read_pair(row, fmt, has_margin)]


def text_of(value) -> str:
    """A prompt or reply as plain text: a string as is, messages as 'role: content' lines."""
    if isinstance(value, str):
        return value
    return "\n".join(f"{m.get('role', '')}: {m.get('content', '')}" for m in value)


def pair_row(pair: Pair, extra: dict | None = None) -> dict:
    """A pair as an explicit `paired` row (prompt, chosen, rejected [, margin, subset])."""
    row = {"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected}
    if pair.margin is not None:
        row["margin"] = pair.margin
    if pair.subset is not None:
        row["subset"] = pair.subset
    if extra:
        row.update(extra)
    return row
