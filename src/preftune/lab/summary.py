"""From the cells' raw results to the statistics of results.json (`summarize`).

For every world, noise setting and method:
- each setting (knob value x learning rate; N for best-of-N) gets, per seed, its gold gain over
  the base policy on validation prompts and on test prompts (same prompts, same sampling seed:
  a paired difference), and t-intervals over seeds (`stats.t_interval`);
- the setting with the highest mean validation gain is *selected*; the method's reported
  numbers (`gain_vs_base`, seen/unseen gains, KL, trajectory, cost) are those of the selected
  setting on test prompts, which took no part in the choice;
- the oracle controls (`*_gold`) do not depend on the labels and appear under every noise
  setting with the same numbers;
- Gao et al. 2022 fits over the trajectories (`stats.gao_fit`).
"""

from __future__ import annotations

import math

from preftune.lab import stats

RL_FIT_KL = "kl_k3"  # the KL estimate the RL fits use: >= 0 by construction, so sqrt is defined


def _by(cells: list[dict], **match) -> list[dict]:
    return [c for c in cells if all(c.get(k) == v for k, v in match.items())]


def _mean(values) -> float | None:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return math.fsum(values) / len(values) if values else None


def summarize(raw: dict) -> dict:
    plan = raw["plan"]
    cells = raw["cells"]
    out = {**raw}
    splits = [c["prompts"] for c in _by(cells, kind="base")]
    out["prompts"] = {
        **{
            k: round(_mean([s[k] for s in splits]) or 0)
            for k in ("train", "validation", "test", "test_seen", "test_unseen")
        },
        "overlap": max((s["overlap"] for s in splits), default=0),
        "evaluated_per_seed": {
            "validation": plan["eval_prompts"],
            "test_seen": plan["eval_prompts"],
            "test_unseen": plan["eval_prompts"],
        },
        "note": "distinct prompt strings per seed (mean over seeds); train/validation/test are "
        "disjoint as strings; test_unseen products/operand pairs never occur in training",
    }
    out["summary"] = {w: _world(raw, w) for w in plan["worlds"]}
    return out


def _world(raw: dict, world: str) -> dict:
    plan, cells = raw["plan"], [c for c in raw["cells"] if c["world"] == world]
    seeds = [
        s for s in plan["seeds"] if _by(cells, kind="eval", seed=s)
    ]  # seeds whose base policy was evaluated
    base = {s: _by(cells, kind="eval", seed=s)[0] for s in seeds}
    out = {
        "seeds": seeds,
        "base_policy": {
            part: stats.t_interval([base[s][part]["gold"] for s in seeds]).to_json()
            for part in ("validation", "test")
        },
        "base_cost": _base_cost(cells, seeds),
        "noise": {},
    }
    for noise in plan["noises"]:
        out["noise"][noise] = _noise(raw, cells, world, noise, seeds, base)
    return out


def _base_cost(cells, seeds) -> dict:
    bases = [c for c in cells if c["kind"] == "base" and c["seed"] in seeds]
    return {
        "wall_time_s": _mean([b.get("wall_time_s") for b in bases]),
        "tokens_trained": _mean([b.get("tokens_trained") for b in bases]),
    }


