"""`preftune lab --quick` end to end: the report exists and its numbers hang together."""

import json
import math

import pytest

from preftune.cli import main
from preftune.errors import PreftuneError
from preftune.lab.run import LabConfig, parse_sweep, resolve


@pytest.fixture(scope="module")
def quick_lab(tmp_path_factory):
    out = tmp_path_factory.mktemp("lab")
    cache = tmp_path_factory.mktemp("lab-cache")
    # Noise-free labels: with human-level noise (30% flips) the few hundred pairs of the quick
    # grid teach the reward model little, and best-of-N then has nothing to find (a real result
    # the default grid reports). Here the reward model must be informative for the checks below.
    argv = ["lab", "--quick", "--noise", "none", "--output-dir", str(out / "report"),
            "--cache-dir", str(cache)]
    assert main(argv) == 0
    results = json.loads((out / "report" / "results.json").read_text())
    return out / "report", cache, argv, results


def _rows(results, method):
    return sorted((r for r in results["summary"] if r["method"] == method),
                  key=lambda r: r["value"] if r["value"] is not None else -1)


@pytest.mark.slow  # the quick lab runs once for the module, minutes on CPU
def test_report_files_exist(quick_lab):
    out, _, _, results = quick_lab
    for name in ("report.md", "frontier.png", "overoptimization.png", "results.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (out / "report.md").read_text()
    assert "Reading of the results" in text and "±" in text
    assert results["failures"] == []
    assert results["config"]["quick"] is True and results["plan"]["seeds"] == [0]


@pytest.mark.slow  # the quick lab runs once for the module, minutes on CPU
def test_base_policy_is_a_fair_coin_against_itself(quick_lab):
    _, _, _, results = quick_lab
    (base,) = _rows(results, "base_policy")
    assert base["kl"] == 0.0
    # An independent sample of the base policy: 50% within noise (4 s.e., s.e. of a win rate
    # over 64 prompts is at most 0.0625).
    assert abs(base["win_rate"] - 0.5) <= 4 * max(base["win_rate_se"], 0.03)


@pytest.mark.slow  # the quick lab runs once for the module, minutes on CPU
def test_every_trained_method_moved_away_from_the_base(quick_lab):
    _, _, _, results = quick_lab
    trained = [r for r in results["summary"] if r["method"] not in ("base_policy", "best_of_n")]
    assert {r["method"] for r in trained} >= {"dpo", "kto", "ppo"}
    for r in trained:
        assert r["kl"] > 0, (r["method"], r["kl"])
        assert r["tokens_trained"] > 0 and r["wall_time_s"] > 0
        for m in ("gold", "kl", "win_rate", "proxy"):
            assert math.isfinite(r[m]) and math.isfinite(r[f"{m}_se"]) and r[f"{m}_se"] >= 0
        assert 0.0 <= r["win_rate"] <= 1.0


@pytest.mark.slow  # the quick lab runs once for the module, minutes on CPU
def test_best_of_n_gold_grows_with_n(quick_lab):
    _, _, _, results = quick_lab
    bon = _rows(results, "best_of_n")
    assert [r["value"] for r in bon] == [1, 4, 16]
    assert bon[0]["kl"] == 0.0 and bon[1]["kl"] < bon[2]["kl"]  # the analytic bound
    # The proxy picks the completion it likes best, so the proxy score grows with N...
    assert bon[0]["proxy"] < bon[1]["proxy"] < bon[2]["proxy"]
    # ...and a reward model trained on gold-labelled pairs tracks the gold reward enough that
    # best-of-16 beats best-of-1.
    assert bon[2]["gold"] > bon[0]["gold"]


@pytest.mark.slow  # the quick lab runs once for the module, minutes on CPU
def test_rerun_resumes_and_skips_finished_cells(quick_lab, capsys):
    out, cache, argv, results = quick_lab
    before = {p: p.stat().st_mtime_ns for p in (out / "cells").rglob("*.json")}
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "train " not in err  # no cell ran again
    after = {p: p.stat().st_mtime_ns for p in (out / "cells").rglob("*.json")}
    assert before == after
    again = json.loads((out / "results.json").read_text())
    assert [r["gold"] for r in again["summary"]] == [r["gold"] for r in results["summary"]]


def test_bad_settings_are_refused():
    for bad in (dict(worlds=["nowhere"]), dict(methods=["magic"]), dict(noise="0.9"),
                dict(seeds=[1, 1]), dict(model="gpt2"), dict(sweep=["dpo=abc"]),
                dict(sweep=["best_of_n=0"])):
        with pytest.raises(PreftuneError):
            LabConfig(**bad).validate()
    assert parse_sweep(["dpo=0.1,0.2", "best_of_n=1,8"]) == {"dpo": (0.1, 0.2),
                                                           "best_of_n": (1, 8)}
    plan = resolve(LabConfig(quick=True, sweep=["dpo=0.5"]))
    assert plan.sweeps["dpo"] == [0.5] and plan.seeds == [0]


def test_cli_reports_a_bad_setting(capsys):
    assert main(["lab", "--noise", "lots"]) == 2
    assert "noise" in capsys.readouterr().err
