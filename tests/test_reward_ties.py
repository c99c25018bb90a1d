"""Ties: the Rao-Kupper, Davidson and three-way losses against hand-computed numbers (and their
Bradley-Terry limit), the arena / `tie` / equal-score layouts, and reward models trained on data
with planted ties."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from preftune.cli import main
from preftune.data.formats import to_pairs, to_prompts
from preftune.errors import PreftuneError
from preftune.losses.reward import (
    bradley_terry_loss,
    three_way_loss,
    tie_log_probs,
    tie_model_loss,
)

E = math.e


# --- the losses by hand ------------------------------------------------------------------------


def test_rao_kupper_by_hand():
    # r_first = 1, r_second = 0 -> π = (e, 1); θ = 2.
    # P(win) = e / (e + 2), P(lose) = 1 / (1 + 2e), P(tie) = (4 − 1) e / ((e + 2)(2e + 1)).
    d = torch.tensor([1.0], dtype=torch.float64)
    logp = tie_log_probs(d, "rao-kupper", math.log(2.0))[0].exp().tolist()
    assert logp == pytest.approx(
        [E / (E + 2), 3 * E / ((E + 2) * (2 * E + 1)), 1 / (1 + 2 * E)], rel=1e-12
    )
    assert sum(logp) == pytest.approx(1.0, rel=1e-12)
    # Loss: −log P(win) for the untied pair, −log P(tie) for the tied one.
    losses, m = tie_model_loss(
        torch.tensor([1.0, 1.0], dtype=torch.float64),
        torch.tensor([0.0, 0.0], dtype=torch.float64),
        torch.tensor([False, True]),
        "rao-kupper",
        math.log(2.0),
    )
    assert losses.tolist() == pytest.approx(
        [-math.log(E / (E + 2)), -math.log(3 * E / ((E + 2) * (2 * E + 1)))], rel=1e-12
    )
    assert m["accuracy"][0] == 1.0 and math.isnan(m["accuracy"][1])  # ties have no accuracy
    # argmax of (0.576, 0.327, 0.097) is "win": right for pair 0, wrong for the tie.
    assert m["three_way_accuracy"].tolist() == [1.0, 0.0]


def test_davidson_by_hand():
    # π = (e, 1), ν = 0.5: D = e + 1 + 0.5 √e; P(win) = e / D, P(tie) = 0.5 √e / D, P(lose) = 1 / D.
    D = E + 1 + 0.5 * math.sqrt(E)
    d = torch.tensor([1.0], dtype=torch.float64)
    p = tie_log_probs(d, "davidson", math.log(0.5))[0].exp().tolist()
    assert p == pytest.approx([E / D, 0.5 * math.sqrt(E) / D, 1 / D], rel=1e-12)
    losses, _ = tie_model_loss(
        torch.tensor([0.0], dtype=torch.float64),
        torch.tensor([1.0], dtype=torch.float64),
        torch.tensor([True]),
        "davidson",
        math.log(0.5),
    )
    assert losses.item() == pytest.approx(-math.log(0.5 * math.sqrt(E) / D), rel=1e-12)


@pytest.mark.parametrize("model, vanishing", [("rao-kupper", 0.0), ("davidson", -60.0)])
def test_tie_models_equal_bradley_terry_when_the_tie_parameter_vanishes(model, vanishing):
    # θ = 1 (log θ = 0) and ν = e^-60 ≈ 0: P(win) = σ(d), P(tie) = 0, the BT loss.
    r_c = torch.tensor([0.3, -1.0, 2.5], dtype=torch.float64)
    r_r = torch.tensor([0.0, 0.5, -0.5], dtype=torch.float64)
    losses, _ = tie_model_loss(r_c, r_r, torch.zeros(3, dtype=torch.bool), model, vanishing)
    bt, _ = bradley_terry_loss(r_c, r_r)
    torch.testing.assert_close(losses, bt, rtol=1e-12, atol=1e-12)
    sig = [1 / (1 + math.exp(-x)) for x in (0.3, -1.5, 3.0)]
    assert losses.tolist() == pytest.approx([-math.log(s) for s in sig], rel=1e-12)
    p_tie = tie_log_probs(r_c - r_r, model, vanishing)[:, 1].exp()
    assert float(p_tie.max()) < 1e-20


def test_rao_kupper_is_stable_far_from_zero_and_refuses_theta_below_one():
    d = torch.tensor([-80.0, 0.0, 80.0], dtype=torch.float64)
    logp = tie_log_probs(d, "rao-kupper", 0.5)
    assert torch.isfinite(logp).all()
    assert logp.exp().sum(-1).tolist() == pytest.approx([1.0] * 3, rel=1e-12)
    # At d = 0: P(tie) = (θ − 1)/(θ + 1) with θ = e^0.5.
    theta = math.exp(0.5)
    assert logp[1, 1].exp().item() == pytest.approx((theta - 1) / (theta + 1), rel=1e-12)
    with pytest.raises(PreftuneError, match="log theta >= 0"):
        tie_log_probs(d, "rao-kupper", -0.1)


def test_three_way_loss_by_hand():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    losses, m = three_way_loss(logits, torch.tensor([1, 2]))
    z = math.log(E**2 + 1 + E**-1)
    assert losses.tolist() == pytest.approx([z - 0.0, math.log(3)], rel=1e-6)
    assert m["three_way_accuracy"].tolist() == [0.0, 0.0]  # argmax 0 (and a 3-way tie -> 0)


# --- data layouts ------------------------------------------------------------------------------


def test_arena_rows_tie_column_and_equal_scores():
    arena = [
        {"prompt": "Q1", "response_a": " x", "response_b": " y", "winner": "a"},
        {"prompt": "Q2", "response_a": " x", "response_b": " y", "winner": "model_b"},
        {"prompt": "Q3", "response_a": " x", "response_b": " y", "winner": "Tie (bothbad)"},
        {"prompt": "Q4", "response_a": " x", "response_b": " y", "winner": "c"},
    ]
    pairs, report = to_pairs(arena, "arena.jsonl", on_bad_row="skip", ties="keep")
    assert report.format == "arena" and report.n_ties == 1
    assert [(p.chosen, p.rejected, p.tie) for p in pairs] == [
        (" x", " y", False),
        (" y", " x", False),
        (" x", " y", True),
    ]
    assert report.skipped == {"bad_winner": 1} and "'winner' must be one of" in report.summary()
    # Bradley-Terry's default: ties are dropped and counted, never coin-flipped.
    pairs, report = to_pairs(arena[:3], "arena.jsonl")
    assert len(pairs) == 2 and report.n_ties == 1 and report.skipped == {"tie": 1}
    assert "1 tied pairs dropped" in report.summary()
    with pytest.raises(PreftuneError, match="winner"):
        to_pairs(arena, "arena.jsonl", on_bad_row="error")
    prompts, _ = to_prompts(arena, "arena.jsonl")
    assert [p.prompt for p in prompts] == ["Q1", "Q2", "Q3", "Q4"]

    paired = [
        {"prompt": "Q", "chosen": " a", "rejected": " b", "tie": True},
        {"prompt": "Q", "chosen": " a", "rejected": " b", "tie": 0},
        {"prompt": "Q", "chosen": " a", "rejected": " b"},
    ]
    pairs, report = to_pairs(paired, "p.jsonl", ties="keep")
    assert [p.tie for p in pairs] == [True, False, False] and report.n_ties == 1

    # KTO and SFT have no use for a tie; rankings give it equal scores.
    from preftune.data.formats import to_ranked, to_sft, to_unpaired

    unpaired, report = to_unpaired(paired, "p.jsonl")
    assert len(unpaired) == 4 and report.skipped == {"tie": 1}
    assert len(to_sft(paired, "p.jsonl")[0]) == 2
    assert [r.scores for r in to_ranked(paired, "p.jsonl")[0]] == [
        [0.0, 0.0],
        [1.0, 0.0],
        [1.0, 0.0],
    ]

    ranked = [{"prompt": "Q", "completions": [" a", " b", " c"], "scores": [1.0, 2.0, 1.0]}]
    pairs, report = to_pairs(ranked, "r.jsonl", ties="keep")
    # (b > a), (a = c) tied, (b > c)
    assert [(p.chosen, p.rejected, p.tie) for p in pairs] == [
        (" b", " a", False),
        (" a", " c", True),
        (" b", " c", False),
    ]
    pairs, report = to_pairs(ranked, "r.jsonl")
    assert len(pairs) == 2 and report.n_ties == 1
    with pytest.raises(PreftuneError, match="all 1 usable pairs are ties"):
        to_pairs([arena[2]], "arena.jsonl")


# --- training on planted ties --------------------------------------------------------------------

WORDS = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta"]


def _reply(rng, end: str) -> str:
    return " " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4))) + f" {end}"


def write_tie_data(path: Path, n: int, seed: int, tie_fraction: float = 0.4) -> Path:
    """Arena rows: `yes` beats `no`; two replies with the same last word tie (planted ties)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3)))
            if rng.random() < tie_fraction:
                end = rng.choice(["yes", "no"])
                a, b, winner = _reply(rng, end), _reply(rng, end), "tie"
                if a == b:
                    b += " " + end
            elif rng.random() < 0.5:
                a, b, winner = _reply(rng, "yes"), _reply(rng, "no"), "a"
            else:
                a, b, winner = _reply(rng, "no"), _reply(rng, "yes"), "b"
            f.write(
                json.dumps({"prompt": prompt, "response_a": a, "response_b": b, "winner": winner})
                + "\n"
            )
    return path