def _noise(raw, cells, world, noise, seeds, base) -> dict:
    plan = raw["plan"]
    data = {s: (_by(cells, kind="data", seed=s, noise=noise) or [None])[0] for s in seeds}
    rms = {s: (_by(cells, kind="reward_model", seed=s, noise=noise) or [None])[0] for s in seeds}
    out: dict = {
        "data": {
            "pairs": _mean([d["pairs"] for d in data.values() if d]),
            "gold_ties_dropped": _mean([d["gold_ties_dropped"] for d in data.values() if d]),
            "identical_dropped": _mean([d["identical_dropped"] for d in data.values() if d]),
            "sampled": _mean([d["sampled"] for d in data.values() if d]),
            "label_agreement": stats.t_interval(
                [
                    d["label_agreement_with_gold"]
                    for d in data.values()
                    if d and d["label_agreement_with_gold"] is not None
                ]
            ).to_json(),
            "flip_rate": next((d["flip_rate"] for d in data.values() if d), None),
        }
    }
    if any(rms.values()):
        ok = [s for s in seeds if rms[s] and rms[s].get("gold_accuracy") is not None]
        out["reward_model"] = {
            "gold_accuracy": _mean([rms[s]["gold_accuracy"] for s in ok]),
            "gold_accuracy_interval": stats.t_interval(
                [rms[s]["gold_accuracy"] for s in ok]
            ).to_json(),
            "heldout_accuracy": _mean([rms[s]["heldout_accuracy"] for s in ok]),
            "heldout_loss": _mean([rms[s]["heldout_loss"] for s in ok]),
            "best_step": [rms[s]["best_step"] for s in ok],
            "stopped_step": [rms[s]["stopped_step"] for s in ok],
            "wall_time_s": _mean([rms[s]["wall_time_s"] for s in ok]),
            "tokens_trained": _mean([rms[s]["tokens_trained"] for s in ok]),
            "gold_accuracy_pairs": _mean([rms[s]["gold_accuracy_pairs"] for s in ok]),
        }
    ens = {s: (_by(cells, kind="reward_ensemble", seed=s, noise=noise) or [None])[0] for s in seeds}
    if any(ens.values()):
        ok = [s for s in seeds if ens[s]]
        aggs = sorted({a for s in ok for a in ens[s]["gold_accuracy_aggregated"]})
        out["reward_ensemble"] = {
            "members": next(ens[s]["members"] for s in ok),
            "gold_accuracy_aggregated": {
                a: stats.t_interval(
                    [
                        ens[s]["gold_accuracy_aggregated"][a]
                        for s in ok
                        if ens[s]["gold_accuracy_aggregated"].get(a) is not None
                    ]
                ).to_json()
                for a in aggs
            },
            "gold_accuracy_members": stats.t_interval(
                [_mean(ens[s]["gold_accuracy_members"]) for s in ok]
            ).to_json(),
            "wall_time_s": _mean([ens[s]["wall_time_s"] for s in ok]),
            "tokens_trained": _mean([ens[s]["tokens_trained"] for s in ok]),
            "gold_accuracy_pairs": _mean([ens[s]["gold_accuracy_pairs"] for s in ok]),
        }
    methods = {}
    for m in plan["methods"]:
        info = raw["methods"][m]
        # An ensemble method's reward (its proxy column and its cost) is the ensemble.
        rewards = (
            {
                s: {**e, "base_proxy": e["base_proxy_by_agg"][info["ensemble_agg"]]} if e else None
                for s, e in ens.items()
            }
            if info.get("ensemble")
            else rms
        )
        if info["kind"] == "inference":
            res = _best_of_n(cells, bon_key(info, noise), seeds, base, rewards)
        else:
            res = _trained(
                cells, m, None if info["reward"] == "gold" else noise, seeds, base, rewards
            )
        if res is None:
            continue
        res.update(
            label=info["label"],
            kind=info["kind"],
            knob=info["knob"],
            oracle=info["reward"] == "gold",
            oracle_of=info["oracle_of"],
            uses_reward_model=info["uses_reward_model"],
            ensemble=info.get("ensemble", False),
            variant_of=info.get("variant_of", ""),
        )
        res["cost"] = _cost(res, info, data, rewards, seeds)
        methods[m] = res
    out["methods"] = methods
    return out


def bon_key(info: dict, noise: str) -> str:
    """Where the inference cell stores a best-of-N method's points: per reward (the gold
    reward, the noise setting's reward model, or its ensemble)."""
    if info["reward"] == "gold":
        return "gold"
    return f"ensemble:{noise}" if info.get("ensemble") else noise


def _gain(values: dict[int, float], base_values: dict[int, float], seeds) -> dict:
    ss = [s for s in seeds if values.get(s) is not None]
    iv = stats.paired_interval([values[s] for s in ss], [base_values[s] for s in ss]).to_json()
    return {**iv, "seeds": ss}


def _trained(cells, method, noise, seeds, base, rms) -> dict | None:
    runs = [
        c
        for c in cells
        if c["method"] == method and c.get("noise") == noise and "test" in c and c["seed"] in seeds
    ]
    if not runs:
        return None
    settings = sorted({(c["value"], c["lr"]) for c in runs})
    rows = []
    for value, lr in settings:
        rs = {c["seed"]: c for c in runs if (c["value"], c["lr"]) == (value, lr)}
        row = {"value": value, "lr": lr, "n_seeds": len(rs)}
        row["validation_gain"] = _gain(
            {s: r["validation"]["gold"] for s, r in rs.items()},
            {s: base[s]["validation"]["gold"] for s in seeds},
            seeds,
        )
        row.update(_test_numbers(rs, base, seeds, rms, noise))
        accs = [r.get("implicit_reward_gold_accuracy") for r in rs.values()]
        # Issue 9 req. 4, reported like the reward model's gold accuracy: per-seed fractions,
        # t-interval over seeds (None for methods without an implicit reward).
        row["implicit_reward_gold_accuracy"] = (
            stats.t_interval([a for a in accs if a is not None]).to_json()
            if any(a is not None for a in accs)
            else None
        )
        row["trajectory"] = _mean_trajectory(rs, base, rms, noise)
        row["trajectories_per_seed"] = {s: r["trajectory"] for s, r in rs.items()}
        row["logps"] = {
            s: r["train"].get("logps") for s, r in rs.items() if r["train"].get("logps")
        }
        row["train"] = {
            k: _mean([r["train"].get(k) for r in rs.values()])
            for k in ("wall_time_s", "tokens_trained", "tokens_generated")
        }
        row["eval_time_s"] = _mean([r.get("eval_time_s") for r in rs.values()])
        rows.append(row)
    chosen = max(
        rows,
        key=lambda r: (
            r["validation_gain"]["mean"] if r["validation_gain"]["mean"] is not None else -math.inf
        ),
    )
    res = {
        "selected": {"value": chosen["value"], "lr": chosen["lr"]},
        "selection": "highest mean validation gold gain over seeds",
        **{
            k: chosen[k]
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
                "implicit_reward_gold_accuracy",
            )
        },
        "settings": rows,
    }
    res["fit"] = _rl_fit(rows, base, seeds)
    return res


