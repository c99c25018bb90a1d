"""`preftune eval-rm --best-of-k`: how well a reward picks the best of K completions.

Data: one row per prompt with `prompt`, `completions` (a list, N_i >= 2 per prompt) and a gold
source: a python function (`--gold-fn module:function`, called as fn(prompts, completions,
**columns)) or an `answer` column (gold 1 when a completion, stripped, equals the answer,
stripped, else 0). For each K the curve is the expected gold score of the completion the
reward ranks first among K completions drawn at random without replacement from a prompt's N
(as lmarena's PPE best-of-K, Frick et al. 2024), beside the oracle (the gold-best of the K) and
a random pick (any one of the K: the prompt's mean gold); `reward_minus_oracle` is the paired
(per-prompt) shortfall of the reward's pick, the regret.

The expectation over subsets is exact, not sampled (`expected_best_of_k`). Intervals are over
prompts: mean ± z · sd / √m of the per-prompt expected values (normal approximation).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import torch

from preftune.errors import PreftuneError
from preftune.evaluation.stats import _z

RESULT_FILES = ("best_of_k.json", "best_of_k.png")


def expected_best_of_k(select: np.ndarray, gold: np.ndarray, k: int) -> float:
    """E[gold of the completion with the highest `select` score among a uniformly random
    K-subset of the N completions].

    Sorted by `select`, descending, position j (0-based) is the subset's best with probability
    C(N−1−j, K−1) / C(N, K): it is drawn, and the other K−1 come from the N−1−j below it. Equal
    `select` scores are a group picked from uniformly, so each group contributes its total
    probability times its mean gold.
    """
    select = np.asarray(select, dtype=np.float64)
    gold = np.asarray(gold, dtype=np.float64)
    n = select.size
    if not 1 <= k <= n:
        raise PreftuneError(f"best-of-K: K={k} needs 1 <= K <= N={n} completions")
    order = np.argsort(-select, kind="stable")
    s, g = select[order], gold[order]
    total = math.comb(n, k)
    p = np.array([math.comb(n - 1 - j, k - 1) / total for j in range(n)])
    value, start = 0.0, 0
    while start < n:
        end = start
        while end + 1 < n and s[end + 1] == s[start]:
            end += 1
        value += p[start : end + 1].sum() * g[start : end + 1].mean()
        start = end + 1
    return float(value)


def _gold_scores(cfg, rows: list[dict], log) -> list[np.ndarray]:
    from preftune.rewards.sources import FunctionReward

    if cfg.gold_fn:
        source = FunctionReward.from_spec(cfg.gold_fn)
        out = []
        for row in rows:
            columns = {
                k: [v] * len(row["completions"])
                for k, v in row.items()
                if k not in ("prompt", "completions")
            }
            out.append(
                source([row["prompt"]] * len(row["completions"]), row["completions"], **columns)
                .double()
                .numpy()
            )
        return out
    if any("answer" not in row for row in rows):
        raise PreftuneError(
            f"{cfg.data}: best_of_k needs a gold source: an `answer` column in "
            "every row, or --gold-fn module:function"
        )
    log("gold: 1 when a completion, stripped, equals the row's `answer`, else 0")
    return [
        np.array(
            [float(_text(c).strip() == str(row["answer"]).strip()) for c in row["completions"]]
        )
        for row in rows
    ]


def _text(completion) -> str:
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content", "") for m in completion)


def read_rows(cfg) -> list[dict]:
    from preftune.data.loading import load_rows, parse_column_map
    from preftune.trainers.common import resolve_data_source

    column_map = parse_column_map(cfg.columns) if cfg.columns else None
    rows = load_rows(resolve_data_source(cfg.data), split=cfg.split, column_map=column_map)
    where = getattr(rows, "where", None)
    out = []
    for i, row in enumerate(rows):
        at = where(i) if where else f"{cfg.data}, row {i + 1}"
        prompt, completions = row.get("prompt"), row.get("completions")
        if prompt is None or not isinstance(completions, list) or len(completions) < 2:
            raise PreftuneError(
                f"{at}: best_of_k needs `prompt` and a `completions` list of at "
                f"least 2, got columns {sorted(row)}"
            )
        out.append(row)
    if not out:
        raise PreftuneError(f"{cfg.data}: no rows")
    return out


def _score_classifier(cfg, path: str, rows: list[dict], log) -> list[np.ndarray]:
    """Each completion scored as `preftune reward` trained it: the same tokenization."""
    from dataclasses import replace

    from preftune.data.collate import pad_sequences
    from preftune.data.formats import SFTExample
    from preftune.data.tokenize import tokenize_sft
    from preftune.evaluation.eval_rm import _device, load_classifier, resolve_truncation

    sub = replace(cfg, model=path, ensemble_agg="mean", ensemble_coef=1.0)
    model, tokenizer, name = load_classifier(sub)
    if getattr(model.config, "preftune_head", None) == "three-way":
        raise PreftuneError(
            f"{path!r} is a three-way pair classifier with no reward per "
            "completion; best_of_k needs a reward model"
        )
    trunc = resolve_truncation(sub, name, log)
    device = _device(cfg)
    model.to(device)
    features = []
    for row in rows:
        feats, _ = tokenize_sft(
            tokenizer,
            [SFTExample(row["prompt"], c) for c in row["completions"]],
            trunc,
            progress=False,
        )
        if len(feats) != len(row["completions"]):
            raise PreftuneError(
                f"{cfg.data}: a completion of prompt {_text(row['prompt'])[:40]!r} "
                "has no token left after truncation; raise --max-length"
            )
        features += feats
    scores = np.empty(len(features))
    order = sorted(range(len(features)), key=lambda i: -len(features[i]["input_ids"]))
    with torch.no_grad():
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            batch = pad_sequences([features[i] for i in idx], tokenizer.pad_token_id)
            logits = model(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
            ).logits
            scores[idx] = logits.float().reshape(-1).cpu().numpy()
    return _split(scores, rows)


def _split(flat: np.ndarray, rows: list[dict]) -> list[np.ndarray]:
    out, start = [], 0
    for row in rows:
        out.append(flat[start : start + len(row["completions"])])
        start += len(row["completions"])
    return out


def score_rows(cfg, kind: str, rows: list[dict], log) -> tuple[list[np.ndarray], dict | None]:
    """The reward's score of every completion, per prompt (+ ensemble disagreement)."""
    from preftune.rewards.sources import (
        FunctionReward,
        aggregate_ensemble,
        ensemble_members,
    )

    if kind == "function":
        source = FunctionReward.from_spec(cfg.model)
        return [
            source([row["prompt"]] * len(row["completions"]), row["completions"]).double().numpy()
            for row in rows
        ], None
    if kind == "ensemble":
        members = [
            np.concatenate(_score_classifier(cfg, p, rows, log))
            for p in ensemble_members(cfg.model)
        ]
        total, std = aggregate_ensemble(
            torch.tensor(np.stack(members)), cfg.ensemble_agg, cfg.ensemble_coef
        )
        info = {
            "members": len(members),
            "agg": cfg.ensemble_agg,
            "coef": cfg.ensemble_coef,
            "mean_member_std": float(std.mean()),
        }
        return _split(total.numpy(), rows), info
    return _score_classifier(cfg, cfg.model, rows, log), None


