import sys

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from preftune.errors import PreftuneError
from preftune.generation import Rollout, SamplingConfig, generate, sample_next_token, vllm_available

VOCAB = 300
PAD, BOS = 0, 1


class ToyTokenizer:
    """All that `generate` reads from a tokenizer."""

    def __init__(self, eos_token_id, pad_token_id=PAD):
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id


def tiny_lm(seed=0, eos_token_id=2):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=32,
        num_hidden_layers=2,  # 2 layers: padding garbage would propagate through layer 2's K/V
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=VOCAB,
        max_position_embeddings=128,
        bos_token_id=BOS,
        eos_token_id=eos_token_id,
        pad_token_id=PAD,
    )
    return LlamaForCausalLM(cfg)


def tiny_gpt2(seed=0):
    """Absolute position embeddings: unlike RoPE, wrong position ids under left padding show."""
    torch.manual_seed(seed)
    cfg = GPT2Config(
        n_embd=32,
        n_layer=2,
        n_head=2,
        vocab_size=VOCAB,
        n_positions=128,
        bos_token_id=BOS,
        eos_token_id=2,
    )
    return GPT2LMHeadModel(cfg)


# Different lengths, so batching left-pads (the first two rows by 4 and 3 tokens).
PROMPTS = [[BOS, 5, 6], [BOS, 7, 8, 9], [BOS, 10, 11, 12, 13, 14, 15]]


def argmax_without_cache(model, prompt, n_tokens, eos=None):
    """Reference greedy decoding: one unpadded prompt, full forward every step, no KV cache."""
    ids = list(prompt)
    out = []
    with torch.no_grad():
        for _ in range(n_tokens):
            logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1]
            tok = int(logits.argmax())
            out.append(tok)
            ids.append(tok)
            if tok == eos:
                break
    return out


@pytest.mark.parametrize("make_model", [tiny_lm, tiny_gpt2], ids=["llama", "gpt2"])
def test_near_greedy_kv_cache_batched_matches_no_cache_argmax(make_model):
    model = make_model().eval()
    expected = [argmax_without_cache(model, p, 10) for p in PROMPTS]
    sampling = SamplingConfig(max_new_tokens=10, temperature=1e-5, stop_at_eos=False)
    rollout = generate(
        model,
        ToyTokenizer(eos_token_id=2),
        PROMPTS,
        sampling,
        generator=torch.Generator().manual_seed(0),
    )
    assert rollout.completion_ids == expected
    assert rollout.prompt_ids == PROMPTS
    # sanity: the reference is not degenerate (the test could not tell paths apart otherwise)
    assert len({tuple(e) for e in expected}) == len(PROMPTS)


def test_tiny_top_p_is_greedy_and_batch_size_does_not_matter():
    model = tiny_lm().eval()
    expected = [argmax_without_cache(model, p, 6) for p in PROMPTS]
    sampling = SamplingConfig(max_new_tokens=6, temperature=1.0, top_p=1e-6, stop_at_eos=False)
    for batch_size in (1, 2, 64):
        rollout = generate(model, ToyTokenizer(2), PROMPTS, sampling, batch_size=batch_size)
        assert rollout.completion_ids == expected


def test_top_k_1_is_greedy():
    logits = torch.randn(5, VOCAB)
    tokens = sample_next_token(logits, SamplingConfig(top_k=1), torch.Generator().manual_seed(0))
    assert tokens.tolist() == logits.argmax(-1).tolist()


def test_top_p_keeps_the_smallest_nucleus():
    # probs 0.5, 0.3, 0.2: top_p=0.7 keeps {0, 1} (0.5 < 0.7, 0.8 >= 0.7); token 2 never drawn
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]])).repeat(2000, 1)
    tokens = sample_next_token(logits, SamplingConfig(top_p=0.7), torch.Generator().manual_seed(0))
    counts = torch.bincount(tokens, minlength=3)
    assert counts[2] == 0
    assert abs(counts[0].item() / 2000 - 0.5 / 0.8) < 0.05


def test_temperature_scales_logits():
    # T=2 on logits log([0.8, 0.2]) gives p ∝ sqrt(0.8), sqrt(0.2) = 2:1, i.e. p0 = 2/3
    logits = torch.log(torch.tensor([[0.8, 0.2]])).repeat(4000, 1)
    tokens = sample_next_token(
        logits, SamplingConfig(temperature=2.0), torch.Generator().manual_seed(0)
    )
    assert abs((tokens == 0).float().mean().item() - 2 / 3) < 0.03


def test_same_seed_same_rollout_different_seed_differs():
    model = tiny_lm()
    sampling = SamplingConfig(max_new_tokens=8, stop_at_eos=False)

    def run(seed):
        return generate(
            model,
            ToyTokenizer(2),
            PROMPTS,
            sampling,
            num_samples=2,
            generator=torch.Generator().manual_seed(seed),
        )

    a, b, c = run(0), run(0), run(1)
    assert a.completion_ids == b.completion_ids
    assert a.completion_ids != c.completion_ids


def test_stops_at_eos_and_keeps_it():
    model = tiny_lm().eval()
    greedy = argmax_without_cache(model, PROMPTS[0], 10)
    # Declare greedy's 4th token of prompt 0 as EOS: that row must stop right after it.
    eos = greedy[3]
    model.config.eos_token_id = model.generation_config.eos_token_id = eos
    cut = greedy.index(eos) + 1  # its first occurrence (<= 4)
    sampling = SamplingConfig(max_new_tokens=10, temperature=1e-5)
    rollout = generate(model, ToyTokenizer(eos), PROMPTS, sampling)
    assert rollout.completion_ids[0] == greedy[:cut]
    assert rollout.finished[0] is True
    for completion, finished in zip(rollout.completion_ids, rollout.finished):
        assert eos not in completion[:-1]  # nothing after EOS
        assert finished == (completion[-1] == eos)
        assert finished or len(completion) == 10  # unfinished rows ran to max_new_tokens


