"""`preftune best-of-n`: the dataset it writes, its summary and the analytic KL bound."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from preftune.cli import main
from preftune.data import formats
from preftune.trainers.best_of_n import kl_bound

ROOT = Path(__file__).resolve().parents[1]
LOWERCASE = f"{ROOT / 'tests' / 'rewards_for_tests.py'}:lowercase_fraction"


def test_kl_bound_by_hand():
    assert kl_bound(1) == 0.0
    assert kl_bound(2) == pytest.approx(math.log(2) - 0.5)  # 0.6931 - 0.5 = 0.1931
    assert kl_bound(8) == pytest.approx(2.0794415 - 0.875)


def _run(tmp_path, *extra) -> Path:
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Question {i}:"}) + "\n" for i in range(6)))
    out = tmp_path / "bon"
    assert (
        main(
            [
                "best-of-n",
                "--model",
                "tiny",
                "--data",
                str(data),
                "--output-dir",
                str(out),
                "--reward-fn",
                LOWERCASE,
                "--n",
                "6",
                "--max-new-tokens",
                "12",
                "--max-length",
                "128",
                "--prompts-per-batch",
                "4",
                *extra,
            ]
        )
        == 0
    )
    return out


def test_best_of_n_writes_best_pairs_and_summary(tmp_path):
    out = _run(tmp_path)
    best = [json.loads(l) for l in (out / "best_of_n.jsonl").read_text().splitlines()]
    pairs = [json.loads(l) for l in (out / "pairs.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    assert len(best) == 6 and set(best[0]) == {"prompt", "completion", "reward"}
    assert all(p["chosen_reward"] > p["rejected_reward"] for p in pairs)
    assert summary["reward/best_mean"] >= summary["reward/all_mean"] >= summary["reward/worst_mean"]
    assert summary["kl_bound"] == pytest.approx(kl_bound(6))
    assert summary["reward/best_mean"] == pytest.approx(sum(b["reward"] for b in best) / 6)
    # the pairs file is preference data the offline trainers read
    examples, _ = formats.to_pairs(pairs, "pairs.jsonl")
    assert len(examples) == len(pairs)
    assert not list(out.glob(".*tmp"))  # written atomically: no temporary files left


def test_best_of_n_refuses_an_existing_run_and_bad_n(tmp_path, capsys):
    _run(tmp_path)
    assert (
        main(
            [
                "best-of-n",
                "--output-dir",
                str(tmp_path / "bon"),
                "--reward-fn",
                LOWERCASE,
                "--data",
                str(tmp_path / "p.jsonl"),
            ]
        )
        == 2
    )
    assert "--overwrite" in capsys.readouterr().err
    assert main(["best-of-n", "--n", "0", "--reward-fn", LOWERCASE]) == 2
    assert "n: got 0" in capsys.readouterr().err
