"""`preftune data inspect`: what is in a preference data set, in one streaming pass.

Counts rows and the pairs training would make of them (bad rows by the training rules'
reasons), turns per dialogue, lengths of prompt, chosen and rejected (tokens with a tokenizer,
characters otherwise), length bias (how often and by how much the chosen reply is longer),
exact and near-duplicate prompts and pairs, prompts in several pairs, margins and ties, a
per-`subset` breakdown and, with a reward source, how often it agrees with the labels (Wilson
interval) and which pairs it disagrees with most confidently (likely flipped labels).
"""

from __future__ import annotations

import heapq
import itertools
import math
import re
from array import array
from collections.abc import Iterable

import numpy as np

from preftune.datatools.dedup import NearDuplicateFinder, Origins, exact_hash
from preftune.datatools.io import located_rows, source_name, where
from preftune.datatools.pairs import BadRow, detect_stream_format, row_pairs, text_of
from preftune.errors import PreftuneError
from preftune.evaluation.stats import wilson_interval

BATCH = 256  # pairs measured (tokenized, scored) together
EXAMPLES = 5
_HUMAN_TURN = re.compile(r"(?:^|\n\n)Human:")


def count_turns(prompt) -> int:
    """User turns in a prompt: user messages, or "Human:" turns of the HH text layout (a plain
    prompt without markers is one turn)."""
    if isinstance(prompt, list):
        n = sum(1 for m in prompt if isinstance(m, dict) and m.get("role") == "user")
    else:
        n = len(_HUMAN_TURN.findall(prompt))
    return max(n, 1)


def _distribution(values: np.ndarray) -> dict:
    if values.size == 0:
        return {"n": 0}
    q = np.percentile(values, [5, 25, 50, 75, 95])
    return {
        "n": int(values.size),
        "mean": float(values.mean()),
        "min": float(values.min()),
        "p5": float(q[0]),
        "p25": float(q[1]),
        "median": float(q[2]),
        "p75": float(q[3]),
        "p95": float(q[4]),
        "max": float(values.max()),
    }


def chosen_length_bias(
    len_chosen: np.ndarray, len_rejected: np.ndarray, confidence: float = 0.95
) -> dict:
    """How often the chosen reply is the longer one, and by how much."""
    n = int(len_chosen.size)
    if n == 0:
        return {"n": 0}
    longer = int(np.sum(len_chosen > len_rejected))
    shorter = int(np.sum(len_chosen < len_rejected))
    low, high = wilson_interval(longer, n, confidence)
    diff = len_chosen.astype(np.float64) - len_rejected.astype(np.float64)
    both = (len_chosen > 0) & (len_rejected > 0)
    ratio = len_chosen[both] / len_rejected[both]
    return {
        "n": n,
        "chosen_longer": longer,
        "chosen_shorter": shorter,
        "equal_length": n - longer - shorter,
        "fraction_chosen_longer": longer / n,
        "ci_low": low,
        "ci_high": high,
        "mean_difference": float(diff.mean()),
        "median_difference": float(np.median(diff)),
        "median_ratio": float(np.median(ratio)) if ratio.size else None,
    }


class _Columns:
    """Per-pair measurements, kept as compact typed arrays (bounded memory per pair)."""

    def __init__(self):
        self.len_prompt, self.len_chosen, self.len_rejected = array("l"), array("l"), array("l")
        self.turns = array("l")
        self.prompt_hash, self.pair_hash = array("Q"), array("Q")
        self.subset = array("l")
        self.margin = array("d")
        self.reward_chosen, self.reward_rejected = array("d"), array("d")


