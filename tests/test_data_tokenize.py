"""Chat rendering, the truncation policy and collation (preftune.data.tokenize / collate)."""

from pathlib import Path

import pytest
import torch

from preftune.data.collate import (
    collate_pairs,
    collate_ranked,
    collate_sft,
    collate_unpaired,
    left_pad,
    pad_sequences,
)
from preftune.data.formats import Pair, PromptExample, Ranked, SFTExample, Unpaired, to_pairs
from preftune.data.loading import load_rows
from preftune.data.tokenize import (
    TruncationConfig,
    load_chat_template,
    render,
    set_chat_template,
    tokenize_pairs,
    tokenize_prompts,
    tokenize_ranked,
    tokenize_sft,
    tokenize_unpaired,
)
from preftune.errors import PreftuneError

BOS, EOS, PAD = 256, 257, 258
FIXTURE = Path(__file__).parent / "fixtures" / "hh_sample.jsonl"


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


# --- rendering -------------------------------------------------------------------------------


def test_render_strings_concatenate_without_template(byte_tokenizer):
    assert render(byte_tokenizer, "Q:", " A") == ("Q:", " A")


def test_render_messages_prefix_property(byte_tokenizer):
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    completion = [{"role": "assistant", "content": "Hello"}]
    p, c = render(byte_tokenizer, prompt, completion)
    assert p == "<|bos|><|system|>Be brief.<|user|>Hi<|assistant|>"
    assert c == "Hello<|eos|>"
    full = byte_tokenizer.apply_chat_template(prompt + completion, tokenize=False)
    assert p + c == full


def test_render_template_breaking_prefix_property(byte_tokenizer):
    # A template whose generation prompt differs from how it renders the assistant turn.
    byte_tokenizer.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}[bot]{% endif %}"
    )
    with pytest.raises(PreftuneError, match="not render the prompt .* as a prefix"):
        render(
            byte_tokenizer,
            [{"role": "user", "content": "Hi"}],
            [{"role": "assistant", "content": "Yo"}],
        )


def test_messages_without_chat_template(byte_tokenizer):
    byte_tokenizer.chat_template = None
    with pytest.raises(PreftuneError, match="no chat template.*--chat-template"):
        render(
            byte_tokenizer,
            [{"role": "user", "content": "Hi"}],
            [{"role": "assistant", "content": "Yo"}],
        )


def test_load_and_set_chat_template(tmp_path, byte_tokenizer):
    with pytest.raises(PreftuneError, match="no such file"):
        load_chat_template(tmp_path / "missing.jinja")
    good = tmp_path / "t.jinja"
    good.write_text(
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    set_chat_template(byte_tokenizer, good)
    assert render(
        byte_tokenizer, [{"role": "user", "content": "a"}], [{"role": "assistant", "content": "b"}]
    ) == ("<user>a<assistant>", "b")
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}")
    with pytest.raises(PreftuneError, match="broken.jinja"):
        set_chat_template(byte_tokenizer, broken)


# --- truncation policy -----------------------------------------------------------------------


def test_config_validation_names_fields():
    with pytest.raises(
        PreftuneError, match=r"max_prompt_length \(512\) must be smaller than max_length \(512\)"
    ):
        TruncationConfig(max_length=512, max_prompt_length=512)
    with pytest.raises(PreftuneError, match="prompt_truncation must be"):
        TruncationConfig(prompt_truncation="middle")
    assert TruncationConfig(max_length=100).prompt_limit == 50


def test_sft_sequence_layout(byte_tokenizer):
    (f,), report = tokenize_sft(
        byte_tokenizer, [SFTExample("ab", "cd")], TruncationConfig(max_length=16)
    )
    # BOS + prompt bytes, then completion bytes + EOS appended.
    assert f["input_ids"] == [BOS] + ids(byte_tokenizer, "ab") + ids(byte_tokenizer, "cd") + [EOS]
    assert f["completion_mask"] == [0, 0, 0, 1, 1, 1]
    assert f["prompt_length"] == 3
    assert (
        report.n_examples == 1
        and report.n_prompt_truncated == 0
        and report.n_completion_truncated == 0
    )


def test_chat_bos_not_doubled_and_eos_not_doubled(byte_tokenizer):
    ex = SFTExample([{"role": "user", "content": "Hi"}], [{"role": "assistant", "content": "Yo"}])
    (f,), _ = tokenize_sft(byte_tokenizer, [ex], TruncationConfig(max_length=64))
    assert f["input_ids"][0] == BOS and f["input_ids"][1] != BOS  # template wrote <|bos|>
    assert f["input_ids"][-1] == EOS and f["input_ids"][-2] != EOS  # template wrote <|eos|>
    completion = [t for t, m in zip(f["input_ids"], f["completion_mask"], strict=True) if m]
    assert byte_tokenizer.decode(completion) == "Yo<|eos|>"