def _test_numbers(rs: dict, base, seeds, rms, noise) -> dict:
    out = {
        "gain_vs_base": _gain(
            {s: r["test"]["gold"] for s, r in rs.items()},
            {s: base[s]["test"]["gold"] for s in seeds},
            seeds,
        ),
        "gain_seen": _gain(
            {s: r["test"]["gold_seen"] for s, r in rs.items()},
            {s: base[s]["test"]["gold_seen"] for s in seeds},
            seeds,
        ),
        "gain_unseen": _gain(
            {s: r["test"]["gold_unseen"] for s, r in rs.items()},
            {s: base[s]["test"]["gold_unseen"] for s in seeds},
            seeds,
        ),
        "gold": _mean([r["test"]["gold"] for r in rs.values()]),
    }
    for k in ("kl_k1", "kl_k3"):
        iv = stats.t_interval([r["test"][k] for r in rs.values()]).to_json()
        # The s.e. over prompts of one seed, averaged: the within-seed precision of the estimator.
        iv["se_within_seed"] = _mean([r["test"][f"{k}_se"] for r in rs.values()])
        out[k] = iv
    if noise is not None and all(rms.get(s) for s in rs):
        out["proxy_gain"] = stats.t_interval(
            [r["test"]["proxy"] - rms[s]["base_proxy"]["test"] for s, r in rs.items()]
        ).to_json()
    else:
        out["proxy_gain"] = None
    return out


def _mean_trajectory(rs: dict, base, rms, noise) -> list[dict]:
    """Mean over seeds of the validation trajectory, point by point (the same steps in every
    seed), starting with the base policy itself at step 0."""
    n = min(len(r["trajectory"]) for r in rs.values())
    proxies = noise is not None and all(rms.get(s) for s in rs)
    points = [
        {
            "step": 0,
            "kl_k1": 0.0,
            "kl_k3": 0.0,
            "gold_gain": 0.0,
            "gold": _mean([base[s]["validation"]["gold"] for s in rs]),
            "proxy": 0.0 if proxies else None,
            "n_seeds": len(rs),
        }
    ]
    for i in range(n):
        pts = {s: r["trajectory"][i] for s, r in rs.items()}
        points.append(
            {
                "step": pts[next(iter(pts))]["step"],
                "kl_k1": _mean([p["kl_k1"] for p in pts.values()]),
                "kl_k3": _mean([p["kl_k3"] for p in pts.values()]),
                "gold": _mean([p["gold"] for p in pts.values()]),
                "gold_gain": _mean(
                    [p["gold"] - base[s]["validation"]["gold"] for s, p in pts.items()]
                ),
                # proxy: gain over the base policy's proxy score under the same reward model
                "proxy": (
                    _mean([p["proxy"] - rms[s]["base_proxy"]["validation"] for s, p in pts.items()])
                    if proxies
                    else None
                ),
                "n_seeds": len(pts),
            }
        )
    return points


def _rl_fit(rows, base, seeds) -> dict | None:
    """Gao et al.'s RL form over every trajectory point of every setting and seed."""
    kl, gain = [], []
    for row in rows:
        for s, traj in row["trajectories_per_seed"].items():
            for p in traj:
                kl.append(p[RL_FIT_KL])
                gain.append(p["gold"] - base[int(s)]["validation"]["gold"])
    fit = stats.gao_fit(kl, gain, "rl")
    if fit is not None:
        fit["kl"] = RL_FIT_KL
        fit["prompts"] = "validation"
    return fit