def inspect(
    rows: Iterable[dict],
    *,
    tokenizer=None,
    reward=None,
    near_duplicates: bool = True,
    threshold: float = 0.8,
    num_perm: int = 128,
    shingle: int = 3,
    confidence: float = 0.95,
    top_disagreements: int = 100,
    source: str | None = None,
    progress=None,
) -> dict:
    """The report (a JSON-able dict) of a preference data set; see the module docstring.

    `rows`: a re-iterable list, `datasets.Dataset` or `RowStream`. `tokenizer`: a transformers
    tokenizer (lengths in tokens) or None (characters). `reward`: a reward source called as
    reward(prompts, completions) -> scores. The arrays behind the plots are in
    report["_arrays"] (removed before the report is written as JSON).
    """
    source = source or source_name(rows)
    fmt, columns = detect_stream_format(rows, source)
    has_margin = "margin" in columns
    unit = "tokens" if tokenizer is not None else "characters"
    cols = _Columns()
    subsets: dict[str, int] = {}
    bad: dict[str, int] = {}
    bad_first: dict[str, str] = {}
    counts = {"rows": 0, "ranked_ties": 0}
    finders = (
        {
            kind: NearDuplicateFinder(threshold, num_perm=num_perm, shingle=shingle)
            for kind in ("prompts", "pairs")
        }
        if near_duplicates
        else {}
    )
    finder_pairs = {"prompts": array("q"), "pairs": array("q")}  # finder id -> pair position
    pair_origins = Origins()
    seen_prompts: set[int] = set()
    seen_pairs: dict[int, int] = {}  # fingerprint -> first pair position
    examples = {
        "near_duplicate_prompts": [],
        "near_duplicate_pairs": [],
        "exact_duplicate_pairs": [],
    }
    disagreements: list = []  # min-heap of (confidence, counter, record), the top ones kept
    counter = itertools.count()

    def measure(batch: list) -> None:
        pairs = [p for p, _ in batch]
        texts = [(text_of(p.prompt), text_of(p.chosen), text_of(p.rejected)) for p in pairs]
        if tokenizer is not None:
            flat = [t for triple in texts for t in triple]
            ids = tokenizer(flat, add_special_tokens=False, verbose=False)["input_ids"]
            lengths = [len(x) for x in ids]
            lengths = [lengths[i : i + 3] for i in range(0, len(lengths), 3)]
        else:
            lengths = [[len(t) for t in triple] for triple in texts]
        if reward is not None:
            scores = reward(
                [p.prompt for p in pairs] * 2,
                [p.chosen for p in pairs] + [p.rejected for p in pairs],
            ).tolist()
        for k, ((pair, origin), (tp, tc, tr), (lp, lc, lr)) in enumerate(
            zip(batch, texts, lengths)
        ):
            position = len(cols.len_prompt)
            pair_origins.append(origin)
            cols.len_prompt.append(lp)
            cols.len_chosen.append(lc)
            cols.len_rejected.append(lr)
            cols.turns.append(count_turns(pair.prompt))
            ph = exact_hash(tp)
            pair_text = tp + "\x00" + tc + "\x00" + tr
            qh = exact_hash(pair_text)
            cols.prompt_hash.append(ph)
            cols.pair_hash.append(qh)
            cols.subset.append(
                subsets.setdefault(pair.subset, len(subsets)) if pair.subset is not None else -1
            )
            if has_margin:
                cols.margin.append(pair.margin)
            if qh in seen_pairs:
                if len(examples["exact_duplicate_pairs"]) < EXAMPLES:
                    examples["exact_duplicate_pairs"].append(
                        {"row": where(origin), "duplicate_of": pair_origins.where(seen_pairs[qh])}
                    )
            else:
                seen_pairs[qh] = position
                if finders:
                    finders["pairs"].add(pair_text)
                    finder_pairs["pairs"].append(position)
            if ph not in seen_prompts:
                seen_prompts.add(ph)
                if finders:
                    finders["prompts"].add(tp)
                    finder_pairs["prompts"].append(position)
            if reward is not None:
                c, r = scores[k], scores[len(pairs) + k]
                cols.reward_chosen.append(c)
                cols.reward_rejected.append(r)
                if r > c:  # the source prefers the rejected reply: a candidate flipped label
                    record = {
                        "row": where(origin),
                        "reward_chosen": c,
                        "reward_rejected": r,
                        "difference": r - c,
                        "prompt": pair.prompt,
                        "chosen": pair.chosen,
                        "rejected": pair.rejected,
                    }
                    item = (r - c, next(counter), record)
                    if len(disagreements) < top_disagreements:
                        heapq.heappush(disagreements, item)
                    elif top_disagreements:
                        heapq.heappushpop(disagreements, item)

    try:
        stream = located_rows(rows, source)
        if progress is not None:
            stream = progress(stream)
        near = {}
        _pass(stream, fmt, has_margin, measure, bad, bad_first, counts)
        for kind, finder in finders.items():
            hits = finder.finish()
            ids = finder_pairs[kind]
            near[kind] = len(hits)
            for j, (i, sim) in itertools.islice(hits.items(), EXAMPLES):
                examples[f"near_duplicate_{kind}"].append(
                    {
                        "row": pair_origins.where(ids[j]),
                        "duplicate_of": pair_origins.where(ids[i]),
                        "similarity": round(sim, 4),
                    }
                )
    finally:
        for finder in finders.values():
            finder.close()
    n_rows, ranked_ties = counts["rows"], counts["ranked_ties"]
    near_prompts, near_pairs = near.get("prompts"), near.get("pairs")
    if not cols.len_chosen:
        raise PreftuneError(f"{source}: no usable pairs in {n_rows} rows (bad rows: {bad})")

    lp, lc, lr = (
        np.array(a, dtype=np.int64) for a in (cols.len_prompt, cols.len_chosen, cols.len_rejected)
    )
    n_pairs = int(lc.size)
    prompt_hash = np.asarray(cols.prompt_hash, dtype=np.uint64)
    _, prompt_counts = np.unique(prompt_hash, return_counts=True)
    n_unique_pairs = int(np.unique(np.asarray(cols.pair_hash, dtype=np.uint64)).size)
    turns = np.asarray(cols.turns)
    report: dict = {
        "source": source,
        "format": fmt,
        "rows": n_rows,
        "pairs": n_pairs,
        "length_unit": unit,
        "bad_rows": {
            "total": sum(bad.values()),
            "by_reason": dict(sorted(bad.items())),
            "first": bad_first,
            "chosen_equals_rejected": bad.get("chosen_equals_rejected", 0),
        },
        "turns": {
            "distribution": _distribution(turns),
            "counts": {str(int(k)): int(v) for k, v in zip(*np.unique(turns, return_counts=True))},
        },
        "lengths": {
            "prompt": _distribution(lp),
            "chosen": _distribution(lc),
            "rejected": _distribution(lr),
        },
        "length_bias": chosen_length_bias(lc, lr, confidence),
        "duplicates": {
            "distinct_prompts": int(prompt_counts.size),
            "exact_duplicate_prompts": n_pairs - int(prompt_counts.size),
            "prompts_in_several_pairs": int(np.sum(prompt_counts > 1)),
            "max_pairs_per_prompt": int(prompt_counts.max()),
            "exact_duplicate_pairs": n_pairs - n_unique_pairs,
            "near_duplicate_prompts": near_prompts if near_duplicates else None,
            "near_duplicate_pairs": near_pairs if near_duplicates else None,
            "near_threshold": threshold if near_duplicates else None,
            "examples": examples,
        },
    }
    if has_margin:
        margin = np.asarray(cols.margin)
        report["margins"] = {**_distribution(margin), "ties": int(np.sum(margin == 0))}
    if fmt == "ranked":
        report["ranked_tied_score_pairs"] = ranked_ties
    subset_ids = np.asarray(cols.subset)
    if subsets:
        per = {}
        for name, sid in sorted(subsets.items()):
            mask = subset_ids == sid
            entry = {
                "pairs": int(mask.sum()),
                "length_bias": chosen_length_bias(lc[mask], lr[mask], confidence),
                "median_chosen_length": float(np.median(lc[mask])),
                "median_rejected_length": float(np.median(lr[mask])),
            }
            per[name] = entry
        report["subsets"] = per
    if reward is not None:
        rc, rr = np.asarray(cols.reward_chosen), np.asarray(cols.reward_rejected)
        report["reward"] = _agreement(rc, rr, confidence, getattr(reward, "name", "reward"))
        if subsets:
            for name, sid in subsets.items():
                mask = subset_ids == sid
                report["subsets"][name]["reward"] = _agreement(rc[mask], rr[mask], confidence, None)
        report["_disagreements"] = [rec for _, _, rec in sorted(disagreements, reverse=True)]
    report["_arrays"] = {"prompt": lp, "chosen": lc, "rejected": lr}
    return report


