"""Synthetic arena-style preference data with real ties, drawn from a known model.

Each reply is 3-6 words; a word is positive (w.p. 0.3), negative (0.3) or neutral (0.4). The
reply's latent quality is q = #positive − #negative. Two replies to the same prompt get an
outcome drawn from Davidson's model (Davidson 1970) with strengths π = exp(q) and ν = `--nu`:
P(a) = π_a / (π_a + π_b + ν √(π_a π_b)), P(tie) = ν √(π_a π_b) / (the same), P(b) the rest.
So the data have ties of the kind human raters give (close pairs tie more often), and the
generating model's own log loss on the test split is the floor no reward model can beat.

    python benchmarks/make_tie_data.py --out-dir tie-data   # train/test .jsonl + floor.json

It also writes `best_of_k.jsonl`: 200 prompts with 16 replies each from the same generator
(seed 7), for `preftune eval-rm --best-of-k --gold-fn benchmarks/make_tie_data.py:gold_quality`.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

POSITIVE = ["great", "good", "clear", "helpful", "kind"]
NEGATIVE = ["bad", "rude", "wrong", "vague", "slow"]
NEUTRAL = ["the", "answer", "is", "here", "and", "so", "it", "this"]
TOPICS = ["lamp", "phone", "chair", "book", "train", "garden"]


def reply(rng: random.Random) -> tuple[str, int]:
    words, q = [], 0
    for _ in range(rng.randint(3, 6)):
        u = rng.random()
        if u < 0.3:
            words.append(rng.choice(POSITIVE))
            q += 1
        elif u < 0.6:
            words.append(rng.choice(NEGATIVE))
            q -= 1
        else:
            words.append(rng.choice(NEUTRAL))
    return " " + " ".join(words), q


def gold_quality(prompts, completions):
    """The gold reward for `eval-rm --best-of-k`: each reply's latent quality q."""
    return [
        sum(w in POSITIVE for w in c.split()) - sum(w in NEGATIVE for w in c.split())
        for c in completions
    ]


def davidson(qa: int, qb: int, nu: float) -> tuple[float, float, float]:
    a, b, t = math.exp(qa), math.exp(qb), nu * math.exp((qa + qb) / 2)
    z = a + b + t
    return a / z, t / z, b / z


def make(n: int, seed: int, nu: float) -> tuple[list[dict], float]:
    rng = random.Random(seed)
    rows, nll = [], 0.0
    while len(rows) < n:
        prompt = f"Review the {rng.choice(TOPICS)}:"
        (a, qa), (b, qb) = reply(rng), reply(rng)
        if a == b:
            continue
        p = davidson(qa, qb, nu)
        u = rng.random()
        winner = "a" if u < p[0] else "tie" if u < p[0] + p[1] else "b"
        nll -= math.log(p[{"a": 0, "tie": 1, "b": 2}[winner]])
        rows.append({"prompt": prompt, "response_a": a, "response_b": b, "winner": winner})
    return rows, nll / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default="tie-data")
    parser.add_argument("--nu", type=float, default=1.0)
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--test", type=int, default=1000)
    args = parser.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    floor = {}
    for name, n, seed in (("train", args.train, 0), ("test", args.test, 1)):
        rows, nll = make(n, seed, args.nu)
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        ties = sum(r["winner"] == "tie" for r in rows)
        floor[name] = {"pairs": n, "ties": ties, "generating_model_log_loss": nll}
        print(
            f"{name}: {n} pairs, {ties} ties ({ties / n:.1%}); log loss of the generating "
            f"Davidson model {nll:.4f}"
        )
    (out / "floor.json").write_text(json.dumps({"nu": args.nu, **floor}, indent=2) + "\n")
    rng = random.Random(7)
    samples = []
    for _ in range(200):
        completions = [reply(rng)[0] for _ in range(16)]
        samples.append({"prompt": f"Review the {rng.choice(TOPICS)}:", "completions": completions})
    (out / "best_of_k.jsonl").write_text("".join(json.dumps(r) + "\n" for r in samples))


if __name__ == "__main__":
    main()