def test_keep_end_keeps_bos_and_last_prompt_tokens(byte_tokenizer):
    trunc = TruncationConfig(max_length=10, max_prompt_length=4, prompt_truncation="keep_end")
    (f,), report = tokenize_sft(byte_tokenizer, [SFTExample("abcdefgh", "XY")], trunc)
    # prompt ids: BOS a..h (9 tokens) -> BOS + last 3 ("fgh")
    assert f["input_ids"] == [BOS] + ids(byte_tokenizer, "fgh") + ids(byte_tokenizer, "XY") + [EOS]
    assert f["prompt_length"] == 4 and report.n_prompt_truncated == 1

    trunc = TruncationConfig(max_length=10, max_prompt_length=4, prompt_truncation="keep_start")
    (f,), _ = tokenize_sft(byte_tokenizer, [SFTExample("abcdefgh", "XY")], trunc)
    assert f["input_ids"][:4] == [BOS] + ids(byte_tokenizer, "abc")


def test_completion_cut_from_the_right(byte_tokenizer):
    trunc = TruncationConfig(max_length=6, max_prompt_length=3)
    (f,), report = tokenize_sft(byte_tokenizer, [SFTExample("ab", "0123456789")], trunc)
    # 3 prompt tokens (BOS a b) leave 3 completion tokens: "012", the EOS is cut off.
    assert f["input_ids"] == [BOS] + ids(byte_tokenizer, "ab012")
    assert sum(f["completion_mask"]) == 3 and len(f["input_ids"]) == 6
    assert report.n_completion_truncated == 1 and report.n_prompt_truncated == 0


def test_pairs_share_prompt_truncation_and_drop_when_no_room(byte_tokenizer):
    trunc = TruncationConfig(max_length=5, max_prompt_length=4)
    pairs = [
        Pair("long prompt here", "yes", "no", margin=0.5, subset="s"),
        Pair("long prompt here", " same start A", " same start B"),  # 1 completion token each: " "
        Pair("hi", "A", "B"),
    ]
    features, report = tokenize_pairs(byte_tokenizer, pairs, trunc)
    assert report.n_examples == 3 and report.n_prompt_truncated == 2
    assert report.n_dropped == {"identical_after_truncation": 1}
    assert report.n_completion_truncated == 2
    f = features[0]
    assert (
        f["chosen_input_ids"][:4]
        == f["rejected_input_ids"][:4]
        == [BOS] + ids(byte_tokenizer, "ere")
    )
    assert f["chosen_completion_mask"] == [0, 0, 0, 0, 1]
    assert (f["margin"], f["subset"]) == (0.5, "s")
    assert "margin" not in features[1]
    assert "dropped identical_after_truncation: 1" in report.summary()


def test_empty_prompt_without_bos(byte_tokenizer, byte_tokenizer_no_bos):
    tok = byte_tokenizer_no_bos
    features, report = tokenize_sft(
        tok, [SFTExample("", "hello"), SFTExample("", "")], TruncationConfig(max_length=16)
    )
    f = features[0]
    assert f["input_ids"] == ids(tok, "hello") + [EOS]
    assert f["completion_mask"][0] == 0 and sum(f["completion_mask"]) == 5
    # The empty completion is only EOS at position 0: nothing to learn from.
    assert report.n_dropped == {"no_completion_tokens": 1}
    # With a BOS tokenizer an empty prompt is just [BOS].
    (f,), _ = tokenize_sft(byte_tokenizer, [SFTExample("", "hi")], TruncationConfig(max_length=16))
    assert f["input_ids"][0] == BOS and f["completion_mask"] == [0, 1, 1, 1]


