"""Nothing lost, nothing silent: each fault of issue 10 injected, and its outcome asserted.

Output folders are owned and locked; training is finite or fails; checkpoints verify
themselves and resume falls back past a damaged one; SIGTERM/SIGINT stop with a checkpoint
from which --resume reaches bit-identical weights; a full disk, bad settings and bad files get
one clear message each.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from preftune.cli import main
from preftune.engine import checkpoint, rundir
from preftune.engine.preemption import SIGNAL_AT_STEP_ENV, SignalWatch, StoppedBeforeTraining

ROOT = Path(__file__).resolve().parents[1]
REWARDS = str(ROOT / "tests" / "rewards_for_tests.py")


def _sft_data(path: Path, n: int = 24, seed: int = 0) -> Path:
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta"]
    with open(path, "w") as f:
        for _ in range(n):
            prompt = " ".join(rng.choice(words) for _ in range(rng.randint(1, 5)))
            completion = " " + " ".join(rng.choice(words) for _ in range(rng.randint(1, 8)))
            f.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")
    return path


def _sft(data: Path, out: Path, *extra: str, **overrides) -> list[str]:
    args = {
        "model": "tiny",
        "data": str(data),
        "output-dir": str(out),
        "max-steps": "4",
        "lr": "1e-3",
        "logging-steps": "1",
        "save-steps": "0",
        "max-length": "64",
        "batch-size": "4",
        "seed": "1",
        "lr-scheduler": "linear",
    }
    args.update({k.replace("_", "-"): str(v) for k, v in overrides.items()})
    return ["sft", *[x for k, v in args.items() for x in (f"--{k}", v)], *extra]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model.safetensors"))


def _assert_identical(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k  # bit-identical, not merely close


def _steps(run: Path) -> list[int]:
    return [
        json.loads(line)["step"]
        for line in (run / "metrics.jsonl").read_text().splitlines()
        if "loss" in json.loads(line)
    ]


def _flip_byte(path: Path, offset: int = -100) -> None:
    """Same-size corruption: one byte changed, as a bad disk or a stray write would do."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture
def data(tmp_path):
    return _sft_data(tmp_path / "d.jsonl")


@pytest.fixture
def straight(tmp_path_factory, data):
    """An uninterrupted 4-step run: the reference every interrupted run must reach."""
    out = tmp_path_factory.mktemp("straight") / "run"
    assert main(_sft(data, out)) == 0
    return out


# --- output folders: owned, locked, rerunnable ---------------------------------------------


def test_overwrite_removes_only_the_runs_own_files(tmp_path, data, capsys):
    out = tmp_path / "x"
    (out / "thesis").mkdir(parents=True)
    (out / "thesis" / "a.tex").write_text("hi")
    assert main(_sft(data, out, "--overwrite", max_steps=1)) == 2
    err = capsys.readouterr().err
    assert "thesis" in err and "no preftune run wrote" in err
    assert (out / "thesis" / "a.tex").read_text() == "hi"

    run = tmp_path / "run"
    assert main(_sft(data, run, max_steps=2, save_steps=1)) == 0
    assert (run / "checkpoints" / "step-1").is_dir()
    (run / "notes.txt").write_text("mine")
    assert main(_sft(data, run, "--overwrite", max_steps=1)) == 2
    assert "notes.txt" in capsys.readouterr().err
    (run / "notes.txt").unlink()
    assert main(_sft(data, run, "--overwrite", max_steps=1)) == 0
    assert not (run / "checkpoints").exists()  # the old run's files went, the new run's came
    assert (run / "model.safetensors").is_file() and _steps(run) == [1]


