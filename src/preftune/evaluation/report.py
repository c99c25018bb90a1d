"""The eval-rm report's aligned text table (JSON goes through `preftune.utils.atomic_write_json`)."""

from __future__ import annotations

from collections.abc import Sequence

from preftune.evaluation.stats import Row


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def format_table(rows: Sequence[Row], *, confidence: float = 0.95) -> str:
    """Aligned text table: name, n, accuracy, CI; rows with a warning get a `*` and a footnote.

    `confidence` only labels the CI column: pass the level the rows were computed with.
    """
    header = ["subset", "n", "accuracy", f"{100 * confidence:g}% CI"]
    body = []
    notes = []
    for row in rows:
        name = row.name
        if row.warning:
            name += "*"
            notes.append(f"* {row.name}: {row.warning}")
        body.append(
            [name, str(row.n), _pct(row.accuracy), f"[{_pct(row.ci_low)}, {_pct(row.ci_high)}]"]
        )
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        # Name left-aligned, numbers right-aligned so the decimal points line up.
        parts = [cells[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]
        return "  ".join(parts).rstrip()

    lines = [line(header), "  ".join("-" * w for w in widths)]
    lines += [line(r) for r in body]
    return "\n".join(lines + notes) + "\n"
