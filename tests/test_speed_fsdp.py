"""FSDP2 through accelerate: 2 processes equal 1 process (same global batch, same weights).

Needs 2 CUDA devices. On the CPU it cannot run: accelerate 1.15 turns `--use_fsdp` into
FSDP only from a device-backed distributed type (MULTI_GPU, MULTI_XPU, ...); with gloo on the
CPU `AcceleratorState` stays `DistributedType.MULTI_CPU` and `prepare` returns a
DistributedDataParallel model (with `Accelerator(cpu=False)` on a CPU-only machine it is
`DistributedType.NO`: each process trains alone). Checked by hand on this machine with
`accelerate launch --use_fsdp --fsdp_version 2 --num_processes 2`; see benchmarks/README.md.
One GPU is not enough either: NCCL refuses two ranks on one device.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        torch.cuda.device_count() < 2,
        reason="FSDP through accelerate needs 2 "
        "CUDA devices (on the CPU accelerate gives DDP, see the module docstring)",
    ),
]


def _data(path: Path) -> Path:
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "eps"]
    with open(path, "w") as f:
        f.writelines(
            json.dumps(
                {
                    "prompt": " ".join(rng.choice(words) for _ in range(rng.randint(1, 6))),
                    "completion": " "
                    + " ".join(rng.choice(words) for _ in range(rng.randint(1, 20))),
                }
            )
            + "\n"
            for _ in range(32)
        )
    return path


def _args(data: Path, out: Path, batch_size: int, grad_accum: int) -> list[str]:
    return [
        "sft",
        "--model",
        "tiny",
        "--data",
        str(data),
        "--output-dir",
        str(out),
        "--max-steps",
        "3",
        "--lr",
        "1e-3",
        "--logging-steps",
        "1",
        "--save-steps",
        "0",
        "--max-length",
        "96",
        "--seed",
        "3",
        "--lr-scheduler",
        "linear",
        "--mixed-precision",
        "no",
        "--dtype",
        "float32",
        "--batch-size",
        str(batch_size),
        "--grad-accum",
        str(grad_accum),
    ]


def test_fsdp2_two_processes_equal_one_process(tmp_path):
    data = _data(tmp_path / "d.jsonl")
    one, two = tmp_path / "one", tmp_path / "two"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "preftune.cli", *_args(data, one, 4, 2)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--use_fsdp",
        "--fsdp_version",
        "2",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--fsdp_auto_wrap_policy",
        "TRANSFORMER_BASED_WRAP",
        "--fsdp_transformer_layer_cls_to_wrap",
        "LlamaDecoderLayer",
        "--fsdp_state_dict_type",
        "FULL_STATE_DICT",
        "-m",
        "preftune.cli",
        *_args(data, two, 4, 1),
    ]
    env = {**os.environ, "MASTER_PORT": str(29500 + random.Random().randint(0, 500))}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m1 = [json.loads(x) for x in (one / "metrics.jsonl").read_text().splitlines()]
    m2 = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(m1, m2):
        if "loss" in a:
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    wa, wb = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=0)
