"""The lab's report: report.md, frontier.png, overoptimization.png and compute.png, written from
results.json alone (`write_report(results_json_path, out_dir)`).

Every comparative sentence is generated from an interval in results.json (or from a paired
interval computed here from the per-seed values it stores) and cites it; `stats.verdict`
decides what may be said: "above"/"below" only where the 95% t-interval excludes 0, "no
difference can be claimed" where it contains 0, "not enough evidence" with one seed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from preftune.lab import stats
from preftune.utils import atomic_output

KNOB_SYMBOL = {"beta": "β", "kl_coef": "KL coef", "n": "N"}


# --- formatting --------------------------------------------------------------------------------


def ci(iv: dict | None, digits: int = 3) -> str:
    """'+0.120 [+0.050, +0.180]' or '+0.120 [one seed: no interval]'."""
    if not iv or iv.get("mean") is None:
        return "-"
    m = f"{iv['mean']:+.{digits}f}"
    if iv.get("ci_low") is None:
        return m + " [one seed: no interval]"
    return f"{m} [{iv['ci_low']:+.{digits}f}, {iv['ci_high']:+.{digits}f}]"


def pct_ci(iv: dict | None) -> str:
    """A proportion with its interval: '69.7 percent [65.7, 73.7]'."""
    if not iv or iv.get("mean") is None:
        return "-"
    m = f"{100 * iv['mean']:.1f} percent"
    if iv.get("ci_low") is None:
        return m + " [one seed: no interval]"
    # A proportion lies in [0, 1]: intersecting the t-interval with it keeps its coverage.
    low, high = max(0.0, iv["ci_low"]), min(1.0, iv["ci_high"])
    return f"{m} [{100 * low:.1f}, {100 * high:.1f}]"


def setting(method: dict, value, lr) -> str:
    knob = KNOB_SYMBOL.get(method.get("knob", ""), method.get("knob", ""))
    text = f"{knob}={value:g}"
    return text + (f", lr={lr:g}" if lr is not None else "")


def _count(n: float | None) -> str:
    if n is None:
        return "-"
    if n >= 1e6:
        return f"{n / 1e6:.1f}M"
    if n >= 1e3:
        return f"{n / 1e3:.0f}k"
    return f"{n:.0f}"


def _kl(iv: dict | None) -> str:
    if not iv or iv.get("mean") is None:
        return "-"
    se = iv.get("se_within_seed")
    return f"{iv['mean']:.2f}" + (f" ± {se:.2f}" if se is not None else "")


# --- claims ------------------------------------------------------------------------------------


def gain_sentence(name: str, iv: dict, what: str = "the base policy") -> str:
    """One sentence about a paired gain, saying only what its interval supports."""
    v = stats.verdict(iv)
    n = iv.get("n_seeds", 0)
    if v == stats.ABOVE:
        return f"{name} beats {what}: {ci(iv)} ({n} seeds, 95% t-interval)."
    if v == stats.BELOW:
        return f"{name} is worse than {what}: {ci(iv)} ({n} seeds, 95% t-interval)."
    if v == stats.NO_DIFFERENCE:
        return (
            f"{name} vs {what}: {ci(iv)} ({n} seeds); the interval contains 0, so no "
            "difference can be claimed."
        )
    return f"{name} vs {what}: {ci(iv)}; not enough evidence (fewer than two seeds)."


def paired(a: dict, b: dict) -> dict | None:
    """Paired t-interval of gain(a) - gain(b) over the seeds both have."""
    sa = dict(zip(a.get("seeds", []), a.get("per_seed", [])))
    sb = dict(zip(b.get("seeds", []), b.get("per_seed", [])))
    common = [s for s in sa if s in sb]
    if not common:
        return None
    return stats.paired_interval([sa[s] for s in common], [sb[s] for s in common]).to_json()


def ranking_sentences(methods: dict[str, dict]) -> list[str]:
    """Which ordered pairs of methods the paired intervals support; otherwise say so."""
    names = [m for m in methods if methods[m].get("gain_vs_base", {}).get("mean") is not None]
    names.sort(key=lambda m: -methods[m]["gain_vs_base"]["mean"])
    supported, unsupported = [], 0
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            iv = paired(methods[a]["gain_vs_base"], methods[b]["gain_vs_base"])
            if iv is None:
                continue
            if stats.verdict(iv) == stats.ABOVE:
                supported.append(
                    f"{methods[a]['label']} above {methods[b]['label']} (difference {ci(iv)})"
                )
            else:
                unsupported += 1
    lines = []
    if names:
        lines.append(
            "Order of the mean test gains (not itself a claim): "
            + " > ".join(methods[m]["label"] for m in names)
            + "."
        )
    if supported:
        lines.append("Orderings the paired intervals support: " + "; ".join(supported) + ".")
    if unsupported:
        lines.append(
            f"For the other {unsupported} pair(s) of methods the paired interval "
            "contains 0 (or there is one seed): not enough evidence to rank them."
        )
    return lines


def overoptimization_sentences(label: str, method: dict) -> list[str]:
    """Gold falling after its peak along training while the proxy still rises, per seed."""
    out = []
    fit = method.get("fit")
    rows = method.get("settings", [])
    for row in rows:
        per_seed = row.get("trajectories_per_seed") or {}
        traj = row.get("trajectory") or []
        if not per_seed or len(traj) < 3:
            continue
        golds = [p["gold"] for p in traj[1:]]  # trained points (step 0 is the base)
        peak = max(range(len(golds)), key=lambda i: golds[i])
        if peak == len(golds) - 1:
            continue
        drops = [t[-1]["gold"] - t[peak]["gold"] for t in per_seed.values() if len(t) > peak]
        iv = stats.t_interval(drops).to_json()
        where = setting(method, row["value"], row["lr"])
        if stats.verdict(iv) == stats.BELOW:
            proxy_note = ""
            if traj[-1].get("proxy") is not None and traj[peak + 1].get("proxy") is not None:
                proxy_note = (
                    f"; the proxy gain meanwhile goes {traj[peak + 1]['proxy']:+.3f} → "
                    f"{traj[-1]['proxy']:+.3f}"
                )
            out.append(
                f"{label} ({where}) over-optimises: validation gold falls after step "
                f"{traj[peak + 1]['step']} (end minus peak {ci(iv)}, KL k3 "
                f"{traj[peak + 1]['kl_k3']:.2f} → {traj[-1]['kl_k3']:.2f}){proxy_note}."
            )
    if fit is not None:
        peak = fit.get("kl_at_gold_peak")
        out.append(
            f"{label}: Gao et al. fit {fit['form']} on {fit['n_points']} points: "
            f"α={fit['alpha']:.3f}, β={fit['beta']:.3f}, R²={fit['r2']:.2f}, "
            + (
                f"fitted gold peak at KL {peak:.2f}."
                if peak is not None
                else "no interior gold peak in the fitted form."
            )
        )
    return out


def noise_sentences(summary_world: dict, noises: list[str]) -> list[str]:
    """How the gains, and the order of methods, change from the first noise setting to each
    other one (paired per seed: same base policy and test prompts)."""
    if len(noises) < 2:
        return ["Only one label-noise setting was run: the effect of noise is not measured."]
    first = noises[0]
    out = []
    for other in noises[1:]:
        a = summary_world["noise"][first]["methods"]
        b = summary_world["noise"][other]["methods"]
        for m in a:
            if m in b and not a[m].get("oracle"):
                iv = paired(b[m]["gain_vs_base"], a[m]["gain_vs_base"])
                if iv is not None:
                    out.append(
                        gain_sentence(
                            f"{a[m]['label']} with noise `{other}`",
                            iv,
                            f"itself with noise `{first}`",
                        )
                    )
        order_a = sorted(
            (m for m in a if a[m]["gain_vs_base"]["mean"] is not None),
            key=lambda m: -a[m]["gain_vs_base"]["mean"],
        )
        order_b = sorted(
            (m for m in b if b[m]["gain_vs_base"]["mean"] is not None),
            key=lambda m: -b[m]["gain_vs_base"]["mean"],
        )
        same = order_a == order_b
        out.append(
            f"Order of mean gains with `{first}`: "
            + " > ".join(a[m]["label"] for m in order_a)
            + f"; with `{other}`: "
            + " > ".join(b[m]["label"] for m in order_b)
            + (
                " (unchanged)."
                if same
                else " (changed; see the supported orderings "
                "above for which of these differences the intervals back)."
            )
        )
    return out


# --- figures -----------------------------------------------------------------------------------


def _figure(n_cols: int, n_rows: int = 1):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.0 * n_cols + 1.8, 3.6 * n_rows), layout="constrained")
    return fig, fig.subplots(n_rows, n_cols, squeeze=False)


def _save(fig, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")


def _styles(names: list[str]) -> dict[str, tuple]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    markers = "osD^vP*Xhp<>"
    return {m: (cmap(i % 10), markers[i % len(markers)]) for i, m in enumerate(names)}


def _panels(results: dict) -> list[tuple[str, str, dict]]:
    return [
        (w, n, results["summary"][w]["noise"][n])
        for w in results["summary"]
        for n in results["summary"][w]["noise"]
    ]


def _half(iv: dict) -> float:
    if iv.get("ci_low") is None:
        return 0.0
    return (iv["ci_high"] - iv["ci_low"]) / 2


def frontier_plot(results: dict, path: Path) -> None:
    """Test gold gain (95% CI) against KL for every setting of every method."""
    panels = _panels(results)
    fig, axes = _figure(len(panels))
    names = list(results["plan"]["methods"])
    styles = _styles(names)
    for ax, (world, noise, s) in zip(axes[0], panels):
        for m, res in s["methods"].items():
            color, marker = styles[m]
            rows = res["settings"]
            bon = res["kind"] == "inference"
            xs = [r["kl_bound"] if bon else (r["kl_k3"] or {}).get("mean") for r in rows]
            ys = [r["gain_vs_base"]["mean"] for r in rows]
            order = sorted(range(len(xs)), key=lambda i: xs[i])
            ax.errorbar(
                [xs[i] for i in order],
                [ys[i] for i in order],
                yerr=[_half(rows[i]["gain_vs_base"]) for i in order],
                color=color,
                marker=marker,
                markersize=4,
                capsize=2,
                linewidth=1,
                linestyle="--" if bon else ("-" if not res["oracle"] else ":"),
                label=res["label"] + (" (KL bound)" if bon else ""),
            )
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_title(f"{world}, noise {noise}: test gold gain vs KL")
        ax.set_xlabel("KL(π ‖ π_base) per sequence, nats (k3; best-of-N: bound)")
        ax.set_ylabel("gold − base gold (95% CI)")
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize=8)
    _save(fig, path)


def overoptimization_plot(results: dict, path: Path) -> None:
    """Gold (top) and proxy (bottom) gain against sqrt(KL) along training (validation
    prompts), with Gao et al.'s fitted forms."""
    import numpy as np

    panels = _panels(results)
    fig, axes = _figure(len(panels), 2)
    styles = _styles(list(results["plan"]["methods"]))
    for col, (world, noise, s) in enumerate(panels):
        top, bottom = axes[0][col], axes[1][col]
        for m, res in s["methods"].items():
            color, marker = styles[m]
            bon = res["kind"] == "inference"
            for row in res["settings"]:
                traj = row.get("trajectory") or ([] if not bon else None)
                if bon:
                    traj = res["trajectory"]
                    xs = [math.sqrt(p["kl_bound"]) for p in traj]
                else:
                    xs = [math.sqrt(max(p["kl_k3"] or 0.0, 0.0)) for p in traj]
                label = res["label"] + ("" if bon else f" {setting(res, row['value'], row['lr'])}")
                top.plot(
                    xs,
                    [p["gold_gain"] for p in traj],
                    color=color,
                    marker=marker,
                    markersize=3,
                    linewidth=1,
                    alpha=0.8,
                    label=label,
                    linestyle="--" if bon else "-",
                )
                if any(p.get("proxy") is not None for p in traj):
                    bottom.plot(
                        xs,
                        [p.get("proxy") for p in traj],
                        color=color,
                        marker=marker,
                        markersize=3,
                        linewidth=1,
                        alpha=0.8,
                        linestyle="--" if bon else "-",
                    )
                if bon:
                    break
            fit = res.get("fit")
            if fit is not None:
                xmax = max(
                    0.5,
                    max(
                        (
                            math.sqrt(max(p.get("kl_bound") if bon else p["kl_k3"] or 0.0, 0.0))
                            for r in ([res] if bon else res["settings"])
                            for p in r["trajectory"]
                        ),
                        default=1.0,
                    ),
                )
                d = np.linspace(1e-3, xmax * 1.1, 100)
                y = d * (fit["alpha"] - fit["beta"] * (d if fit["form"] == "bon" else np.log(d)))
                top.plot(
                    d,
                    y,
                    color=color,
                    linewidth=2,
                    alpha=0.35,
                    label=f"{res['label']} fit (R²={fit['r2']:.2f})",
                )
        for ax, what in ((top, "gold − base gold"), (bottom, "proxy − base proxy")):
            ax.axhline(0, color="black", linewidth=0.8)
            ax.set_xlabel("√KL (nats^½)")
            ax.set_ylabel(what)
            ax.grid(alpha=0.3)
        top.set_title(f"{world}, noise {noise}: along training / over N")
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside right center", fontsize=7)
    _save(fig, path)


