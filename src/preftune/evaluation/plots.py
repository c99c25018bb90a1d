"""Figures for the eval-rm report, drawn with matplotlib's Agg canvas.

We build `Figure` objects directly instead of going through pyplot: no global backend switch,
no figure registry to leak, nothing that could open a window.
"""

from __future__ import annotations

import os

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from preftune.errors import PreftuneError
from preftune.evaluation.stats import Calibration, check_finite
from preftune.utils import atomic_output


def _save_png(fig: Figure, path: str | os.PathLike) -> None:
    FigureCanvasAgg(fig)  # attach the Agg canvas explicitly
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")


def reliability_diagram(cal: Calibration, path: str | os.PathLike) -> None:
    """Bars of accuracy per confidence bin against the diagonal, with bin counts below."""
    fig = Figure(figsize=(5.0, 6.0))
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    left = cal.edges[:-1]
    width = np.diff(cal.edges)
    filled = cal.counts > 0

    top.bar(
        left[filled],
        cal.accuracy[filled],
        width=width[filled],
        align="edge",
        edgecolor="black",
        color="tab:blue",
        alpha=0.8,
        label="accuracy",
    )
    top.plot([0.5, 1.0], [0.5, 1.0], "--", color="gray", label="perfect calibration")
    # The gap between a bar's top and its red tick is that bin's |accuracy − confidence|.
    top.plot(
        (left + width / 2)[filled],
        cal.confidence[filled],
        "_",
        color="tab:red",
        markersize=14,
        markeredgewidth=2,
        label="mean confidence",
    )
    top.set_xlim(0.5, 1.0)
    top.set_ylim(0.0, 1.0)
    top.set_ylabel("accuracy (chosen ranked higher)")
    top.set_title(
        f"Reliability of σ(r_chosen − r_rejected)\nECE = {cal.ece:.3f}, n = {cal.n} pairs"
    )
    top.legend(loc="upper left", fontsize="small")

    bottom.bar(left, cal.counts, width=width, align="edge", edgecolor="black", color="tab:gray")
    bottom.set_xlabel("confidence max(p, 1 − p)")
    bottom.set_ylabel("pairs")
    _save_png(fig, path)


def reward_distributions(r_chosen, r_rejected, path: str | os.PathLike, *, bins: int = 40) -> None:
    """Overlaid histograms of chosen and rejected rewards on shared bins."""
    c = check_finite("rewards of chosen responses", r_chosen)
    r = check_finite("rewards of rejected responses", r_rejected)
    both = np.concatenate([c, r])
    if both.size == 0:
        raise PreftuneError("no rewards to plot")
    lo, hi = float(both.min()), float(both.max())
    if lo == hi:  # all rewards equal: give the single bar some width
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, bins + 1)

    fig = Figure(figsize=(6.0, 4.0))
    ax = fig.subplots()
    ax.hist(c, bins=edges, alpha=0.5, color="tab:green", label=f"chosen (mean {c.mean():.3g})")
    ax.hist(r, bins=edges, alpha=0.5, color="tab:red", label=f"rejected (mean {r.mean():.3g})")
    ax.set_xlabel("reward")
    ax.set_ylabel("responses")
    ax.set_title("Reward distributions")
    ax.legend(fontsize="small")
    _save_png(fig, path)
