"""The engine's invariants: accumulation and data parallelism do not change the gradients,
a killed run resumes to the same weights, checkpoints are atomic, and the output directory
is protected."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from preftune.cli import main
from preftune.engine.engine import KILL_AFTER_CHECKPOINT_ENV

ROOT = Path(__file__).resolve().parents[1]


def _write_sft_data(path: Path, n: int = 32, seed: int = 0) -> Path:
    """Prompt/completion rows of very different lengths, so token normalisation matters."""
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta"]
    with open(path, "w") as f:
        for _ in range(n):
            prompt = " ".join(rng.choice(words) for _ in range(rng.randint(1, 6)))
            completion = " " + " ".join(rng.choice(words) for _ in range(rng.randint(1, 20)))
            f.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")
    return path


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model.safetensors"))


def _assert_same_weights(a: Path, b: Path, atol: float) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=0)


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _sft_args(data: Path, out: Path, **overrides) -> list[str]:
    args = {
        "model": "tiny",
        "data": str(data),
        "output-dir": str(out),
        "max-steps": "3",
        "lr": "1e-3",
        "logging-steps": "1",
        "save-steps": "0",
        "max-length": "96",
        "seed": "3",
        "lr-scheduler": "linear",
    }
    args.update({k.replace("_", "-"): str(v) for k, v in overrides.items()})
    out_args = ["sft"]
    for k, v in args.items():
        out_args += [f"--{k}", v]
    return out_args


def test_gradient_accumulation_equals_one_large_batch(tmp_path):
    data = _write_sft_data(tmp_path / "d.jsonl")
    big, accum = tmp_path / "big", tmp_path / "accum"
    assert main(_sft_args(data, big, batch_size=8, grad_accum=1)) == 0
    assert main(_sft_args(data, accum, batch_size=2, grad_accum=4)) == 0
    # Same examples per step, losses normalised over the global token count: same numbers.
    for mb, ma in zip(_metrics(big), _metrics(accum)):
        assert mb["loss"] == pytest.approx(ma["loss"], rel=1e-5)
        assert mb["grad_norm"] == pytest.approx(ma["grad_norm"], rel=1e-4)
    _assert_same_weights(big, accum, atol=2e-6)


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path):
    """2 CPU processes under `accelerate launch` (gloo) equal 1 process, same global batch."""
    data = _write_sft_data(tmp_path / "d.jsonl")
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(_sft_args(data, one, batch_size=4, grad_accum=2)) == 0
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "preftune.cli",
        *_sft_args(data, two, batch_size=4, grad_accum=1),
    ]
    env = {**os.environ, "MASTER_PORT": str(29500 + random.Random().randint(0, 500))}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for m1, m2 in zip(_metrics(one), _metrics(two)):
        assert m1["loss"] == pytest.approx(m2["loss"], rel=1e-5)
    _assert_same_weights(one, two, atol=2e-6)


@pytest.mark.slow
def test_kill_after_checkpoint_then_resume_matches_uninterrupted(tmp_path):
    data = _write_sft_data(tmp_path / "d.jsonl")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    common = dict(batch_size=4, max_steps=6, save_steps=2)
    assert main(_sft_args(data, straight, **common)) == 0

    cmd = [sys.executable, "-m", "preftune.cli", *_sft_args(data, killed, **common)]
    env = {**os.environ, KILL_AFTER_CHECKPOINT_ENV: "4"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (killed / "checkpoints" / "step-4" / "trainer_state.json").is_file()
    assert not (killed / "model.safetensors").exists()
    # A half-written checkpoint from a crash must never be picked up.
    (killed / "checkpoints" / ".tmp-step-6").mkdir()

    assert main([*_sft_args(data, killed, **common), "--resume"]) == 0
    _assert_same_weights(straight, killed, atol=1e-6)
    steps = [m["step"] for m in _metrics(killed) if "loss" in m]
    assert steps == [1, 2, 3, 4, 5, 6]  # lines after the checkpoint were not duplicated
    for ms, mk in zip(_metrics(straight), _metrics(killed)):
        assert ms["loss"] == pytest.approx(mk["loss"], rel=1e-5)


def test_output_dir_with_another_run_is_refused(tmp_path, capsys):
    data = _write_sft_data(tmp_path / "d.jsonl")
    out = tmp_path / "run"
    assert main(_sft_args(data, out, max_steps=1)) == 0
    assert main(_sft_args(data, out, max_steps=1)) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--overwrite" in err
    assert main([*_sft_args(data, out, max_steps=1), "--overwrite"]) == 0
    # Resuming with a setting that changes the result is refused, naming the setting.
    assert main([*_sft_args(data, out, max_steps=1, lr="0.5"), "--resume"]) == 2
    assert "lr" in capsys.readouterr().err


def test_checkpoint_limit_keeps_latest(tmp_path):
    data = _write_sft_data(tmp_path / "d.jsonl")
    out = tmp_path / "run"
    assert (
        main(_sft_args(data, out, batch_size=4, max_steps=7, save_steps=2, save_total_limit=2)) == 0
    )
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step-4", "step-6"]
    state = json.loads((out / "checkpoints" / "step-6" / "trainer_state.json").read_text())
    assert state["step"] == 6
