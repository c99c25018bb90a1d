"""Speed-ups that must not change a number: each is compared with the straightforward path.

- the chunked log-prob head (models/logprobs.py) against log_softmax over full logits;
- `--mixed-precision auto` on the CPU (engine._resolve_mixed_precision);
- the sampler's fast paths (generation/sampling.py) against the plain loop, same seed.
"""

import pytest
import torch
from torch import nn

import preftune.engine.engine as engine_mod
import preftune.models.logprobs as logprobs_mod
from preftune.models import build_tiny_model, build_tiny_tokenizer, completion_logprobs
from preftune.models.logprobs import token_logps_from_hidden


def _reference_logps(head, hidden, targets, temperature):
    """The textbook computation, written out here: log_softmax(h W^T + b / T)[target]."""
    logits = (hidden @ head.weight.t() + (head.bias if head.bias is not None else 0)).float()
    logps = torch.log_softmax(logits / temperature, dim=-1)
    entropy = -(logps.exp() * logps).sum(-1)
    return logps.gather(-1, targets[:, None]).squeeze(-1), entropy


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_head_matches_full_log_softmax_values_and_gradients(monkeypatch, bias, temperature):
    monkeypatch.setattr(logprobs_mod, "HEAD_CHUNK_ROWS", 4)  # 11 rows: chunks of 4, 4 and 3
    torch.manual_seed(0)
    head = nn.Linear(16, 50, bias=bias).double()
    hidden = torch.randn(11, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (11,))
    weights = torch.randn(11, dtype=torch.float64)  # an arbitrary upstream gradient per token

    picked, entropy = token_logps_from_hidden(
        head, hidden, targets, temperature=temperature, return_entropy=True, chunked=True
    )
    (picked * weights).sum().backward()
    grads = [hidden.grad.clone(), head.weight.grad.clone()] + (
        [head.bias.grad.clone()] if bias else []
    )
    hidden.grad = None
    head.zero_grad()

    want, want_entropy = _reference_logps(head, hidden, targets, temperature)
    (want * weights).sum().backward()
    want_grads = [hidden.grad, head.weight.grad] + ([head.bias.grad] if bias else [])

    # float32 log-softmax on both sides: equal to float32 rounding
    torch.testing.assert_close(picked.double(), want.float().double(), rtol=0, atol=1e-5)
    torch.testing.assert_close(entropy.double(), want_entropy.float().double(), rtol=0, atol=1e-5)
    assert not entropy.requires_grad  # a metric: no gradient through the chunked entropy
    for got, exp in zip(grads, want_grads):
        torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-6)


def test_chunked_head_under_bf16_autocast_matches_autocast_head():
    torch.manual_seed(1)
    head = nn.Linear(32, 64, bias=False)
    hidden = torch.randn(9, 32, requires_grad=True)
    targets = torch.randint(0, 64, (9,))
    out = {}
    for chunked in (True, False):
        hidden.grad = None
        head.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            picked, _ = token_logps_from_hidden(head, hidden, targets, chunked=chunked)
        assert picked.dtype == torch.float32
        picked.sum().backward()
        out[chunked] = (picked.detach(), hidden.grad.clone(), head.weight.grad.clone())
    # both multiply in bf16 and take the log-softmax in float32: the same numbers up to the
    # rounding of bf16 gradient accumulation
    torch.testing.assert_close(out[True][0], out[False][0], rtol=0, atol=1e-5)
    torch.testing.assert_close(out[True][1], out[False][1], rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(out[True][2], out[False][2], rtol=2e-2, atol=2e-3)


def test_completion_logprobs_chunked_equals_straightforward_on_a_model(monkeypatch):
    monkeypatch.setattr(logprobs_mod, "HEAD_CHUNK_ROWS", 7)
    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok, hidden_size=32, num_layers=1, seed=3).train()
    ids = torch.randint(0, 256, (3, 12))
    attn = torch.ones_like(ids)
    attn[2, 9:] = 0  # a right-padded row
    cmask = torch.zeros_like(ids)
    cmask[:, 5:] = 1
    results = {}
    for chunked in (True, False):
        model.zero_grad()
        out = completion_logprobs(
            model, ids, attn, cmask, temperature=0.9, return_entropy=True, chunked_head=chunked
        )
        (out.seq_logps * torch.tensor([1.0, -2.0, 0.5])).sum().backward()
        results[chunked] = (out, {n: p.grad.clone() for n, p in model.named_parameters()})
    (a, ga), (b, gb) = results[True], results[False]
    torch.testing.assert_close(a.token_logps, b.token_logps, rtol=0, atol=1e-5)
    torch.testing.assert_close(a.entropy, b.entropy.detach(), rtol=0, atol=1e-5)
    assert torch.equal(a.n_tokens, b.n_tokens) and a.n_tokens.tolist() == [7, 7, 4]
    assert set(ga) == set(gb)
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=1e-4, atol=1e-6, msg=name)