def test_output_dir_dot_never_empties_the_working_directory(tmp_path, data, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.txt").write_text("precious")
    assert main(_sft(data, Path("."), "--overwrite", max_steps=1)) == 2
    assert "keep.txt" in capsys.readouterr().err
    assert (tmp_path / "keep.txt").read_text() == "precious" and data.is_file()


def test_second_run_refused_while_the_first_lives_allowed_after_it_dies(tmp_path, data, capsys):
    out = tmp_path / "run"
    out.mkdir()
    hold = (
        "import sys, time; from pathlib import Path; "
        "from preftune.engine.rundir import RunLock; RunLock(Path(sys.argv[1])).acquire(); "
        "print('locked', flush=True); time.sleep(300)"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", hold, str(out)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(_sft(data, out, max_steps=1)) == 2
        err = capsys.readouterr().err
        assert "in use by another preftune run" in err
        assert f"PID {holder.pid} on host {socket.gethostname()}" in err
    finally:
        holder.kill()
        holder.wait()
    assert main(_sft(data, out, max_steps=1)) == 0  # the dead holder's lock is stale
    assert f"taking over the lock of preftune process {holder.pid}" in capsys.readouterr().err
    assert not (out / rundir.LOCK_FILE).exists()  # released at the end


def test_a_run_that_failed_before_its_first_step_does_not_block_its_rerun(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    good = _sft_data(tmp_path / "good.jsonl").read_text()
    data.write_text(good + '{"prompt": "a" "completion": "b"}\n')
    out = tmp_path / "run"
    assert main(_sft(data, out, max_steps=1)) == 2
    assert "line 25: not valid JSON" in capsys.readouterr().err
    data.write_text(good)  # fixed: the same command now runs, no --overwrite needed
    assert main(_sft(data, out, max_steps=1)) == 0


# --- finite or fail ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--lr", "inf"),
        ("--weight-decay", "inf"),
        ("--epochs", "inf"),
        ("--lr", "nan"),
        ("--max-grad-norm", "inf"),
    ],
)
def test_non_finite_hyperparameters_are_refused(tmp_path, data, capsys, flag, value):
    out = tmp_path / "run"
    assert main([*_sft(data, out), flag, value]) == 2
    err = capsys.readouterr().err
    assert f"{flag[2:].replace('-', '_')}: got {value}" in err and "expected a finite number" in err
    assert "Traceback" not in err and not out.exists()


def test_diverging_run_stops_at_the_first_non_finite_step(tmp_path, data, capsys):
    out = tmp_path / "run"
    # lr 1e30: the first update sends the weights to ~1e30, the second forward overflows
    assert main(_sft(data, out, lr="1e30", save_steps=1)) == 3
    err = capsys.readouterr().err
    assert "step 2: the loss is not finite" in err and "without saving a model" in err
    assert not (out / "model.safetensors").exists() and not (out / "run_complete.json").exists()
    assert checkpoint.verify(out / "checkpoints" / "step-1") is None  # the last good one
    assert not (out / "checkpoints" / "step-2").exists()


def _nan_at_call(monkeypatch, n: int) -> None:
    """Make the n-th micro-batch loss NaN (a bad batch, an overflow)."""
    from preftune.engine.engine import Engine

    real = Engine.backward
    calls = {"n": 0}

    def backward(self, loss_sum, units):
        calls["n"] += 1
        if calls["n"] == n:
            loss_sum = loss_sum * float("nan")
        return real(self, loss_sum, units)

    monkeypatch.setattr(Engine, "backward", backward)


def test_one_nan_step_fails_by_default_and_is_skipped_on_request(
    tmp_path, data, monkeypatch, capsys
):
    _nan_at_call(monkeypatch, 3)
    assert main(_sft(data, tmp_path / "fail")) == 3
    assert "step 3: the loss is not finite" in capsys.readouterr().err
    _nan_at_call(monkeypatch, 3)
    out = tmp_path / "skip"
    assert main(_sft(data, out, nan_policy="skip-step")) == 0
    assert (
        "step 3: the loss is not finite (NaN or inf); skipped this update"
        in capsys.readouterr().err
    )
    assert all(torch.isfinite(w).all() for w in _weights(out).values())


# --- graceful preemption and self-verifying checkpoints -------------------------------------


def test_sigterm_leaves_a_checkpoint_from_which_resume_is_bit_identical(
    tmp_path, data, straight, monkeypatch, capsys
):
    killed = tmp_path / "killed"
    monkeypatch.setenv(SIGNAL_AT_STEP_ENV, "3")
    assert main(_sft(data, killed)) == 143
    err = capsys.readouterr().err
    assert "stopped by SIGTERM after step 3 of 4" in err
    assert "to continue: preftune sft" in err and err.rstrip().endswith("--resume")
    assert checkpoint.verify(killed / "checkpoints" / "step-3") is None
    assert not (killed / "model.safetensors").exists()
    monkeypatch.delenv(SIGNAL_AT_STEP_ENV)
    # The run folder may be moved (another disk, another machine) and resumed there.
    moved = tmp_path / "moved"
    shutil.move(killed, moved)
    assert main(_sft(data, moved, "--resume")) == 0
    _assert_identical(straight, moved)
    assert _steps(moved) == [1, 2, 3, 4]


def test_resume_falls_back_past_a_damaged_checkpoint(tmp_path, data, straight, monkeypatch, capsys):
    out = tmp_path / "run"
    monkeypatch.setenv(SIGNAL_AT_STEP_ENV, "3:INT")  # Ctrl-C
    assert main(_sft(data, out, save_steps=2)) == 130
    monkeypatch.delenv(SIGNAL_AT_STEP_ENV)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-3"]
    _flip_byte(out / "checkpoints" / "step-3" / "model.safetensors")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')  # a line torn by the crash
    capsys.readouterr()
    assert main(_sft(data, out, "--resume", save_steps=2)) == 0
    err = capsys.readouterr().err
    assert "step-3 is damaged: model.safetensors does not match its checksum" in err
    assert "falling back to step-2" in err and "dropped 1 unreadable line" in err
    _assert_identical(straight, out)
    assert _steps(out) == [1, 2, 3, 4]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-3.damaged"]


def test_no_intact_checkpoint_stops_with_no_model_saved(tmp_path, data, monkeypatch, capsys):
    out = tmp_path / "run"
    monkeypatch.setenv(SIGNAL_AT_STEP_ENV, "3")
    assert main(_sft(data, out, save_steps=2)) == 143
    monkeypatch.delenv(SIGNAL_AT_STEP_ENV)
    # step-3: NaN weights with a manifest that matches them; step-2: truncated optimizer state
    step3 = out / "checkpoints" / "step-3"
    weights = load_file(str(step3 / "model.safetensors"))
    save_file(
        {k: torch.full_like(v, float("nan")) for k, v in weights.items()},
        str(step3 / "model.safetensors"),
        metadata={"format": "pt"},
    )
    (step3 / checkpoint.MANIFEST_FILE).unlink()
    checkpoint.write_manifest(step3)
    optimizer = out / "checkpoints" / "step-2" / "optimizer.bin"
    optimizer.write_bytes(optimizer.read_bytes()[:1000])
    capsys.readouterr()
    assert main(_sft(data, out, "--resume", save_steps=2)) == 2
    err = capsys.readouterr().err
    assert (
        "no intact checkpoint" in err
        and "non-finite" in err
        and "optimizer.bin has 1000 bytes" in err
    )
    assert "Traceback" not in err and not (out / "model.safetensors").exists()


def test_resume_refuses_changed_training_data(tmp_path, data, monkeypatch, capsys):
    out = tmp_path / "run"
    monkeypatch.setenv(SIGNAL_AT_STEP_ENV, "2")
    assert main(_sft(data, out)) == 143
    monkeypatch.delenv(SIGNAL_AT_STEP_ENV)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    rows[5]["completion"] = " something else entirely"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(_sft(data, out, "--resume")) == 2
    assert "the training data differs" in capsys.readouterr().err
    assert main(_sft(data, out, "--resume", "--allow-data-change")) == 0


def test_grpo_sigterm_then_resume_is_bit_identical(tmp_path, monkeypatch):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": f"Question {i}: say"}) + "\n" for i in range(8))
    )

    def grpo(out, *extra):
        return [
            "grpo",
            "--model",
            "tiny",
            "--data",
            str(prompts),
            "--output-dir",
            str(out),
            "--reward-fn",
            f"{REWARDS}:lowercase_fraction",
            "--max-steps",
            "3",
            "--max-new-tokens",
            "8",
            "--max-length",
            "64",
            "--prompts-per-step",
            "4",
            "--num-generations",
            "2",
            "--batch-size",
            "8",
            "--lr",
            "2e-3",
            *extra,
        ]

    assert main(grpo(tmp_path / "straight")) == 0
    monkeypatch.setenv(SIGNAL_AT_STEP_ENV, "2")
    assert main(grpo(tmp_path / "killed")) == 143
    monkeypatch.delenv(SIGNAL_AT_STEP_ENV)
    assert (tmp_path / "killed" / "checkpoints" / "step-2").is_dir()
    assert main(grpo(tmp_path / "killed", "--resume")) == 0
    _assert_identical(tmp_path / "straight", tmp_path / "killed")


