"""`preftune lab` end to end on a miniature grid: the results.json names tools read, paired
gains that match the cells, trajectories, disjoint prompts, and resuming."""

import json
from pathlib import Path

import pytest

from preftune.cli import main
from preftune.errors import PreftuneError
from preftune.lab.plan import LabConfig, cells, parse_grid, resolve


@pytest.fixture(scope="module")
def mini_lab(tmp_path_factory):
    out = tmp_path_factory.mktemp("lab")
    cache = tmp_path_factory.mktemp("lab-cache")
    argv = [
        "lab",
        "--quick",
        "--noise",
        "none",
        "--seeds",
        "0",
        "1",
        "--methods",
        "dpo",
        "ppo",
        "best_of_n",
        "--sweep",
        "best_of_n=1,2,4",
        "--sft-steps",
        "60",
        "--pairs",
        "96",
        "--eval-prompts",
        "8",
        "--offline-steps",
        "5",
        "--online-steps",
        "5",
        "--output-dir",
        str(out / "report"),
        "--cache-dir",
        str(cache),
    ]
    assert main(argv) == 0
    results = json.loads((out / "report" / "results.json").read_text())
    return out / "report", argv, results


@pytest.mark.slow
def test_report_files_and_names(mini_lab):
    out, _, results = mini_lab
    for name in ("report.md", "frontier.png", "overoptimization.png", "compute.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    text = (out / "report.md").read_text()
    assert "Smoke run (`--quick`)" in text and "What this run cannot tell" in text
    assert results["failures"] == []
    p = results["prompts"]
    assert p["overlap"] == 0 and min(p["train"], p["validation"], p["test"]) > 0
    s = results["summary"]["review"]["noise"]["none"]
    assert 0.0 <= s["reward_model"]["gold_accuracy"] <= 1.0
    for name in ("dpo", "ppo", "best_of_n"):
        m = s["methods"][name]
        gain = m["gain_vs_base"]
        assert gain["n_seeds"] == 2 and gain["ci_low"] <= gain["mean"] <= gain["ci_high"]
        assert "kl_k1" in m and "kl_k3" in m
        for point in m["trajectory"]:
            assert {"kl_k1", "kl_k3", "gold", "proxy"} <= set(point)


@pytest.mark.slow
def test_gains_are_paired_differences_of_the_cells(mini_lab):
    _, _, results = mini_lab
    base = {c["seed"]: c["test"]["gold"] for c in results["cells"] if c["kind"] == "eval"}
    m = results["summary"]["review"]["noise"]["none"]["methods"]["dpo"]
    sel = m["selected"]
    runs = {
        c["seed"]: c["test"]["gold"]
        for c in results["cells"]
        if c["method"] == "dpo" and c["value"] == sel["value"] and c["lr"] == sel["lr"]
    }
    expected = [runs[s] - base[s] for s in (0, 1)]
    assert m["gain_vs_base"]["per_seed"] == pytest.approx(expected)
    assert m["gain_vs_base"]["mean"] == pytest.approx(sum(expected) / 2)


@pytest.mark.slow
def test_trajectories_have_at_least_five_points(mini_lab):
    _, _, results = mini_lab
    trained = [c for c in results["cells"] if c["kind"] in ("offline", "online")]
    assert {c["method"] for c in trained} == {"dpo", "ppo"}
    for c in trained:
        steps = [p["step"] for p in c["trajectory"]]
        assert len(steps) >= 5 and steps == sorted(set(steps)) and steps[-1] == 5
        # Every checkpoint is the trained policy, not the frozen reference that accelerate
        # saved beside it (it would read KL exactly 0).
        assert all(p["kl_k3"] > 0 for p in c["trajectory"]), c["method"]
    assert trained[0]["train"]["logps"]  # DPO's chosen/rejected log-prob trend


@pytest.mark.slow
def test_implicit_reward_accuracy_is_recomputable(mini_lab):
    # Issue 9 req. 4: DPO's implicit reward beta*(log pi - log pi_base) on the reward model's
    # fresh gold-ranked test pairs, recomputed here from the saved policy of one cell.
    from preftune.lab import evaluate as ev
    from preftune.lab.run import Runner
    from preftune.models import load_causal_lm

    out, _, results = mini_lab
    s = results["summary"]["review"]["noise"]["none"]["methods"]
    acc = s["dpo"]["implicit_reward_gold_accuracy"]
    assert 0.0 <= acc["mean"] <= 1.0 and acc["n_seeds"] == 2
    assert s["ppo"].get("implicit_reward_gold_accuracy") is None
    assert "implicit-reward gold accuracy" in (out / "report.md").read_text()
    cell = next(c for c in results["cells"] if c["method"] == "dpo" and c["seed"] == 0)
    runner = Runner(
        resolve(LabConfig(**results["config"])), out, Path(results["config"]["cache_dir"])
    )
    rollout, _, _, gold = runner.gold_pairs("review", 0)
    base, tokenizer = runner.base("review", 0)
    policy, _ = load_causal_lm(
        str(out / "runs/review/seed0/noise-none" / f"dpo-{cell['value']:g}-lr{cell['lr']:g}")
    )
    lp = ev.sequence_logps(policy, rollout, tokenizer.pad_token_id)
    ref = ev.sequence_logps(base, rollout, tokenizer.pad_token_id)
    r = [cell["value"] * (a - b) for a, b in zip(lp, ref)]
    decided = [i for i in range(0, len(gold), 2) if gold[i] != gold[i + 1]]
    right = [(gold[i] > gold[i + 1]) == (r[i] > r[i + 1]) for i in decided]
    assert cell["implicit_reward_gold_pairs"] == len(decided) > 0
    assert cell["implicit_reward_gold_accuracy"] == pytest.approx(sum(right) / len(decided))


@pytest.mark.slow
def test_offline_only_lab_runs_without_a_reward_model(mini_lab, tmp_path):
    # No method needs a reward model: none is trained, and the offline cells (a reference-free
    # loss among them) have no proxy column but their implicit-reward accuracy.
    out, argv, _ = mini_lab
    cache = argv[argv.index("--cache-dir") + 1]  # the base policy is cached there
    assert (
        main(
            [
                "lab",
                "--quick",
                "--noise",
                "none",
                "--seeds",
                "0",
                "--methods",
                "simpo",
                "--sft-steps",
                "60",
                "--pairs",
                "96",
                "--eval-prompts",
                "8",
                "--offline-steps",
                "5",
                "--output-dir",
                str(tmp_path),
                "--cache-dir",
                cache,
            ]
        )
        == 0
    )
    results = json.loads((tmp_path / "results.json").read_text())
    s = results["summary"]["review"]["noise"]["none"]
    assert "reward_model" not in s and s["methods"]["simpo"]["proxy_gain"] is None
    cell = next(c for c in results["cells"] if c["method"] == "simpo")
    assert cell["implicit_reward"] == "mean"
    assert 0.0 <= cell["implicit_reward_gold_accuracy"] <= 1.0


@pytest.mark.slow
def test_best_of_n_proxy_never_falls_with_n(mini_lab):
    # With the same samples, the best proxy score among the first N cannot fall as N grows.
    _, _, results = mini_lab
    rows = results["summary"]["review"]["noise"]["none"]["methods"]["best_of_n"]["settings"]
    assert [r["value"] for r in rows] == [1, 2, 4]
    proxies = [r["proxy_gain"]["mean"] for r in rows]
    assert proxies == sorted(proxies)
    assert [r["kl_bound"] for r in rows] == sorted(r["kl_bound"] for r in rows)
    assert all(r["kl_plugin"]["mean"] <= r["kl_bound"] + 1e-9 for r in rows)


@pytest.mark.slow
def test_rerun_resumes_and_skips_finished_cells(mini_lab, capsys):
    out, argv, results = mini_lab
    before = {p: p.stat().st_mtime_ns for p in (out / "cells").rglob("*.json")}
    capsys.readouterr()
    assert main(argv) == 0
    assert "lab [" not in capsys.readouterr().err  # no cell ran again
    after = {p: p.stat().st_mtime_ns for p in (out / "cells").rglob("*.json")}
    assert before == after
    again = json.loads((out / "results.json").read_text())
    assert (
        again["summary"]["review"]["noise"]["none"]["methods"]["dpo"]["gain_vs_base"]
        == results["summary"]["review"]["noise"]["none"]["methods"]["dpo"]["gain_vs_base"]
    )


def test_default_plan():
    plan = resolve(LabConfig())
    assert plan.noises == ["none", "human"] and len(plan.seeds) >= 3
    assert {"ppo_gold", "best_of_n_gold"} <= set(plan.methods)
    assert max(plan.sweeps["dpo"]) == 5.0 and len(plan.lrs["dpo"]) >= 2
    assert 0.0 in plan.sweeps["ppo"]
    kinds = [c.kind for c in cells(plan)]
    assert kinds.count("base") == len(plan.seeds)
    assert kinds.count("reward_model") == len(plan.seeds) * 2


def test_bad_settings_are_refused():
    for bad in (
        dict(worlds=["nowhere"]),
        dict(methods=["magic"]),
        dict(noise=["0.9"]),
        dict(seeds=[1, 1]),
        dict(model="gpt2"),
        dict(sweep=["dpo=abc"]),
        dict(sweep=["best_of_n=0"]),
        dict(lrs=["dpo=0"]),
        dict(eval_points=3),
    ):
        with pytest.raises(PreftuneError):
            LabConfig(**bad).validate()
    assert parse_grid(["dpo=0.1,0.2", "best_of_n=1,8"], "sweep") == {
        "dpo": (0.1, 0.2),
        "best_of_n": (1, 8),
    }
    plan = resolve(LabConfig(quick=True, sweep=["dpo=0.5"]))
    assert plan.sweeps["dpo"] == [0.5] and plan.seeds == [0, 1]


def test_cli_reports_a_bad_setting(capsys):
    assert main(["lab", "--noise", "lots"]) == 2
    assert "noise" in capsys.readouterr().err


def test_ensemble_variant_resolves_to_an_ensemble_reward(tmp_path):
    # Issue 13: ppo_ensemble trains K reward models into one folder (not the single one) and
    # PPO optimises their mean minus one std; it is not a default method.
    from preftune.lab import stages
    from preftune.lab.methods import DEFAULT_METHODS, METHODS
    from preftune.lab.run import Runner

    assert not {"ppo_ensemble", "best_of_n_ensemble"} & set(DEFAULT_METHODS)
    plan = resolve(
        LabConfig(quick=True, methods=["ppo_ensemble"], seeds=[0], noise=["none"], ensemble_size=4)
    )
    kinds = [c.kind for c in cells(plan)]
    assert "reward_ensemble" in kinds and "reward_model" not in kinds
    both = resolve(
        LabConfig(
            quick=True, methods=["best_of_n", "best_of_n_ensemble"], seeds=[0], noise=["none"]
        )
    )
    assert [c.kind for c in cells(both)] == [
        "base",
        "eval",
        "data",
        "reward_model",
        "reward_ensemble",
        "inference",
    ]
    assert both.sweeps["best_of_n_ensemble"] == [1, 4, 16]
    assert stages.ensemble_settings(plan, 0)["ensemble"] == 4
    cell = next(c for c in cells(plan) if c.method == "ppo_ensemble")
    runner = Runner(plan, tmp_path, tmp_path / "cache")
    folder = runner.ensemble_dir("review", 0, "none")
    cfg = runner.trainer_config(cell)
    assert (cfg.reward_model, cfg.ensemble_agg, cfg.ensemble_coef) == (
        str(folder),
        "mean-minus-std",
        1.0,
    )
    assert type(cfg).__name__ == "PPOConfig" and cfg.kl_coef == cell.value
    with pytest.raises(PreftuneError, match="ensemble"):  # no ensemble.json yet: refused
        cfg.validate()
    # A changed ensemble size reruns the ensemble and the method, not the single-RM cells.
    other = Runner(
        resolve(
            LabConfig(
                quick=True, methods=["ppo_ensemble"], seeds=[0], noise=["none"], ensemble_size=3
            )
        ),
        tmp_path,
        tmp_path,
    )
    assert runner.key(cell) != other.key(cell)
    assert runner.reward_key("review", 0, "none") == other.reward_key("review", 0, "none")
    assert METHODS["ppo_ensemble"].uses_reward_model
    with pytest.raises(PreftuneError, match="ensemble_size"):
        LabConfig(ensemble_size=1).validate()


def test_ensemble_cost_counts_every_member():
    # The whole cost of an ensemble method adds the ensemble's training (all K members, as the
    # ensemble cell sums them), not the single reward model's.
    from preftune.lab.summary import _cost

    res = {"train": {"wall_time_s": 2.0, "tokens_trained": 10, "tokens_generated": 5}}
    info = {"reward": "proxy", "uses_reward_model": True}
    data = {0: {"tokens_generated": 7}, 1: {"tokens_generated": 9}}
    ensemble = {
        0: {"wall_time_s": 30.0, "tokens_trained": 300},
        1: {"wall_time_s": 34.0, "tokens_trained": 340},
    }
    whole = _cost(res, info, data, ensemble, [0, 1])["with_data_and_reward_model"]
    assert whole == {
        "wall_time_s": 2.0 + 32.0,
        "tokens_trained": 10 + 320,
        "tokens_generated": 5 + 8,
    }