def test_sampled_rollout_invariants_with_likely_eos():
    eos = 3
    model = tiny_lm(eos_token_id=eos)
    with torch.no_grad():  # make EOS likely enough that some rows stop early and some do not
        model.lm_head.weight[eos] = model.model.norm.weight.sign() * 0.25
    sampling = SamplingConfig(max_new_tokens=12)
    rollout = generate(
        model,
        ToyTokenizer(eos),
        PROMPTS,
        sampling,
        num_samples=8,
        generator=torch.Generator().manual_seed(0),
    )
    assert len(rollout) == 24
    assert any(rollout.finished) and not all(rollout.finished)
    for completion, finished in zip(rollout.completion_ids, rollout.finished):
        assert 1 <= len(completion) <= 12
        assert eos not in completion[:-1]
        assert finished == (completion[-1] == eos)
        assert finished or len(completion) == 12


def test_model_generation_config_eos_also_stops():
    model = tiny_lm().eval()
    greedy = argmax_without_cache(model, PROMPTS[0], 10)
    model.generation_config.eos_token_id = [greedy[2]]  # e.g. an instruct model's end-of-turn id
    rollout = generate(
        model, ToyTokenizer(eos_token_id=VOCAB - 1), PROMPTS[:1], SamplingConfig(temperature=1e-5)
    )
    assert rollout.completion_ids[0] == greedy[: greedy.index(greedy[2]) + 1]
    assert rollout.finished == [True]


def test_num_samples_rows_are_prompt_major():
    model = tiny_lm().eval()
    expected = [argmax_without_cache(model, p, 5) for p in PROMPTS]
    sampling = SamplingConfig(max_new_tokens=5, temperature=1e-5, stop_at_eos=False)
    rollout = generate(model, ToyTokenizer(2), PROMPTS, sampling, num_samples=3, batch_size=4)
    assert rollout.num_samples == 3
    assert rollout.prompt_ids == [p for p in PROMPTS for _ in range(3)]
    assert rollout.completion_ids == [e for e in expected for _ in range(3)]


def test_train_mode_restored_and_no_grad():
    model = tiny_lm()
    model.train()
    generate(model, ToyTokenizer(2), PROMPTS, SamplingConfig(max_new_tokens=2))
    assert model.training
    model.eval()
    generate(model, ToyTokenizer(2), PROMPTS, SamplingConfig(max_new_tokens=2))
    assert not model.training


def test_to_batch_right_pads_and_masks_completion():
    rollout = Rollout(
        prompt_ids=[[1, 5], [1, 6, 7]], completion_ids=[[8, 9, 2], [4]], finished=[True, False]
    )
    batch = rollout.to_batch(pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 5, 8, 9, 2], [1, 6, 7, 4, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert batch["completion_mask"].tolist() == [[0, 0, 1, 1, 1], [0, 0, 0, 1, 0]]
    assert all(t.dtype == torch.long for t in batch.values())
    assert rollout.completion_lengths == [3, 1]


def test_generated_batch_shapes():
    model = tiny_lm()
    rollout = generate(
        model,
        ToyTokenizer(2),
        PROMPTS,
        SamplingConfig(max_new_tokens=4, stop_at_eos=False),
        num_samples=2,
    )
    batch = rollout.to_batch(PAD)
    assert batch["input_ids"].shape == (6, 7 + 4)
    assert batch["completion_mask"].sum(1).tolist() == [4] * 6
    assert (batch["completion_mask"][:, 0] == 0).all()


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"temperature": 0.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"top_k": -1}, "top_k"),
    ],
)
def test_sampling_config_validation_names_the_field(kwargs, field):
    with pytest.raises(PreftuneError, match=field):
        SamplingConfig(**kwargs).validate()


def test_bad_prompts_and_missing_eos_are_user_errors():
    model = tiny_lm()
    sampling = SamplingConfig(max_new_tokens=2)
    with pytest.raises(PreftuneError, match="prompt 1 must be a non-empty"):
        generate(model, ToyTokenizer(2), [[1, 2], []], sampling)
    with pytest.raises(PreftuneError, match="outside the model's vocabulary"):
        generate(model, ToyTokenizer(2), [[1, VOCAB + 5]], sampling)
    with pytest.raises(PreftuneError, match="num_samples"):
        generate(model, ToyTokenizer(2), PROMPTS, sampling, num_samples=0)
    no_eos_model = tiny_lm(eos_token_id=None)
    no_eos_model.generation_config.eos_token_id = None
    with pytest.raises(PreftuneError, match="EOS"):
        generate(no_eos_model, ToyTokenizer(None), PROMPTS, sampling)


def test_hf_path_never_imports_vllm():
    generate(tiny_lm(), ToyTokenizer(2), PROMPTS, SamplingConfig(max_new_tokens=2))
    vllm_available()
    assert "vllm" not in sys.modules


def test_vllm_generator_refuses_cleanly_without_vllm_or_gpu():
    if vllm_available():
        pytest.skip("vLLM and a GPU are present")
    from preftune.generation import VLLMGenerator

    with pytest.raises(PreftuneError, match="vllm"):
        VLLMGenerator("some/model", SamplingConfig())
    assert "vllm" not in sys.modules
