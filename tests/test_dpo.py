"""`preftune dpo` end to end on `tiny`: every loss learns a synthetic preference, the reference
can be precomputed without changing the trajectory, LoRA uses its base as the reference, and
bad input or settings are refused with clear messages before any model loads."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from preftune.cli import main
from preftune.data.collate import collate_pairs
from preftune.data.formats import to_pairs
from preftune.data.loading import load_rows
from preftune.data.tokenize import TruncationConfig, tokenize_pairs
from preftune.losses.preference import PREFERENCE_LOSSES, REFERENCE_FREE
from preftune.models.loading import load_causal_lm
from preftune.models.logprobs import completion_logprobs

ROOT = Path(__file__).resolve().parents[1]
HH_SAMPLE = ROOT / "tests" / "fixtures" / "hh_sample.jsonl"
MAX_LENGTH = 48


def write_pairs(path: Path, n: int, seed: int) -> Path:
    """Chosen replies are made of the letters a-e, rejected ones of v-z: a learnable pattern
    that generalises to held-out pairs (different random strings, same letters)."""
    rng = random.Random(seed)

    def word(letters: str) -> str:
        return "".join(rng.choice(letters) for _ in range(rng.randint(4, 9)))

    with open(path, "w") as f:
        for _ in range(n):
            f.write(
                json.dumps(
                    {
                        "prompt": f"Q {word('klmnop')} A",
                        "chosen": " " + word("abcde"),
                        "rejected": " " + word("vwxyz"),
                    }
                )
                + "\n"
            )
    return path


@pytest.fixture(scope="module")
def pair_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("pairs")
    return write_pairs(d / "train.jsonl", 96, seed=0), write_pairs(d / "eval.jsonl", 32, seed=1)


def dpo_args(train: Path, out: Path, eval_data: Path | None = None, **overrides) -> list[str]:
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
    if eval_data is not None:
        args["eval-data"] = str(eval_data)
    args.update({k.replace("_", "-"): str(v) for k, v in overrides.items()})
    out_args = ["dpo"]
    for k, v in args.items():
        out_args += [f"--{k}"] + ([] if v == "" else [v])
    return out_args


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_metrics(run_dir: Path) -> list[dict]:
    return [m for m in metrics(run_dir) if "loss" in m]


@torch.no_grad()
def heldout_margin(model_name: str, eval_path: Path) -> float:
    """Mean over held-out pairs of log π(chosen) − log π(rejected)."""
    model, tok = load_causal_lm(model_name, seed=0)
    pairs, _ = to_pairs(load_rows(str(eval_path)), str(eval_path))
    feats, _ = tokenize_pairs(tok, pairs, TruncationConfig(max_length=MAX_LENGTH))
    batch = collate_pairs(feats, tok.pad_token_id)
    out = completion_logprobs(
        model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    )
    n = batch["num_pairs"]
    return float((out.seq_logps[:n] - out.seq_logps[n:]).mean())


LOSS_SETTINGS = {
    "dpo": {},
    "ipo": {},
    "hinge": {},
    "cdpo": {"label_smoothing": 0.1},
    "robust": {"label_smoothing": 0.1},
    "simpo": {"beta": 2.0},
    "orpo": {},
    "cpo": {},
}
assert set(LOSS_SETTINGS) == set(PREFERENCE_LOSSES)


@pytest.mark.parametrize("loss", PREFERENCE_LOSSES)
def test_every_loss_learns_the_preference(loss, pair_data, tmp_path):
    train, held_out = pair_data
    out = tmp_path / loss
    assert main(dpo_args(train, out, held_out, loss=loss, **LOSS_SETTINGS[loss])) == 0
    final = metrics(out)[-1]
    # Held-out preference accuracy of the implicit reward (the method's own score when
    # reference-free), well above the 0.5 of chance.
    assert final["eval/rewards/accuracies"] >= 0.85, final
    names = {
        "eval/loss",
        "eval/rewards/chosen",
        "eval/rewards/rejected",
        "eval/rewards/margins",
        "eval/logps/chosen",
        "eval/logps/rejected",
    }
    if loss not in REFERENCE_FREE:
        names.add("eval/kl/chosen")
        assert final["eval/rewards/margins"] > 0
    assert names <= final.keys()
    train_logged = train_metrics(out)
    assert {
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "tokens_per_s",
    } <= train_logged[-1].keys()
    # The policy's log-prob of held-out chosen replies rose relative to the rejected ones.
    before, after = heldout_margin("tiny", held_out), heldout_margin(str(out), held_out)
    assert after > before + 5.0, (before, after)


def test_precomputed_reference_matches_on_the_fly(pair_data, tmp_path):
    train, held_out = pair_data
    fly, pre = tmp_path / "fly", tmp_path / "pre"
    common = dict(max_steps=6, logging_steps=1)
    assert main(dpo_args(train, fly, held_out, **common)) == 0
    assert main(dpo_args(train, pre, held_out, precompute_ref="", **common)) == 0
    assert (pre / "ref_logps.safetensors").is_file()
    # Tolerance: the reference is computed in other batches (other padding widths), so its
    # log-probs may differ in the last float32 bits; losses, rewards and log-probs agree to
    # 1e-4 relative, weights to 1e-5. Accuracies are skipped: a near-tie can flip either way.
    skip = {
        "tokens_per_s",
        "examples_per_s",
        "step_time_s",
        "rewards/accuracies",
        "eval/rewards/accuracies",
    }
    for a, b in zip(metrics(fly), metrics(pre)):
        assert a.keys() == b.keys()
        for k in a:
            if k in skip:
                continue
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), k
    wa, wb = load_file(str(fly / "model.safetensors")), load_file(str(pre / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=0)
    # --resume reuses the cache (the fingerprint matches) and continues the run.
    stamp = (pre / "ref_logps.safetensors").stat().st_mtime_ns
    assert (
        main(
            dpo_args(
                train, pre, held_out, precompute_ref="", resume="", max_steps=8, logging_steps=1
            )
        )
        == 0
    )
    assert (pre / "ref_logps.safetensors").stat().st_mtime_ns == stamp


def test_lora_reference_is_the_base_model(pair_data, tmp_path):
    train, held_out = pair_data
    out = tmp_path / "lora"
    assert (
        main(
            dpo_args(
                train,
                out,
                held_out,
                lora="",
                lora_r=8,
                max_steps=4,
                logging_steps=1,
                sft_weight=0.5,
            )
        )
        == 0
    )
    first = train_metrics(out)[0]
    # At step 1 the adapters are zero: the policy equals its base, the reference.
    assert first["kl/chosen"] == pytest.approx(0.0, abs=1e-4)
    assert first["loss"] > 0
    assert (out / "adapter_config.json").is_file()


def test_separate_reference_model(pair_data, tmp_path):
    train, _ = pair_data
    ref_dir = tmp_path / "ref"
    model, tok = load_causal_lm("tiny", seed=5)
    model.save_pretrained(ref_dir)
    tok.save_pretrained(ref_dir)
    out = tmp_path / "run"
    assert main(dpo_args(train, out, ref_model=ref_dir, max_steps=2, logging_steps=1)) == 0
    # A reference other than the initial policy: the log-ratio is not zero at the start.
    assert abs(train_metrics(out)[0]["kl/chosen"]) > 1e-3


def test_hh_pairs_with_implicit_prompt(tmp_path):
    """Real HH-RLHF pairs: whole dialogues, the prompt is their common prefix."""
    rows = HH_SAMPLE.read_text().splitlines()[:24]
    data = tmp_path / "hh.jsonl.gz"
    with gzip.open(data, "wt") as f:
        f.write("\n".join(rows) + "\n")
    out = tmp_path / "hh"
    assert (
        main(
            [
                "dpo",
                "--model",
                "tiny",
                "--data",
                str(data),
                "--output-dir",
                str(out),
                "--max-steps",
                "2",
                "--batch-size",
                "4",
                "--max-length",
                "128",
                "--logging-steps",
                "1",
                "--save-steps",
                "0",
                "--eval-fraction",
                "0.2",
            ]
        )
        == 0
    )
    logged = metrics(out)
    assert all(m.get("loss", 0) == m.get("loss", 0) for m in logged)  # no NaN
    assert "eval/rewards/accuracies" in logged[-1]


# --- refusals --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"beta": 0}, ["beta"]),
        ({"beta": -1}, ["beta"]),
        ({"loss": "cdpo", "label_smoothing": 0.5}, ["label_smoothing", "[0, 0.5)"]),
        ({"loss": "dpo", "label_smoothing": 0.1}, ["label_smoothing", "no effect"]),
        ({"loss": "simpo", "precompute_ref": ""}, ["precompute_ref", "reference-free"]),
        ({"loss": "orpo", "ref_model": "/nonexistent"}, ["ref_model", "reference-free"]),
        ({"loss": "dpo", "simpo_gamma": 1.0}, ["simpo_gamma", "simpo"]),
        ({"loss": "orpo", "sft_weight": 1.0}, ["sft_weight"]),
    ],
)
def test_bad_settings_refused_before_loading(overrides, words, tmp_path, capsys, monkeypatch):
    import preftune.trainers.dpo as dpo

    def no_run(cfg):  # validation must refuse the settings before the trainer starts
        raise AssertionError("the trainer ran")

    monkeypatch.setattr(dpo, "run_dpo", no_run)
    assert main(dpo_args(tmp_path / "missing.jsonl", tmp_path / "out", **overrides)) == 2
    err = capsys.readouterr().err
    for w in words:
        assert w in err, err
    assert not (tmp_path / "out").exists()


def test_unknown_loss_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(dpo_args(tmp_path / "x.jsonl", tmp_path / "out", loss="bogus"))
    assert exc.value.code == 2
    assert "bogus" in capsys.readouterr().err


def test_bad_rows_are_named(tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    rows = [
        {"prompt": "Q a", "chosen": " x", "rejected": " y"},
        {"prompt": "Q b", "chosen": " same", "rejected": " same"},
        {"prompt": "Q c", "chosen": "", "rejected": " y"},
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(dpo_args(data, tmp_path / "o1", on_bad_row="error", max_steps=1)) == 2
    err = capsys.readouterr().err
    assert "line 2" in err or "row 2" in err, err
    assert "identical" in err


def test_pairs_truncated_to_nothing(tmp_path, capsys):
    # Replies that differ only after the first 20 bytes are identical once cut to max_length.
    data = tmp_path / "long.jsonl"
    rows = [
        {"prompt": "Q " + "p" * 8, "chosen": " " + "a" * 40 + "x", "rejected": " " + "a" * 40 + "y"}
        for _ in range(4)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(dpo_args(data, tmp_path / "o", max_length=16, batch_size=2, max_steps=1)) == 2
    err = capsys.readouterr().err
    assert "no pair is left" in err and "max_length" in err


def test_reference_with_another_tokenizer_refused(pair_data, tmp_path, capsys):
    from transformers import PreTrainedTokenizerFast

    train, _ = pair_data
    ref_dir = tmp_path / "ref"
    model, tok = load_causal_lm("tiny", seed=0)
    model.save_pretrained(ref_dir)
    tok.add_tokens(["<|extra|>"])
    assert isinstance(tok, PreTrainedTokenizerFast)
    tok.save_pretrained(ref_dir)
    assert main(dpo_args(train, tmp_path / "o", ref_model=ref_dir, max_steps=1)) == 2
    err = capsys.readouterr().err
    assert "tokenizer differs" in err and "ref_model" in err