def test_chunked_head_is_the_default_under_no_grad_and_for_large_logits(monkeypatch):
    calls = []
    original = logprobs_mod._ChunkedTokenLogProb.apply
    monkeypatch.setattr(
        logprobs_mod._ChunkedTokenLogProb, "apply", lambda *a: calls.append(1) or original(*a)
    )
    head = nn.Linear(8, 10)
    hidden, targets = torch.randn(4, 8), torch.randint(0, 10, (4,))
    token_logps_from_hidden(head, hidden, targets)  # grad enabled, 40 logits: straightforward
    assert calls == []
    with torch.no_grad():
        token_logps_from_hidden(head, hidden, targets)
    assert calls == [1]
    monkeypatch.setattr(logprobs_mod, "CHUNKED_HEAD_MIN_ELEMENTS", 40)
    token_logps_from_hidden(head, hidden, targets)
    assert calls == [1, 1]


# ---------------------------------------------------------------- --mixed-precision auto


def test_mixed_precision_auto_on_the_cpu(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("CUDA machine: auto follows the GPU")
    resolve = engine_mod._resolve_mixed_precision
    monkeypatch.setattr(engine_mod, "_has_accelerator_device", lambda: False)
    probes = []
    monkeypatch.setattr(engine_mod, "_bf16_speedup_on_cpu", lambda: probes.append(1) or speedup)
    monkeypatch.setattr(engine_mod, "_cpu_has_native_bf16", lambda: False)
    cached = engine_mod._cpu_auto_precision
    try:
        speedup = 5.0
        cached.cache_clear()
        assert resolve("auto") == "no" and probes == []  # no native bf16: never probed
        monkeypatch.setattr(engine_mod, "_cpu_has_native_bf16", lambda: True)
        cached.cache_clear()
        assert resolve("auto") == "bf16"  # native and measured faster
        speedup = 1.1
        assert resolve("auto") == "bf16"  # measured once per process: the state cannot change
        cached.cache_clear()
        assert resolve("auto") == "no"  # native but not measured faster (this CPU: about 0.5x)
        assert resolve("no") == "no" and resolve("bf16") == "bf16" and resolve("fp16") == "fp16"
        assert len(probes) == 2
    finally:
        cached.cache_clear()  # later tests measure this machine again


def test_bf16_probe_measures_a_positive_ratio():
    assert engine_mod._bf16_speedup_on_cpu(size=64, repeats=1) > 0
    # this CPU (avx512_bf16, no AMX) runs bf16 about 2x slower than fp32: if it has native bf16,
    # auto stays fp32 here


# ---------------------------------------------------------------- the sampler


def _sampling_lm(num_kv_heads):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=num_kv_heads,
        intermediate_size=64,
        vocab_size=120,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    model = LlamaForCausalLM(cfg)
    # Twelve EOS ids (10% of the vocabulary): rows finish at different steps, so the fast loop
    # drops finished rows from its batch mid-generation.
    model.generation_config.eos_token_id = list(range(2, 14))
    return model


@pytest.mark.parametrize("num_kv_heads", [4, 2])  # multi-head and grouped-query attention
@pytest.mark.parametrize(
    "settings", [{}, {"temperature": 0.7, "top_k": 40, "top_p": 0.9}, {"stop_at_eos": False}]
)
def test_fast_sampler_draws_the_same_sequences_as_the_plain_loop(
    monkeypatch, num_kv_heads, settings
):
    import preftune.generation.sampling as sampling_mod
    from preftune.generation import SamplingConfig, generate

    model = _sampling_lm(num_kv_heads)
    assert sampling_mod._FastDecoder.supports(model)
    prompts = [[1, 5, 6], [1, 7, 8, 9, 10, 11], [1, 20]]  # different lengths: left padding
    cfg = SamplingConfig(max_new_tokens=24, **settings)
    calls, prefilled = [], []
    monkeypatch.setattr(
        sampling_mod._FastDecoder,
        "keep_rows",
        lambda self, keep, f=sampling_mod._FastDecoder.keep_rows: (
            calls.append(int(keep.sum())) or f(self, keep)
        ),
    )
    monkeypatch.setattr(
        sampling_mod._FastDecoder,
        "prefill",
        lambda self, ids, *a, f=sampling_mod._FastDecoder.prefill: (
            prefilled.append(ids.shape[0]) or f(self, ids, *a)
        ),
    )
    rollouts, logits, filtered_probs = {}, {}, sampling_mod._filtered_probs
    for fast in (True, False):
        monkeypatch.setattr(sampling_mod, "FAST_DECODE", fast)
        seen = logits[fast] = []
        monkeypatch.setattr(
            sampling_mod,
            "_filtered_probs",
            lambda x, s, seen=seen: seen.append(x.clone()) or filtered_probs(x, s),
        )
        rollouts[fast] = generate(
            model,
            None,
            prompts,
            cfg,
            num_samples=3,
            batch_size=4,
            generator=torch.Generator().manual_seed(7),
        )
    fast, plain = rollouts[True], rollouts[False]
    assert fast.completion_ids == plain.completion_ids
    assert fast.finished == plain.finished
    # Group prefill: chunks of 4 rows [p0 p0 p0 p1] [p1 p1 p2 p2] [p2] run 2, 2 and 1 prompts.
    assert prefilled == [2, 2, 1]
    # The first logits of each chunk come from the group prefill, the rest from decode steps:
    # the plain loop's logits (compared while no row of the chunk has left the fast batch).
    assert len(logits[True]) == len(logits[False])
    same_rows = [(a, b) for a, b in zip(logits[True], logits[False]) if a.shape == b.shape]
    assert len(same_rows) >= 3
    for a, b in same_rows:
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    if cfg.stop_at_eos:  # the test exercises the shrinking batch
        assert calls and len(set(fast.completion_lengths)) > 2 and any(fast.finished)
    else:
        assert calls == [] and fast.completion_lengths == [24] * 9
    # Group prefill against per-row prefill within the fast decoder: the same sequences.
    monkeypatch.setattr(sampling_mod, "FAST_DECODE", True)
    monkeypatch.setattr(sampling_mod, "GROUP_PREFILL", False)
    per_row = generate(
        model,
        None,
        prompts,
        cfg,
        num_samples=3,
        batch_size=4,
        generator=torch.Generator().manual_seed(7),
    )
    assert prefilled[3:] == [4, 4, 1]
    assert per_row.completion_ids == fast.completion_ids and per_row.finished == fast.finished


def test_fast_sampler_only_for_architectures_it_knows():
    from transformers import GPT2Config, GPT2LMHeadModel

    import preftune.generation.sampling as sampling_mod

    gpt2 = GPT2LMHeadModel(
        GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50, n_positions=32)
    )
    assert not sampling_mod._FastDecoder.supports(gpt2)  # falls back to the model's own forward


