"""`preftune kto` end to end on `tiny`: learns from unpaired labels and from split pairs, the
in-batch mismatched pairs, and clear refusals of bad labels and settings."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from preftune.cli import main
from preftune.trainers.kto import _mismatched
from test_dpo import heldout_margin, write_pairs

MAX_LENGTH = 48


def write_unpaired(path: Path, n: int, seed: int, label=lambda good: good) -> Path:
    rng = random.Random(seed)

    def word(letters: str) -> str:
        return "".join(rng.choice(letters) for _ in range(rng.randint(4, 9)))

    with open(path, "w") as f:
        for i in range(n):
            good = i % 2 == 0
            f.write(
                json.dumps(
                    {
                        "prompt": f"Q {word('klmnop')} A",
                        "completion": " " + word("abcde" if good else "vwxyz"),
                        "label": label(good),
                    }
                )
                + "\n"
            )
    return path


def kto_args(train: Path, out: Path, **overrides) -> list[str]:
    args = {
        "model": "tiny",
        "data": str(train),
        "output-dir": str(out),
        "max-steps": "24",
        "batch-size": "8",
        "lr": "2e-3",
        "lr-scheduler": "constant",
        "logging-steps": "4",
        "save-steps": "0",
        "max-length": str(MAX_LENGTH),
        "seed": "0",
    }
    args.update({k.replace("_", "-"): str(v) for k, v in overrides.items()})
    out_args = ["kto"]
    for k, v in args.items():
        out_args += [f"--{k}"] + ([] if v == "" else [v])
    return out_args


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_kto_learns_from_split_pairs(tmp_path):
    train = write_pairs(tmp_path / "train.jsonl", 96, seed=0)
    held_out = write_pairs(tmp_path / "eval.jsonl", 32, seed=1)
    out = tmp_path / "kto"
    assert main(kto_args(train, out, eval_data=held_out)) == 0
    final = metrics(out)[-1]
    assert final["eval/rewards/accuracies"] >= 0.85, final
    assert final["eval/rewards/margins"] > 0
    names = {
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
        "kl/chosen",
        "kl/z0",
    }
    assert names <= [m for m in metrics(out) if "loss" in m][-1].keys()
    before, after = heldout_margin("tiny", held_out), heldout_margin(str(out), held_out)
    assert after > before + 5.0, (before, after)


def test_kto_on_unpaired_labels_with_lora(tmp_path):
    train = write_unpaired(
        tmp_path / "u.jsonl", 64, seed=0, label=lambda good: "true" if good else "false"
    )
    out = tmp_path / "lora"
    assert (
        main(kto_args(train, out, lora="", max_steps=3, logging_steps=1, desirable_weight=1.2)) == 0
    )
    first = [m for m in metrics(out) if "loss" in m][0]
    # At step 1 the adapters are zero: policy = base = reference, so log-ratios and z0 are 0.
    assert first["kl/chosen"] == pytest.approx(0.0, abs=1e-4)
    assert first["kl/z0"] == pytest.approx(0.0, abs=1e-4)
    assert (out / "adapter_config.json").is_file()


def test_mismatched_pairs_rotate_completions():
    feats = [
        {"input_ids": [1, 2, 10, 11], "completion_mask": [0, 0, 1, 1], "prompt_length": 2},
        {"input_ids": [3, 20], "completion_mask": [0, 1], "prompt_length": 1},
        {
            "input_ids": [4, 5, 6, 30, 31, 32],
            "completion_mask": [0, 0, 0, 1, 1, 1],
            "prompt_length": 3,
        },
    ]
    kl = _mismatched(feats, max_length=5)
    assert kl[0] == {"input_ids": [1, 2, 20], "completion_mask": [0, 0, 1]}
    assert kl[1] == {"input_ids": [3, 30, 31, 32], "completion_mask": [0, 1, 1, 1]}
    assert kl[2] == {"input_ids": [4, 5, 6, 10, 11], "completion_mask": [0, 0, 0, 1, 1]}


def test_non_boolean_label_is_named(tmp_path, capsys):
    data = write_unpaired(
        tmp_path / "u.jsonl", 8, seed=0, label=lambda good: "yes" if good else False
    )
    assert main(kto_args(data, tmp_path / "o", on_bad_row="error", max_steps=1)) == 2
    err = capsys.readouterr().err
    assert "label" in err and "boolean" in err and ("line 1" in err or "row 1" in err), err


def test_one_class_only_is_refused(tmp_path, capsys):
    data = write_unpaired(tmp_path / "u.jsonl", 8, seed=0, label=lambda good: True)
    assert main(kto_args(data, tmp_path / "o", max_steps=1)) == 2
    assert "KTO needs both" in capsys.readouterr().err


@pytest.mark.parametrize(
    "overrides, word",
    [
        ({"beta": 0}, "beta"),
        ({"desirable_weight": 0}, "desirable_weight"),
        ({"undesirable_weight": -1}, "undesirable_weight"),
        ({"batch_size": 1}, "batch_size"),
    ],
)
def test_bad_settings_refused(overrides, word, tmp_path, capsys):
    assert main(kto_args(tmp_path / "missing.jsonl", tmp_path / "o", **overrides)) == 2
    assert word in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
