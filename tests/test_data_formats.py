"""Loading files and normalising dataset formats (preftune.data.loading / formats)."""

import gzip
import json
from pathlib import Path

import pytest

from preftune.data.formats import (
    Pair,
    Ranked,
    SFTExample,
    Unpaired,
    detect_format,
    split_implicit_prompt,
    to_pairs,
    to_prompts,
    to_ranked,
    to_sft,
    to_unpaired,
)
from preftune.data.loading import load_rows, parse_column_map
from preftune.errors import PreftuneError

FIXTURE = Path(__file__).parent / "fixtures" / "hh_sample.jsonl"
HH_DEV = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "hh-harmless-dev.jsonl.gz"

MSGS = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Sky colour?"},
    {"role": "assistant", "content": "Blue."},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


# --- loading ---------------------------------------------------------------------------------


def test_jsonl_blank_lines_and_line_numbers(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "a"}\n\n   \n{"prompt": "b"}\n')
    rows = load_rows(str(p))
    assert rows == [{"prompt": "a"}, {"prompt": "b"}]
    assert rows.where(1) == f"{p}, line 4"


def test_malformed_json_names_file_and_line(tmp_path):
    p = tmp_path / "data.jsonl"
    p.write_text('{"prompt": "a"}\n{"prompt": "b"}\n{"prompt" "c"}\n')
    with pytest.raises(PreftuneError, match=r"data\.jsonl, line 3: not valid JSON \(Expecting ':'"):
        load_rows(str(p))


def test_json_line_that_is_not_an_object(tmp_path):
    p = tmp_path / "data.jsonl"
    p.write_text('{"prompt": "a"}\n[1, 2]\n')
    with pytest.raises(
        PreftuneError, match=r"data\.jsonl, line 2: expected a JSON object, got list"
    ):
        load_rows(str(p))


def test_empty_file_is_an_error(tmp_path):
    p = tmp_path / "empty.jsonl"
    p.write_text("\n\n")
    with pytest.raises(PreftuneError, match="empty.jsonl: no rows"):
        load_rows(str(p))


def test_missing_local_file(tmp_path):
    with pytest.raises(PreftuneError, match="no such file"):
        load_rows(str(tmp_path / "nope.jsonl"))


def test_json_list_dict_and_gzip(tmp_path):
    rows = [{"prompt": "a"}, {"prompt": "b"}]
    (tmp_path / "list.json").write_text(json.dumps(rows))
    (tmp_path / "dict.json").write_text(json.dumps({"data": rows}))
    with gzip.open(tmp_path / "z.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps(r) for r in rows))
    with gzip.open(tmp_path / "z.json.gz", "wt") as f:
        f.write(json.dumps(rows))
    for name in ("list.json", "dict.json", "z.jsonl.gz", "z.json.gz"):
        assert load_rows(str(tmp_path / name)) == rows, name
    bad = tmp_path / "bad.json"
    bad.write_text('[\n {"prompt": "a"},\n {"prompt": }\n]')
    with pytest.raises(PreftuneError, match=r"bad\.json, line 3: not valid JSON"):
        load_rows(str(bad))


def test_parquet_and_csv(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {"prompt": "p1", "chosen": "good", "rejected": "bad", "margin": 1.5},
        {"prompt": "p2", "chosen": "fine, really", "rejected": "worse", "margin": 0.5},
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    assert load_rows(str(tmp_path / "d.parquet")) == rows
    (tmp_path / "d.csv").write_text(
        'prompt,chosen,rejected,margin\np1,good,bad,1.5\np2,"fine, really",worse,0.5\n'
    )
    assert load_rows(str(tmp_path / "d.csv")) == rows
    pairs, report = to_pairs(load_rows(str(tmp_path / "d.csv")), "d.csv")
    assert pairs[1] == Pair("p2", "fine, really", "worse", margin=0.5)


def test_folder_of_files_sorted_and_save_to_disk(tmp_path):
    import datasets

    folder = tmp_path / "shards"
    folder.mkdir()
    write_jsonl(folder / "b.jsonl", [{"prompt": "b"}])
    write_jsonl(folder / "a.jsonl", [{"prompt": "a"}])
    (folder / "notes.txt").write_text("ignored: not a data file")
    assert load_rows(str(folder)) == [{"prompt": "a"}, {"prompt": "b"}]

    ds = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list([{"prompt": "x"}]),
            "test": datasets.Dataset.from_list([{"prompt": "y"}]),
        }
    )
    ds.save_to_disk(str(tmp_path / "saved"))
    assert load_rows(str(tmp_path / "saved"), split="test") == [{"prompt": "y"}]
    with pytest.raises(PreftuneError, match=r"no split 'dev'.*\['test', 'train'\]"):
        load_rows(str(tmp_path / "saved"), split="dev")