def test_a_second_signal_exits_at_once(monkeypatch):
    import signal

    exits = []
    monkeypatch.setattr(os, "_exit", exits.append)
    watch = SignalWatch()
    watch.training = True
    watch.handle(signal.SIGTERM, None)
    assert watch.signum == signal.SIGTERM and exits == []  # first: finish the step
    watch.handle(signal.SIGTERM, None)
    assert exits == []  # within the repeat window: the same signal delivered twice
    watch.first_at -= 10
    watch.handle(signal.SIGTERM, None)
    assert exits == [143]
    before = SignalWatch()  # before training (loading, reading data): nothing to save
    with pytest.raises(StoppedBeforeTraining):
        before.handle(signal.SIGTERM, None)
    with pytest.raises(KeyboardInterrupt):
        SignalWatch().handle(signal.SIGINT, None)


# --- a full disk, an unusable output folder ------------------------------------------------


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _save_state_then_enospc(self, output_dir, **kwargs):
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    (Path(output_dir) / "model.safetensors").write_bytes(b"half")
    _enospc()


@pytest.mark.parametrize("where", ["manifest", "save_state"])
def test_a_full_disk_is_reported_and_leaves_no_checkpoint_looking_valid(
    tmp_path, data, monkeypatch, capsys, where
):
    from accelerate import Accelerator

    if where == "manifest":
        monkeypatch.setattr(checkpoint, "write_manifest", _enospc)
    else:
        monkeypatch.setattr(Accelerator, "save_state", _save_state_then_enospc)
    out = tmp_path / "run"
    assert main(_sft(data, out, save_steps=2)) == 2
    err = capsys.readouterr().err
    assert (
        f"the disk is full (no space left on device) while writing checkpoint step-2 in "
        f"{out / 'checkpoints'}"
        in err
        and "Traceback" not in err
    )
    assert list((out / "checkpoints").iterdir()) == []  # no step-2, no .tmp-step-2
    assert not (out / "model.safetensors").exists()


