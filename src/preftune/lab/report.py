"""The lab's report folder: report.md, frontier.png, overoptimization.png and results.json.

Aggregation over seeds, for every (world, method, knob value) and every metric: the mean of
the per-seed means, with a standard error that is the larger of
  - the s.e. over seeds, std(per-seed means) / sqrt(k) (needs k >= 2 seeds), and
  - the s.e. from the held-out prompts, sqrt(sum_s se_s^2) / k;
so one seed still gets an error bar, and two seeds that agree by chance do not shrink it below
the sampling noise of the evaluation. Two settings "cannot be told apart" when their difference
is within 1.96 standard errors of the difference (a two-sided z-test at 5%).
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from pathlib import Path

from preftune.utils import atomic_output, atomic_write_json

METRICS = ("gold", "kl", "win_rate", "length", "proxy")
Z95 = 1.96
RM_METHODS = ("ppo", "grpo", "rloo", "online_dpo", "best_of_n")
NAMES = {"base_policy": "base policy", "dpo": "DPO", "ipo": "IPO", "cdpo": "cDPO",
         "robust": "robust DPO", "hinge": "SLiC (hinge)", "simpo": "SimPO", "orpo": "ORPO",
         "cpo": "CPO", "kto": "KTO", "ppo": "PPO", "grpo": "GRPO", "rloo": "RLOO",
         "online_dpo": "online DPO", "best_of_n": "best-of-N"}
KNOB_SYMBOL = {"beta": "β", "kl_coef": "KL coef", "n": "N"}


# --- aggregation ---------------------------------------------------------------------------------

def points(results: dict) -> list[dict]:
    """Every evaluated policy of every seed: {world, seed, method, value, eval, train}."""
    out = []
    for cell in results["cells"]:
        if "points" in cell:
            for p in cell["points"]:
                out.append({"world": cell["world"], "seed": cell["seed"],
                            "method": cell["method"], **p})
        elif "eval" in cell:
            out.append({k: cell.get(k) for k in ("world", "seed", "method", "value", "eval",
                                                 "train")})
    return out


def aggregate(results: dict) -> list[dict]:
    """One row per (world, method, value): metrics over seeds (module docstring)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    pts = points(results)
    # Each seed has its own reward model, whose offset is arbitrary: the proxy column is the
    # gain over the base policy's mean proxy reward of the same seed.
    base_proxy = {(p["world"], p["seed"]): p["eval"]["proxy"] for p in pts
                  if p["method"] == "base_policy" and p["eval"].get("proxy") is not None}
    for p in pts:
        if p["eval"].get("proxy") is not None and (p["world"], p["seed"]) in base_proxy:
            p["eval"] = {**p["eval"], "proxy_raw": p["eval"]["proxy"],
                         "proxy": p["eval"]["proxy"] - base_proxy[(p["world"], p["seed"])]}
        groups[(p["world"], p["method"], p["value"])].append(p)
    rows = []
    for (world, method, value), ps in groups.items():
        row = {"world": world, "method": method, "value": value, "seeds": len(ps),
               "kl_kind": ps[0]["eval"].get("kl_kind", "estimate")}
        for m in METRICS:
            if any(m not in p["eval"] or p["eval"][m] is None for p in ps):
                continue
            means = [p["eval"][m] for p in ps]
            ses = [p["eval"].get(f"{m}_se") or 0.0 for p in ps]
            row[m], row[f"{m}_se"], row[f"{m}_se_from"] = _combine(means, ses)
            row[f"{m}_per_seed"] = means
        for cost in ("wall_time_s", "tokens_trained", "tokens_generated"):
            row[cost] = _mean([p["train"].get(cost, 0) or 0 for p in ps])
        row["eval_tokens_generated"] = _mean([p["eval"].get("eval_tokens_generated", 0)
                                              for p in ps])
        rows.append(row)
    order = {m: i for i, m in enumerate(results["plan"]["methods"])}
    rows.sort(key=lambda r: (results["plan"]["worlds"].index(r["world"]),
                             -1 if r["method"] == "base_policy" else order.get(r["method"], 99),
                             r["value"] if r["value"] is not None else -1))
    return rows


def _mean(values) -> float:
    return sum(values) / len(values) if values else math.nan


