"""Packed batches (models/packing.py) against the padded path: same losses, same gradients.

A packed pair is one row [common prefix, chosen suffix, rejected suffix] with a 4D mask; the
padded path runs chosen and rejected as separate right-padded rows. Every number the trainers
use (log-probs, token counts, losses, parameter gradients) must agree to float32 rounding.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import preftune.models.logprobs as logprobs_mod
from preftune.data.collate import collate_pairs, collate_ranked, collate_sft, pad_sequences
from preftune.data.formats import Pair
from preftune.data.tokenize import TruncationConfig, tokenize_pairs
from preftune.models import build_tiny_model, build_tiny_tokenizer
from preftune.models.loading import LoraSettings, apply_lora
from preftune.models.logprobs import CompletionLogProbs, can_pack, completion_logprobs, unwrap_peft
from preftune.models.packing import attention_mask_4d, common_prefix_length, pack_sequences
from preftune.models.tiny import build_tiny_sequence_classifier
from preftune.trainers import reference as ref_lib
from preftune.trainers.dpo import DPOConfig, DPOObjective
from preftune.trainers.kto import KTOConfig, KTOObjective, collate_kto
from preftune.trainers.reward import (
    ListwiseRewardObjective,
    PairwiseRewardObjective,
    RewardModule,
    TieRewardModule,
    TieRewardObjective,
    packed_scores,
)
from preftune.trainers.sft import SFTObjective

PAD = build_tiny_tokenizer().pad_token_id
TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def _seq(tokens, prompt_len):
    mask = [0] * prompt_len + [1] * (len(tokens) - prompt_len)
    mask[0] = 0
    return {"input_ids": list(tokens), "completion_mask": mask}


def _pair_features(seed: int, n: int, *, shared_completion: int = 0, same_length: bool = False):
    """Random pairs: prompts of different lengths; chosen and rejected may share their first
    `shared_completion` completion tokens (the common prefix then extends into the completion)."""
    rng = random.Random(seed)
    feats = []
    for i in range(n):
        # one long prompt first, so that the shorter pairs share rows (padding-free)
        prompt = [1] + [rng.randrange(10, 200) for _ in range(24 if i == 0 else 2 + i)]
        shared = [rng.randrange(10, 200) for _ in range(shared_completion)]
        lc = 5 if same_length else rng.randrange(1, 8)
        lr = 5 if same_length else rng.randrange(1, 8)
        chosen = _seq(prompt + shared + [rng.randrange(10, 200) for _ in range(lc)], len(prompt))
        rejected = _seq(prompt + shared + [rng.randrange(10, 200) for _ in range(lr)], len(prompt))
        feats.append(
            {
                "chosen_input_ids": chosen["input_ids"],
                "chosen_completion_mask": chosen["completion_mask"],
                "rejected_input_ids": rejected["input_ids"],
                "rejected_completion_mask": rejected["completion_mask"],
            }
        )
    return feats


def _grads(model):
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def _compare(run, model, batch):
    """run(batch) -> (loss, values) on the padded and on the packed batch: equal, with grads."""
    assert "packed" in batch
    # the packed path must really run (a silent fallback would compare the padded path twice)
    if hasattr(unwrap_peft(model), "score"):
        assert packed_scores(model, batch["packed"]) is not None
    else:
        assert can_pack(model, batch["packed"])
    padded = {k: v for k, v in batch.items() if k != "packed"}
    results = []
    for b in (padded, batch):
        model.zero_grad(set_to_none=True)
        loss, values = run(b)
        loss.backward()
        results.append((loss.detach(), [v.detach() for v in values], _grads(model)))
    (l0, v0, g0), (l1, v1, g1) = results
    torch.testing.assert_close(l1, l0, **TOL)
    for i, (a, b) in enumerate(zip(v1, v0)):
        torch.testing.assert_close(a, b, equal_nan=True, msg=f"value {i}: {a} vs {b}", **TOL)
    assert g0.keys() == g1.keys() and g0
    for k in g0:
        # Shared prefixes sum a parameter's gradient in another order: compare to its scale.
        scale = float(g0[k].abs().max())
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-5, atol=1e-5 * scale, msg=k)


# --- the layout ---------------------------------------------------------------------------------


def test_pack_sequences_layout_by_hand():
    # pair: chosen 5 6 7 8, rejected 5 6 9; common prefix 5 6 -> row [5 6 | 7 8 | 9]
    seqs = [
        {"input_ids": [5, 6, 7, 8], "completion_mask": [0, 0, 1, 1]},
        {"input_ids": [5, 6, 9], "completion_mask": [0, 1, 1]},
    ]
    p = pack_sequences(seqs, [[0, 1]], pad_id=PAD)
    assert p.input_ids.tolist() == [[5, 6, 7, 8, 9]]
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 2]]
    assert p.branch_ids.tolist() == [[0, 0, 1, 1, 2]]
    # scored: chosen 7 (predicted by 6), 8 (by 7); rejected 6 (by 5), 9 (by 6: the prefix)
    assert p.target_index.tolist() == [2, 3, 1, 4]
    assert p.predict_index.tolist() == [1, 2, 0, 1]
    assert p.seq_index.tolist() == [0, 0, 1, 1]
    assert p.token_offset.tolist() == [2, 3, 1, 2]
    assert p.last_index.tolist() == [3, 4]
    mask = attention_mask_4d(p)[0, 0].int().tolist()
    assert mask == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 0, 0, 1],
    ]  # 9 sees the prefix and itself, not chosen's 7 8


def test_rows_packed_by_first_fit_decreasing_and_padding_attends_only_to_padding():
    seqs = [{"input_ids": [1] * n, "completion_mask": [0] + [1] * (n - 1)} for n in (6, 3, 4, 2)]
    p = pack_sequences(seqs, pad_id=PAD, row_tokens=8)
    # 6 -> row 0; 4 -> row 1; 3 -> row 1 (7 tokens); 2 -> row 0 (8 tokens)
    assert p.input_ids.shape == (2, 8)
    assert p.position_ids[0].tolist() == [0, 1, 2, 3, 4, 5, 0, 1]
    assert p.position_ids[1].tolist() == [0, 1, 2, 3, 0, 1, 2, 0]
    mask = attention_mask_4d(p)[1, 0]
    assert mask[7].tolist() == [False] * 7 + [True]  # the padding token: a group of its own
    additive = attention_mask_4d(p, torch.float32)
    assert additive[1, 0, 7, 0] == torch.finfo(torch.float32).min and additive[1, 0, 7, 7] == 0
    assert common_prefix_length([[1, 2, 3], [1, 2], [1, 2, 4]]) == 2


def test_pack_sequences_refuses_groups_that_miss_a_sequence():
    seqs = [{"input_ids": [1, 2], "completion_mask": [0, 1]}] * 3
    with pytest.raises(ValueError, match="exactly once"):
        pack_sequences(seqs, [[0, 1]], pad_id=PAD)


# --- log-probs ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case",
    [
        "ragged",
        "same_length",
        "prefix_into_completion",
        "one_pair",
        "no_common_prefix",
        "chosen_is_prefix_of_rejected",
    ],
)
def test_completion_logprobs_packed_equal_padded_with_gradients(tokenizer, case):
    model = build_tiny_model(tokenizer, seed=1).train()
    if case == "no_common_prefix":
        feats = _pair_features(0, 3)
        for f in feats:
            f["rejected_input_ids"] = [7] + f["rejected_input_ids"][1:]
    elif case == "chosen_is_prefix_of_rejected":
        feats = _pair_features(0, 2)
        for f in feats:
            f["chosen_input_ids"] = f["rejected_input_ids"][:-2]
            f["chosen_completion_mask"] = f["rejected_completion_mask"][:-2]
            if not any(f["chosen_completion_mask"]):
                f["chosen_completion_mask"][-1] = 1
    else:
        feats = _pair_features(
            0,
            1 if case == "one_pair" else 4,
            shared_completion=3 if case == "prefix_into_completion" else 0,
            same_length=case == "same_length",
        )
    batch = collate_pairs(feats, PAD, pack=True)
    module = CompletionLogProbs(model)
    weights = torch.randn(batch["input_ids"].shape, generator=torch.Generator().manual_seed(0))

    def run(b):
        out = module(
            b["input_ids"],
            b["attention_mask"],
            b["completion_mask"],
            return_entropy=True,
            **({"packed": b["packed"]} if "packed" in b else {}),
        )
        return (out.token_logps * weights).sum(), [
            out.token_logps,
            out.seq_logps,
            out.n_tokens.float(),
            out.entropy,
        ]

    _compare(run, model, batch)


@pytest.mark.parametrize("truncation", ["keep_end", "keep_start"])
def test_packed_equal_padded_after_prompt_truncation(tokenizer, truncation):
    pairs = [
        Pair(
            prompt="one two three four five six seven eight nine ten " * (i + 1),
            chosen=" yes indeed" * (i + 1),
            rejected=" no" * (3 - i),
        )
        for i in range(3)
    ]
    trunc = TruncationConfig(max_length=40, max_prompt_length=16, prompt_truncation=truncation)
    feats, _ = tokenize_pairs(tokenizer, pairs, trunc)
    assert len(feats) == 3
    model = build_tiny_model(tokenizer, seed=2).train()
    module = CompletionLogProbs(model)

    def run(b):
        out = module(
            b["input_ids"],
            b["attention_mask"],
            b["completion_mask"],
            **({"packed": b["packed"]} if "packed" in b else {}),
        )
        return out.seq_logps.sum(), [out.seq_logps]

    _compare(run, model, collate_pairs(feats, PAD, pack=True))


def test_several_pairs_per_row_and_other_architectures(tokenizer):
    """Padding-free rows (several groups per row), with Mistral, Qwen2 and eager attention."""
    feats = _pair_features(3, 5, shared_completion=2)
    seqs = [
        {"input_ids": f[f"{s}_input_ids"], "completion_mask": f[f"{s}_completion_mask"]}
        for s in ("chosen", "rejected")
        for f in feats
    ]
    batch = pad_sequences(seqs, PAD)
    batch["packed"] = pack_sequences(
        seqs, [[i, 5 + i] for i in range(5)], pad_id=PAD, row_tokens=64
    )
    assert batch["packed"].input_ids.shape[0] < 5
    small = dict(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=PAD,
    )
    torch.manual_seed(0)
    models = {
        "llama-eager": build_tiny_model(tokenizer, seed=3),
        "mistral": MistralForCausalLM(MistralConfig(**small, sliding_window=None)),
        "qwen2": Qwen2ForCausalLM(Qwen2Config(**small)),
    }
    models["llama-eager"].set_attn_implementation("eager")
    for name, model in models.items():
        model.float().train()
        assert can_pack(model, batch["packed"]), name
        module = CompletionLogProbs(model)

        def run(b):
            out = module(
                b["input_ids"],
                b["attention_mask"],
                b["completion_mask"],
                **({"packed": b["packed"]} if "packed" in b else {}),
            )
            return out.seq_logps.sum(), [out.seq_logps]

        _compare(run, model, batch)


def test_unsupported_models_take_the_padded_path(tokenizer, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the packed path ran for an unsupported model")

    monkeypatch.setattr(logprobs_mod, "packed_completion_logprobs", refuse)
    batch = collate_pairs(_pair_features(0, 2), PAD, pack=True)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=32, n_layer=1, n_head=2))
    windowed = MistralForCausalLM(
        MistralConfig(
            vocab_size=300,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            sliding_window=4,
        )
    )
    capped = build_tiny_model(tokenizer)
    capped.config.final_logit_softcapping = 30.0  # logits post-processed: the head is not ours
    for model in (gpt2, windowed, capped):
        model.eval()  # no dropout: the two calls below must agree exactly
        assert not can_pack(model, batch["packed"])
        out = completion_logprobs(
            model,
            batch["input_ids"],
            batch["attention_mask"],
            batch["completion_mask"],
            packed=batch["packed"],
        )
        plain = completion_logprobs(
            model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
        )
        torch.testing.assert_close(out.seq_logps, plain.seq_logps, rtol=0, atol=0)
    assert "packed" not in collate_pairs(_pair_features(0, 2), PAD)  # --packing off


# --- DPO ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["dpo", "ipo", "simpo", "orpo"])
def test_dpo_objective_packed_equal_padded(tokenizer, loss):
    policy = build_tiny_model(tokenizer, seed=4).train()
    reference = None
    if loss in ("dpo", "ipo"):
        reference = ref_lib.Reference(model=CompletionLogProbs(build_tiny_model(tokenizer, seed=5)))
    cfg = DPOConfig(model="tiny", loss=loss, beta=0.3, sft_weight=0.5 if loss == "dpo" else 0.0)
    objective = DPOObjective(cfg, reference)
    module = CompletionLogProbs(policy)
    batch = collate_pairs(_pair_features(5, 3, shared_completion=1), PAD, pack=True)
    assert batch["packed"].input_ids.shape[0] < 3  # two pairs share a row

    def run(b):
        loss_sum, metrics = objective(module, b)
        return loss_sum, [metrics[k] for k in sorted(metrics)]

    _compare(run, policy, batch)


def test_dpo_with_lora_reference_and_precomputed_reference(tokenizer):
    policy = apply_lora(build_tiny_model(tokenizer, seed=6), LoraSettings(r=4, alpha=8))
    with torch.no_grad():  # adapters that change the outputs, so policy != reference
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    policy.train()
    reference = ref_lib.Reference(policy=policy)
    cfg = DPOConfig(model="tiny", loss="dpo", lora=True)
    module = CompletionLogProbs(policy)
    feats = _pair_features(6, 4, shared_completion=2)
    batch = collate_pairs(feats, PAD, pack=True)

    def run(b):
        loss_sum, metrics = DPOObjective(cfg, reference)(module, b)
        return loss_sum, [metrics["rewards/chosen"], metrics["rewards/rejected"]]

    _compare(run, policy, batch)

    # precomputed: sequence_logps over pairs, packed or padded, equals the per-row forward
    engine = SimpleNamespace(world_size=1, rank=0, accelerator=SimpleNamespace(device="cpu"))
    seqs = [
        {"input_ids": f["chosen_input_ids"], "completion_mask": f["chosen_completion_mask"]}
        for f in feats
    ] + [
        {"input_ids": f["rejected_input_ids"], "completion_mask": f["rejected_completion_mask"]}
        for f in feats
    ]

    def score(*b, **kw):
        return reference(module, *b, **kw).seq_logps

    groups = [[i, 4 + i] for i in range(4)]
    plain = ref_lib.sequence_logps(engine, score, seqs, PAD, 4)
    for pack in (False, True):
        got = ref_lib.sequence_logps(engine, score, seqs, PAD, 4, groups=groups, pack=pack)
        torch.testing.assert_close(got, plain, **TOL)
    b = pad_sequences(seqs, PAD)
    direct = score(b["input_ids"], b["attention_mask"], b["completion_mask"])
    torch.testing.assert_close(plain, direct, **TOL)


# --- reward model -------------------------------------------------------------------------------


def _classifier(tokenizer, seed):
    return build_tiny_sequence_classifier(tokenizer, seed=seed).train()


def test_pairwise_and_tie_reward_packed_equal_padded(tokenizer):
    feats = _pair_features(7, 4, shared_completion=2)
    feats[0]["chosen_input_ids"][-1] = PAD  # a sequence ending in pad: read at the token before
    batch = collate_pairs(feats, PAD, pack=True)
    batch["margin"] = torch.tensor([0.5, 0.0, 1.0, -0.2])
    model = _classifier(tokenizer, 8)
    module = RewardModule(model)
    objective = PairwiseRewardObjective(center_coef=0.01)

    def run(b):
        loss_sum, metrics = objective(module, b)
        return loss_sum, [metrics[k] for k in sorted(metrics)]

    _compare(run, model, batch)

    tie_module = TieRewardModule(model, "rao-kupper", scale=1.0)
    batch["tie"] = torch.tensor([True, False, False, True])
    tie_objective = TieRewardObjective(tie_model="rao-kupper")

    def run_tie(b):
        loss_sum, metrics = tie_objective(tie_module, b)
        return loss_sum, [metrics[k] for k in sorted(metrics)]

    _compare(run_tie, model, batch)


def test_listwise_reward_and_lora_classifier_packed_equal_padded(tokenizer):
    rng = random.Random(9)
    features = []
    for k in (3, 2, 4):
        prompt = [1] + [rng.randrange(10, 200) for _ in range(rng.randrange(3, 9))]
        features.append(
            {
                "sequences": [
                    _seq(
                        prompt + [rng.randrange(10, 200) for _ in range(rng.randrange(1, 6))],
                        len(prompt),
                    )
                    for _ in range(k)
                ],
                "scores": [rng.random() for _ in range(k)],
            }
        )
    batch = collate_ranked(features, PAD, pack=True)
    model = apply_lora(_classifier(tokenizer, 10), LoraSettings(r=4, alpha=8), task_type="SEQ_CLS")
    model.train()
    module = RewardModule(model)
    objective = ListwiseRewardObjective(loss="plackett-luce")

    def run(b):
        loss_sum, metrics = objective(module, b)
        return loss_sum, [metrics[k] for k in sorted(metrics)]

    _compare(run, model, batch)


# --- SFT and KTO: padding-free rows -------------------------------------------------------------


def _ragged_sequences(seed: int, lengths: list[int]) -> list[dict]:
    rng = random.Random(seed)
    return [
        _seq([1] + [rng.randrange(10, 200) for _ in range(n - 1)], max(1, n // 3)) for n in lengths
    ]


def test_sft_objective_padding_free_equal_padded(tokenizer):
    seqs = _ragged_sequences(11, [17, 4, 9, 12, 6, 3])
    batch = collate_sft(seqs, PAD, pack=True)
    # no packed row is longer than the longest sequence, and there are fewer rows
    assert batch["packed"].input_ids.shape[1] == 17 and batch["packed"].input_ids.shape[0] < 6
    model = build_tiny_model(tokenizer, seed=12).train()
    module = CompletionLogProbs(model)

    def run(b):
        loss_sum, metrics = SFTObjective()(module, b)
        return loss_sum, [metrics["nll/per_token"]]

    _compare(run, model, batch)
    # equal lengths: nothing to save, so no packed layout (the padded rows' causal mask runs)
    assert "packed" not in collate_sft(_ragged_sequences(11, [9, 9, 9]), PAD, pack=True)


def test_kto_objective_packed_equal_padded(tokenizer):
    rng = random.Random(13)
    features = []
    for i in range(5):
        # one long example first, so that the short ones share rows
        prompt = [1] + [
            rng.randrange(10, 200) for _ in range(20 if i == 0 else rng.randrange(2, 9))
        ]
        completion = [rng.randrange(10, 200) for _ in range(rng.randrange(1, 8))]
        seq = _seq(prompt + completion, len(prompt))
        features.append({**seq, "prompt_length": len(prompt), "label": i % 2 == 0})
    batch = collate_kto(features, PAD, max_length=32, pack=True)
    policy = build_tiny_model(tokenizer, seed=14).train()
    reference = ref_lib.Reference(model=CompletionLogProbs(build_tiny_model(tokenizer, seed=15)))
    engine = SimpleNamespace(global_sum=lambda v: float(torch.as_tensor(v).sum()))
    objective = KTOObjective(KTOConfig(model="tiny", beta=0.2), engine, reference)
    module = CompletionLogProbs(policy)
    keys = [k for k in batch if k.endswith("packed")]
    assert sorted(keys) == ["kl_packed", "packed", "ref_packed"]

    def run(b):
        if "packed" not in b:  # the padded path: drop every packed layout and the joint rows
            b = {
                k: v for k, v in b.items() if not k.endswith("packed") and not k.startswith("ref_")
            }
        loss_sum, metrics = objective(module, b)
        return loss_sum, [metrics[k] for k in sorted(metrics)]

    _compare(run, policy, batch)
