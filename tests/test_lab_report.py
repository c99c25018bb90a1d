"""A report built from a hand-made results.json makes exactly the claims its intervals allow.

The intervals below are computed by hand (t(2) = 4.303 for three seeds):
- DPO gains [0.5, 0.6, 0.7]: mean 0.6, sd 0.1, s.e. 0.057735, half 0.24843 -> beats the base.
- PPO gains [0.1, -0.2, 0.4]: mean 0.1, sd 0.3, s.e. 0.173205, half 0.74530 -> contains 0.
- KTO gains [-0.5, -0.6, -0.4]: mean -0.5, half 0.24843 -> worse than the base.
Paired differences: DPO - PPO = [0.4, 0.8, 0.3]: mean 0.5, sd 0.264575, half 0.65729 ->
[-0.157, +1.157], not supported; DPO - KTO = [1.0, 1.2, 1.1]: mean 1.1, sd 0.1 ->
[+0.852, +1.348]; PPO - KTO = [0.6, 0.4, 0.8]: mean 0.6, sd 0.2, half 0.49687 ->
[+0.103, +1.097].
"""

import json

from preftune.lab import stats
from preftune.lab.report import write_report

SEEDS = [0, 1, 2]


def _iv(values, seeds=SEEDS):
    return {**stats.t_interval(values).to_json(), "seeds": seeds[: len(values)]}


def _method(label, kind, knob, gains, value, oracle_of="", proxy=True):
    traj = [
        {
            "step": s,
            "kl_k1": 0.1 * s,
            "kl_k3": 0.1 * s,
            "gold": 0.01 * s,
            "gold_gain": 0.01 * s,
            "proxy": 0.02 * s if proxy else None,
            "n_seeds": 3,
        }
        for s in range(6)
    ]
    row = {
        "value": value,
        "lr": 5e-4,
        "n_seeds": len(gains),
        "validation_gain": _iv(gains),
        "gain_vs_base": _iv(gains),
        "gain_seen": _iv(gains),
        "gain_unseen": _iv(gains),
        "gold": 0.0,
        "kl_k1": {**_iv([1.0, 1.1, 1.2]), "se_within_seed": 0.1},
        "kl_k3": {**_iv([0.9, 1.0, 1.1]), "se_within_seed": 0.05},
        "proxy_gain": _iv([0.1, 0.2, 0.3]) if proxy else None,
        "trajectory": traj,
        "trajectories_per_seed": {},
        "logps": {},
        "train": {"wall_time_s": 3.0, "tokens_trained": 1000, "tokens_generated": 0},
    }
    return {
        **{
            k: row[k]
            for k in (
                "validation_gain",
                "gain_vs_base",
                "gain_seen",
                "gain_unseen",
                "gold",
                "kl_k1",
                "kl_k3",
                "proxy_gain",
                "trajectory",
                "logps",
                "train",
                "n_seeds",
            )
        },
        "selected": {"value": value, "lr": 5e-4},
        "settings": [row],
        "fit": None,
        "label": label,
        "kind": kind,
        "knob": knob,
        "oracle": bool(oracle_of),
        "oracle_of": oracle_of,
        "uses_reward_model": kind == "online" and not oracle_of,
        "cost": {"method": row["train"], "with_data_and_reward_model": row["train"]},
    }


def _results(methods_by_noise, quick=False, seeds=SEEDS):
    noise = {}
    for name, methods in methods_by_noise.items():
        noise[name] = {
            "data": {
                "pairs": 900,
                "sampled": 1024,
                "gold_ties_dropped": 100,
                "identical_dropped": 24,
                "label_agreement": _iv([0.7, 0.72, 0.68]),
                "flip_rate": 0.3,
            },
            "reward_model": {
                "gold_accuracy": 0.7,
                "gold_accuracy_interval": _iv([0.68, 0.7, 0.72]),
                "best_step": [40, 60, 40],
            },
            "methods": methods,
        }
    return {
        "plan": {
            "quick": quick,
            "seeds": seeds,
            "worlds": ["review"],
            "noises": list(noise),
            "methods": ["dpo", "ppo", "kto"],
            "model": "tiny-64x2",
            "sft_steps": 800,
            "eval_prompts": 64,
            "offline_steps": 100,
            "online_steps": 30,
            "eval_points": 5,
        },
        "environment": {"cpus": 2, "threads": 1, "torch": "x", "load_average": 1.0},
        "wall_time_s": 600.0,
        "cpu_time_s": 500.0,
        "prompts": {
            "train": 120,
            "validation": 38,
            "test": 73,
            "test_seen": 25,
            "test_unseen": 48,
            "overlap": 0,
        },
        "worlds": {"review": "review: a world"},
        "summary": {
            "review": {
                "seeds": seeds,
                "base_policy": {"validation": _iv([0.0] * 3), "test": _iv([0.0] * 3)},
                "base_cost": {"wall_time_s": 40.0},
                "noise": noise,
            }
        },
        "failures": [],
    }