def _combine(means: list[float], ses: list[float]) -> tuple[float, float, str]:
    k = len(means)
    mean = _mean(means)
    prompt_se = math.sqrt(sum(s * s for s in ses)) / k
    if k < 2:
        return mean, prompt_se, "prompts"
    seed_se = math.sqrt(sum((x - mean) ** 2 for x in means) / (k - 1) / k)
    return (mean, seed_se, "seeds") if seed_se >= prompt_se else (mean, prompt_se, "prompts")


def distinguishable(a: dict, b: dict, metric: str = "gold") -> bool:
    diff = a[metric] - b[metric]
    se = math.sqrt(a[f"{metric}_se"] ** 2 + b[f"{metric}_se"] ** 2)
    return abs(diff) > Z95 * se if se > 0 else diff != 0


def best_per_method(rows: list[dict], world: str) -> dict[str, dict]:
    """Each method's setting with the highest mean gold reward in `world`."""
    best: dict[str, dict] = {}
    for r in rows:
        if r["world"] == world and "gold" in r:
            if r["method"] not in best or r["gold"] > best[r["method"]]["gold"]:
                best[r["method"]] = r
    return best


# --- formatting ------------------------------------------------------------------------------------

def method_label(method: str, value) -> str:
    return NAMES.get(method, method)


def setting_label(row: dict, knobs: dict[str, str]) -> str:
    if row["value"] is None:
        return "-"
    knob = knobs.get(row["method"], "")
    return f"{KNOB_SYMBOL.get(knob, knob)}={row['value']:g}"


def _pm(row: dict, m: str, digits: int = 3, pct: bool = False) -> str:
    if m not in row:
        return "-"
    scale = 100.0 if pct else 1.0
    text = f"{row[m] * scale:.{digits}f} ± {row[f'{m}_se'] * scale:.{digits}f}"
    return text + ("%" if pct else "")


def _count(n: float) -> str:
    if n >= 1e6:
        return f"{n / 1e6:.1f}M"
    if n >= 1e3:
        return f"{n / 1e3:.0f}k"
    return f"{n:.0f}"


def _method_knobs(results: dict) -> dict[str, str]:
    from preftune.lab.run import METHODS

    return {m: spec[4] for m, spec in METHODS.items()}


