"""curves.png and `preftune plot`, on metrics.jsonl files written here (no training: the runs
of each family are in test_readme_examples.py)."""

from __future__ import annotations

import json

import pytest

from preftune.cli import main
from preftune.engine.curves import (
    _series,
    panels_for,
    plot_runs,
    read_metrics,
    write_curves,
)
from preftune.errors import PreftuneError

PNG = b"\x89PNG\r\n\x1a\n"


def _run(path, rows):
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


DPO_ROWS = [
    {"step": 0, "eval/loss": 0.69, "eval/rewards/margins": 0.0},
    {
        "step": 1,
        "loss": 0.68,
        "lr": 1e-6,
        "grad_norm": 2.0,
        "rewards/margins": 0.1,
        "rewards/accuracies": 0.5,
        "kl/chosen": -0.1,
        "tokens_per_s": 100.0,
    },
    {
        "step": 2,
        "loss": 0.60,
        "lr": 5e-7,
        "grad_norm": float("nan"),
        "rewards/margins": 0.3,
        "rewards/accuracies": 0.75,
        "kl/chosen": -0.2,
    },
    {"step": 2, "eval/loss": 0.66, "eval/rewards/margins": 0.2},
]


def test_series_and_panels():
    # grad_norm at step 2 is NaN: left out, not drawn as a gap at zero.
    assert _series(DPO_ROWS, "grad_norm") == ([1], [2.0])
    assert _series(DPO_ROWS, "eval/loss") == ([0, 2], [0.69, 0.66])
    panels = [m for m, _ in panels_for([DPO_ROWS])]
    assert panels == [
        "loss",
        "lr",
        "grad_norm",
        "rewards/margins",
        "rewards/accuracies",
        "kl/chosen",
    ]  # tokens_per_s is not a key metric; no online panels
    online = [
        {
            "step": 1,
            "loss/policy": 0.1,
            "reward/mean": 0.2,
            "kl/k1": 0.01,
            "completion/length": 12.0,
        }
    ]
    assert [m for m, _ in panels_for([online])] == [
        "loss/policy",
        "reward/mean",
        "kl/k1",
        "completion/length",
    ]
    assert [m for m, _ in panels_for([DPO_ROWS, online], ["loss", "reward/mean"])] == [
        "loss",
        "reward/mean",
    ]


def test_write_curves_and_plot_two_runs(tmp_path, capsys):
    a = _run(tmp_path / "beta0.1", DPO_ROWS)
    b = _run(
        tmp_path / "beta0.5", [{**r, "loss": r["loss"] / 2} if "loss" in r else r for r in DPO_ROWS]
    )
    assert write_curves(a).read_bytes()[:8] == PNG
    out = tmp_path / "cmp.png"
    assert main(["plot", str(a), str(b), "--labels", "β=0.1", "β=0.5", "--output", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG and str(out) in capsys.readouterr().out
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_plot_refuses_bad_input(tmp_path, capsys):
    a = _run(tmp_path / "a", DPO_ROWS)
    assert main(["plot", str(a), str(tmp_path / "nope")]) == 2
    assert "nope: no metrics.jsonl" in capsys.readouterr().err
    assert main(["plot", str(a), "--labels", "x", "y"]) == 2
    assert "got 2 for 1 runs" in capsys.readouterr().err
    assert main(["plot", str(a), "--metrics", "no/such", "--output", str(tmp_path / "x.png")]) == 2
    assert "nothing to plot" in capsys.readouterr().err
    bad = _run(tmp_path / "bad", [])
    (bad / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2,\n')
    with pytest.raises(PreftuneError, match="metrics.jsonl, line 2: not valid JSON"):
        read_metrics(bad)
    empty = _run(tmp_path / "empty", [{"step": 1, "time/generation_s": 0.5}])
    assert write_curves(empty) is None  # nothing worth a picture: no file
    with pytest.raises(PreftuneError, match="nothing to plot"):
        plot_runs([empty], tmp_path / "e.png")