def test_split_on_a_plain_file_is_refused(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a"}])
    with pytest.raises(PreftuneError, match="split='test' applies only"):
        load_rows(p, split="test")


def test_hub_failure_becomes_preftune_error(monkeypatch):
    import datasets

    def fail(*args, **kwargs):
        raise FileNotFoundError("Couldn't find dataset some-org/some-data on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", fail)
    with pytest.raises(
        PreftuneError, match=r"could not load dataset 'some-org/some-data'.*pass a local file"
    ):
        load_rows("some-org/some-data")


def test_column_map(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "good": "g", "bad": "b", "id": 1}])
    mapping = parse_column_map("prompt=question, chosen=good,rejected=bad")
    assert mapping == {"question": "prompt", "good": "chosen", "bad": "rejected"}
    rows = load_rows(p, column_map=mapping)
    assert rows == [{"prompt": "q", "chosen": "g", "rejected": "b", "id": 1}]
    assert detect_format(rows, p) == "paired"
    with pytest.raises(
        PreftuneError, match=r"'answer'.*columns present: \['bad', 'good', 'id', 'question'\]"
    ):
        load_rows(p, column_map={"answer": "completion"})
    with pytest.raises(PreftuneError, match="not of the form standard=source"):
        parse_column_map("prompt")
    with pytest.raises(PreftuneError, match="mapped more than once"):
        parse_column_map("prompt=a,prompt=b")


# --- detection -------------------------------------------------------------------------------

EXAMPLES = {
    "language_modeling": {"text": "hello world"},
    "prompt_completion": {"prompt": "2+2=", "completion": " 4"},
    "conversational": {"messages": MSGS},
    "paired": {"prompt": "Q", "chosen": " good", "rejected": " bad", "subset": "s"},
    "implicit_paired": {
        "chosen": "\n\nHuman: hi\n\nAssistant: hello",
        "rejected": "\n\nHuman: hi\n\nAssistant: go away",
    },
    "unpaired": {"prompt": "Q", "completion": " ok", "label": True},
    "ranked": {"prompt": "Q", "completions": [" a", " b", " c"], "scores": [1, 3, 2]},
    "prompt_only": {"prompt": "Q", "id": 7},
}


@pytest.mark.parametrize("fmt", sorted(EXAMPLES))
def test_detect_every_format(fmt):
    assert detect_format([EXAMPLES[fmt]], "x.jsonl") == fmt


def test_unrecognised_columns_list_found_and_accepted():
    with pytest.raises(PreftuneError) as e:
        detect_format([{"question": "q", "answer": "a"}], "x.jsonl")
    msg = str(e.value)
    assert "['answer', 'question']" in msg
    assert (
        "paired (prompt, chosen, rejected)" in msg and "ranked (prompt, completions, scores)" in msg
    )


def test_hh_fixture_is_implicit_paired():
    rows = load_rows(str(FIXTURE))
    assert len(rows) == 60
    assert detect_format(rows, "hh") == "implicit_paired"


# --- converters ------------------------------------------------------------------------------


def test_to_sft_formats():
    ex, _ = to_sft([EXAMPLES["language_modeling"]], "s")
    assert ex == [SFTExample("", "hello world")]
    ex, _ = to_sft([EXAMPLES["conversational"]], "s")
    assert ex == [SFTExample(MSGS[:3], MSGS[3:])]
    ex, _ = to_sft([EXAMPLES["paired"]], "s")
    assert ex == [SFTExample("Q", " good")]
    ex, _ = to_sft([EXAMPLES["implicit_paired"]], "s")
    assert ex == [SFTExample("\n\nHuman: hi\n\nAssistant:", " hello")]
    with pytest.raises(PreftuneError, match=r"format ranked .* cannot be used for SFT"):
        to_sft([EXAMPLES["ranked"]], "s")


def test_to_pairs_ranked_all_and_best_worst():
    rows = [{"prompt": "Q", "completions": ["a", "b", "c", "d"], "scores": [1, 3, 2, 1]}]
    pairs, report = to_pairs(rows, "r")
    # (a,b) (a,c) (b,c) (b,d) (c,d); a and d tie -> no pair
    assert [(p.chosen, p.rejected) for p in pairs] == [
        ("b", "a"),
        ("c", "a"),
        ("b", "c"),
        ("b", "d"),
        ("c", "d"),
    ]
    assert report.n_kept == 1 and report.n_examples == 5
    pairs, _ = to_pairs(rows, "r", ranked_pairs="best_worst")
    assert [(p.chosen, p.rejected) for p in pairs] == [("b", "a")]