def _pass(stream, fmt, has_margin, measure, bad, bad_first, counts) -> None:
    """Read every row once: bad rows are counted, pairs go to `measure` in batches."""
    batch: list = []
    for row, origin in stream:
        counts["rows"] += 1
        try:
            pairs = row_pairs(row, fmt, has_margin=has_margin)
        except BadRow as e:
            bad[e.reason] = bad.get(e.reason, 0) + 1
            bad_first.setdefault(e.reason, f"{where(origin)}: {e.message}")
            continue
        if fmt == "ranked":
            scores = row["scores"]
            counts["ranked_ties"] += sum(1 for a, b in itertools.combinations(scores, 2) if a == b)
        batch.extend((p, origin) for p in pairs)
        if len(batch) >= BATCH:
            measure(batch)
            batch = []
    if batch:
        measure(batch)


def _agreement(rc: np.ndarray, rr: np.ndarray, confidence: float, name) -> dict:
    n = int(rc.size)
    agree = int(np.sum(rc > rr))
    ties = int(np.sum(rc == rr))
    low, high = wilson_interval(agree, n, confidence) if n else (math.nan, math.nan)
    out = {
        "pairs": n,
        "agree": agree,
        "ties": ties,
        "disagree": n - agree - ties,
        "agreement": agree / n if n else None,
        "ci_low": low,
        "ci_high": high,
        "confidence": confidence,
        "ties_count_as": "disagreement",
    }
    if name:
        out = {"source": name, **out}
    return out