def compute_plot(results: dict, path: Path) -> None:
    """Test gold gain of each method's selected setting against its whole compute."""
    panels = _panels(results)
    fig, axes = _figure(len(panels))
    styles = _styles(list(results["plan"]["methods"]))
    for ax, (world, noise, s) in zip(axes[0], panels):
        for m, res in s["methods"].items():
            whole = res["cost"]["with_data_and_reward_model"]
            tokens = (whole["tokens_trained"] or 0) + (whole["tokens_generated"] or 0)
            color, marker = styles[m]
            ax.errorbar(
                [max(tokens, 1.0)],
                [res["gain_vs_base"]["mean"]],
                yerr=[_half(res["gain_vs_base"])],
                color=color,
                marker=marker,
                capsize=2,
                linestyle="none",
                label=res["label"],
            )
        ax.set_xscale("log")
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_title(f"{world}, noise {noise}: gold gain vs compute")
        ax.set_xlabel("tokens trained + generated (incl. data and reward model)")
        ax.set_ylabel("gold − base gold (95% CI)")
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize=8)
    _save(fig, path)


# --- report.md -----------------------------------------------------------------------------------


def _table(s: dict) -> list[str]:
    lines = [
        "| method | setting (chosen on validation) | gold gain vs base, test [95% CI] | "
        "seen prompts | unseen prompts | KL k1 ± s.e. | KL k3 ± s.e. | proxy gain | "
        "implicit-reward gold accuracy | train time | tokens trained / generated "
        "(whole) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m, res in s["methods"].items():
        sel = res["selected"]
        if res["kind"] == "inference":
            kl1 = f"plug-in {res['kl_plugin']['mean']:.2f}"
            kl3 = f"bound {res['kl_bound']:.2f}"
        else:
            kl1, kl3 = _kl(res["kl_k1"]), _kl(res["kl_k3"])
        whole = res["cost"]["with_data_and_reward_model"]
        lines.append(
            f"| {res['label']} | {setting(res, sel['value'], sel['lr'])} | "
            f"{ci(res['gain_vs_base'])} | {ci(res['gain_seen'])} | {ci(res['gain_unseen'])} | "
            f"{kl1} | {kl3} | {ci(res['proxy_gain'], 2)} | "
            f"{pct_ci(res.get('implicit_reward_gold_accuracy'))} | {whole['wall_time_s']:.0f}s | {_count(whole['tokens_trained'])} / "
            f"{_count(whole['tokens_generated'])} |"
        )
    return lines


def _avg(trends: list[list[dict]], i: int, key: str) -> float:
    """Mean over seeds of the i-th logged value of `key` (a log-prob trend)."""
    return sum(t[i][key] for t in trends) / len(trends)


def _settings_table(s: dict) -> list[str]:
    lines = [
        "| method | setting | validation gain [95% CI] | test gain [95% CI] | KL | "
        "log-probs chosen / rejected (first → last logged, seed mean) | implicit-reward "
        "gold accuracy |",
        "|---|---|---|---|---|---|---|",
    ]
    for m, res in s["methods"].items():
        for row in res["settings"]:
            kl = (
                f"bound {row['kl_bound']:.2f}, plug-in {row['kl_plugin']['mean']:.2f}"
                if res["kind"] == "inference"
                else f"k3 {_kl(row['kl_k3'])}"
            )
            lp = "-"
            trends = [t for t in (row.get("logps") or {}).values() if t]
            if trends:
                lp = (
                    f"{_avg(trends, 0, 'chosen'):.1f} → {_avg(trends, -1, 'chosen'):.1f} / "
                    f"{_avg(trends, 0, 'rejected'):.1f} → {_avg(trends, -1, 'rejected'):.1f}"
                )
            lines.append(
                f"| {res['label']} | {setting(res, row['value'], row['lr'])} | "
                f"{ci(row['validation_gain'])} | {ci(row['gain_vs_base'])} | {kl} | "
                f"{lp} | {pct_ci(row.get('implicit_reward_gold_accuracy'))} |"
            )
    return lines


def reading(results: dict, world: str, noise: str) -> list[str]:
    """The sentences of one (world, noise) panel, each generated from an interval."""
    sw = results["summary"][world]
    s = sw["noise"][noise]
    lines = []
    rm = s.get("reward_model")
    data = s["data"]
    agree = data["label_agreement"]
    lines.append(
        f"Labels: {data['pairs']:.0f} pairs per seed (of {data['sampled']:.0f} "
        f"sampled; {data['gold_ties_dropped']:.0f} tied on gold and "
        f"{data['identical_dropped']:.0f} identical were dropped, not coin-flipped); "
        f"they agree with the gold order on {pct_ci(agree)} of pairs (flip rate "
        f"{data['flip_rate']})."
    )
    if rm:
        lines.append(
            f"The reward model (early stopping on held-out pairs; best step per seed "
            f"{rm['best_step']}) orders fresh gold-ranked test pairs correctly "
            f"{pct_ci(rm['gold_accuracy_interval'])} of the time (50 percent is "
            "chance)."
        )
    ens = s.get("reward_ensemble")
    if ens:
        for agg, iv in ens["gold_accuracy_aggregated"].items():
            lines.append(
                f"The ensemble of {ens['members']} reward models (seeds seed..seed+"
                f"{ens['members'] - 1}), aggregated as {agg.replace(':', ', coef ')}, "
                f"orders the same test pairs correctly {pct_ci(iv)} of the time (its "
                f"members on average {pct_ci(ens['gold_accuracy_members'])})."
            )
    for m, res in s["methods"].items():
        acc = res.get("implicit_reward_gold_accuracy")
        if acc and acc.get("mean") is not None:
            lines.append(
                f"{res['label']}'s own implicit reward orders fresh gold-ranked test "
                f"pairs (those of the reward model's accuracy) correctly {pct_ci(acc)} "
                "of the time."
            )
    for m, res in s["methods"].items():
        sel = res["selected"]
        lines.append(
            gain_sentence(
                f"{res['label']} ({setting(res, sel['value'], sel['lr'])})", res["gain_vs_base"]
            )
        )
    lines += ranking_sentences(s["methods"])
    for m, res in s["methods"].items():
        if res.get("oracle") and res.get("oracle_of") in s["methods"]:
            proxy_m = s["methods"][res["oracle_of"]]
            iv = paired(res["gain_vs_base"], proxy_m["gain_vs_base"])
            if iv is not None:
                lines.append(
                    gain_sentence(res["label"], iv, proxy_m["label"] + " on the reward model")
                    + " (The gap is what the reward model's errors cost the "
                    "algorithm.)"
                )
    for m, res in s["methods"].items():
        if res.get("variant_of") in s["methods"]:
            single = s["methods"][res["variant_of"]]
            iv = paired(res["gain_vs_base"], single["gain_vs_base"])
            if iv is not None:
                lines.append(
                    gain_sentence(res["label"], iv, single["label"] + " on one reward model")
                )
    for m, res in s["methods"].items():
        seen, unseen = res.get("gain_seen"), res.get("gain_unseen")
        if seen and unseen and seen.get("mean") is not None:
            iv = paired(unseen, seen)
            if iv is not None and stats.verdict(iv) in (stats.ABOVE, stats.BELOW):
                lines.append(
                    gain_sentence(f"{res['label']} on unseen prompts", iv, "itself on seen prompts")
                )
    for m, res in s["methods"].items():
        lines += overoptimization_sentences(res["label"], res)
    return lines


def write_report(results_path: Path, out: Path) -> None:
    """Write report.md and the figures from results.json."""
    results = json.loads(Path(results_path).read_text())
    out = Path(out)
    plan = results["plan"]
    frontier_plot(results, out / "frontier.png")
    overoptimization_plot(results, out / "overoptimization.png")
    compute_plot(results, out / "compute.png")

    seeds = plan["seeds"]
    k = len(seeds)
    md = ["# preftune lab report", ""]
    if plan["quick"]:
        md += [
            "**Smoke run (`--quick`)**: short training, one setting per method and "
            f"{k} seed(s). Its intervals are wide and its claims underpowered; use it to "
            "check that the lab works, not to compare methods.",
            "",
        ]
    env = results["environment"]
    md += [
        f"This run took {results['wall_time_s'] / 60:.1f} min of wall time and "
        f"{results.get('cpu_time_s', 0) / 60:.1f} min of CPU time ({env['cpus']} CPUs, "
        f"{env['threads']} torch thread(s), load average {env.get('load_average', 0):.1f} "
        f"at the end; torch {env['torch']}).",
        "",
    ]
    p = results["prompts"]
    t_mult = f"t({k - 1}) = {stats.t_quantile(k - 1):.2f}" if k >= 2 else "no t-interval"
    md += [
        f"**Design.** Worlds: {', '.join(plan['worlds'])}. Seeds: {k} "
        f"({', '.join(map(str, seeds))}); each seed trains its own base policy "
        f"({plan['model']}, {plan['sft_steps']} SFT steps), data, reward models and methods, "
        f"and is the unit of every interval (95% t-intervals over seeds, {t_mult}). Label "
        f"noise settings: {', '.join(plan['noises'])}. Prompts per seed (distinct strings, "
        f"disjoint): {p['train']} train, {p['validation']} validation, {p['test']} test "
        f"({p['test_seen']} with a product/operand pair seen in training, {p['test_unseen']} "
        f"unseen); overlap {p['overlap']}. Each evaluation samples {plan['eval_prompts']} "
        f"validation prompts and {plan['eval_prompts']} seen + {plan['eval_prompts']} "
        f"unseen test prompts. Offline methods: {plan['offline_steps']} steps of 16 pairs; "
        f"online: {plan['online_steps']} rollouts; {plan['eval_points']} checkpoints per "
        "run are evaluated on validation prompts (trajectories).",
        "",
        "**How to read it.** Gain = policy gold minus base gold per seed, on the same test "
        "prompts with the same sampling seed (paired), then a t-interval over seeds. Each "
        "method's knob and learning rate are chosen on validation prompts and reported on "
        "test prompts. A claim is made only where its interval excludes 0. KL: k1 and k3 "
        "per sequence (Schulman 2020) with their within-seed standard errors; best-of-N: "
        "the analytic bound log N − (N−1)/N and a plug-in estimate from the samples. "
        "Ensemble variants optimise K reward models' mean minus their std (Coste et al. "
        "2023); their proxy column is that aggregate and their cost includes all K. "
        "Proxy gain: the reward model's score minus the base policy's. Implicit-reward "
        "gold accuracy (offline methods): how often the trained policy's implicit reward "
        "(β·(log π − log π_base); SimPO/ORPO β·mean log π, CPO β·log π) orders the "
        "reward model's fresh gold-ranked test pairs as the gold reward does. Cost (whole): the "
        "method's training plus the preference data it learns from, plus the reward model "
        "for the methods that optimise it; the base policy is shared by all.",
        "",
    ]
    for world in plan["worlds"]:
        sw = results["summary"][world]
        md += [
            f"## {world}",
            "",
            "```",
            results["worlds"][world],
            "```",
            "",
            f"Base policy gold (test): {ci(sw['base_policy']['test'])}; trained in "
            f"{sw['base_cost']['wall_time_s'] or 0:.0f}s per seed.",
            "",
        ]
        for noise in sw["noise"]:
            s = sw["noise"][noise]
            md += [f"### {world}, label noise `{noise}`", ""]
            md += ["- " + line for line in reading(results, world, noise)]
            md += [
                "",
                *_table(s),
                "",
                "<details><summary>every setting</summary>",
                "",
                *_settings_table(s),
                "",
                "</details>",
                "",
            ]
        md += ["### Label noise as a factor", ""]
        md += ["- " + line for line in noise_sentences(sw, list(sw["noise"]))]
        md.append("")
    md += [
        "![frontier](frontier.png)",
        "",
        "![over-optimisation](overoptimization.png)",
        "",
        "![compute](compute.png)",
        "",
    ]
    md += [
        "## What this run cannot tell",
        "",
        f"- With {k} seed(s) an interval is wide ({t_mult} times the standard error); a "
        "difference smaller than about the half-widths above is invisible, and 'no "
        "difference can be claimed' is not evidence of equality.",
        "- Tiny byte-level models trained for seconds on synthetic worlds: the lab shows "
        "how methods trade gold reward against KL under controlled conditions; it does not "
        "rank them on real models or real data.",
        "- One choice of training length, data size and learning-rate grid per method; "
        "another budget can change the order.",
        "- Trajectories are evaluated on validation prompts (which also chose the settings); "
        "only the test columns are clean held-out estimates.",
        "",
    ]
    if results.get("failures"):
        md += ["## Failed cells", ""]
        md += [f"- {f['cell']}: {f['error']} (log: `{f['log']}`)" for f in results["failures"]]
        md.append("")
    md += ["Every number, the configuration and the per-seed values are in `results.json`."]
    with atomic_output(out / "report.md") as tmp:
        Path(tmp).write_text("\n".join(md) + "\n", encoding="utf-8")