def test_pairs_keep_margin_and_subset():
    rows = [{"prompt": "Q", "chosen": "a", "rejected": "b", "margin": 2, "subset": "math"}]
    assert to_pairs(rows, "m")[0] == [Pair("Q", "a", "b", margin=2.0, subset="math")]


def test_to_unpaired_labels_and_from_pairs():
    rows = [
        {"prompt": "Q", "completion": "a", "label": True},
        {"prompt": "Q", "completion": "b", "label": 0},
        {"prompt": "Q", "completion": "c", "label": "True"},
    ]
    ex, _ = to_unpaired(rows, "u")
    assert [e.label for e in ex] == [True, False, True]
    ex, report = to_unpaired([EXAMPLES["paired"]], "u")
    assert ex == [Unpaired("Q", " good", True), Unpaired("Q", " bad", False)]
    assert report.n_kept == 1 and report.n_examples == 2


def test_to_ranked():
    ex, _ = to_ranked([EXAMPLES["ranked"], EXAMPLES["paired"]][:1], "r")
    assert ex == [Ranked("Q", [" a", " b", " c"], [1.0, 3.0, 2.0])]
    ex, _ = to_ranked([EXAMPLES["paired"]], "r")
    assert ex == [Ranked("Q", [" good", " bad"], [1.0, 0.0])]


def test_to_prompts_from_every_prompt_format():
    expected = {
        "prompt_only": ("Q", {"id": 7}),
        "paired": ("Q", {"chosen": " good", "rejected": " bad", "subset": "s"}),
        "unpaired": ("Q", {"completion": " ok", "label": True}),
        "prompt_completion": ("2+2=", {"completion": " 4"}),
        "ranked": ("Q", {"completions": [" a", " b", " c"], "scores": [1, 3, 2]}),
        "conversational": (MSGS[:3], {}),
        "implicit_paired": ("\n\nHuman: hi\n\nAssistant:", {}),
    }
    for fmt, (prompt, extra) in expected.items():
        (ex,), _ = to_prompts([EXAMPLES[fmt]], fmt)
        assert (ex.prompt, ex.extra) == (prompt, extra), fmt
    with pytest.raises(PreftuneError, match="cannot be used for prompts"):
        to_prompts([EXAMPLES["language_modeling"]], "lm")


# --- bad rows: error names source, line and field; skip counts the reason ----------------------

GOOD_PAIR = {"prompt": "Q", "chosen": "a", "rejected": "b"}
BAD_ROWS = [
    # (converter, bad row, reason, words the message must contain)
    (
        to_pairs,
        {"prompt": "Q", "chosen": None, "rejected": "b"},
        "missing_field",
        "'chosen' is missing",
    ),
    (
        to_pairs,
        {"prompt": "Q", "rejected": "b", "chosen": 3},
        "wrong_type",
        "'chosen' must be a string",
    ),
    (
        to_pairs,
        {"prompt": "Q", "chosen": "  \n", "rejected": "b"},
        "empty_text",
        "'chosen' is empty",
    ),
    (
        to_pairs,
        {"prompt": "Q", "chosen": "same", "rejected": "same"},
        "chosen_equals_rejected",
        "'chosen' and 'rejected' are identical",
    ),
    (
        to_pairs,
        {"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"},
        "malformed_messages",
        "'prompt', message 0",
    ),
    (
        to_unpaired,
        {"prompt": "Q", "completion": "a", "label": "yes"},
        "bad_label",
        "'label' must be a boolean",
    ),
    (
        to_unpaired,
        {"prompt": "Q", "completion": "a", "label": 2},
        "bad_label",
        "'label' must be a boolean",
    ),
    (
        to_ranked,
        {"prompt": "Q", "completions": ["a", "b"], "scores": [1.0]},
        "bad_ranking",
        "same length >= 2",
    ),
    (
        to_ranked,
        {"prompt": "Q", "completions": ["a"], "scores": [1.0]},
        "bad_ranking",
        "same length >= 2",
    ),
    (
        to_sft,
        {"messages": [{"role": "user", "content": "hi"}]},
        "malformed_messages",
        "must end with an assistant message",
    ),
    (
        to_sft,
        {"messages": "hi"},
        "malformed_messages",
        "'messages' must be a non-empty message list",
    ),
]
GOOD_FOR = {
    to_pairs: GOOD_PAIR,
    to_unpaired: {"prompt": "Q", "completion": "a", "label": False},
    to_ranked: {"prompt": "Q", "completions": ["a", "b"], "scores": [1.0, 0.0]},
    to_sft: {"messages": MSGS},
}


