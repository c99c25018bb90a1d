"""`preftune eval-rm` end to end through the CLI: numbers checked against hand computation
(accuracy, ties, Wilson intervals, ECE, section weights), the implicit reward of a policy
against a naive full-logits forward, the classifier path, and bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from preftune.cli import main

# A rule-based reward: the number after "score=" in the completion.
REWARD_FILE = """
def score(prompts, completions):
    return [float(c.split("score=")[1]) for c in completions]

def wrong_shape(prompts, completions):
    return [[1.0, 2.0]] * len(completions)

def nan_reward(prompts, completions):
    return [float("nan")] * len(completions)
"""

# (subset, chosen score, rejected score): diffs 2, 1, 1, 0 (a tie) in A; -1 in B (wrong).
CRAFTED = [("A", 2.0, 0.0), ("A", 1.0, 0.0), ("A", 0.5, -0.5), ("A", 0.0, 0.0), ("B", 0.0, 1.0)]


def _write(tmp_path: Path) -> tuple[Path, str]:
    data = tmp_path / "pairs.jsonl"
    with open(data, "w") as f:
        for subset, c, r in CRAFTED:
            # The higher-scored reply is 10 characters longer; the tie has equal lengths.
            pad_c, pad_r = "x" * 10 * (c > r), "x" * 10 * (r > c)
            f.write(
                json.dumps(
                    {
                        "prompt": "Q:",
                        "chosen": f" c{pad_c}score={c}",
                        "rejected": f" r{pad_r}score={r}",
                        "subset": subset,
                    }
                )
                + "\n"
            )
    fn_file = tmp_path / "rewards.py"
    fn_file.write_text(REWARD_FILE)
    return data, str(fn_file)


def _wilson(s: float, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    p = s / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def _eval(args: list[str]) -> int:
    return main(["eval-rm", *args])


def test_function_reward_numbers_by_hand(tmp_path, capsys):
    data, fn_file = _write(tmp_path)
    out = tmp_path / "eval"
    assert (
        _eval(
            [
                "--model",
                f"{fn_file}:score",
                "--data",
                str(data),
                "--output-dir",
                str(out),
                "--section-weights",
                "A=1,B=1",
            ]
        )
        == 0
    )
    printed = capsys.readouterr()
    res = json.loads((out / "results.json").read_text())

    # Ties count as wrong: 3 of 5 right overall; A has 3 of 4, B 0 of 1.
    assert res["n_pairs"] == 5 and res["n_ties"] == 1
    assert res["accuracy"] == pytest.approx(3 / 5)
    assert (res["ci_low"], res["ci_high"]) == pytest.approx(_wilson(3, 5))
    table = {row["name"]: row for row in res["table"]}
    assert table["A"]["accuracy"] == pytest.approx(3 / 4)
    assert (table["A"]["ci_low"], table["A"]["ci_high"]) == pytest.approx(_wilson(3, 4))
    assert table["B"]["n"] == 1 and table["B"]["accuracy"] == 0.0
    assert "only 1 example" in table["B"]["warning"]  # a subset of one is flagged
    assert table["weighted"]["accuracy"] == pytest.approx((3 / 4 + 0) / 2)
    assert "B*" in printed.out and "only 1 example" in printed.out

    # ECE, 10 bins on [0.5, 1]: confidence σ(|d|), correct 1 / 0 / 0.5 on a tie.
    # bin [0.85, 0.9): d=2 right; bin [0.7, 0.75): d=1, 1 right and d=-1 wrong; bin [0.5, 0.55): tie.
    ece = (
        (1 / 5) * abs(1 - _sigmoid(2))
        + (3 / 5) * abs(2 / 3 - _sigmoid(1))
        + (1 / 5) * abs(0.5 - 0.5)
    )
    assert res["calibration"]["ece"] == pytest.approx(ece, rel=1e-9)
    counts = [b["count"] for b in res["calibration"]["bins"]]
    assert counts == [1, 0, 0, 0, 3, 0, 0, 1, 0, 0]

    # Length bias in characters: chosen longer in the 3 right pairs, equal in the tie, shorter in B.
    lb = res["length_bias"]
    assert lb["unit"] == "characters"
    assert lb["chosen_longer"]["n"] == 3 and lb["chosen_longer"]["accuracy"] == 1.0
    assert lb["chosen_shorter"]["n"] == 1 and lb["chosen_shorter"]["accuracy"] == 0.0
    assert lb["equal_length"]["n"] == 1 and lb["equal_length"]["accuracy"] == 0.0
    assert res["rewards"]["mean_chosen"] == pytest.approx(sum(c for _, c, _ in CRAFTED) / 5)

    for name in ("reliability.png", "rewards.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    scores = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert [s["reward_chosen"] for s in scores] == [c for _, c, _ in CRAFTED]


def test_ties_as_half_and_output_protection(tmp_path, capsys):
    data, fn_file = _write(tmp_path)
    out = tmp_path / "eval"
    args = ["--model", f"{fn_file}:score", "--data", str(data), "--output-dir", str(out)]
    assert _eval([*args, "--ties", "half"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["accuracy"] == pytest.approx(3.5 / 5)
    assert (res["ci_low"], res["ci_high"]) == pytest.approx(_wilson(3.5, 5))
    assert _eval(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert _eval([*args, "--overwrite", "--confidence", "0.9"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert (res["ci_low"], res["ci_high"]) == pytest.approx(_wilson(3, 5, z=1.6448536269514722))


def _naive_seq_logp(model, tokenizer, prompt: str, completion: str) -> float:
    """Sum of log p(completion tokens | prefix) from a full-logits forward, no masking tricks."""
    prompt_ids = tokenizer(prompt)["input_ids"]  # with BOS
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [
        tokenizer.eos_token_id
    ]
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logps = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    return sum(float(logps[t - 1, ids[0, t]]) for t in range(len(prompt_ids), ids.shape[1]))


def test_implicit_reward_equals_hand_computed_log_ratios(tmp_path):
    from preftune.models import build_tiny_model, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    policy, ref = build_tiny_model(tokenizer, seed=1), build_tiny_model(tokenizer, seed=2)
    for name, model in (("policy", policy), ("ref", ref)):
        model.save_pretrained(str(tmp_path / name))
        tokenizer.save_pretrained(str(tmp_path / name))
    pairs = [("Hello, who", " are you?", " is there"), ("2 + 2 =", " 4", " five, surely")]
    data = tmp_path / "pairs.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in pairs)
    )

    out = tmp_path / "implicit"
    assert (
        _eval(
            [
                "--model",
                str(tmp_path / "policy"),
                "--ref-model",
                str(tmp_path / "ref"),
                "--data",
                str(data),
                "--output-dir",
                str(out),
                "--beta",
                "0.5",
            ]
        )
        == 0
    )
    scores = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    for (p, c, r), s in zip(pairs, scores):
        for completion, got in ((c, s["reward_chosen"]), (r, s["reward_rejected"])):
            want = 0.5 * (
                _naive_seq_logp(policy, tokenizer, p, completion)
                - _naive_seq_logp(ref, tokenizer, p, completion)
            )
            assert got == pytest.approx(want, abs=1e-4)

    out = tmp_path / "mean"
    assert (
        _eval(
            [
                "--model",
                str(tmp_path / "policy"),
                "--reference-free",
                "--logprob-agg",
                "mean",
                "--data",
                str(data),
                "--output-dir",
                str(out),
            ]
        )
        == 0
    )
    scores = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    p, c, _ = pairs[0]
    n_tokens = len(tokenizer(c, add_special_tokens=False)["input_ids"]) + 1  # + EOS
    assert scores[0]["reward_chosen"] == pytest.approx(
        _naive_seq_logp(policy, tokenizer, p, c) / n_tokens, abs=1e-5
    )


def _save_tiny_classifier(path: Path, nan: bool = False) -> None:
    from preftune.models import build_tiny_sequence_classifier, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    model = build_tiny_sequence_classifier(tokenizer, seed=0)
    if nan:
        with torch.no_grad():
            model.score.weight.fill_(float("nan"))
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))


def test_classifier_scores_the_training_data_path(tmp_path):
    from preftune.data.formats import Pair
    from preftune.data.tokenize import TruncationConfig, tokenize_pairs
    from preftune.models import build_tiny_sequence_classifier, build_tiny_tokenizer

    _save_tiny_classifier(tmp_path / "rm")
    # A reward run's config.yaml next to the model sets the truncation.
    (tmp_path / "rm" / "config.yaml").write_text(
        "max_length: 24\nmax_prompt_length: 8\nprompt_truncation: keep_end\n"
    )
    rows = [("a long prompt that will be cut", " yes it is", " no"), ("hi", " there", " you")]
    data = tmp_path / "d.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in rows)
    )
    out = tmp_path / "eval"
    assert (
        _eval(
            [
                "--model",
                str(tmp_path / "rm"),
                "--data",
                str(data),
                "--output-dir",
                str(out),
                "--batch-size",
                "1",
            ]
        )
        == 0
    )
    res = json.loads((out / "results.json").read_text())
    assert res["truncation"]["max_length"] == 24 and res["length_bias"]["unit"] == "tokens"
    scores = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]

    tokenizer = build_tiny_tokenizer()
    model = build_tiny_sequence_classifier(tokenizer, seed=0)
    features, _ = tokenize_pairs(
        tokenizer,
        [Pair(*row) for row in rows],
        TruncationConfig(max_length=24, max_prompt_length=8),
    )
    for f, s in zip(features, scores):
        for side in ("chosen", "rejected"):
            with torch.no_grad():
                want = float(model(input_ids=torch.tensor([f[f"{side}_input_ids"]])).logits)
            assert s[f"reward_{side}"] == pytest.approx(want, abs=1e-5)


def test_a_policy_passed_as_classifier_says_what_to_pass(tmp_path, capsys):
    from preftune.models import build_tiny_model, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    build_tiny_model(tokenizer).save_pretrained(str(tmp_path / "policy"))
    tokenizer.save_pretrained(str(tmp_path / "policy"))
    data, _ = _write(tmp_path)
    assert (
        _eval(
            [
                "--model",
                str(tmp_path / "policy"),
                "--data",
                str(data),
                "--output-dir",
                str(tmp_path / "e"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "no reward head" in err and "--ref-model" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("no_such_module_xyz:score", "cannot import module"),
        ("{fn}:missing", "has no attribute 'missing'"),
        ("{fn}:wrong_shape", "must return 5 numbers"),
        ("{fn}:nan_reward", "non-finite"),
    ],
)
def test_bad_reward_functions(tmp_path, capsys, spec, expected):
    data, fn_file = _write(tmp_path)
    assert (
        _eval(
            [
                "--model",
                spec.format(fn=fn_file),
                "--data",
                str(data),
                "--output-dir",
                str(tmp_path / "e"),
                "--batch-size",
                "8",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err


def test_nan_rewards_from_a_model_are_refused(tmp_path, capsys):
    _save_tiny_classifier(tmp_path / "rm", nan=True)
    data, _ = _write(tmp_path)
    assert (
        _eval(
            [
                "--model",
                str(tmp_path / "rm"),
                "--data",
                str(data),
                "--output-dir",
                str(tmp_path / "e"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "non-finite" in err and "pair 1" in err


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--beta", "2"], "beta only applies"),
        (["--ref-model", "x", "--reference-free"], "pass one"),
        (["--section-weights", "A=one"], "section_weights"),
        (["--section-weights", "C=1"], "not in the data"),
        (["--max-length", "16", "--max-prompt-length", "16"], "max_prompt_length"),
    ],
)
def test_bad_settings(tmp_path, capsys, extra, expected):
    data, fn_file = _write(tmp_path)
    _save_tiny_classifier(tmp_path / "rm")
    model = f"{fn_file}:score" if "section" in extra[0] else str(tmp_path / "rm")
    assert (
        _eval(["--model", model, "--data", str(data), "--output-dir", str(tmp_path / "e"), *extra])
        == 2
    )
    assert expected in capsys.readouterr().err