@pytest.mark.parametrize("command", ["rloo", "grpo"])
def test_old_logps_from_the_update_forward_equal_a_separate_forward(tmp_path, monkeypatch, command):
    """One pass over each rollout: π_old taken from the update's own forward (RLOO: run before
    the advantages, which need it) gives the losses, gradients and metrics of the separate
    no-grad π_old forward."""
    import json

    import preftune.trainers.policy_gradient as pg_mod
    from preftune.cli import main

    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Question {i}: say"}) + "\n" for i in range(8)))
    reward = "tests/rewards_for_tests.py:lowercase_fraction"
    seen: dict[bool, dict[str, list]] = {}
    original_backward, original_step = engine_mod.Engine.backward, engine_mod.Engine.optimizer_step
    original_forward = logprobs_mod.CompletionLogProbs.forward
    for reuse in (True, False):
        rec = seen[reuse] = {"loss": [], "grads": [], "forwards": 0}

        def backward(self, loss_sum, units, rec=rec):
            rec["loss"].append(loss_sum.detach().clone())
            return original_backward(self, loss_sum, units)

        def step(self, rec=rec):
            rec["grads"].append(
                [p.grad.clone() for p in self.model.parameters() if p.grad is not None]
            )
            return original_step(self)

        def count(self, *args, rec=rec, **kwargs):
            rec["forwards"] += 1
            return original_forward(self, *args, **kwargs)

        monkeypatch.setattr(pg_mod, "REUSE_CURRENT", reuse)
        monkeypatch.setattr(engine_mod.Engine, "backward", backward)
        monkeypatch.setattr(engine_mod.Engine, "optimizer_step", step)
        monkeypatch.setattr(logprobs_mod.CompletionLogProbs, "forward", count)
        out = tmp_path / f"run-{reuse}"
        assert (
            main(
                [
                    command,
                    "--model",
                    "tiny",
                    "--data",
                    str(data),
                    "--output-dir",
                    str(out),
                    "--reward-fn",
                    reward,
                    "--max-steps",
                    "2",
                    "--max-new-tokens",
                    "12",
                    "--max-length",
                    "96",
                    "--prompts-per-step",
                    "4",
                    "--num-generations",
                    "2",
                    "--batch-size",
                    "8",
                    "--kl-coef",
                    "0.1",
                    "--lr",
                    "2e-3",
                    "--save-steps",
                    "0",
                    "--lr-scheduler",
                    "constant",
                ]
            )
            == 0
        )
        rec["metrics"] = [
            json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
        ]
    reused, separate = seen[True], seen[False]
    # 2 rollouts: reference + update forward each, plus π_old's separate forward without reuse
    assert (reused["forwards"], separate["forwards"]) == (4, 6)
    assert len(reused["loss"]) == len(separate["loss"]) == 2
    for a, b in zip(reused["loss"], separate["loss"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for ga, gb in zip(reused["grads"], separate["grads"]):
        assert len(ga) == len(gb) > 0
        # The separate no-grad forward (chunked head) matches the update's log-probs to ~1e-7;
        # RLOO's KL-penalised reward and the whitened advantages carry that into the gradient.
        for a, b in zip(ga, gb):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3 * float(b.abs().max()))
    for ma, mb in zip(reused["metrics"], separate["metrics"]):
        for key in ("loss/policy", "reward/mean", "kl/k1", "kl/k3", "entropy", "grad_norm"):
            assert ma[key] == pytest.approx(mb[key], rel=1e-4, abs=1e-6), key
        if command == "rloo":
            assert ma["reward/penalised"] == pytest.approx(
                mb["reward/penalised"], rel=1e-4, abs=1e-6
            )


@pytest.mark.parametrize(
    "command,extra",
    [
        (
            "grpo",
            [
                "--kl-coef",
                "0.1",
                "--ppo-epochs",
                "2",
                "--num-minibatches",
                "2",
                "--batch-size",
                "3",
            ],
        ),  # groups split across micro-batches
        ("rloo", ["--kl-coef", "0.1", "--batch-size", "8"]),
        ("online-dpo", ["--batch-size", "1"]),
    ],
)
def test_packed_prompt_groups_equal_padded_rows(tmp_path, monkeypatch, command, extra):
    """GRPO/RLOO/online DPO with the completions of a prompt packed into one row sharing the
    prompt (reference, π_old and update forwards) give the padded rows' losses, gradients and
    metrics."""
    import json

    from preftune.cli import main

    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Question {i}: say"}) + "\n" for i in range(8)))
    seen: dict[str, dict[str, list]] = {}
    original_backward, original_step = engine_mod.Engine.backward, engine_mod.Engine.optimizer_step
    original_packed = logprobs_mod.packed_completion_logprobs
    for packing in ("auto", "off"):
        rec = seen[packing] = {"loss": [], "grads": [], "packed": 0}

        def backward(self, loss_sum, units, rec=rec):
            rec["loss"].append(loss_sum.detach().clone())
            return original_backward(self, loss_sum, units)

        def step(self, rec=rec):
            rec["grads"].append(
                [p.grad.clone() for p in self.model.parameters() if p.grad is not None]
            )
            return original_step(self)

        def packed(*args, rec=rec, **kwargs):
            rec["packed"] += 1
            return original_packed(*args, **kwargs)

        monkeypatch.setattr(engine_mod.Engine, "backward", backward)
        monkeypatch.setattr(engine_mod.Engine, "optimizer_step", step)
        monkeypatch.setattr(logprobs_mod, "packed_completion_logprobs", packed)
        out = tmp_path / f"run-{packing}"
        assert (
            main(
                [
                    command,
                    "--model",
                    "tiny",
                    "--data",
                    str(data),
                    "--output-dir",
                    str(out),
                    "--reward-fn",
                    "tests/rewards_for_tests.py:lowercase_fraction",
                    "--max-steps",
                    "2",
                    "--max-new-tokens",
                    "12",
                    "--max-length",
                    "96",
                    "--prompts-per-step",
                    "4",
                    "--num-generations",
                    "2",
                    "--lr",
                    "2e-3",
                    "--save-steps",
                    "0",
                    "--lr-scheduler",
                    "constant",
                    "--packing",
                    packing,
                ]
                + extra
            )
            == 0
        )
        rec["metrics"] = [
            json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
        ]
    packed_run, padded = seen["auto"], seen["off"]
    assert packed_run["packed"] > 0 and padded["packed"] == 0
    assert len(packed_run["loss"]) == len(padded["loss"]) > 0
    for a, b in zip(packed_run["loss"], padded["loss"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert len(packed_run["grads"]) == len(padded["grads"]) > 0
    for ga, gb in zip(packed_run["grads"], padded["grads"]):
        assert len(ga) == len(gb) > 0
        # Float rounding (~1e-7 in log-probs) reaches RLOO's gradient through the KL-penalised
        # reward and the whitened advantages: compared to 1e-3 of the largest gradient entry.
        tol = 1e-3 if command == "rloo" else 1e-4
        for a, b in zip(ga, gb):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol * float(b.abs().max()))
    for ma, mb in zip(packed_run["metrics"], padded["metrics"]):
        for key in ("loss/policy", "reward/mean", "kl/k1", "kl/k3", "entropy", "grad_norm"):
            assert ma[key] == pytest.approx(mb[key], rel=1e-4, abs=1e-6), key


def test_pack_groups_puts_each_prompts_completions_in_one_row():
    from preftune.trainers.rollout import pack_groups

    prompt_a, prompt_b = [1, 5, 6, 7], [1, 9]
    rows = [prompt_a + [20, 21], prompt_a + [22], prompt_b + [23, 24, 25], prompt_b + [26]]
    width = max(map(len, rows))
    batch = {
        "input_ids": torch.tensor([r + [0] * (width - len(r)) for r in rows]),
        "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
        "completion_mask": torch.tensor(
            [
                [0] * (len(r) - c) + [1] * c + [0] * (width - len(r))
                for r, c in zip(rows, [2, 1, 3, 1])
            ]
        ),
    }
    packed = pack_groups(batch, num_generations=2, pad_id=0)
    assert packed.input_ids.shape == (2, 4 + 2 + 1)  # [prompt_a, 20 21, 22]; prompt_b's row padded
    assert packed.input_ids[0].tolist() == prompt_a + [20, 21, 22]
    # A micro-batch of rollout rows 3, 0, 2 (batch rows in that order): prompt_b's two share.
    sub = {k: v[[3, 0, 2]] for k, v in batch.items()}
    packed = pack_groups(sub, num_generations=2, pad_id=0, rows=torch.tensor([3, 0, 2]))
    assert packed.input_ids.shape[0] == 2 and packed.num_sequences == 3
