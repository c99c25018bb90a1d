"""Reward-model ensembles (aggregations by hand, training, PPO and eval-rm with one) and the
best-of-K evaluation on a toy source whose answer is known."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from preftune.cli import main
from preftune.errors import PreftuneError
from preftune.evaluation.best_of_k import expected_best_of_k
from preftune.rewards.sources import EnsembleReward, FunctionReward, aggregate_ensemble

ROOT = Path(__file__).resolve().parents[1]


# --- aggregation by hand -------------------------------------------------------------------------


def test_ensemble_aggregations_by_hand():
    # Three members, two completions: scores (1, 2, 6) and (0, 0, 3).
    scores = torch.tensor([[1.0, 0.0], [2.0, 0.0], [6.0, 3.0]])
    # mean 3 and 1; population std sqrt(((1-3)^2 + (2-3)^2 + (6-3)^2) / 3) = sqrt(14/3), sqrt(2).
    std = [math.sqrt(14 / 3), math.sqrt(2)]
    total, s = aggregate_ensemble(scores, "mean")
    assert total.tolist() == pytest.approx([3.0, 1.0]) and s.tolist() == pytest.approx(std)
    assert aggregate_ensemble(scores, "min")[0].tolist() == [1.0, 0.0]
    total, _ = aggregate_ensemble(scores, "mean-minus-std", 0.5)
    assert total.tolist() == pytest.approx([3 - 0.5 * std[0], 1 - 0.5 * std[1]], abs=1e-6)
    total, _ = aggregate_ensemble(scores, "mean-minus-var", 0.5)
    assert total.tolist() == pytest.approx([3 - 0.5 * 14 / 3, 1 - 0.5 * 2], abs=1e-6)
    with pytest.raises(PreftuneError, match="ensemble_agg"):
        aggregate_ensemble(scores, "max")


def test_ensemble_reward_source_components():
    members = [
        FunctionReward(lambda p, c, k=k: [k * len(x) for x in c], name=f"m{k}") for k in (1.0, 3.0)
    ]
    source = EnsembleReward(members, agg="mean-minus-std", coef=2.0)
    total, parts = source.score_with_components(["q", "q"], ["ab", "abcd"])
    # members: (2, 4) and (6, 12); mean (4, 8), std (2, 4): total 4 - 2*2 = 0, 8 - 2*4 = 0.
    assert parts["member_0"].tolist() == [2.0, 4.0] and parts["member_1"].tolist() == [6.0, 12.0]
    assert parts["ensemble_std"].tolist() == [2.0, 4.0]
    assert total.tolist() == pytest.approx([0.0, 0.0], abs=1e-6)
    with pytest.raises(PreftuneError, match="at least 2 members"):
        EnsembleReward(members[:1])


# --- training an ensemble and using it -----------------------------------------------------------


def _pairs(path: Path) -> Path:
    rows = [
        {"prompt": f"Q{i}:", "chosen": f" good {i} yes", "rejected": f" bad {i} no"}
        for i in range(12)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def ensemble_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ens")
    out = root / "rm"
    assert (
        main(
            [
                "reward",
                "--model",
                "tiny",
                "--data",
                str(_pairs(root / "pairs.jsonl")),
                "--output-dir",
                str(out),
                "--max-steps",
                "2",
                "--batch-size",
                "4",
                "--max-length",
                "32",
                "--save-steps",
                "0",
                "--ensemble",
                "2",
                "--bootstrap",
                "--lr",
                "1e-3",
            ]
        )
        == 0
    )
    return out


def test_ensemble_folder_layout(ensemble_dir):
    from safetensors.torch import load_file

    manifest = json.loads((ensemble_dir / "ensemble.json").read_text())
    assert [m["path"] for m in manifest["members"]] == ["member-0", "member-1"]
    assert [m["seed"] for m in manifest["members"]] == [0, 1] and manifest["bootstrap"]
    w0 = load_file(str(ensemble_dir / "member-0" / "model.safetensors"))
    w1 = load_file(str(ensemble_dir / "member-1" / "model.safetensors"))
    assert not torch.equal(w0["score.weight"], w1["score.weight"])  # different seeds


def test_ppo_with_an_ensemble_logs_disagreement(tmp_path, ensemble_dir):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Question {i}:"}) + "\n" for i in range(8)))
    out = tmp_path / "ppo"
    assert (
        main(
            [
                "ppo",
                "--model",
                "tiny",
                "--data",
                str(prompts),
                "--output-dir",
                str(out),
                "--reward-model",
                str(ensemble_dir),
                "--ensemble-agg",
                "mean-minus-std",
                "--ensemble-coef",
                "0.5",
                "--max-steps",
                "2",
                "--prompts-per-step",
                "4",
                "--max-new-tokens",
                "8",
                "--max-length",
                "128",
                "--batch-size",
                "8",
                "--save-steps",
                "0",
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert row["reward/ensemble_std"] > 0  # two differently seeded members disagree
        # The trained reward is mean − 0.5 · std, averaged over the rollout.
        assert row["reward/mean"] < row["reward/ensemble_mean"]
    assert (out / "run_complete.json").is_file()


def test_ensemble_settings_are_refused_without_an_ensemble(tmp_path, capsys, ensemble_dir):
    member = ensemble_dir / "member-0"
    assert (
        main(
            [
                "grpo",
                "--model",
                "tiny",
                "--reward-model",
                str(member),
                "--ensemble-agg",
                "min",
                "--output-dir",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    assert "ensemble.json" in capsys.readouterr().err
    assert (
        main(
            [
                "best-of-n",
                "--reward-model",
                str(ensemble_dir),
                "--ensemble-coef",
                "2",
                "--output-dir",
                str(tmp_path / "y"),
            ]
        )
        == 2
    )
    assert "only applies to ensemble_agg mean-minus-std" in capsys.readouterr().err


def test_eval_rm_on_an_ensemble_reports_members(tmp_path, ensemble_dir):
    out = tmp_path / "eval"
    assert (
        main(
            [
                "eval-rm",
                "--model",
                str(ensemble_dir),
                "--data",
                str(_pairs(tmp_path / "pairs.jsonl")),
                "--output-dir",
                str(out),
                "--ensemble-agg",
                "min",
            ]
        )
        == 0
    )
    res = json.loads((out / "results.json").read_text())
    scores = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert res["reward_kind"] == "ensemble" and res["ensemble"]["members"] == 2
    assert len(res["ensemble"]["member_accuracy"]) == 2 and res["ensemble"]["mean_member_std"] > 0
    stds = []
    for s in scores:  # `min` of the members, reply by reply
        assert s["reward_chosen"] == pytest.approx(min(s["member_rewards_chosen"]), abs=1e-6)
        assert s["reward_rejected"] == pytest.approx(min(s["member_rewards_rejected"]), abs=1e-6)
        stds += [np.std(s["member_rewards_chosen"]), np.std(s["member_rewards_rejected"])]
    assert res["ensemble"]["mean_member_std"] == pytest.approx(np.mean(stds), rel=1e-5)
    accuracy = [
        np.mean([s["member_rewards_chosen"][k] > s["member_rewards_rejected"][k] for s in scores])
        for k in (0, 1)
    ]
    assert res["ensemble"]["member_accuracy"] == pytest.approx(accuracy)


# --- best-of-K -----------------------------------------------------------------------------------


def test_expected_best_of_k_by_hand():
    # N = 3, reward order c0 > c1 > c2, gold (0, 1, 0).
    select, gold = np.array([3.0, 2.0, 1.0]), np.array([0.0, 1.0, 0.0])
    # K = 1: a random completion, mean gold 1/3.
    assert expected_best_of_k(select, gold, 1) == pytest.approx(1 / 3)
    # K = 2: subsets {0,1}, {0,2}, {1,2} pick c0, c0, c1: gold 0, 0, 1 -> 1/3.
    assert expected_best_of_k(select, gold, 2) == pytest.approx(1 / 3)
    # K = 3: always c0 -> 0. The oracle (select = gold) picks c1 whenever it is drawn: 2/3 at K=2.
    assert expected_best_of_k(select, gold, 3) == 0.0
    assert expected_best_of_k(gold, gold, 2) == pytest.approx(2 / 3)
    # Equal scores are a uniform pick: all tied -> the mean gold at every K.
    assert expected_best_of_k(np.zeros(3), gold, 3) == pytest.approx(1 / 3)


BOK_FUNCTIONS = """
def guess(prompts, completions):
    # A reward that likes the largest number: right when the answer is the largest.
    return [float(c) for c in completions]