def run_best_of_k(cfg, log) -> dict:
    from preftune.config import save_config
    from preftune.utils import atomic_write_json

    out = Path(cfg.output_dir or "runs/eval-rm")
    if not cfg.overwrite and any((out / f).exists() for f in RESULT_FILES):
        raise PreftuneError(
            f"output directory {out} already holds best-of-K results: pass "
            "--overwrite to replace them, or another --output-dir"
        )
    kind = cfg.reward_kind
    rows = read_rows(cfg)
    gold = _gold_scores(cfg, rows, log)
    scores, ensemble = score_rows(cfg, kind, rows, log)
    for row, s in zip(rows, scores):
        if not np.all(np.isfinite(s)):
            raise PreftuneError(
                f"{kind} reward {cfg.model!r} gave a non-finite score for a "
                f"completion of prompt {_text(row['prompt'])[:40]!r}"
            )
    n_min = min(len(row["completions"]) for row in rows)
    ks = sorted(set(cfg.k_values)) or sorted(
        {2**i for i in range(int(math.log2(n_min)) + 1)} | {n_min}
    )
    if ks[-1] > n_min:
        raise PreftuneError(
            f"k_values: K={ks[-1]} exceeds the {n_min} completions of the "
            "prompt with the fewest; lower it"
        )
    z = _z(cfg.confidence)
    m = len(rows)

    def summarise(values: np.ndarray) -> dict:
        mean = float(values.mean())
        half = z * float(values.std(ddof=1)) / math.sqrt(m) if m > 1 else float("nan")
        return {"mean": mean, "ci_low": mean - half, "ci_high": mean + half}

    curve = []
    for k in ks:
        rm = np.array([expected_best_of_k(s, g, k) for s, g in zip(scores, gold)])
        oracle = np.array([expected_best_of_k(g, g, k) for g in gold])
        random_pick = np.array([g.mean() for g in gold])  # any one of K: the mean, exactly
        curve.append(
            {
                "k": k,
                "reward_pick": summarise(rm),
                "oracle_pick": summarise(oracle),
                "random_pick": summarise(random_pick),
                "reward_minus_random": summarise(rm - random_pick),
                "reward_minus_oracle": summarise(rm - oracle),
            }
        )  # paired, per prompt
    results = {
        "model": cfg.model,
        "reward_kind": kind,
        "data": cfg.data,
        "prompts": m,
        "completions_per_prompt": {"min": n_min, "max": max(len(r["completions"]) for r in rows)},
        "gold": cfg.gold_fn or "answer column (exact match)",
        "confidence": cfg.confidence,
        "curve": curve,
        "ensemble": ensemble,
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "best_of_k.json", results, strict=True)
    _plot(curve, out / "best_of_k.png", cfg.confidence)
    save_config(cfg, out / "config.yaml", extra={"command": "eval-rm"})
    print(
        f"best-of-K over {m} prompts (gold: {results['gold']}; mean ± {cfg.confidence:.0%} "
        "interval over prompts)"
    )
    names = ("reward_pick", "oracle_pick", "random_pick", "reward_minus_oracle")
    print(f"{'K':>4}  " + "  ".join(f"{n.replace('_', ' '):>24}" for n in names))
    for c in curve:
        cells = [f"{c[n]['mean']:.3f} [{c[n]['ci_low']:.3f}, {c[n]['ci_high']:.3f}]" for n in names]
        print(f"{c['k']:>4}  " + "  ".join(f"{x:>24}" for x in cells))
    print(f"wrote {out / 'best_of_k.json'} and best_of_k.png", file=sys.stderr)
    return results


def _plot(curve: list[dict], path: Path, confidence: float) -> None:
    from matplotlib.figure import Figure

    from preftune.evaluation.plots import _save_png

    fig = Figure(figsize=(5.5, 4.0))
    ax = fig.subplots()
    ks = [c["k"] for c in curve]
    for name, label in (
        ("oracle_pick", "oracle pick"),
        ("reward_pick", "reward's pick"),
        ("random_pick", "random pick"),
    ):
        mean = [c[name]["mean"] for c in curve]
        ax.plot(ks, mean, marker="o", label=label)
        ax.fill_between(
            ks, [c[name]["ci_low"] for c in curve], [c[name]["ci_high"] for c in curve], alpha=0.2
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("K (completions to choose from)")
    ax.set_ylabel("gold score of the pick")
    ax.set_title(f"best-of-K ({confidence:.0%} intervals over prompts)")
    ax.legend(fontsize=8)
    _save_png(fig, path)
