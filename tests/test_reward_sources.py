import math
import textwrap

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

from preftune.errors import PreftuneError
from preftune.rewards import (
    CombinedReward,
    FunctionReward,
    ModelReward,
    apply_penalties,
    load_function,
    parse_reward_spec,
)

PROMPTS = ["a", "bb", "ccc"]
COMPLETIONS = ["x", "yy", "zzz"]


def write_module(tmp_path, name, body):
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(body))
    return path


# ----------------------------------------------------------------------------- load_function


def test_load_function_from_file_path(tmp_path):
    path = write_module(
        tmp_path,
        "my_rewards",
        "def length(prompts, completions):\n    return [len(c) for c in completions]\n",
    )
    fn = load_function(f"{path}:length")
    assert fn(PROMPTS, COMPLETIONS) == [1, 2, 3]


def test_load_function_from_module(tmp_path, monkeypatch):
    write_module(
        tmp_path,
        "preftune_test_rewards_mod",
        "def one(prompts, completions):\n    return [1.0] * len(completions)\n",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = load_function("preftune_test_rewards_mod:one")
    assert fn(PROMPTS, COMPLETIONS) == [1.0, 1.0, 1.0]


def test_load_function_errors(tmp_path):
    with pytest.raises(
        PreftuneError, match=r"cannot import module 'no_such_module_xyz'.*No module named"
    ):
        load_function("no_such_module_xyz:f")
    with pytest.raises(
        PreftuneError, match=r"has no attribute 'nope'.*callables it defines: acos, acosh"
    ):
        load_function("math:nope")
    with pytest.raises(PreftuneError, match=r"'pi' is a float, not a callable"):
        load_function("math:pi")
    with pytest.raises(PreftuneError, match="must look like 'module:function'"):
        load_function("math.sqrt")
    with pytest.raises(PreftuneError, match="does not exist"):
        load_function(f"{tmp_path}/missing.py:f")
    broken = write_module(tmp_path, "broken", "import no_such_dependency_xyz\n")
    with pytest.raises(
        PreftuneError, match=r"ModuleNotFoundError: No module named 'no_such_dependency_xyz'"
    ):
        load_function(f"{broken}:f")


# ----------------------------------------------------------------------------- FunctionReward


def test_function_reward_passes_extra_columns_it_names():
    def exact_match(prompts, completions, answer):
        return [float(c == a) for c, a in zip(completions, answer)]

    source = FunctionReward(exact_match)
    scores = source(PROMPTS, COMPLETIONS, answer=["x", "no", "zzz"], unrelated=[0, 0, 0])
    assert scores.tolist() == [1.0, 0.0, 1.0]
    assert scores.dtype == torch.float32
    total, components = source.score_with_components(PROMPTS, COMPLETIONS, answer=["x", "x", "x"])
    assert list(components) == ["exact_match"] and total.tolist() == [1.0, 0.0, 0.0]


def test_function_reward_with_kwargs_gets_every_column():
    seen = {}

    def fn(prompts, completions, **kw):
        seen.update(kw)
        return np.zeros(len(completions))

    FunctionReward(fn)(PROMPTS, COMPLETIONS, a=[1, 2, 3], b=[4, 5, 6])
    assert set(seen) == {"a", "b"}


@pytest.mark.parametrize(
    "returned, match",
    [
        ([1.0, 2.0], r"'bad' must return 3 numbers .*got a list of length 2"),
        (torch.zeros(3, 2), r"'bad' must return 3 numbers .*got a Tensor of shape \(3, 2\)"),
        (None, r"'bad' must return a list, array or tensor of 3 numbers .*got NoneType"),
        ("abc", r"'bad' must return .*got str"),
        (
            [1.0, "high", 0.0],
            r"'bad' must return 3 numbers, got a list with non-numbers; e.g. 'high' \(str\)",
        ),
        (
            [1.0, float("nan"), float("inf")],
            r"'bad' returned 2 non-finite \(NaN or inf\) scores of 3, at indices 1, 2",
        ),
        (np.array([0.0, np.nan, 1.0]), r"1 non-finite .* at indices 1$"),
    ],
)
def test_function_reward_checks_what_it_returns(returned, match):
    def bad(prompts, completions):
        return returned

    with pytest.raises(PreftuneError, match=match):
        FunctionReward(bad)(PROMPTS, COMPLETIONS)


def test_function_reward_accepts_tensors_arrays_bools():
    for returned in (torch.tensor([1, 2, 3]), np.array([1.0, 2.0, 3.0]), (1, 2.0, True)):
        scores = FunctionReward(lambda p, c, r=returned: r, name="f")(PROMPTS, COMPLETIONS)
        assert scores.tolist() == [1.0, 2.0, float(returned[2])]


def test_function_reward_wraps_exceptions():
    def crashes(prompts, completions):
        raise KeyError("answer")

    with pytest.raises(PreftuneError, match=r"reward function 'crashes' raised KeyError: 'answer'"):
        FunctionReward(crashes)(PROMPTS, COMPLETIONS)


# ----------------------------------------------------------------------------- combination, penalties


def const(value, name):
    return FunctionReward(lambda p, c: [value] * len(c), name=name)


def test_combined_reward_weights_and_components():
    length = FunctionReward(lambda p, c: [len(x) for x in c], name="length")
    combined = CombinedReward([(length, 2.0), (const(1.0, "bonus"), -0.5)])
    total, components = combined.score_with_components(PROMPTS, COMPLETIONS)
    # 2*[1,2,3] - 0.5*[1,1,1] = [1.5, 3.5, 5.5]
    assert total.tolist() == [1.5, 3.5, 5.5]
    assert components["length"].tolist() == [1.0, 2.0, 3.0]
    assert components["bonus"].tolist() == [1.0, 1.0, 1.0]
    assert combined(PROMPTS, COMPLETIONS).tolist() == total.tolist()


def test_combined_reward_keeps_duplicate_names_apart():
    total, components = CombinedReward(
        [(const(1.0, "f"), 1.0), (const(2.0, "f"), 1.0)]
    ).score_with_components(PROMPTS, COMPLETIONS)
    assert set(components) == {"f", "f_2"} and total.tolist() == [3.0] * 3


def test_apply_penalties():
    rewards = torch.tensor([1.0, 1.0, 0.0])
    out = apply_penalties(
        rewards, [True, False, False], [2, 10, 4], missing_eos_penalty=1.5, length_penalty=0.1
    )
    # [1 - 0.2, 1 - 1.5 - 1.0, 0 - 1.5 - 0.4]
    assert torch.allclose(out, torch.tensor([0.8, -1.5, -1.9]))
    assert rewards.tolist() == [1.0, 1.0, 0.0]  # not modified in place
    assert apply_penalties(rewards, [False] * 3, [5] * 3, missing_eos_penalty=None).tolist() == [
        1.0,
        1.0,
        0.0,
    ]
    with pytest.raises(PreftuneError, match="missing_eos_penalty"):
        apply_penalties(rewards, [True] * 3, [1] * 3, missing_eos_penalty=-1.0)
    with pytest.raises(PreftuneError, match="2 finished flags"):
        apply_penalties(rewards, [True] * 2, [1] * 3, missing_eos_penalty=1.0)


def test_parse_reward_spec(tmp_path):
    path = write_module(
        tmp_path,
        "spec_rewards",
        """
        def length(prompts, completions):
            return [len(c) for c in completions]

        def one(prompts, completions):
            return [1.0] * len(completions)
        """,
    )
    single = parse_reward_spec(None, [f"{path}:length"], None)
    assert isinstance(single, FunctionReward) and single(PROMPTS, COMPLETIONS).tolist() == [
        1.0,
        2.0,
        3.0,
    ]
    combined = parse_reward_spec(None, [f"{path}:length", f"{path}:one"], [1.0, 10.0])
    assert combined(PROMPTS, COMPLETIONS).tolist() == [11.0, 12.0, 13.0]
    unweighted = parse_reward_spec(None, [f"{path}:length", f"{path}:one"], None)
    assert unweighted(PROMPTS, COMPLETIONS).tolist() == [2.0, 3.0, 4.0]
    with pytest.raises(PreftuneError, match="no reward source"):
        parse_reward_spec(None, [], None)
    with pytest.raises(PreftuneError, match=r"got 1 weights for 2 reward sources \(length, one\)"):
        parse_reward_spec(None, [f"{path}:length", f"{path}:one"], [1.0])
    with pytest.raises(PreftuneError, match="finite"):
        parse_reward_spec(None, [f"{path}:length"], [math.nan])


# ----------------------------------------------------------------------------- ModelReward


def byte_tokenizer():
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, **{ch: i + 3 for i, ch in enumerate(alphabet)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )


def tiny_config(**kw):
    return LlamaConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=300,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **kw,
    )