def table(rows: list[dict], world: str, knobs: dict[str, str]) -> str:
    lines = ["| method | setting | gold reward | KL to base (nats) | win rate vs base | "
             "length (tokens) | proxy reward (vs base) | train time | tokens generated | tokens trained |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["world"] != world:
            continue
        kl = _pm(r, "kl", 2) if r["kl_kind"] == "estimate" else f"≤ {r['kl']:.2f} (bound)"
        gen = r["tokens_generated"] + (r["eval_tokens_generated"]
                                       if r["method"] == "best_of_n" else 0)
        lines.append(
            f"| {method_label(r['method'], r['value'])} | {setting_label(r, knobs)} | "
            f"{_pm(r, 'gold')} | {kl} | {_pm(r, 'win_rate', 1, pct=True)} | "
            f"{r.get('length', math.nan):.1f} | {_pm(r, 'proxy', 2)} | "
            f"{r['wall_time_s']:.1f}s | {_count(gen)} | {_count(r['tokens_trained'])} |")
    return "\n".join(lines)


# --- the plain-language reading --------------------------------------------------------------------

def reading(rows: list[dict], world: str, knobs: dict[str, str],
            rm_gold_accuracy: list[float] = ()) -> list[str]:
    """Sentences that say what the numbers of one world show, and what they cannot show.

    `rm_gold_accuracy`: per seed, how often the reward model orders fresh pairs like the gold
    reward does.
    """
    lines: list[str] = []
    if rm_gold_accuracy:
        accs = ", ".join(f"{a:.0%}" for a in rm_gold_accuracy)
        lines.append(f"The reward model orders fresh pairs like the gold reward {accs} of the "
                     "time (per seed; 50% is chance)"
                     + (": close to chance, so the methods that maximise it have little to go "
                        "on." if max(rm_gold_accuracy) < 0.6 else "."))
    world_rows = [r for r in rows if r["world"] == world]
    base = next((r for r in world_rows if r["method"] == "base_policy"), None)
    best = best_per_method(rows, world)
    best.pop("base_policy", None)
    if base is not None:
        lines.append(f"The base policy scores {_pm(base, 'gold')} gold reward; against an "
                     f"independent sample of itself it wins {_pm(base, 'win_rate', 1, True)} "
                     "(50% expected).")
    if not best:
        return lines
    ranked = sorted(best.values(), key=lambda r: -r["gold"])
    top = ranked[0]
    lines.append(f"Highest gold reward: {NAMES.get(top['method'], top['method'])} "
                 f"({setting_label(top, knobs)}), {_pm(top, 'gold')} at KL "
                 f"{top['kl']:.2f} nats"
                 + (" (bound)" if top["kl_kind"] == "bound" else "") + ".")
    if base is not None:
        above = [r for r in ranked if r["gold"] > base["gold"] and distinguishable(r, base)]
        below = [r for r in ranked if r["gold"] < base["gold"] and distinguishable(r, base)]
        same = [r for r in ranked if not distinguishable(r, base)]
        if above:
            lines.append("Better than the base policy beyond noise (best setting of each): "
                         + _names(above) + ".")
        if same:
            lines.append("Not distinguishable from the base policy: " + _names(same) + ".")
        if below:
            lines.append("Worse than the base policy beyond noise: " + _names(below) + ".")
    tied = [r for r in ranked[1:] if not distinguishable(r, top)]
    if tied:
        lines.append(f"Cannot be told apart from {NAMES.get(top['method'], top['method'])} "
                     f"statistically (|Δ gold| < 1.96 s.e.): {_names(tied)}. The ranking "
                     "among these is noise at this number of seeds and prompts.")
    elif len(ranked) > 1:
        lines.append(f"{NAMES.get(top['method'], top['method'])} is ahead of every other "
                     "method beyond noise.")
    lines.append("Choosing each method's best setting on the same evaluation favours methods "
                 "with more settings in the sweep; treat small leads with suspicion.")

    # Over-optimisation: proxy up, gold down as the KL grows.
    calm = []
    for method in RM_METHODS:
        ms = sorted((r for r in world_rows if r["method"] == method and "proxy" in r),
                    key=lambda r: r["kl"])
        if len(ms) < 2:
            continue
        peak_gold = max(ms, key=lambda r: r["gold"])
        peak_proxy = max(ms, key=lambda r: r["proxy"])
        name = NAMES.get(method, method)
        if (peak_proxy["kl"] > peak_gold["kl"] and peak_proxy["gold"] < peak_gold["gold"]
                and distinguishable(peak_proxy, peak_gold)):
            lines.append(f"{name} over-optimises the proxy: from KL {peak_gold['kl']:.2f} to "
                         f"{peak_proxy['kl']:.2f} the proxy reward rises to "
                         f"{peak_proxy['proxy']:.2f} while the gold reward falls from "
                         f"{peak_gold['gold']:.3f} to {peak_proxy['gold']:.3f}.")
        else:
            calm.append(name)
    if calm:
        lines.append("No significant over-optimisation within the sweep (the gold reward at "
                     "the largest proxy reward is within noise of the best gold reward) for: "
                     + ", ".join(calm) + ".")
    bon = sorted((r for r in world_rows if r["method"] == "best_of_n"), key=lambda r: r["value"])
    if len(bon) >= 2:
        lo, hi = bon[0], bon[-1]
        trend = ("grows" if hi["gold"] > lo["gold"] and distinguishable(hi, lo)
                 else "falls" if hi["gold"] < lo["gold"] and distinguishable(hi, lo)
                 else "does not change beyond noise")
        lines.append(f"Best-of-N: gold reward {trend} from N={lo['value']:g} "
                     f"({lo['gold']:.3f}) to N={hi['value']:g} ({hi['gold']:.3f}); the proxy "
                     f"goes from {lo['proxy']:.2f} to {hi['proxy']:.2f}.")
    return lines


def _names(rows: list[dict]) -> str:
    return ", ".join(f"{NAMES.get(r['method'], r['method'])} ({r['gold']:.3f})" for r in rows)


# --- figures ---------------------------------------------------------------------------------------

def _figure(n_cols: int, n_rows: int = 1):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2 * n_cols + 1.8, 3.8 * n_rows), layout="constrained")
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    return fig, axes