def test_output_folder_that_is_a_file_or_unwritable(tmp_path, data, monkeypatch, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(_sft(data, afile)) == 2
    assert f"output_dir {afile} is a file, not a folder" in capsys.readouterr().err
    locked = tmp_path / "ro"
    locked.mkdir()
    if os.geteuid() == 0:  # root writes anywhere: make the first write fail as it would

        def denied(self):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

        monkeypatch.setattr(rundir.RunLock, "acquire", denied)
    else:
        locked.chmod(0o500)
    assert main(_sft(data, locked)) == 2
    err = capsys.readouterr().err
    assert f"cannot write the run's files in {locked}: Permission denied" in err
    assert "Traceback" not in err


# --- settings and data: clear messages, nothing silent ---------------------------------------


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--seed", "-1"], "seed: got -1, expected an integer in [0, 2**32)"),
        (["--lora-r", "8"], "lora_r set but lora is off"),
        (["--eval-steps", "2"], "eval_steps=2 but there is no held-out data"),
    ],
)
def test_settings_refused_with_the_reason(tmp_path, data, capsys, args, expected):
    assert main([*_sft(data, tmp_path / "o"), *args]) == 2
    assert expected in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is fine on a GPU")
def test_fp16_on_the_cpu_is_refused(tmp_path, data, capsys):
    assert main([*_sft(data, tmp_path / "o"), "--mixed-precision", "fp16"]) == 2
    assert "mixed_precision=fp16 needs a CUDA GPU" in capsys.readouterr().err