def tiny_reward_model(seed=0):
    torch.manual_seed(seed)
    return LlamaForSequenceClassification(tiny_config(num_labels=1))


TEXT_PROMPTS = ["Hello", "What is 2+2?", "Tell me a long story about a dragon", "x"]
TEXT_COMPLETIONS = [" world", " 4", " Once upon a time there was a dragon.", " yz"]


def test_model_reward_batch_size_does_not_change_scores():
    model, tok = tiny_reward_model(), byte_tokenizer()
    one = ModelReward(model, tok, batch_size=1)(TEXT_PROMPTS, TEXT_COMPLETIONS)
    four = ModelReward(model, tok, batch_size=4)(TEXT_PROMPTS, TEXT_COMPLETIONS)
    assert one.shape == (4,) and one.dtype == torch.float32
    assert torch.allclose(one, four, atol=1e-5)
    assert one.std() > 0  # different texts, different scores
    # and each row equals scoring its own unpadded text by hand
    # (the completion ends with EOS, the layout `preftune reward` trains on)
    ids = tok("Hello" + " world")["input_ids"] + [tok.eos_token_id]
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([ids])).logits[0, 0]
    assert abs(one[0].item() - expected.item()) < 1e-5


def test_model_reward_truncates_and_keeps_train_mode():
    model, tok = tiny_reward_model(), byte_tokenizer()
    model.train()
    source = ModelReward(model, tok, batch_size=2, max_length=8)
    scores = source(["a" * 50, "b"], ["c" * 50, "d"])
    with torch.no_grad():
        model.eval()
        # truncated to max_length, still ending with EOS like the training layout
        ids = tok("a" * 8)["input_ids"][:7] + [tok.eos_token_id]
        expected = model(input_ids=torch.tensor([ids])).logits[0, 0]
    assert abs(scores[0].item() - expected.item()) < 1e-5
    model.train()
    source(["a"], ["b"])
    assert model.training


