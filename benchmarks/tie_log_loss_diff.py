"""Paired differences of the three-way log loss between eval-rm runs on the same tie data.

    python benchmarks/tie_log_loss_diff.py --data tie-data/test.jsonl --baseline eval-bt eval-rk ...

Reads each run's scores.jsonl (pairs of the eval split: `tie_split == "eval"`), prints every
run's log loss minus the baseline's, pair by pair, with a 95% normal interval, and the log loss
of the Davidson model that generated the data (benchmarks/make_tie_data.py, ν read from
floor.json next to the data) on the same pairs.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from make_tie_data import NEGATIVE, POSITIVE, davidson


def pair_nll(run: Path) -> dict[int, float]:
    out = {}
    for line in (run / "scores.jsonl").read_text().splitlines():
        s = json.loads(line)
        if s.get("tie_split") == "eval":  # the first reply of a stored pair is the winner
            out[s["pair"]] = -math.log(max(s["p_tie"] if s["tie"] else s["p_win"], 1e-12))
    return out


def quality(text: str) -> int:
    words = text.split()
    return sum(w in POSITIVE for w in words) - sum(w in NEGATIVE for w in words)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--baseline", required=True)
    parser.add_argument("runs", nargs="+")
    args = parser.parse_args()
    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines()]
    nu = json.loads((Path(args.data).parent / "floor.json").read_text())["nu"]
    base = pair_nll(Path(args.baseline))
    gen = []
    for i in base:
        pa, pt, pb = davidson(quality(rows[i]["response_a"]), quality(rows[i]["response_b"]), nu)
        gen.append(-math.log({"a": pa, "tie": pt, "b": pb}[rows[i]["winner"]]))
    print(
        f"{len(base)} eval-split pairs; baseline {args.baseline}: log loss "
        f"{sum(base.values()) / len(base):.4f}; generating model: {sum(gen) / len(gen):.4f}"
    )
    for run in args.runs:
        other = pair_nll(Path(run))
        d = [other[i] - base[i] for i in base]
        m = sum(d) / len(d)
        half = 1.96 * math.sqrt(sum((x - m) ** 2 for x in d) / (len(d) - 1) / len(d))
        print(
            f"{run}: log loss {sum(other.values()) / len(other):.4f}, minus baseline "
            f"{m:+.4f} [{m - half:+.4f}, {m + half:+.4f}]"
        )


if __name__ == "__main__":
    main()