def gold(prompts, completions, answer):
    return [float(c.strip() == a) for c, a in zip(completions, answer)]
"""


def test_best_of_k_on_a_toy_source_with_known_answers(tmp_path, capsys):
    fns = tmp_path / "fns.py"
    fns.write_text(BOK_FUNCTIONS)
    data = tmp_path / "bok.jsonl"
    # Prompt 1: the answer 4 is the largest -> the reward's pick is always right when drawn.
    # Prompt 2: the answer 2 is the smallest -> the reward picks it only when K = 1 draws it.
    rows = [
        {"prompt": "2+2=", "completions": ["1", "4", "3", "2"], "answer": "4"},
        {"prompt": "1+1=", "completions": ["2", "3", "5", "7"], "answer": "2"},
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for gold_args in ([], ["--gold-fn", f"{fns}:gold"]):
        out = tmp_path / f"out{len(gold_args)}"
        assert (
            main(
                [
                    "eval-rm",
                    "--best-of-k",
                    "--model",
                    f"{fns}:guess",
                    "--data",
                    str(data),
                    "--output-dir",
                    str(out),
                    *gold_args,
                ]
            )
            == 0
        )
        res = json.loads((out / "best_of_k.json").read_text())
        curve = {c["k"]: c for c in res["curve"]}
        assert sorted(curve) == [1, 2, 4]
        # P(the answer is among K of 4) = K/4. Prompt 1: reward pick right with that
        # probability; prompt 2: right only at K = 1 (1/4). Mean over the two prompts:
        for k, want in ((1, (1 / 4 + 1 / 4) / 2), (2, (2 / 4 + 0) / 2), (4, (1 + 0) / 2)):
            assert curve[k]["reward_pick"]["mean"] == pytest.approx(want)
            assert curve[k]["oracle_pick"]["mean"] == pytest.approx(k / 4)
            assert curve[k]["random_pick"]["mean"] == pytest.approx(1 / 4)
        # Interval: mean ± 1.96 · sd / √2 of the per-prompt values (1/2, 0) at K = 2.
        half = 1.959963984540054 * np.std([0.5, 0.0], ddof=1) / math.sqrt(2)
        assert curve[2]["reward_pick"]["ci_high"] == pytest.approx(0.25 + half)
        # Paired regret at K = 4: prompt 1 loses nothing, prompt 2 loses 1 (oracle 1, pick 0).
        assert curve[4]["reward_minus_oracle"]["mean"] == pytest.approx(-0.5)
        assert (out / "best_of_k.png").read_bytes()[:4] == b"\x89PNG"
    assert "oracle pick" in capsys.readouterr().out
    assert (
        main(
            [
                "eval-rm",
                "--best-of-k",
                "--model",
                f"{fns}:guess",
                "--data",
                str(data),
                "--output-dir",
                str(tmp_path / "bad"),
                "--k-values",
                "8",
            ]
        )
        == 2
    )
    assert "exceeds the 4 completions" in capsys.readouterr().err


def test_best_of_n_with_an_ensemble_reports_disagreement(tmp_path, ensemble_dir):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Q{i}:"}) + "\n" for i in range(3)))
    out = tmp_path / "bon"
    assert (
        main(
            [
                "best-of-n",
                "--model",
                "tiny",
                "--data",
                str(prompts),
                "--n",
                "3",
                "--reward-model",
                str(ensemble_dir),
                "--ensemble-agg",
                "min",
                "--max-new-tokens",
                "6",
                "--max-length",
                "64",
                "--output-dir",
                str(out),
            ]
        )
        == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reward/ensemble_std"] > 0


def test_data_relabel_with_an_ensemble_uses_the_aggregation(tmp_path, ensemble_dir):
    # `preftune data relabel` is a reward-model consumer too: with `min` every written pair is
    # ordered by the smaller of the two members' scores, recomputed here member by member.
    from preftune.rewards.sources import ModelReward

    data = _pairs(tmp_path / "pairs.jsonl")
    out = tmp_path / "relabelled"
    assert (
        main(
            [
                "data",
                "relabel",
                str(data),
                "--reward-model",
                str(ensemble_dir),
                "--ensemble-agg",
                "min",
                "--output-dir",
                str(out),
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in (out / "data.jsonl").read_text().splitlines()]
    members = [ModelReward.from_pretrained(str(ensemble_dir / f"member-{k}")) for k in (0, 1)]
    for row in rows:
        texts = [row["chosen"], row["rejected"]]
        scores = [m([row["prompt"]] * 2, texts).tolist() for m in members]
        low = [min(scores[0][i], scores[1][i]) for i in (0, 1)]
        assert row["reward_chosen"] == pytest.approx(low[0], abs=1e-5)
        assert row["reward_rejected"] == pytest.approx(low[1], abs=1e-5)
    assert (
        main(
            [
                "data",
                "relabel",
                str(data),
                "--reward-model",
                str(ensemble_dir / "member-0"),
                "--ensemble-agg",
                "min",
                "--output-dir",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