def _save(fig, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


MARKERS = "osD^vP*Xhp<>"


def _colors(methods: list[str]) -> dict[str, tuple]:
    """A colour and a marker per method, distinct for up to 10 (then the markers differ)."""
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {m: (cmap(i % 10), MARKERS[i % len(MARKERS)]) for i, m in enumerate(methods)}


def _curve(ax, rows: list[dict], metric: str, style, label: str) -> None:
    color, marker = style
    rows = sorted(rows, key=lambda r: r["kl"])
    bound = rows[0]["kl_kind"] == "bound"
    ax.errorbar([r["kl"] for r in rows], [r[metric] for r in rows],
                xerr=[r.get("kl_se", 0.0) for r in rows],
                yerr=[r[f"{metric}_se"] for r in rows], color=color, marker=marker,
                markersize=4, capsize=2, linewidth=1.2, linestyle="--" if bound else "-",
                markerfacecolor="white" if bound else color,
                label=label + (" (KL bound)" if bound else ""))


def frontier_plot(rows: list[dict], worlds: list[str], methods: list[str], path: Path) -> None:
    """Gold reward against KL to the base policy, one curve per method, one panel per world."""
    fig, axes = _figure(len(worlds))
    colors = _colors(methods)
    for ax, world in zip(axes[0], worlds):
        for method in methods:
            ms = [r for r in rows if r["world"] == world and r["method"] == method
                  and "gold" in r]
            if ms:
                _curve(ax, ms, "gold", colors[method], NAMES.get(method, method))
        base = next((r for r in rows if r["world"] == world and r["method"] == "base_policy"),
                    None)
        if base is not None:
            ax.errorbar([0.0], [base["gold"]], yerr=[base["gold_se"]], color="black",
                        marker="*", markersize=11, capsize=2, linestyle="none",
                        label="base policy")
        ax.set_title(f"{world}: gold reward vs KL")
        ax.set_xlabel("KL(π ‖ π_base) per sequence (nats)")
        ax.set_ylabel("gold reward")
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize=8)
    fig.suptitle("Reward-KL frontier (error bars: ±1 s.e.)")
    _save(fig, path)


def overoptimization_plot(rows: list[dict], worlds: list[str], methods: list[str],
                          path: Path) -> None:
    """Gold (top) and proxy (bottom) reward against KL for the reward-model-based methods."""
    fig, axes = _figure(len(worlds), 2)
    rm_methods = [m for m in methods if m in RM_METHODS]
    colors = _colors(methods)
    for col, world in enumerate(worlds):
        for row_i, metric in enumerate(("gold", "proxy")):
            ax = axes[row_i][col]
            for method in rm_methods:
                ms = [r for r in rows if r["world"] == world and r["method"] == method
                      and metric in r]
                if ms:
                    _curve(ax, ms, metric, colors[method], NAMES.get(method, method))
            base = next((r for r in rows if r["world"] == world
                         and r["method"] == "base_policy" and metric in r), None)
            if base is not None:
                ax.errorbar([0.0], [base[metric]], yerr=[base[f"{metric}_se"]], color="black",
                            marker="*", markersize=11, linestyle="none", label="base policy")
            ax.set_title(f"{world}: {metric} reward vs KL")
            ax.set_xlabel("KL(π ‖ π_base) per sequence (nats)")
            ax.set_ylabel("gold reward" if metric == "gold"
                          else "proxy reward, minus the base policy's")
            ax.grid(alpha=0.3)
            if not rm_methods:
                ax.text(0.5, 0.5, "no reward-model-based method in this run",
                        transform=ax.transAxes, ha="center")
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside right center", fontsize=8)
    fig.suptitle("Over-optimisation: the proxy the methods maximise vs the gold reward")
    _save(fig, path)


# --- the report ------------------------------------------------------------------------------------

