"""`preftune data`: inspect, dedup, decontaminate, binarize, relabel, split, on real HH-RLHF
pairs (tests/fixtures/hh_sample.jsonl, the first 60 rows of ../shared/data) and on a
hand-built file in UltraFeedback's real layout. Expected figures are computed in the tests."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import numpy as np
import pytest

from preftune.cli import main
from preftune.data.loading import load_rows
from preftune.datatools import (
    NgramIndex,
    RowStream,
    binarize,
    decontaminate,
    dedup,
    inspect,
    relabel,
    split,
)
from preftune.errors import PreftuneError
from preftune.evaluation.stats import wilson_interval

FIXTURES = Path(__file__).parent / "fixtures"
HH = FIXTURES / "hh_sample.jsonl"
UF = FIXTURES / "ultrafeedback_sample.jsonl"
SHARED_HH = Path(__file__).parents[1] / ".." / "shared" / "data" / "hh-harmless-dev.jsonl.gz"


def _hh_rows() -> list[dict]:
    return [json.loads(line) for line in HH.read_text().splitlines() if line.strip()]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _replies(row: dict) -> tuple[str, str] | None:
    """HH: the replies after the last "\n\nAssistant:" the two dialogues share (by hand)."""
    c, r = row["chosen"], row["rejected"]
    n = 0
    while n < min(len(c), len(r)) and c[n] == r[n]:
        n += 1
    cut = c[:n].rfind("\n\nAssistant:")
    if cut < 0 or c == r:
        return None
    cut += len("\n\nAssistant:")
    if not c[cut:].strip() or not r[cut:].strip():
        return None
    return c[cut:], r[cut:]


# --- reading ---------------------------------------------------------------------------------


def test_stream_reads_what_training_reads(tmp_path):
    rows = _hh_rows()[:10]
    expected = load_rows(str(HH))[:10]
    gz = tmp_path / "d.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    import datasets

    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "disk"))
    folder = tmp_path / "folder"
    folder.mkdir()
    _write_jsonl(folder / "a.jsonl", rows[:4])
    _write_jsonl(folder / "b.jsonl", rows[4:])
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows[:3]), "test": datasets.Dataset.from_list(rows)}
    ).save_to_disk(str(tmp_path / "dd"))
    for source in (gz, tmp_path / "d.parquet", tmp_path / "disk", folder):
        assert list(RowStream(str(source))) == expected, source
    assert list(RowStream(str(tmp_path / "dd"), split="test")) == expected
    with pytest.raises(PreftuneError, match="no split 'dev'"):
        list(RowStream(str(tmp_path / "dd"), split="dev"))
    # Column map, and the location of a row in a folder of files.
    renamed = [{"good": r["chosen"], "bad": r["rejected"]} for r in rows]
    _write_jsonl(tmp_path / "m.jsonl", renamed)
    stream = RowStream(str(tmp_path / "m.jsonl"), columns="chosen=good,rejected=bad")
    assert list(stream) == expected
    assert [o for _, o in RowStream(str(folder)).located()][4] == (
        str(folder / "b.jsonl"),
        "line",
        1,
    )


def test_bad_input_is_named_by_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(_hh_rows()[0]) + "\n{not json\n")
    assert main(["data", "dedup", str(bad), "--output-dir", str(tmp_path / "o")]) == 2
    assert f"{bad}, line 2: not valid JSON" in capsys.readouterr().err
    assert not (tmp_path / "o" / "data.jsonl").exists()  # nothing half-written
    with pytest.raises(PreftuneError, match="column map names column"):
        list(RowStream(str(HH), columns="prompt=question"))
    with pytest.raises(PreftuneError, match="no such file"):
        RowStream(str(tmp_path / "missing.jsonl"))


# --- inspect -----------------------------------------------------------------------------------


def test_inspect_length_bias_and_duplicates_match_counts_by_hand():
    rows = _hh_rows()
    planted = rows + [rows[7], rows[12]]  # two exact duplicate pairs (and prompts)
    report = inspect(planted, source="hh")
    replies = [_replies(r) for r in planted]
    good = [x for x in replies if x is not None]
    longer = sum(len(c) > len(r) for c, r in good)
    shorter = sum(len(c) < len(r) for c, r in good)
    lb = report["length_bias"]
    assert report["rows"] == 62 and report["pairs"] == len(good) == 61
    assert report["bad_rows"]["by_reason"] == {"empty_text": 1}  # line 49 of the fixture
    assert (lb["chosen_longer"], lb["chosen_shorter"]) == (longer, shorter)
    assert lb["fraction_chosen_longer"] == pytest.approx(longer / len(good))
    assert (lb["ci_low"], lb["ci_high"]) == pytest.approx(wilson_interval(longer, len(good)))
    assert lb["median_difference"] == pytest.approx(np.median([len(c) - len(r) for c, r in good]))
    dup = report["duplicates"]
    assert dup["exact_duplicate_pairs"] == 2 and dup["exact_duplicate_prompts"] == 2
    assert dup["prompts_in_several_pairs"] == 2 and dup["max_pairs_per_prompt"] == 2
    assert dup["near_duplicate_pairs"] == 0 and dup["near_duplicate_prompts"] == 0
    assert report["lengths"]["chosen"]["max"] == max(len(c) for c, _ in good)


def test_inspect_counts_turns_margins_subsets_and_reward_agreement():
    rows = [
        {
            "prompt": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant:",
            "chosen": " fine, thanks",
            "rejected": " no",
            "margin": 2.0,
            "subset": "chat",
        },
        {
            "prompt": "Add 2 and 2.",
            "chosen": " 4",
            "rejected": " it is 5",
            "margin": 0.0,
            "subset": "math",
        },
        {
            "prompt": "Add 1 and 2.",
            "chosen": " 3",
            "rejected": " 3",
            "margin": 1.0,
            "subset": "math",
        },
        {
            "prompt": "Add 3 and 3.",
            "chosen": " six",
            "rejected": " 6",
            "margin": 1.0,
            "subset": "math",
        },
    ]
    import torch

    def length(prompts, completions):
        return torch.tensor([float(len(c)) for c in completions])

    report = inspect(rows, reward=length, source="mem", near_duplicates=False)
    assert report["turns"]["counts"] == {"1": 2, "2": 1}
    assert report["bad_rows"]["chosen_equals_rejected"] == 1
    assert report["margins"]["ties"] == 1 and report["margins"]["max"] == 2.0
    # Length reward: chosen longer in pair 1 and pair 3 (" six" vs " 6"), shorter in pair 2.
    assert report["reward"]["agree"] == 2 and report["reward"]["pairs"] == 3
    assert (report["reward"]["ci_low"], report["reward"]["ci_high"]) == pytest.approx(
        wilson_interval(2, 3)
    )
    assert report["subsets"]["math"]["pairs"] == 2
    assert report["subsets"]["math"]["reward"]["agree"] == 1
    assert [d["row"] for d in report["_disagreements"]] == ["mem, row 2"]


def test_inspect_command_writes_report_and_plots(tmp_path):
    out = tmp_path / "inspect"
    assert main(["data", "inspect", str(HH), "--output-dir", str(out), "--tokenizer", "tiny"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["length_unit"] == "tokens" and report["format"] == "implicit_paired"
    md = (out / "report.md").read_text()
    lb = report["length_bias"]
    assert f"longer one in {lb['chosen_longer']} of {lb['n']} pairs" in md
    assert (out / "lengths.png").stat().st_size > 1000
    assert (out / "length_difference.png").stat().st_size > 1000
    assert main(["data", "inspect", str(HH), "--output-dir", str(out)]) == 2  # no silent overwrite


# --- dedup -----------------------------------------------------------------------------------


def _near_copy(row: dict) -> dict:
    """The same dialogue with one word of the chosen reply changed (Jaccard well above 0.8)."""
    chosen = row["chosen"]
    cut = chosen.rfind(" the ")
    assert cut > 0
    return {"chosen": chosen[:cut] + " that " + chosen[cut + 5 :], "rejected": row["rejected"]}


def test_dedup_finds_the_planted_duplicates_and_nothing_else(tmp_path):
    rows = _hh_rows()
    long_rows = [
        i for i, r in enumerate(rows) if len(r["chosen"]) > 1500 and " the " in r["chosen"][-400:]
    ]
    a, b = long_rows[:2]
    planted = rows + [rows[3], _near_copy(rows[a]), rows[10], _near_copy(rows[b])]
    path = _write_jsonl(tmp_path / "planted.jsonl", planted)
    removed: list = []
    kept, report = dedup(RowStream(str(path)), removed=removed)
    kept = list(kept)
    assert kept == rows
    assert (report.exact_duplicates, report.near_duplicates) == (2, 2)
    assert [(r["row"], r["duplicate_of"], r["kind"]) for r in removed] == [
        (f"{path}, line 61", f"{path}, line 4", "exact"),
        (f"{path}, line 62", f"{path}, line {a + 1}", "near"),
        (f"{path}, line 63", f"{path}, line 11", "exact"),
        (f"{path}, line 64", f"{path}, line {b + 1}", "near"),
    ]
    assert all(0.8 <= r["similarity"] < 1.0 for r in removed if r["kind"] == "near")
    # The same on a datasets.Dataset, and inspect counts the same planted duplicates.
    import datasets

    kept, report = dedup(datasets.Dataset.from_list(planted))
    assert list(kept) == rows and (report.exact_duplicates, report.near_duplicates) == (2, 2)
    dup = inspect(planted, source="planted")["duplicates"]
    assert (dup["exact_duplicate_pairs"], dup["near_duplicate_pairs"]) == (2, 2)
    # Exact only: the near copies stay.
    kept, report = dedup(planted, near=False)
    assert len(list(kept)) == 62 and report.exact_duplicates == 2


def test_dedup_command_writes_rows_report_and_parquet(tmp_path):
    rows = _hh_rows()
    path = _write_jsonl(tmp_path / "d.jsonl", rows + rows[:3])
    out = tmp_path / "out"
    assert main(["data", "dedup", str(path), "--output-dir", str(out), "--format", "parquet"]) == 0
    import pyarrow.parquet as pq

    assert pq.read_table(out / "data.parquet").to_pylist() == rows
    report = json.loads((out / "report.json").read_text())
    assert report["n_rows"] == 63 and report["n_kept"] == 60 and report["exact_duplicates"] == 3
    assert len((out / "removed.jsonl").read_text().splitlines()) == 3


# --- decontaminate ---------------------------------------------------------------------------


def test_decontaminate_finds_the_planted_span(tmp_path):
    rows = _hh_rows()
    first_turns = [r["chosen"].split("\n\nAssistant:")[0].split()[1:] for r in rows]
    i, j = [k for k, w in enumerate(first_turns) if len(w) >= 16][:2]
    # Eval set: item 1 repeats 15 words of row i's prompt; item 2 only 12 words of row j's.
    span = " ".join(first_turns[i][:15])
    twelve = " ".join(first_turns[j][:12])
    evals = _write_jsonl(
        tmp_path / "eval.jsonl",
        [
            {"question": f"Unrelated words first. {span.upper()} and then more."},
            {"question": twelve},
        ],
    )
    index = NgramIndex(13)
    index.add_eval_set("eval", RowStream(str(evals)))
    removed: list = []
    kept, report = decontaminate(RowStream(str(HH)), index, removed=removed)
    kept = list(kept)
    assert report.n_removed == 1 and len(kept) == 59
    assert removed[0]["row"] == f"{HH}, line {i + 1}" and removed[0]["eval_item"] == 1
    assert removed[0]["span"] == span  # quoted from the row, not the upper-cased eval text
    assert report.eval_sets["eval"]["rows_matched"] == 1 and report.eval_sets["eval"]["items"] == 2
    # With 12-grams the second item matches row j as well.
    index12 = NgramIndex(12)
    index12.add_eval_set("eval", RowStream(str(evals)))
    kept, report = decontaminate(_hh_rows(), index12)
    list(kept)
    assert report.n_removed == 2


def test_decontaminate_responses_only_when_asked(tmp_path):
    rows = [
        {
            "prompt": "Tell me a story.",
            "chosen": " " + " ".join(f"w{i}" for i in range(20)),
            "rejected": " no",
        }
    ]
    index = NgramIndex(13)
    index.add_eval_set("e", [{"text": " ".join(f"w{i}" for i in range(3, 18))}])
    kept, report = decontaminate(rows, index)
    assert len(list(kept)) == 1
    kept, report = decontaminate(rows, index, responses=True)
    assert list(kept) == [] and report.eval_sets["e"]["examples"][0]["span"] == " ".join(
        f"w{i}" for i in range(3, 18)
    )


# --- binarize --------------------------------------------------------------------------------

UF_TEXT = {  # (row, completion) -> response, from tests/fixtures/ultrafeedback_sample.jsonl
    "A": "11 is a prime number between 10 and 20.",
    "B": "13 is one, and so is 17.",
    "C": "15 is a prime number.",
    "D": "19 is prime: it has no divisors but 1 and itself.",
    "P": "It passes through your digestive system in a few days.",
    "Q": "Your body cannot digest it, but it passes through normally.",
    "R": "It stays in your stomach for seven years.",
    "S": "Nothing much; it is excreted.",
}


def _uf_pairs(rating, pairs, min_margin=0.0, seed=0):
    out, report = binarize(
        RowStream(str(UF), columns="prompt=instruction"),
        rating=rating,
        pairs=pairs,
        min_margin=min_margin,
        seed=seed,
    )
    inverse = {v: k for k, v in UF_TEXT.items()}
    return [(inverse[p["chosen"]], inverse[p["rejected"]], p["margin"]) for p in out], report


# Ratings in the fixture (helpfulness, honesty, instruction_following, truthfulness; overall):
#   row 1: A 5 5 5 5; 8.5   B 3 4 2 3; 6.0   C 2 2 3 1; 4.0   D 4 3 4 5; 6.0
#   row 2: P 4 N/A 4 4; 7.0 Q 4 4 4 4; 7.0   R 2 3 1 2; 3.5   S "three" 2 2 2; 5.0
#   row 3: two completions rated 3 3 3 3; 5.0 (a tie under every rating)
# mean: A 5, B 3, C 2, D 4; P and S unrated (N/A, "three"), Q 4, R 2.
@pytest.mark.parametrize(
    "rating, pairs, min_margin, expected, ties, below",
    [
        ("overall", "best-vs-worst", 0, [("A", "C", 4.5), ("P", "R", 3.5)], 1, 0),
        (
            "overall",
            "all",
            0,
            [
                ("A", "B", 2.5),
                ("A", "C", 4.5),
                ("A", "D", 2.5),
                ("B", "C", 2.0),
                ("D", "C", 2.0),
                ("P", "R", 3.5),
                ("P", "S", 2.0),
                ("Q", "R", 3.5),
                ("Q", "S", 2.0),
                ("S", "R", 1.5),
            ],
            3,
            0,
        ),
        (
            "overall",
            "all",
            2.5,
            [("A", "B", 2.5), ("A", "C", 4.5), ("A", "D", 2.5), ("P", "R", 3.5), ("Q", "R", 3.5)],
            3,
            5,
        ),
        ("mean", "best-vs-worst", 0, [("A", "C", 3.0), ("Q", "R", 2.0)], 1, 0),
        (
            "mean",
            "all",
            0,
            [
                ("A", "B", 2.0),
                ("A", "C", 3.0),
                ("A", "D", 1.0),
                ("B", "C", 1.0),
                ("D", "B", 1.0),
                ("D", "C", 2.0),
                ("Q", "R", 2.0),
            ],
            1,
            0,
        ),
        ("helpfulness", "best-vs-worst", 0, [("A", "C", 3.0), ("P", "R", 2.0)], 1, 0),
        # honesty: A 5, B 4, C 2, D 3; P unrated, Q 4, R 3, S 2. Below 1.5: A-B, B-D, D-C, Q-R, R-S.
        (
            "honesty",
            "all",
            1.5,
            [("A", "C", 3.0), ("A", "D", 2.0), ("B", "C", 2.0), ("Q", "S", 2.0)],
            1,
            5,
        ),
    ],
)
def test_binarize_gives_the_pairs_computed_by_hand(
    rating, pairs, min_margin, expected, ties, below
):
    got, report = _uf_pairs(rating, pairs, min_margin)
    assert got == expected
    assert report.n_pairs == len(expected)
    assert report.ties_dropped == ties and report.below_min_margin_dropped == below


def test_binarize_best_vs_random_draws_the_documented_rejected():
    for seed in range(5):
        got, report = _uf_pairs("overall", "best-vs-random", seed=seed)
        # By hand: best A (row 1) and P (row 2, first of the two 7.0); the rejected one is
        # random.Random(f"{seed}-{row}").choice of the others; row 3 is a tie.
        r1 = random.Random(f"{seed}-1").choice(["B", "C", "D"])
        r2 = random.Random(f"{seed}-2").choice(["Q", "R", "S"])
        overall = {"B": 6.0, "C": 4.0, "D": 6.0, "Q": 7.0, "R": 3.5, "S": 5.0}
        expected = [("A", r1, 8.5 - overall[r1])] + (
            [] if r2 == "Q" else [("P", r2, 7.0 - overall[r2])]
        )
        assert got == expected
        assert report.ties_dropped == 1 + (r2 == "Q")


def test_binarize_reports_bad_ratings_by_row(tmp_path):
    bad: list = []
    out, report = binarize(
        RowStream(str(UF), columns="prompt=instruction"), rating="mean", bad_ratings=bad
    )
    list(out)
    assert bad == [
        {
            "row": f"{UF}, line 2",
            "completion": 0,
            "field": "annotations.honesty.Rating",
            "value": "N/A",
        },
        {
            "row": f"{UF}, line 2",
            "completion": 3,
            "field": "annotations.helpfulness.Rating",
            "value": "three",
        },
    ]
    assert report.bad_ratings == 2
    # The `scores` layout through the command: a non-numeric score is reported, not parsed.
    data = _write_jsonl(
        tmp_path / "scores.jsonl",
        [
            {"prompt": "Q?", "completions": ["a", "b", "c"], "scores": [1, 3, "N/A"]},
            {"prompt": "R?", "completions": ["x", "y"], "scores": [2, "2.5"]},
        ],
    )
    out_dir = tmp_path / "bin"
    assert (
        main(
            [
                "data",
                "binarize",
                str(data),
                "--pairs",
                "best-vs-worst",
                "--output-dir",
                str(out_dir),
            ]
        )
        == 0
    )
    written = [json.loads(l) for l in (out_dir / "data.jsonl").read_text().splitlines()]
    assert [(w["chosen"], w["rejected"], w["margin"]) for w in written] == [
        ("b", "a", 2.0),
        ("y", "x", 0.5),
    ]
    bad_lines = [json.loads(l) for l in (out_dir / "bad_ratings.jsonl").read_text().splitlines()]
    assert bad_lines == [
        {"row": f"{data}, line 1", "completion": 2, "field": "scores", "value": "N/A"}
    ]
    with pytest.raises(PreftuneError, match="needs per-aspect annotations"):
        list(binarize(load_rows(str(data)), rating="mean")[0])


# --- relabel and split -------------------------------------------------------------------------


def test_relabel_flips_what_the_reward_prefers_and_counts_it(tmp_path):
    rows = _hh_rows()
    good = [x for x in (_replies(r) for r in rows) if x is not None]
    longer = sum(len(c) > len(r) for c, r in good)
    shorter = sum(len(c) < len(r) for c, r in good)
    import torch

    def length(prompts, completions):
        return torch.tensor([float(len(c)) for c in completions])

    out, report = relabel(rows, length)
    out = list(out)
    assert (report.agreed, report.flipped, report.ties) == (
        longer,
        shorter,
        len(good) - longer - shorter,
    )
    assert all(len(r["chosen"]) >= len(r["rejected"]) for r in out)
    assert all(r["margin"] == len(r["chosen"]) - len(r["rejected"]) for r in out)
    out, report = relabel(rows, length, keep_agreement=True)
    assert len(list(out)) == len(good) - shorter
    # Through the command, with a reward function from a file.
    out_dir = tmp_path / "relabel"
    spec = f"{Path(__file__).parent / 'rewards_for_tests.py'}:completion_length"
    assert (
        main(["data", "relabel", str(HH), "--reward-fn", spec, "--output-dir", str(out_dir)]) == 0
    )
    assert json.loads((out_dir / "report.json").read_text())["flipped"] == shorter


def test_split_never_puts_a_prompt_on_both_sides(tmp_path):
    rows = _hh_rows()
    # Paired rows with repeated prompts: 20 prompts, 3 pairs each.
    paired = [
        {"prompt": f"Question {i % 20}?", "chosen": f" good {i}", "rejected": f" bad {i}"}
        for i in range(60)
    ]
    sides, report = split(paired, test_fraction=0.3, seed=1)
    sides = list(sides)
    test_prompts = {r["prompt"] for s, r in sides if s == "test"}
    train_prompts = {r["prompt"] for s, r in sides if s == "train"}
    assert not test_prompts & train_prompts and len(test_prompts | train_prompts) == 20
    assert report.n_train + report.n_test == 60 and report.n_test == 3 * len(test_prompts)
    assert 0 < len(test_prompts) < 20
    out = tmp_path / "split"
    assert (
        main(["data", "split", str(HH), "--test-fraction", "0.25", "--output-dir", str(out)]) == 0
    )
    train = [json.loads(l) for l in (out / "train.jsonl").read_text().splitlines()]
    test = [json.loads(l) for l in (out / "test.jsonl").read_text().splitlines()]
    assert sorted(map(json.dumps, train + test)) == sorted(map(json.dumps, rows))
    assert test and train


def test_every_data_command_has_help(capsys):
    from preftune.datatools.cli import SUBCOMMANDS

    for argv in (["data", "--help"], *(["data", sub, "--help"] for sub in SUBCOMMANDS)):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "decontaminate" in out and "--test-fraction" in out and "--against" in out
    with pytest.raises(SystemExit) as exit_:
        main(["data", "nonsense"])
    assert exit_.value.code == 2


def test_relabel_and_inspect_with_a_reward_model_folder(tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from preftune.models.tiny import build_tiny_tokenizer
    from preftune.rewards.sources import ModelReward

    tok = build_tiny_tokenizer()
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(
        LlamaConfig(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            intermediate_size=64,
            vocab_size=len(tok),
            max_position_embeddings=512,
            num_labels=1,
            pad_token_id=tok.pad_token_id,
        )
    )
    rm = tmp_path / "rm"
    model.save_pretrained(rm)
    tok.save_pretrained(rm)
    rows = [r for r in _hh_rows()[:12] if _replies(r) is not None]
    data = _write_jsonl(tmp_path / "d.jsonl", rows)
    # By hand: score both replies with the same model, count where rejected scores higher.
    reward = ModelReward.from_pretrained(str(rm))
    prompts = [r["chosen"][: len(r["chosen"]) - len(_replies(r)[0])] for r in rows]
    sc = reward(prompts, [_replies(r)[0] for r in rows])
    sr = reward(prompts, [_replies(r)[1] for r in rows])
    flips = int((sr > sc).sum())
    assert 0 < flips < len(rows)  # a random model: some pairs each way
    out = tmp_path / "relabel"
    assert (
        main(["data", "relabel", str(data), "--reward-model", str(rm), "--output-dir", str(out)])
        == 0
    )
    report = json.loads((out / "report.json").read_text())
    assert report["n_pairs"] == len(rows) and report["flipped"] == flips
    out = tmp_path / "inspect"
    assert (
        main(
            [
                "data",
                "inspect",
                str(data),
                "--reward-model",
                str(rm),
                "--output-dir",
                str(out),
                "--no-near-duplicates",
            ]
        )
        == 0
    )
    report = json.loads((out / "report.json").read_text())
    assert report["reward"]["disagree"] + report["reward"]["ties"] == flips + int((sr == sc).sum())
    lines = (out / "disagreements.jsonl").read_text().splitlines()
    assert len(lines) == flips


def test_binarize_reads_aspect_lists_and_refuses_unknown_aspects():
    def completion(text, ratings):
        return {"response": text, "annotations": {"helpfulness": [{"Rating": r} for r in ratings]}}

    rows = [
        {
            "prompt": "Q?",
            "completions": [
                completion("a", ["4", "2"]),
                completion("b", ["5"]),
                completion("c", ["1", "N/A"]),
            ],
        }
    ]
    bad: list = []
    out, report = binarize(rows, rating="helpfulness", pairs="all", bad_ratings=bad)
    # a = mean(4, 2) = 3, b = 5; c has an N/A inside its list.
    assert [(p["chosen"], p["rejected"], p["margin"]) for p in out] == [("b", "a", 2.0)]
    assert bad == [
        {
            "row": "rows, row 1",
            "completion": 2,
            "field": "annotations.helpfulness.Rating",
            "value": "N/A",
        }
    ]
    out, report = binarize(rows, rating="honesty")
    assert list(out) == [] and report.bad_ratings == 3  # no such aspect: reported, not guessed


def test_run_data_runs_a_command_from_python(tmp_path):
    from preftune import run_data
    from preftune.datatools.cli import SplitConfig

    report = run_data(SplitConfig(data=str(HH), test_fraction=0.5, output_dir=str(tmp_path / "s")))
    assert report["n_train"] + report["n_test"] == 60 and (tmp_path / "s" / "test.jsonl").exists()
    with pytest.raises(PreftuneError, match="test_fraction"):
        run_data(SplitConfig(data=str(HH), test_fraction=1.5))
