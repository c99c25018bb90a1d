"""The command line: generated help, YAML configs with overrides, and bad input handled as
one clear message with a non-zero exit and no traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from preftune.cli import COMMANDS, main


def _run_cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "preftune.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _demo_rows(n=16):
    return [{"prompt": f"Question {i}?", "completion": f" Answer number {i}."} for i in range(n)]


def test_top_level_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


@pytest.mark.slow
def test_command_help_comes_from_the_config_fields():
    proc = _run_cli("sft", "--help")
    assert proc.returncode == 0
    assert "--max-steps" in proc.stdout and "Optimizer steps to run" in proc.stdout
    assert "--on-bad-row {skip,error}" in proc.stdout


def test_yaml_config_with_command_line_overrides(tmp_path):
    data = _jsonl(tmp_path / "d.jsonl", _demo_rows())
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "model": "tiny",
                "data": str(data),
                "lr": 0.003,
                "max_steps": 5,
                "batch-size": 4,
                "max_length": 64,
            }
        )
    )
    out = tmp_path / "out"
    assert main(["sft", "--config", str(cfg), "--max-steps", "2", "--output-dir", str(out)]) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["lr"] == 0.003 and saved["batch_size"] == 4  # from the file
    assert saved["max_steps"] == 2  # the flag wins
    assert saved["command"] == "sft"
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines if "loss" in l] == [2]


@pytest.mark.parametrize(
    "content, expected",
    [
        ({"lerning_rate": 1}, "unknown setting 'lerning_rate'"),
        ({"lr": "fast"}, "lr is 'fast'"),
        ({"max_steps": 1.5}, "max_steps is 1.5"),
    ],
)
def test_bad_yaml_is_named(tmp_path, capsys, content, expected):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump(content))
    assert main(["sft", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert str(cfg) in err and expected in err


@pytest.mark.slow
def test_unknown_option_and_out_of_range_value_exit_2_without_traceback(tmp_path):
    proc = _run_cli("sft", "--learning-rte", "1")
    assert proc.returncode == 2 and "unrecognized arguments" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = _run_cli("sft", "--lr", "-1", "--output-dir", str(tmp_path / "o"))
    assert proc.returncode == 2 and "lr: got -1.0, expected a number > 0" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()  # refused before anything was written


@pytest.mark.slow
def test_malformed_json_names_file_and_line(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(
        '{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": "b"}\n'
        '{"prompt": "a" "completion": "b"}\n'
    )
    proc = _run_cli("sft", "--data", str(data), "--output-dir", str(tmp_path / "o"))
    assert proc.returncode == 2, proc.stderr
    assert f"{data}, line 3" in proc.stderr and "not valid JSON" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_columns_name_the_columns_and_formats(tmp_path, capsys):
    data = _jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}])
    assert main(["sft", "--data", str(data), "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "question" in err and "answer" in err and "prompt" in err and "completion" in err
    # The column mapping makes the same file usable.
    assert (
        main(
            [
                "sft",
                "--data",
                str(data),
                "--columns",
                "prompt=question,completion=answer",
                "--output-dir",
                str(tmp_path / "o2"),
                "--max-steps",
                "1",
                "--batch-size",
                "1",
            ]
        )
        == 0
    )


def test_empty_text_rows_skip_or_stop(tmp_path, capsys):
    rows = _demo_rows(8)
    rows[3]["completion"] = "   "
    data = _jsonl(tmp_path / "d.jsonl", rows)
    assert (
        main(
            [
                "sft",
                "--data",
                str(data),
                "--output-dir",
                str(tmp_path / "a"),
                "--on-bad-row",
                "error",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert f"{data}, line 4" in err and "completion" in err
    assert (
        main(
            [
                "sft",
                "--data",
                str(data),
                "--output-dir",
                str(tmp_path / "b"),
                "--max-steps",
                "1",
                "--batch-size",
                "2",
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "7 kept" in err and "skipped 1" in err


def test_prompt_over_the_limit_truncates_or_stops(tmp_path, capsys):
    rows = _demo_rows(4)
    rows[2]["prompt"] = "word " * 200
    data = _jsonl(tmp_path / "d.jsonl", rows)
    common = [
        "sft",
        "--data",
        str(data),
        "--max-length",
        "64",
        "--max-steps",
        "1",
        "--batch-size",
        "2",
    ]
    assert main([*common, "--output-dir", str(tmp_path / "a"), "--prompt-truncation", "error"]) == 2
    assert "example 3" in capsys.readouterr().err
    assert main([*common, "--output-dir", str(tmp_path / "b")]) == 0
    assert "prompt truncated in 1" in capsys.readouterr().err


def test_missing_model_path_and_empty_data(tmp_path, capsys):
    data = _jsonl(tmp_path / "d.jsonl", _demo_rows())
    assert (
        main(
            [
                "sft",
                "--model",
                str(tmp_path / "nope"),
                "--data",
                str(data),
                "--output-dir",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert main(["sft", "--data", str(empty), "--output-dir", str(tmp_path / "o2")]) == 2
    assert str(empty) in capsys.readouterr().err


def test_too_few_examples_for_one_global_batch(tmp_path, capsys):
    data = _jsonl(tmp_path / "d.jsonl", _demo_rows(3))
    assert (
        main(["sft", "--data", str(data), "--output-dir", str(tmp_path / "o"), "--batch-size", "4"])
        == 2
    )
    assert "fewer than one global batch" in capsys.readouterr().err