def _report(tmp_path, results):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    write_report(path, tmp_path)
    for name in ("frontier.png", "overoptimization.png", "compute.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    return (tmp_path / "report.md").read_text()


def _three():
    return {
        "dpo": _method("DPO", "offline", "beta", [0.5, 0.6, 0.7], 1.0, proxy=False),
        "ppo": _method("PPO", "online", "kl_coef", [0.1, -0.2, 0.4], 0.05),
        "kto": _method("KTO", "offline", "beta", [-0.5, -0.6, -0.4], 0.1, proxy=False),
    }


def test_claims_follow_the_intervals(tmp_path):
    text = _report(tmp_path, _results({"none": _three()}))
    assert (
        "DPO (β=1, lr=0.0005) beats the base policy: +0.600 [+0.352, +0.848] (3 seeds, "
        "95% t-interval)."
    ) in text
    assert (
        "PPO (KL coef=0.05, lr=0.0005) vs the base policy: +0.100 [-0.645, +0.845] "
        "(3 seeds); the interval contains 0, so no difference can be claimed."
    ) in text
    assert "KTO (β=0.1, lr=0.0005) is worse than the base policy: -0.500 [-0.748, -0.252]" in text
    assert (
        "Orderings the paired intervals support: DPO above KTO (difference +1.100 "
        "[+0.852, +1.348]); PPO above KTO (difference +0.600 [+0.103, +1.097])."
    ) in text
    assert "DPO above PPO" not in text and "PPO beats" not in text
    assert "For the other 1 pair(s) of methods the paired interval contains 0" in text
    assert "Only one label-noise setting was run" in text
    assert "Smoke run" not in text
    assert "t(2) = 4.30" in text


def test_one_seed_claims_nothing(tmp_path):
    methods = {
        "dpo": _method("DPO", "offline", "beta", [0.9], 1.0, proxy=False),
        "kto": _method("KTO", "offline", "beta", [-0.9], 0.1, proxy=False),
    }
    text = _report(tmp_path, _results({"none": methods}, quick=True, seeds=[0]))
    assert (
        "DPO (β=1, lr=0.0005) vs the base policy: +0.900 [one seed: no interval]; not "
        "enough evidence" in text
    )
    assert "beats the base" not in text and "is worse than" not in text
    assert "Orderings the paired intervals support" not in text
    assert "not enough evidence to rank them" in text
    assert "Smoke run (`--quick`)" in text and "underpowered" in text


def test_noise_factor_sentences(tmp_path):
    clean = _three()
    noisy = _three()
    # With noise DPO's gain per seed drops by [0.6, 0.7, 0.8] (mean 0.7, sd 0.1, half 0.24843).
    noisy["dpo"] = _method("DPO", "offline", "beta", [-0.1, -0.1, -0.1], 1.0, proxy=False)
    text = _report(tmp_path, _results({"none": clean, "human": noisy}))
    assert (
        "DPO with noise `human` is worse than itself with noise `none`: -0.700 [-0.948, -0.452]"
    ) in text
    assert (
        "Order of mean gains with `none`: DPO > PPO > KTO; with `human`: PPO > DPO > KTO "
        "(changed" in text
    )


def test_proportion_intervals_stay_within_0_and_100_percent():
    from preftune.lab.report import pct_ci

    # Two seeds at 25% and 100%: mean 0.625, t(1) interval 0.625 +- 12.706 * 0.375 runs past
    # both ends; a proportion's interval is cut to [0, 100] percent.
    iv = {"mean": 0.625, "ci_low": 0.625 - 12.706 * 0.375, "ci_high": 0.625 + 12.706 * 0.375}
    assert pct_ci(iv) == "62.5 percent [0.0, 100.0]"
    assert pct_ci({"mean": 0.8, "ci_low": 0.7, "ci_high": 0.9}) == "80.0 percent [70.0, 90.0]"