def test_model_reward_renders_conversations_with_the_chat_template():
    model, tok = tiny_reward_model(), byte_tokenizer()
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    source = ModelReward(model, tok)
    conv = source([[{"role": "user", "content": "hi"}]], ["yo"])
    plain = source(["<user>hi"], ["<assistant>yo"])
    assert torch.allclose(conv, plain, atol=1e-6)
    tok.chat_template = None
    with pytest.raises(PreftuneError, match="no chat template"):
        source([[{"role": "user", "content": "hi"}]], ["yo"])


def test_model_reward_refuses_more_than_one_label():
    torch.manual_seed(0)
    with pytest.raises(PreftuneError, match=r"num_labels=2.*preftune reward"):
        ModelReward(LlamaForSequenceClassification(tiny_config(num_labels=2)), byte_tokenizer())


def test_model_reward_from_pretrained(tmp_path):
    model, tok = tiny_reward_model(), byte_tokenizer()
    model.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    loaded = ModelReward.from_pretrained(str(tmp_path / "rm"), batch_size=2)
    expected = ModelReward(model, tok)(TEXT_PROMPTS, TEXT_COMPLETIONS)
    assert torch.allclose(loaded(TEXT_PROMPTS, TEXT_COMPLETIONS), expected, atol=1e-5)

    torch.manual_seed(0)
    LlamaForCausalLM(tiny_config()).save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    with pytest.raises(
        PreftuneError,
        match=r"LlamaForCausalLM checkpoint without a classification head.*preftune reward",
    ):
        ModelReward.from_pretrained(str(tmp_path / "lm"))
    with pytest.raises(PreftuneError, match="cannot load reward model"):
        ModelReward.from_pretrained(str(tmp_path / "nothing_here"))


def test_parse_reward_spec_with_model_and_function(tmp_path):
    model, tok = tiny_reward_model(), byte_tokenizer()
    model.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    path = write_module(
        tmp_path,
        "lenfn",
        "def length(prompts, completions):\n    return [len(c) for c in completions]\n",
    )
    source = parse_reward_spec(str(tmp_path / "rm"), [f"{path}:length"], [2.0, 0.5])
    total, components = source.score_with_components(TEXT_PROMPTS, TEXT_COMPLETIONS)
    assert list(components) == ["reward_model", "length"]
    assert torch.allclose(total, 2.0 * components["reward_model"] + 0.5 * components["length"])
    assert components["length"].tolist() == [float(len(c)) for c in TEXT_COMPLETIONS]