def test_online_options_without_effect_are_refused_or_warned_once(tmp_path, capsys):
    assert (
        main(
            [
                "grpo",
                "--reward-fn",
                f"{REWARDS}:lowercase_fraction",
                "--output-dir",
                str(tmp_path / "o"),
                "--kl-estimator",
                "k1",
            ]
        )
        == 2
    )
    assert "kl_estimator='k1' has no effect: kl_coef is 0" in capsys.readouterr().err
    # clip_eps without reuse is warned about (once), not refused: one settings file may serve
    # runs with and without --ppo-epochs
    from preftune.trainers.grpo import GRPOConfig

    for _ in range(2):
        GRPOConfig(reward_fn=[f"{REWARDS}:lowercase_fraction"], clip_eps=0.31).validate()
    err = capsys.readouterr().err
    assert err.count("warning: clip_eps=0.31 has no effect with ppo_epochs=1") == 1
    GRPOConfig(reward_fn=[f"{REWARDS}:lowercase_fraction"], clip_eps=0.31, ppo_epochs=2).validate()
    assert capsys.readouterr().err == ""


def test_chat_template_with_plain_text_data_is_refused(tmp_path, data, capsys):
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert main([*_sft(data, tmp_path / "o"), "--chat-template", str(template)]) == 2
    assert f"chat_template is set but {data} holds plain text" in capsys.readouterr().err


def test_yaml_exponent_without_a_dot_is_a_float(tmp_path, data):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: 1e-3\nmax_steps: 1\n")  # PyYAML reads 1e-3 as the string '1e-3'
    out = tmp_path / "o"
    assert main([*_sft(data, out), "--config", str(cfg)]) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["lr"] == 0.001


def test_data_errors_name_the_file_and_line(tmp_path, capsys):
    rows = [{"prompt": f"q{i}", "completion": f" a{i}"} for i in range(6)]
    rows[4]["prompt"] = "word " * 100
    long_prompt = tmp_path / "long.jsonl"
    long_prompt.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main([*_sft(long_prompt, tmp_path / "a"), "--prompt-truncation", "error"]) == 2
    assert f"{long_prompt}, line 5 (example 5): a prompt is" in capsys.readouterr().err

    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(
        b'{"prompt": "a", "completion": "b"}\n{"prompt": "caf\xe9", "completion": "c"}\n'
    )
    assert main(_sft(latin, tmp_path / "b")) == 2
    assert (
        f"{latin}, line 2: not UTF-8 text (byte b'\\xe9' at column 16)" in capsys.readouterr().err
    )

    stray = tmp_path / "stray.csv"
    stray.write_text('prompt,completion\nq1,fine\nq2,"ans"wer\n')
    assert main(_sft(stray, tmp_path / "c")) == 2
    assert f"{stray}, line 3: malformed CSV" in capsys.readouterr().err


def test_model_folder_without_config_json(tmp_path, data, capsys):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "tokenizer.json").write_text("{}")
    assert main([*_sft(data, tmp_path / "o"), "--model", str(folder)]) == 2
    err = capsys.readouterr().err
    assert f"model folder {folder} has no config.json" in err and "tokenizer.json" in err