def write_report(results: dict, out: Path) -> dict:
    """Write results.json, the two figures and report.md into `out`; return the summary rows."""
    out = Path(out)
    plan = results["plan"]
    rows = aggregate(results)
    knobs = _method_knobs(results)
    results = {**results, "summary": rows}
    atomic_write_json(out / "results.json", results, strict=True)
    methods = [m for m in plan["methods"]]
    frontier_plot(rows, plan["worlds"], methods, out / "frontier.png")
    overoptimization_plot(rows, plan["worlds"], methods, out / "overoptimization.png")

    cells_by_kind: dict[tuple, dict] = {}
    for cell in results["cells"]:
        cells_by_kind[(cell["world"], cell["seed"], cell["kind"])] = cell
    md = ["# preftune lab report", "",
          f"Written {time.strftime('%Y-%m-%d %H:%M')}; this invocation ran for "
          f"{results['wall_time_s'] / 60:.1f} min ({'quick grid' if plan['quick'] else 'default grid'}"
          f"; {results['environment']['cpus']} CPUs, torch {results['environment']['torch']}).",
          "",
          f"Worlds: {', '.join(plan['worlds'])}. Seeds: {', '.join(map(str, plan['seeds']))}. "
          f"Base policy: {plan['model']} trained by SFT for {plan['sft_steps']} steps on "
          f"{plan['sft_examples']} demonstrations. Preference data: {plan['pairs']} prompts, two "
          f"base-policy samples each, labelled by Bradley-Terry on the gold reward with noise "
          f"`{plan['noise']}`. Offline methods: {plan['offline_steps']} steps of 16 pairs; "
          f"online methods: {plan['online_steps']} rollouts of 32 completions against a reward "
          f"model trained on the same pairs ({plan['reward_steps']} steps). Every policy is "
          f"evaluated on {plan['eval_prompts']} held-out prompts, one sample each.", ""]
    if plan.get("left_out"):
        md += ["Left out: " + "; ".join(f"{m} ({why})" for m, why in plan["left_out"].items())
               + ".", ""]
    md += ["## How to read this", "",
           "- **gold reward**: the world's programmatic reward (the truth the methods never see).",
           f"- **KL to base**: {results['kl_estimator']}. For best-of-N the column is the "
           f"{results['best_of_n_kl']}.",
           "- **win rate vs base**: how often the policy's completion has a higher gold reward "
           "than a sample of the base policy on the same prompt; ties count one half.",
           "- **proxy reward (vs base)**: the score of the reward model trained on the "
           "preference pairs (the reward PPO, GRPO, RLOO, online DPO and best-of-N maximise), "
           "minus the base policy's mean score; each seed has its own reward model, whose "
           "offset is arbitrary. Proxy up with gold down is over-optimisation.",
           "- **cost**: training wall time on this machine; tokens generated while training "
           "(for best-of-N, at evaluation: N samples per prompt); tokens (prompt + completion) "
           "through forward and backward passes (for the online methods an estimate: rows x "
           "mean length x passes).",
           "- **± values**: one standard error: the larger of the s.e. over seeds and the s.e. "
           "from the held-out prompts (with one seed, the latter only). Differences within "
           "1.96 s.e. are called indistinguishable.", ""]
    md += ["## Reading of the results", ""]
    for world in plan["worlds"]:
        accs = [cells_by_kind[(world, seed, "reward_model")].get("gold_accuracy")
                for seed in plan["seeds"] if (world, seed, "reward_model") in cells_by_kind]
        accs = [a for a in accs if a is not None]
        md += [f"**{world}.** " + " ".join(reading(rows, world, knobs, accs)), ""]
    md += ["These are tiny models trained for seconds on synthetic tasks: the lab shows how "
           "methods trade reward against KL under controlled conditions; it does not rank them "
           "on real models.", ""]
    md += ["![frontier](frontier.png)", "", "![over-optimisation](overoptimization.png)", ""]
    for world in plan["worlds"]:
        md += [f"## World: {world}", "", "```", results["worlds"][world], "```", ""]
        for seed in plan["seeds"]:
            data = cells_by_kind.get((world, seed, "data"))
            rm = cells_by_kind.get((world, seed, "reward_model"))
            parts = []
            if data:
                agree = data.get("label_agreement_with_gold")
                parts.append(f"{data['pairs']} pairs ({data['identical_dropped']} identical "
                             "samples dropped), labels agree with the gold argmax on "
                             + (f"{agree:.0%}" if agree is not None else "-")
                             + " of pairs with different gold")
            if rm:
                acc, gold_acc = rm.get("eval_accuracy"), rm.get("gold_accuracy")
                parts.append("reward model accuracy "
                             + (f"{acc:.0%}" if acc is not None else "-")
                             + " on held-out noisy labels, "
                             + (f"{gold_acc:.0%}" if gold_acc is not None else "-")
                             + " on fresh pairs ranked by the gold reward (50% is chance)")
            if parts:
                md.append(f"- seed {seed}: " + "; ".join(parts) + ".")
        md += ["", table(rows, world, knobs), ""]
    if results.get("failures"):
        md += ["## Failed cells", ""]
        md += [f"- {f['cell']}: {f['error']} (log: `{f['log']}`)" for f in results["failures"]]
        md.append("")
    md += ["Every number, the full configuration and the seeds are in `results.json`."]
    with atomic_output(out / "report.md") as tmp:
        Path(tmp).write_text("\n".join(md) + "\n", encoding="utf-8")
    return {"summary": rows}
