"""The online trainers end to end on `tiny`: each of ppo, grpo, rloo and online-dpo raises a
rule-based reward within a short CPU run while the KL to the reference stays finite and is
logged; they run with a reward model; bad input is refused with one clear message; a killed
run resumes to the same rollouts."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from preftune.cli import main
from preftune.engine.engine import KILL_AFTER_CHECKPOINT_ENV
from preftune.trainers.rollout import sampling_seed, step_prompt_indices

ROOT = Path(__file__).resolve().parents[1]
REWARDS = str(ROOT / "tests" / "rewards_for_tests.py")
LOWERCASE = f"{REWARDS}:lowercase_fraction"
# Logged by every online trainer at every step.
COMMON_METRICS = (
    "reward/mean",
    "reward/std",
    "kl/k1",
    "kl/k3",
    "entropy",
    "completion/length",
    "time/generation_s",
    "time/scoring_s",
    "time/training_s",
    "loss/policy",
    "grad_norm",
    "lr",
)


def _prompts(path: Path, n: int = 32, **extra) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"Question {i}: say something", **extra}) + "\n")
    return path


def _args(command: str, data: Path, out: Path, **overrides) -> list[str]:
    args = {
        "model": "tiny",
        "data": str(data),
        "output-dir": str(out),
        "reward-fn": LOWERCASE,
        "max-steps": "2",
        "max-new-tokens": "16",
        "max-length": "128",
        "prompts-per-step": "16",
        "batch-size": "64",
        "lr": "2e-3",
        "save-steps": "0",
        "lr-scheduler": "constant",
    }
    args.update({k.replace("_", "-"): v for k, v in overrides.items()})
    out_args = [command]
    for k, v in args.items():
        if v is None:
            continue
        out_args.append(f"--{k}")
        out_args += v if isinstance(v, list) else [str(v)]
    return out_args


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _assert_learned(run_dir: Path, margin: float) -> list[dict]:
    rows = _metrics(run_dir)
    for name in COMMON_METRICS:
        assert name in rows[-1], name
    first = rows[0]["reward/mean"]
    last5 = sum(r["reward/mean"] for r in rows[-5:]) / 5
    assert last5 > first + margin, (first, last5)
    for r in rows:
        assert math.isfinite(r["kl/k1"]) and math.isfinite(r["kl/k3"]) and r["kl/k3"] >= 0
    assert rows[-1]["kl/k3"] > 0  # the policy moved away from the reference
    return rows


def _policy_changed(run_dir: Path) -> bool:
    from preftune.models import load_causal_lm

    initial, _ = load_causal_lm("tiny", seed=0)
    trained = load_file(str(run_dir / "model.safetensors"))
    return any(
        not torch.equal(trained[k], v) for k, v in initial.state_dict().items() if k in trained
    )


# --- the reward goes up -------------------------------------------------------------------------


@pytest.mark.slow
def test_grpo_raises_the_reward(tmp_path):
    out = tmp_path / "run"
    assert (
        main(
            _args(
                "grpo",
                _prompts(tmp_path / "p.jsonl"),
                out,
                max_steps=25,
                num_generations=4,
                kl_coef=0.01,
            )
        )
        == 0
    )
    rows = _assert_learned(out, margin=0.1)
    assert "clipfrac" in rows[-1]
    assert _policy_changed(out)


@pytest.mark.slow
def test_rloo_raises_the_reward(tmp_path):
    out = tmp_path / "run"
    assert (
        main(
            _args(
                "rloo",
                _prompts(tmp_path / "p.jsonl"),
                out,
                max_steps=25,
                num_generations=4,
                kl_coef=0.01,
            )
        )
        == 0
    )
    rows = _assert_learned(out, margin=0.1)
    assert "reward/penalised" in rows[-1] and "clipfrac" in rows[-1]


@pytest.mark.slow
def test_online_dpo_raises_the_reward(tmp_path):
    out = tmp_path / "run"
    assert (
        main(
            _args(
                "online-dpo", _prompts(tmp_path / "p.jsonl"), out, max_steps=25, prompts_per_step=32
            )
        )
        == 0
    )
    rows = _assert_learned(out, margin=0.08)
    assert "rewards/margins" in rows[-1] and "pairs/tie_fraction" in rows[-1]


@pytest.mark.slow
def test_ppo_raises_the_reward(tmp_path):
    out = tmp_path / "run"
    assert (
        main(
            _args(
                "ppo", _prompts(tmp_path / "p.jsonl"), out, max_steps=25, num_generations=2, lam=1.0
            )
        )
        == 0
    )
    rows = _assert_learned(out, margin=0.06)
    for name in ("loss/value", "clipfrac", "value/clipfrac", "approx_kl"):
        assert name in rows[-1] and math.isfinite(rows[-1][name])
    assert (out / "value_model" / "model.safetensors").is_file()


# --- other settings run end to end ---------------------------------------------------------------


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory) -> Path:
    """A reward model as `preftune reward` saves it (trained for a few steps on fixture pairs)."""
    out = tmp_path_factory.mktemp("rm") / "rm"
    data = ROOT / "tests" / "fixtures" / "hh_sample.jsonl"
    assert (
        main(
            [
                "reward",
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
                "--save-steps",
                "0",
            ]
        )
        == 0
    )
    return out


@pytest.mark.parametrize("command", ["ppo", "grpo", "rloo", "online-dpo"])
def test_runs_with_a_reward_model(tmp_path, reward_model_dir, command):
    out = tmp_path / "run"
    generations = {"online-dpo": 2, "ppo": 1}.get(command, 2)
    assert (
        main(
            _args(
                command,
                _prompts(tmp_path / "p.jsonl"),
                out,
                reward_fn=None,
                reward_model=str(reward_model_dir),
                num_generations=generations,
                prompts_per_step=4,
                max_new_tokens=8,
            )
        )
        == 0
    )
    rows = _metrics(out)
    assert len(rows) == 2 and "reward/reward_model" in rows[-1]
    assert (out / "run_complete.json").is_file()


def test_combined_reward_sources_with_weights(tmp_path, reward_model_dir):
    out = tmp_path / "run"
    assert (
        main(
            _args(
                "grpo",
                _prompts(tmp_path / "p.jsonl"),
                out,
                num_generations=2,
                reward_model=str(reward_model_dir),
                reward_fn=[LOWERCASE, f"{REWARDS}:completion_length"],
                reward_weights=["1.0", "1.0", "0.01"],
                missing_eos_penalty=1.0,
                length_penalty=0.01,
            )
        )
        == 0
    )
    for row in _metrics(out):
        # Every term is linear, so the step means combine like the per-row rewards:
        # 1·rm + 1·lowercase + 0.01·characters − 1.0·(no EOS) − 0.01·tokens.
        expected = (
            row["reward/reward_model"]
            + row["reward/lowercase_fraction"]
            + 0.01 * row["reward/completion_length"]
            - 1.0 * (1 - row["completion/eos_fraction"])
            - 0.01 * row["completion/length"]
        )
        assert row["reward/mean"] == pytest.approx(expected, abs=1e-4)


def test_grpo_with_lora_uses_the_disabled_adapters_as_reference(tmp_path):
    out = tmp_path / "run"
    assert (
        main(
            _args(
                "grpo",
                _prompts(tmp_path / "p.jsonl"),
                out,
                num_generations=2,
                loss_aggregation="token",
                kl_coef=0.1,
                prompts_per_step=4,
            )
            + ["--lora"]
        )
        == 0
    )
    rows = _metrics(out)
    assert abs(rows[0]["kl/k1"]) < 1e-4  # LoRA starts as the identity: π = π_ref
    assert (out / "adapter_config.json").is_file()


def test_ppo_kl_as_a_loss_and_several_minibatches(tmp_path):
    out = tmp_path / "run"
    assert (
        main(
            _args(
                "ppo",
                _prompts(tmp_path / "p.jsonl"),
                out,
                kl_penalty="loss",
                kl_estimator="k3",
                num_minibatches=2,
                ppo_epochs=2,
                batch_size=4,
                prompts_per_step=8,
                lr_scheduler="linear",
            )
        )
        == 0
    )
    rows = _metrics(out)
    # 2 rollouts x 2 epochs x 2 minibatches = 8 optimizer steps on the schedule: the linear
    # decay is halfway after the first rollout's 4 steps and at 0 after the second's.
    assert [r["lr"] for r in rows] == pytest.approx([2e-3 * 4 / 8, 0.0])
    for r in rows:
        # KL as a loss term: the reward GAE sees is the score alone.
        assert r["reward/with_kl"] == pytest.approx(r["reward/mean"], abs=1e-5)
        assert r["approx_kl"] > 0  # later minibatches see a policy already updated


def test_grpo_reuses_rollouts_with_the_clipped_ratio(tmp_path):
    data = _prompts(tmp_path / "p.jsonl")
    reuse, single = tmp_path / "reuse", tmp_path / "single"
    assert (
        main(
            _args(
                "grpo",
                data,
                reuse,
                num_generations=2,
                ppo_epochs=2,
                num_minibatches=2,
                loss_aggregation="constant",
                prompts_per_step=8,
                clip_eps=1e-3,
                lr_scheduler="linear",
            )
            + ["--no-scale-rewards"]
        )
        == 0
    )
    rows = _metrics(reuse)
    assert [r["lr"] for r in rows] == pytest.approx([2e-3 * 4 / 8, 0.0])  # 8 optimizer steps
    # After the first optimizer step π ≠ π_old, so with ε = 1e-3 the ratio leaves the clip range.
    assert all(r["clipfrac"] > 0 for r in rows)
    # One pass, one minibatch: π_old is π itself, the ratio is exactly 1, nothing is clipped.
    assert (
        main(_args("grpo", data, single, num_generations=2, prompts_per_step=8, clip_eps=1e-3)) == 0
    )
    assert all(r["clipfrac"] == 0 for r in _metrics(single))


def test_extra_columns_reach_the_reward_function(tmp_path):
    out = tmp_path / "run"
    data = tmp_path / "p.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": f"Question {i}: say something", "value": i}) + "\n"
            for i in range(32)
        )
    )
    assert (
        main(
            _args(
                "rloo",
                data,
                out,
                reward_fn=f"{REWARDS}:column_value",
                num_generations=2,
                prompts_per_step=4,
            )
        )
        == 0
    )
    for row in _metrics(out):
        # Each row's reward is its own prompt's `value`: the mean of this step's prompt indices.
        indices = step_prompt_indices(32, 4, row["step"], seed=0)
        assert row["reward/column_value"] == pytest.approx(sum(indices) / 4)
        assert row["reward/mean"] == pytest.approx(sum(indices) / 4)


# --- resume ----------------------------------------------------------------------------------------


def test_prompt_order_and_sampling_seed_are_functions_of_the_step():
    a = step_prompt_indices(10, 4, 3, seed=1)
    assert a == step_prompt_indices(10, 4, 3, seed=1)
    # positions 8..11 of the stream: the end of pass 0, then the start of pass 1
    first_pass = step_prompt_indices(10, 10, 1, seed=1)
    assert a[:2] == first_pass[8:]
    two = step_prompt_indices(10, 4, 3, seed=1, rank=0, world_size=2)
    assert two + step_prompt_indices(10, 4, 3, seed=1, rank=1, world_size=2) == a
    assert sampling_seed(0, 1, 0) != sampling_seed(0, 2, 0) != sampling_seed(0, 1, 1)


@pytest.mark.slow
def test_killed_grpo_run_resumes_to_the_same_rollouts(tmp_path):
    data = _prompts(tmp_path / "p.jsonl")
    common = dict(max_steps=4, num_generations=2, prompts_per_step=8, save_steps=2)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert main(_args("grpo", data, straight, **common)) == 0
    env = {**os.environ, KILL_AFTER_CHECKPOINT_ENV: "2", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "preftune.cli", *_args("grpo", data, killed, **common)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0 and (killed / "checkpoints" / "step-2").is_dir()
    assert main([*_args("grpo", data, killed, **common), "--resume"]) == 0
    a, b = _metrics(straight), _metrics(killed)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        assert ra["reward/mean"] == pytest.approx(rb["reward/mean"], abs=1e-6)
        assert ra["completion/length"] == pytest.approx(rb["completion/length"], abs=1e-6)
    wa, wb = (
        load_file(str(straight / "model.safetensors")),
        load_file(str(killed / "model.safetensors")),
    )
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=0)


# --- bad input -------------------------------------------------------------------------------------


def _fails(args: list[str], capsys) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_prompt_data_without_a_prompt_column_is_refused(tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"question": "hi"}) + "\n")
    err = _fails(_args("grpo", data, tmp_path / "run", num_generations=2), capsys)
    assert "prompt" in err


@pytest.mark.parametrize(
    "fn, expected",
    [
        ("raises", "'raises' raised ValueError"),
        ("wrong_shape", "'wrong_shape' must return 8 numbers"),
        ("returns_nan", "non-finite"),
    ],
)
def test_bad_reward_functions_are_named(tmp_path, capsys, fn, expected):
    err = _fails(
        _args(
            "rloo",
            _prompts(tmp_path / "p.jsonl"),
            tmp_path / "run",
            reward_fn=f"{REWARDS}:{fn}",
            num_generations=2,
            prompts_per_step=4,
        ),
        capsys,
    )
    assert expected in err


def test_nan_from_a_reward_model_is_refused(tmp_path):
    from preftune.errors import PreftuneError
    from preftune.trainers.rollout import RolloutSettings, score

    class NaNModel:
        name = "reward_model"

        def score_with_components(self, prompts, completions, **extra):
            s = torch.tensor([0.0, float("nan")])
            return s, {"reward_model": s}

    with pytest.raises(PreftuneError, match="non-finite"):
        score(
            NaNModel(),
            ["a", "b"],
            ["x", "y"],
            {},
            [True, True],
            [1, 1],
            RolloutSettings(reward_fn=["x:y"]),
        )


@pytest.mark.parametrize("command", ["grpo", "rloo"])
def test_group_methods_need_two_generations(tmp_path, capsys, command):
    err = _fails(
        _args(command, _prompts(tmp_path / "p.jsonl"), tmp_path / "run", num_generations=1), capsys
    )
    assert "num_generations" in err and ">= 2" in err


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"reward_fn": None}, "no reward source"),
        ({"reward_weights": ["1", "2"]}, "reward_weights"),
        ({"num_generations": 3}, "exactly 2"),
        ({"generator": "vllm"}, "vllm"),
        ({"temperature": 0}, "temperature"),
    ],
)
def test_bad_settings_are_refused_before_loading(tmp_path, capsys, overrides, expected):
    if overrides.get("generator") == "vllm":
        from preftune.generation import vllm_available

        if vllm_available():
            pytest.skip("vllm and a GPU are present")
    err = _fails(
        _args("online-dpo", _prompts(tmp_path / "p.jsonl"), tmp_path / "run", **overrides), capsys
    )
    assert expected in err
    assert not (tmp_path / "run").exists()


def test_grad_accum_is_not_an_online_flag(tmp_path, capsys):
    # Online commands split each rollout into minibatches themselves: no --grad-accum at all
    # (a YAML key grad_accum is refused with that reason, tests/test_config_blocks.py).
    with pytest.raises(SystemExit) as exc:
        main(_args("online-dpo", _prompts(tmp_path / "p.jsonl"), tmp_path / "run", grad_accum=2))
    assert exc.value.code == 2
    assert "unrecognized arguments: --grad-accum" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_missing_reward_function_file_is_named(tmp_path, capsys):
    err = _fails(
        _args(
            "grpo",
            _prompts(tmp_path / "p.jsonl"),
            tmp_path / "run",
            reward_fn="nope.py:f",
            num_generations=2,
        ),
        capsys,
    )
    assert "nope.py" in err