def test_reward_function_that_hangs_becomes_an_error():
    from preftune.errors import PreftuneError
    from preftune.rewards.sources import FunctionReward

    def slow(prompts, completions):
        time.sleep(5)
        return [0.0] * len(completions)

    reward = FunctionReward(slow, timeout=0.2)
    t0 = time.perf_counter()
    with pytest.raises(
        PreftuneError, match=r"'slow' did not return within 0.2 s \(--reward-timeout\)"
    ):
        reward.score_with_components(["p"], ["c"])
    assert time.perf_counter() - t0 < 2
    fast = FunctionReward(lambda p, c: [1.0] * len(c), timeout=5)
    assert fast.score_with_components(["p"], ["c"])[0].tolist() == [1.0]


def test_step_zero_evaluation_written_once_after_resume(tmp_path, data, monkeypatch):
    from preftune.engine.engine import Engine

    out = tmp_path / "run"

    def crash(self):
        raise RuntimeError("killed before the first checkpoint")

    monkeypatch.setattr(Engine, "optimizer_step", crash)
    with pytest.raises(RuntimeError):
        main(_sft(data, out, eval_fraction=0.25))
    monkeypatch.undo()
    assert [
        json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
    ] == [0]
    assert main(_sft(data, out, "--resume", eval_fraction=0.25)) == 0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps.count(0) == 1


def test_output_files_respect_the_umask(tmp_path, data):
    from preftune.utils import atomic_write_json

    old = os.umask(0o022)
    try:
        out = tmp_path / "run"
        assert main(_sft(data, out, max_steps=2, save_steps=1)) == 0
        atomic_write_json(tmp_path / "results.json", {"acc": 0.5}, strict=True)  # eval-rm, lab
        os.umask(0o027)
        atomic_write_json(tmp_path / "group.json", {})
    finally:
        os.umask(old)
    assert (tmp_path / "results.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "group.json").stat().st_mode & 0o777 == 0o640
    modes = {
        p.relative_to(out).as_posix(): p.stat().st_mode & 0o777
        for p in out.rglob("*")
        if p.is_file()
    }
    assert "model.safetensors" in modes and "checkpoints/step-1/model.safetensors" in modes
    assert {m for m in modes.values()} == {0o644}, modes


@pytest.mark.slow
def test_sigterm_to_accelerate_launch_stops_every_process_at_one_step(tmp_path, data):
    """A real SIGTERM to the launcher (as a scheduler sends it): torchrun forwards it, the two
    processes agree on one step, checkpoint it, and --resume continues to the weights of an
    uninterrupted run (one process, same global batch: equal to 2e-6, as data parallelism is)."""
    import signal

    out = tmp_path / "two"

    def launch(*extra):
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
            *_sft(data, out, *extra, batch_size=2, lr_scheduler="constant"),
        ]
        env = {**os.environ, "MASTER_PORT": str(29500 + random.Random().randint(0, 500))}
        return subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )

    proc = launch("--max-steps", "100000")
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, log[-3000:]  # torchrun reports the workers' 143 as a failure
    (ckpt,) = (out / "checkpoints").iterdir()
    assert checkpoint.verify(ckpt) is None, log[-3000:]
    step = checkpoint.step_of(ckpt)
    assert f"stopped by SIGTERM after step {step} of 100000" in log
    assert (
        "random_states_1.pkl" in json.loads((ckpt / checkpoint.MANIFEST_FILE).read_text())["files"]
    )

    proc = launch("--resume", "--max-steps", str(step + 2))
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log[-3000:]
    one = tmp_path / "one"
    assert main(_sft(data, one, max_steps=step + 2, batch_size=4, lr_scheduler="constant")) == 0
    wa, wb = _weights(one), _weights(out)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=2e-6, rtol=0)


def test_checkpoint_from_before_manifests_still_resumes(tmp_path, data, straight, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setenv(SIGNAL_AT_STEP_ENV, "2")
    assert main(_sft(data, out)) == 143
    monkeypatch.delenv(SIGNAL_AT_STEP_ENV)
    (out / "checkpoints" / "step-2" / checkpoint.MANIFEST_FILE).unlink()  # as older preftune wrote
    (out / rundir.OWNED_FILE).unlink()
    assert main(_sft(data, out, "--resume")) == 0
    _assert_identical(straight, out)