def test_unpaired_ranked_prompts(byte_tokenizer):
    trunc = TruncationConfig(max_length=32)
    feats, _ = tokenize_unpaired(
        byte_tokenizer, [Unpaired("Q", "a", True), Unpaired("Q", "b", False)], trunc
    )
    assert [f["label"] for f in feats] == [True, False]
    (f,), _ = tokenize_ranked(byte_tokenizer, [Ranked("Q", ["a", "bb", "c"], [2, 1, 3])], trunc)
    assert len(f["sequences"]) == 3 and f["scores"] == [2.0, 1.0, 3.0]
    assert all(s["prompt_length"] == 2 for s in f["sequences"])
    msgs = [{"role": "user", "content": "Hi"}]
    feats, report = tokenize_prompts(
        byte_tokenizer,
        [PromptExample("0123456789", {"id": 1}), PromptExample("ab", {})],
        5,
        "keep_end",
    )
    assert feats[0]["prompt_ids"] == [BOS] + ids(byte_tokenizer, "6789") and feats[0]["extra"] == {
        "id": 1
    }
    assert feats[1]["prompt_ids"] == [BOS] + ids(byte_tokenizer, "ab")
    assert report.n_prompt_truncated == 1
    (f,), _ = tokenize_prompts(byte_tokenizer, [PromptExample(msgs, {})], 64)
    assert byte_tokenizer.decode(f["prompt_ids"]) == "<|bos|><|user|>Hi<|assistant|>"


def test_hh_sample_end_to_end(byte_tokenizer):
    pairs, _ = to_pairs(load_rows(str(FIXTURE)), "hh", on_bad_row="skip")
    trunc = TruncationConfig(max_length=256, max_prompt_length=128)
    features, report = tokenize_pairs(byte_tokenizer, pairs, trunc, progress=False)
    assert report.n_examples == 59 and report.n_prompt_truncated > 0
    for f in features:
        for side in ("chosen", "rejected"):
            n = len(f[f"{side}_input_ids"])
            assert n <= 256 and f[f"{side}_input_ids"][0] == BOS
            assert f[f"{side}_completion_mask"][: f["prompt_length"]] == [0] * f["prompt_length"]
            assert sum(f[f"{side}_completion_mask"]) == n - f["prompt_length"] > 0
        # Untruncated prompts end with the assistant marker.
    batch = collate_pairs(features[:4], PAD)
    assert batch["input_ids"].shape[0] == 8 and batch["num_pairs"] == 4


# --- collation -------------------------------------------------------------------------------


def test_pad_sequences_right_pads():
    seqs = [
        {"input_ids": [1, 2, 3], "completion_mask": [0, 1, 1]},
        {"input_ids": [4], "completion_mask": [0]},
    ]
    b = pad_sequences(seqs, pad_id=9)
    assert b["input_ids"].tolist() == [[1, 2, 3], [4, 9, 9]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["completion_mask"].tolist() == [[0, 1, 1], [0, 0, 0]]
    assert all(t.dtype == torch.long for t in b.values())
    assert collate_sft(seqs, 9)["input_ids"].shape == (2, 3)


def test_collate_pairs_chosen_first_then_rejected():
    feats = [
        {
            "chosen_input_ids": [1, 2],
            "chosen_completion_mask": [0, 1],
            "rejected_input_ids": [1, 3, 3],
            "rejected_completion_mask": [0, 1, 1],
            "margin": 1.0,
        },
        {
            "chosen_input_ids": [5, 6, 7, 8],
            "chosen_completion_mask": [0, 0, 1, 1],
            "rejected_input_ids": [5, 6, 9],
            "rejected_completion_mask": [0, 0, 1],
            "margin": 2.0,
        },
    ]
    b = collate_pairs(feats, pad_id=0)
    assert b["num_pairs"] == 2
    assert b["input_ids"].tolist() == [[1, 2, 0, 0], [5, 6, 7, 8], [1, 3, 3, 0], [5, 6, 9, 0]]
    assert b["completion_mask"].tolist() == [[0, 1, 0, 0], [0, 0, 1, 1], [0, 1, 1, 0], [0, 0, 1, 0]]
    assert b["margin"].dtype == torch.float and b["margin"].tolist() == [1.0, 2.0]


def test_collate_unpaired_and_ranked():
    feats = [
        {"input_ids": [1, 2], "completion_mask": [0, 1], "label": True},
        {"input_ids": [3], "completion_mask": [0], "label": False},
    ]
    b = collate_unpaired(feats, 0)
    assert b["label"].dtype == torch.bool and b["label"].tolist() == [True, False]
    ranked = [
        {"sequences": feats[:2], "scores": [1.0, 0.0]},
        {"sequences": feats[:1] * 3, "scores": [3.0, 2.0, 1.0]},
    ]
    b = collate_ranked(ranked, 0)
    assert b["input_ids"].shape == (5, 2) and b["num_completions"].tolist() == [2, 3]


def test_left_pad():
    input_ids, attention_mask = left_pad([[1, 2, 3], [4]], pad_id=0)
    assert input_ids.tolist() == [[1, 2, 3], [0, 0, 4]]
    assert attention_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