@pytest.mark.parametrize(
    "convert,bad,reason,words",
    BAD_ROWS,
    ids=[f"{b[0].__name__}-{b[2]}-{i}" for i, b in enumerate(BAD_ROWS)],
)
def test_bad_rows_error_and_skip(tmp_path, convert, bad, reason, words):
    good = GOOD_FOR[convert]
    path = write_jsonl(tmp_path / "d.jsonl", [good, good, bad, good])
    rows = load_rows(path)
    with pytest.raises(PreftuneError) as e:
        convert(rows, path)
    assert "d.jsonl, line 3: " in str(e.value)
    assert words in str(e.value)
    examples, report = convert(rows, path, on_bad_row="skip")
    assert report.skipped == {reason: 1}
    assert report.n_rows == 4 and report.n_kept == 3
    assert "line 3" in report.first_problem[reason]
    assert reason in report.summary()


def test_bad_row_in_plain_list_names_row():
    with pytest.raises(PreftuneError, match=r"src, row 2: field 'rejected' is missing"):
        to_pairs([GOOD_PAIR, {"prompt": "Q", "chosen": "a", "rejected": None}], "src")


def test_all_rows_bad_is_an_error():
    with pytest.raises(PreftuneError, match="no usable rows"):
        to_pairs([{"prompt": "Q", "chosen": "a", "rejected": "a"}], "src", on_bad_row="skip")


def test_on_bad_row_value_checked():
    with pytest.raises(PreftuneError, match="on_bad_row must be 'error' or 'skip'"):
        to_pairs([GOOD_PAIR], "src", on_bad_row="ignore")


def test_margin_column_requires_numbers_on_every_row():
    rows = [dict(GOOD_PAIR, margin=1.0), dict(GOOD_PAIR, margin=None), dict(GOOD_PAIR, margin="x")]
    _, report = to_pairs(rows, "m", on_bad_row="skip")
    assert report.skipped == {"missing_field": 1, "wrong_type": 1}


# --- implicit prompts --------------------------------------------------------------------------


def test_split_implicit_prompt_rules():
    # HH layout: cut right after the last shared "Assistant:", even if replies share words.
    p, c, r = split_implicit_prompt(
        "\n\nHuman: hi\n\nAssistant: Sure, yes.", "\n\nHuman: hi\n\nAssistant: Sure, no."
    )
    assert (p, c, r) == ("\n\nHuman: hi\n\nAssistant:", " Sure, yes.", " Sure, no.")
    # No marker: never split mid-word.
    assert split_implicit_prompt("The capital is Paris.", "The capital is Pisa.") == (
        "The capital is",
        " Paris.",
        " Pisa.",
    )
    with pytest.raises(ValueError, match="share no prompt"):
        split_implicit_prompt("abc", "xyz")
    with pytest.raises(ValueError, match="identical"):
        split_implicit_prompt("abc", "abc")
    # Message lists: the common prefix ends before an assistant message.
    chosen = MSGS[:2] + [{"role": "user", "content": "x"}, {"role": "assistant", "content": "A"}]
    rejected = MSGS[:2] + [{"role": "user", "content": "x"}, {"role": "assistant", "content": "B"}]
    assert split_implicit_prompt(chosen, rejected) == (chosen[:3], chosen[3:], rejected[3:])
    with pytest.raises(ValueError, match="share no prompt"):
        split_implicit_prompt(
            [{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]
        )


def check_hh_rows(rows):
    for i, row in enumerate(rows):
        prompt, c, r = split_implicit_prompt(row["chosen"], row["rejected"])
        assert prompt.endswith("\n\nAssistant:"), i
        assert prompt + c == row["chosen"] and prompt + r == row["rejected"], i
        assert c and r, i


def test_implicit_prompt_on_hh_fixture():
    rows = load_rows(str(FIXTURE))
    check_hh_rows(rows)
    # Line 49 of the sample has an empty chosen reply ("Assistant: " and nothing after it).
    with pytest.raises(
        PreftuneError, match=r"hh_sample\.jsonl, line 49: field 'chosen' has an empty reply"
    ):
        to_pairs(rows, "hh_sample")
    pairs, report = to_pairs(rows, "hh_sample", on_bad_row="skip")
    assert report.skipped == {"empty_text": 1} and report.n_kept == 59
    assert all(p.prompt.endswith("\n\nAssistant:") and p.chosen.startswith(" ") for p in pairs)


@pytest.mark.skipif(not HH_DEV.is_file(), reason="../shared/data/hh-harmless-dev.jsonl.gz absent")
def test_implicit_prompt_on_all_hh_dev_rows():
    rows = load_rows(str(HH_DEV))
    assert len(rows) == 1500
    check_hh_rows(rows)
    # A few HH replies are empty ("Assistant: " then nothing): counted as empty_text.
    pairs, report = to_pairs(rows, "hh", on_bad_row="skip")
    assert set(report.skipped) <= {"empty_text"}
    assert report.n_kept + sum(report.skipped.values()) == 1500 and report.n_kept >= 1490