def _best_of_n(cells, key, seeds, base, rms) -> dict | None:
    """`key`: the reward whose points the inference cell stores (`bon_key`)."""
    runs = {
        c["seed"]: c
        for c in cells
        if c["kind"] == "inference" and c["seed"] in seeds and key in c["points"]["test"]
    }
    if not runs:
        return None
    rows = []
    for j, n in enumerate(runs[next(iter(runs))]["ns"]):
        pts = {
            s: {part: r["points"][part][key][j] for part in ("validation", "test")}
            for s, r in runs.items()
        }
        row = {"value": n, "lr": None, "n_seeds": len(pts)}
        row["validation_gain"] = _gain(
            {s: p["validation"]["gold"] for s, p in pts.items()},
            {s: base[s]["validation"]["gold"] for s in seeds},
            seeds,
        )
        row["gain_vs_base"] = _gain(
            {s: p["test"]["gold"] for s, p in pts.items()},
            {s: base[s]["test"]["gold"] for s in seeds},
            seeds,
        )
        row["gain_seen"] = _gain(
            {s: p["test"]["gold_seen"] for s, p in pts.items()},
            {s: base[s]["test"]["gold_seen"] for s in seeds},
            seeds,
        )
        row["gain_unseen"] = _gain(
            {s: p["test"]["gold_unseen"] for s, p in pts.items()},
            {s: base[s]["test"]["gold_unseen"] for s in seeds},
            seeds,
        )
        row["gold"] = _mean([p["test"]["gold"] for p in pts.values()])
        row["kl_bound"] = pts[next(iter(pts))]["test"]["kl_bound"]
        row["kl_plugin"] = stats.t_interval(
            [p["test"]["kl_plugin"] for p in pts.values()]
        ).to_json()
        row["kl_k1"] = row["kl_k3"] = None  # no sample estimate: see kl_bound and kl_plugin
        if key != "gold":
            row["proxy_gain"] = stats.t_interval(
                [p["test"]["proxy"] - rms[s]["base_proxy"]["test"] for s, p in pts.items()]
            ).to_json()
        else:
            row["proxy_gain"] = None
        row["validation_proxy_gain"] = (
            _mean(
                [
                    p["validation"]["proxy"] - rms[s]["base_proxy"]["validation"]
                    for s, p in pts.items()
                ]
            )
            if key != "gold"
            else None
        )
        row["validation_gold_gain_per_seed"] = {
            s: p["validation"]["gold"] - base[s]["validation"]["gold"] for s, p in pts.items()
        }
        row["train"] = {
            "wall_time_s": 0.0,
            "tokens_trained": 0,
            "tokens_generated": _mean([p["test"]["tokens_generated"] for p in pts.values()]),
        }
        rows.append(row)
    chosen = max(rows, key=lambda r: r["validation_gain"]["mean"])
    trajectory = [
        {
            "value": r["value"],
            "kl_k1": None,
            "kl_k3": None,
            "kl_bound": r["kl_bound"],
            "kl_plugin": r["kl_plugin"]["mean"],
            "gold_gain": r["validation_gain"]["mean"],
            "proxy": r["validation_proxy_gain"],
            "gold": r["validation_gain"]["mean"],
            "n_seeds": r["n_seeds"],
        }
        for r in rows
    ]
    kl = [r["kl_bound"] for r in rows for _ in r["validation_gold_gain_per_seed"]]
    gain = [g for r in rows for g in r["validation_gold_gain_per_seed"].values()]
    fit = stats.gao_fit(kl, gain, "bon")
    if fit is not None:
        fit["kl"] = "kl_bound"
        fit["prompts"] = "validation"
    return {
        "selected": {"value": chosen["value"], "lr": None},
        "selection": "highest mean validation gold gain over seeds",
        **{
            k: chosen[k]
            for k in (
                "validation_gain",
                "gain_vs_base",
                "gain_seen",
                "gain_unseen",
                "gold",
                "kl_k1",
                "kl_k3",
                "kl_bound",
                "kl_plugin",
                "proxy_gain",
                "train",
                "n_seeds",
            )
        },
        "trajectory": trajectory,
        "settings": rows,
        "fit": fit,
        "logps": {},
    }


def _cost(res: dict, info: dict, data: dict, rms: dict, seeds) -> dict:
    """Training cost of the selected setting, and the whole cost: plus the preference data
    (sampled pairs) for every method that learns from labels, plus the reward model for the
    methods that optimise it (all K members of the ensemble for an ensemble method). The base policy (shared by all) is reported separately."""
    train = res["train"]
    whole = {k: train.get(k) or 0.0 for k in ("wall_time_s", "tokens_trained", "tokens_generated")}
    if info["reward"] != "gold":
        ds = [d for d in data.values() if d]
        whole["tokens_generated"] += _mean([d["tokens_generated"] for d in ds]) or 0.0
    if info["uses_reward_model"]:
        rs = [r for r in rms.values() if r]
        whole["wall_time_s"] += _mean([r["wall_time_s"] for r in rs]) or 0.0
        whole["tokens_trained"] += _mean([r["tokens_trained"] for r in rs]) or 0.0
    return {"method": train, "with_data_and_reward_model": whole}