def _train(data: Path, out: Path, loss: str, **extra) -> int:
    args = [
        "reward",
        "--model",
        "tiny",
        "--data",
        str(data),
        "--output-dir",
        str(out),
        "--loss",
        loss,
        "--max-length",
        "48",
        "--batch-size",
        "16",
        "--lr",
        "3e-3",
        "--logging-steps",
        "5",
        "--save-steps",
        "0",
        "--epochs",
        "3",
    ]
    for k, v in extra.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return main(args)


@pytest.fixture(scope="module")
def tie_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ties")
    train = write_tie_data(root / "train.jsonl", 128, seed=0)
    test = write_tie_data(root / "test.jsonl", 80, seed=1)
    runs = {"bt": root / "bt", "rao-kupper": root / "rao-kupper"}
    assert _train(train, runs["rao-kupper"], "rao-kupper") == 0  # 24 steps
    assert _train(train, runs["bt"], "bt", max_steps=4) == 0  # only its outputs are compared
    return root, train, test, runs


def test_rao_kupper_model_predicts_ties_on_tied_pairs_more_than_bradley_terry(tie_runs):
    from transformers import AutoModelForSequenceClassification

    root, _, test, runs = tie_runs
    model = AutoModelForSequenceClassification.from_pretrained(str(runs["rao-kupper"]))
    assert model.config.num_labels == 1  # one output; the tie parameter rides in the config
    assert model.config.tie_model == "rao-kupper" and model.config.tie_parameter > 2.0
    results = {}
    for loss, run in runs.items():
        out = root / f"eval-{loss}"
        assert (
            main(["eval-rm", "--model", str(run), "--data", str(test), "--output-dir", str(out)])
            == 0
        )
        results[loss] = json.loads((out / "results.json").read_text())
        results[loss]["scores"] = [
            json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()
        ]
    rk = results["rao-kupper"]["ties_three_way"]
    assert rk["method"].startswith("rao-kupper")
    # The tie model says "tie" (its most probable outcome) on most held-out tied pairs, seldom
    # on untied ones, and beats constant outcome rates in log loss.
    assert rk["n_tied"] >= 5 and rk["tie_recall"] >= 0.75
    assert rk["mean_p_tie_tied"] > rk["mean_p_tie_untied"] + 0.2
    assert rk["log_loss"] < rk["log_loss_constant"]
    # Bradley-Terry's own probabilities, σ(r_a − r_b) with P(tie) = 0, never predict a tie.
    bt_scores = [s for s in results["bt"]["scores"] if s["tie"]]
    n_tied = results["bt"]["n_tied_pairs"]
    assert len(bt_scores) == n_tied == results["rao-kupper"]["n_tied_pairs"] >= 10
    rk_scores = [s for s in results["rao-kupper"]["scores"] if s["tie"]]
    rk_says_tie = sum(s["p_tie"] > max(s["p_win"], s["p_lose"]) for s in rk_scores)
    assert rk_says_tie / len(rk_scores) > 0.75  # BT's own fraction is 0 by construction
    # Its margin-threshold baseline is reported next to it (fitted on the fit split).
    bt = results["bt"]["ties_three_way"]
    assert bt["method"].startswith("margin threshold") and bt["n"] == rk["n"]
    # Untied pairs keep the pairwise statistics; ties are counted apart.
    assert results["bt"]["n_pairs"] + n_tied == results["bt"]["n_pairs_in_data"] == 80
    assert (root / "eval-rao-kupper" / "ties_reliability.png").read_bytes()[:4] == b"\x89PNG"


