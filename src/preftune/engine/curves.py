"""Training curves as a picture: `curves.png` at the end of every run, and `preftune plot`.

Read from `metrics.jsonl` (one line per logging step; held-out metrics as `eval/<name>`), one
panel per metric: loss, learning rate, gradient norm, then each method's own key metrics.
A held-out series is drawn dashed, with markers, in its training series' panel. Figures are
built on matplotlib's Agg canvas directly (no pyplot: no global state, never a window).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from preftune.config import arg
from preftune.errors import PreftuneError

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
# Panels in this order, where a run logged the metric (or its held-out `eval/` twin).
KEY_METRICS = (
    ("loss", "loss"),
    ("loss/policy", "policy loss"),
    ("lr", "learning rate"),
    ("grad_norm", "gradient norm"),
    ("rewards/margins", "rewards/margins"),  # DPO family, KTO, reward models
    ("rewards/accuracies", "rewards/accuracies"),
    ("kl/chosen", "DPO: kl/chosen (log π/π_ref)"),
    ("reward/mean", "online: reward/mean"),
    ("kl/k1", "online: kl/k1 per sequence"),
    ("completion/length", "online: completion length"),
    ("loss/value", "PPO: value loss"),
)


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The lines of a run's metrics.jsonl, naming the file and line of a malformed one."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise PreftuneError(f"{run_dir}: no {METRICS_FILE} (is it a preftune run folder?)")
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise PreftuneError(f"{path}, line {i}: not valid JSON ({exc.msg})") from None
    return rows


def _series(rows: list[dict], name: str) -> tuple[list[float], list[float]]:
    steps, values = [], []
    for row in rows:
        value = row.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            steps.append(row.get("step", len(steps)))
            values.append(float(value))
    return steps, values


def panels_for(runs: list[list[dict]], metrics: list[str] | None = None) -> list[tuple[str, str]]:
    """(metric, title) of every panel that has data in at least one run."""
    wanted = [(m, m) for m in metrics] if metrics else list(KEY_METRICS)
    present = set()
    for rows in runs:
        for row in rows:
            present.update(row)
    return [(m, title) for m, title in wanted if m in present or f"eval/{m}" in present]


def plot_runs(
    run_dirs: list[str | os.PathLike],
    path: str | os.PathLike,
    *,
    labels: list[str] | None = None,
    metrics: list[str] | None = None,
) -> Path:
    """One figure with a panel per metric, each run in its own colour, held-out dashed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from preftune.utils import atomic_output

    runs = [read_metrics(d) for d in run_dirs]
    labels = labels or [Path(d).name or str(d) for d in run_dirs]
    if len(set(labels)) < len(labels):  # two folders with one name: tell them apart
        labels = [str(d) for d in run_dirs]
    panels = panels_for(runs, metrics)
    if not panels:
        wanted = ", ".join(metrics) if metrics else "loss, lr, grad_norm or a method metric"
        raise PreftuneError(
            f"{', '.join(map(str, run_dirs))}: no {wanted} logged in "
            f"{METRICS_FILE}; nothing to plot"
        )
    cols = min(3, len(panels))
    rows_n = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(4.2 * cols, 2.9 * rows_n))
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows_n, cols, squeeze=False).ravel()
    colors = [f"C{i % 10}" for i in range(len(runs))]
    several = len(runs) > 1
    for i, (ax, (metric, title)) in enumerate(zip(axes, panels)):
        for rows, label, color in zip(runs, labels, colors):
            steps, values = _series(rows, metric)
            if steps:
                ax.plot(
                    steps,
                    values,
                    color=color,
                    linewidth=1.4,
                    label=f"{label} train" if several else "train",
                )
            steps, values = _series(rows, f"eval/{metric}")
            if steps:
                ax.plot(
                    steps,
                    values,
                    color=color,
                    linestyle="--",
                    marker="o",
                    markersize=3,
                    label=f"{label} held-out" if several else "held-out",
                )
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.locator_params(axis="x", nbins=5, integer=True)
        ax.grid(alpha=0.3)
        if i == 0:  # one legend: the same runs and line styles in every panel
            ax.legend(fontsize=6)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    fig.supxlabel("optimizer step (online: rollout)", fontsize=8)
    # Fixed margins rather than tight_layout, which draws the figure once more to measure it.
    height = 2.9 * rows_n
    fig.subplots_adjust(
        left=0.07, right=0.98, bottom=0.55 / height, top=1 - 0.3 / height, wspace=0.3, hspace=0.45
    )
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    return Path(path)


def write_curves(output_dir: str | os.PathLike) -> Path | None:
    """`curves.png` in a finished run's folder (nothing when no metric was logged)."""
    runs = [read_metrics(output_dir)]
    if not panels_for(runs):
        return None
    return plot_runs([output_dir], Path(output_dir) / CURVES_FILE)


# --- `preftune plot` ---------------------------------------------------------------------------


@dataclass
class PlotConfig:
    """Settings of `preftune plot`: overlay the curves of several runs."""

    runs: list[str] = arg([], "Run folders (each with metrics.jsonl) to overlay.", positional=True)
    output: str = arg("curves-comparison.png", "The PNG file to write.")
    labels: list[str] = arg([], "One label per run (default: the folder names).")
    metrics: list[str] = arg(
        [],
        "Metrics to plot, e.g. loss rewards/margins (default: loss, "
        "lr, grad_norm and each method's key metrics the runs logged).",
    )

    def validate(self) -> None:
        if not self.runs:
            raise PreftuneError("runs: give at least one run folder")
        for run in self.runs:
            if not (Path(run) / METRICS_FILE).is_file():
                raise PreftuneError(f"{run}: no {METRICS_FILE} (is it a preftune run folder?)")
        if self.labels and len(self.labels) != len(self.runs):
            raise PreftuneError(
                f"labels: got {len(self.labels)} for {len(self.runs)} runs; give "
                "one per run, in the same order"
            )
        if not self.output.endswith(".png"):
            raise PreftuneError(f"output: got {self.output!r}, expected a .png file name")


def run_plot(cfg: PlotConfig) -> Path:
    cfg.validate()
    path = plot_runs(cfg.runs, cfg.output, labels=cfg.labels or None, metrics=cfg.metrics or None)
    print(f"wrote {path}")
    return path