# --- the written report ---------------------------------------------------------------------


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _num(x) -> str:
    if x is None:
        return "n/a"
    return f"{x:,.0f}" if float(x).is_integer() else f"{x:,.2f}"


def render_markdown(report: dict) -> str:
    """report.md: the figures of `report`, each sentence generated from its numbers."""
    unit = report["length_unit"]
    bad = report["bad_rows"]
    lines = [
        f"# Data report: {report['source']}",
        "",
        f"- rows: {report['rows']:,}; detected format: **{report['format']}**; pairs "
        f"training would use: {report['pairs']:,}",
        f"- bad rows (skipped by training, same rules): {bad['total']:,}"
        + (
            ""
            if not bad["by_reason"]
            else " (" + ", ".join(f"{k}: {v:,}" for k, v in bad["by_reason"].items()) + ")"
        ),
        f"- chosen identical to rejected: {bad['chosen_equals_rejected']:,}",
    ]
    for reason, first in bad["first"].items():
        lines.append(f"  - first {reason}: {first}")
    turns = report["turns"]
    lines += [
        "",
        "## Turns per dialogue (user turns in the prompt)",
        "",
        "| turns | pairs |",
        "| ---: | ---: |",
    ]
    lines += [f"| {k} | {v:,} |" for k, v in turns["counts"].items()]
    lines += [
        "",
        f"## Lengths ({unit})",
        "",
        "| part | mean | p5 | median | p95 | max |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for part in ("prompt", "chosen", "rejected"):
        d = report["lengths"][part]
        lines.append(
            f"| {part} | {_num(d['mean'])} | {_num(d['p5'])} | {_num(d['median'])} | "
            f"{_num(d['p95'])} | {_num(d['max'])} |"
        )
    lb = report["length_bias"]
    lines += [
        "",
        "## Length bias",
        "",
        f"The chosen reply is the longer one in {lb['chosen_longer']:,} of {lb['n']:,} pairs "
        f"({_pct(lb['fraction_chosen_longer'])}, {_pct(lb['ci_low'])} to {_pct(lb['ci_high'])} "
        f"Wilson interval), shorter in {lb['chosen_shorter']:,} and as long in "
        f"{lb['equal_length']:,}. Chosen minus rejected length: mean {_num(lb['mean_difference'])}, "
        f"median {_num(lb['median_difference'])} {unit}; median ratio chosen/rejected "
        f"{_num(lb['median_ratio'])}.",
    ]
    if lb["ci_low"] > 0.5:
        lines.append("The interval lies above 50%: the labels favour longer replies.")
    elif lb["ci_high"] < 0.5:
        lines.append("The interval lies below 50%: the labels favour shorter replies.")
    else:
        lines.append(
            "The interval contains 50%: no length preference can be told from these pairs."
        )
    dup = report["duplicates"]
    lines += [
        "",
        "## Duplicates",
        "",
        f"- distinct prompts: {dup['distinct_prompts']:,}; prompts in several pairs: "
        f"{dup['prompts_in_several_pairs']:,} (at most {dup['max_pairs_per_prompt']:,} pairs "
        "for one prompt)",
        f"- exact duplicate prompts (pairs whose prompt occurred before): "
        f"{dup['exact_duplicate_prompts']:,}; exact duplicate pairs: {dup['exact_duplicate_pairs']:,}",
    ]
    if dup["near_duplicate_prompts"] is not None:
        lines.append(
            f"- near-duplicate prompts (MinHash Jaccard >= {dup['near_threshold']}, not "
            f"exact): {dup['near_duplicate_prompts']:,}; near-duplicate pairs: "
            f"{dup['near_duplicate_pairs']:,}"
        )
    for kind, items in dup["examples"].items():
        for item in items:
            sim = f" (similarity {item['similarity']})" if "similarity" in item else ""
            lines.append(
                f"  - {kind.replace('_', ' ')}: {item['row']} ~ {item['duplicate_of']}{sim}"
            )
    if "margins" in report:
        m = report["margins"]
        lines += [
            "",
            "## Margins",
            "",
            f"mean {_num(m['mean'])}, median {_num(m['median'])}, min {_num(m['min'])}, "
            f"max {_num(m['max'])}; ties (margin 0): {m['ties']:,}",
        ]
    if "ranked_tied_score_pairs" in report:
        lines += [
            "",
            f"Pairs of completions with equal scores (no preference): "
            f"{report['ranked_tied_score_pairs']:,}",
        ]
    if "reward" in report:
        r = report["reward"]
        lines += [
            "",
            f"## Agreement with the reward source ({r['source']})",
            "",
            f"The reward source prefers the chosen reply in {r['agree']:,} of {r['pairs']:,} "
            f"pairs: {_pct(r['agreement'])} ({_pct(r['ci_low'])} to {_pct(r['ci_high'])}, "
            f"{_pct(r['confidence'])} Wilson interval; {r['ties']:,} ties count as "
            "disagreement). The pairs it disagrees with most confidently are in "
            "disagreements.jsonl.",
        ]
    if "subsets" in report:
        lines += [
            "",
            "## Per subset",
            "",
            "| subset | pairs | chosen longer | median chosen | median rejected |"
            + (" reward agreement |" if "reward" in report else ""),
            "| --- | ---: | ---: | ---: | ---: |" + (" ---: |" if "reward" in report else ""),
        ]
        for name, s in report["subsets"].items():
            line = (
                f"| {name} | {s['pairs']:,} | {_pct(s['length_bias']['fraction_chosen_longer'])} | "
                f"{_num(s['median_chosen_length'])} | {_num(s['median_rejected_length'])} |"
            )
            if "reward" in s:
                line += f" {_pct(s['reward']['agreement'])} |"
            lines.append(line)
    lines += [
        "",
        "Plots: lengths.png (length distributions), length_difference.png "
        "(chosen minus rejected length).",
        "",
    ]
    return "\n".join(lines)


def plot_lengths(arrays: dict, unit: str, out_dir) -> list[str]:
    """lengths.png and length_difference.png; returns the file names written."""
    from pathlib import Path

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from preftune.utils import atomic_output

    out_dir = Path(out_dir)
    written = []
    fig = Figure(figsize=(7.0, 4.0))
    ax = fig.subplots()
    top = max(float(np.percentile(np.concatenate([arrays[k] for k in arrays]), 99)), 1.0)
    bins = np.linspace(0, top, 60)
    for part, color in (("prompt", "tab:gray"), ("chosen", "tab:green"), ("rejected", "tab:red")):
        ax.hist(
            np.clip(arrays[part], 0, top),
            bins=bins,
            histtype="step",
            color=color,
            linewidth=1.5,
            label=f"{part} (median {np.median(arrays[part]):.0f})",
        )
    ax.set_xlabel(f"length ({unit}; the last bin holds everything above the 99th percentile)")
    ax.set_ylabel("pairs")
    ax.legend()
    written.append(_save(fig, out_dir / "lengths.png", FigureCanvasAgg, atomic_output))

    diff = arrays["chosen"] - arrays["rejected"]
    fig = Figure(figsize=(7.0, 4.0))
    ax = fig.subplots()
    lo, hi = np.percentile(diff, [1, 99])
    ax.hist(np.clip(diff, lo, hi), bins=60, color="tab:blue")
    ax.axvline(0, color="black", linestyle="--")
    longer = float(np.mean(diff > 0))
    ax.set_title(f"chosen is longer in {100 * longer:.1f}% of {diff.size:,} pairs")
    ax.set_xlabel(f"chosen minus rejected length ({unit}; clipped to the 1st-99th percentile)")
    ax.set_ylabel("pairs")
    written.append(_save(fig, out_dir / "length_difference.png", FigureCanvasAgg, atomic_output))
    return written


def _save(fig, path, canvas, atomic_output) -> str:
    canvas(fig)
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return path.name