def test_three_way_head_trains_saves_and_is_evaluated(tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification

    data = write_tie_data(tmp_path / "d.jsonl", 48, seed=2)
    out = tmp_path / "rm3"
    assert (
        main(
            [
                "reward",
                "--model",
                "tiny",
                "--data",
                str(data),
                "--output-dir",
                str(out),
                "--loss",
                "three-way",
                "--max-length",
                "64",
                "--batch-size",
                "16",
                "--max-steps",
                "3",
                "--lr",
                "3e-3",
                "--save-steps",
                "0",
            ]
        )
        == 0
    )
    model = AutoModelForSequenceClassification.from_pretrained(str(out))
    assert model.config.num_labels == 3 and model.config.preftune_head == "three-way"
    assert model.config.id2label == {0: "first_wins", 1: "tie", 2: "second_wins"}
    assert (
        main(
            [
                "eval-rm",
                "--model",
                str(out),
                "--data",
                str(data),
                "--output-dir",
                str(tmp_path / "ev"),
            ]
        )
        == 0
    )
    res = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert res["reward_kind"] == "three_way" and res["ties_three_way"]["method"] == "three-way head"
    scores = [
        json.loads(line) for line in (tmp_path / "ev" / "scores.jsonl").read_text().splitlines()
    ]
    for s in scores:  # both orders averaged: proper probabilities
        assert s["p_win"] + s["p_tie"] + s["p_lose"] == pytest.approx(1.0, abs=1e-6)
    # A pair classifier has no reward per reply: the online trainers refuse it.
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "hi"}) + "\n")
    assert (
        main(
            [
                "grpo",
                "--model",
                "tiny",
                "--data",
                str(prompts),
                "--reward-model",
                str(out),
                "--output-dir",
                str(tmp_path / "g"),
                "--max-steps",
                "1",
            ]
        )
        == 2
    )
    assert "num_labels=3" in capsys.readouterr().err


def test_tie_settings_are_refused(tmp_path, capsys):
    data = write_tie_data(tmp_path / "d.jsonl", 8, seed=3)
    for extra, expected in (
        (["--tie-lr", "0.1"], "tie_lr only applies"),
        (["--loss", "three-way", "--center-coef", "0.1"], "center_coef"),
        (["--loss", "three-way", "--ensemble", "2"], "ensemble"),
        (["--bootstrap"], "bootstrap"),
    ):
        assert (
            main(["reward", "--data", str(data), "--output-dir", str(tmp_path / "x"), *extra]) == 2
        )
        assert expected in capsys.readouterr().err
