"""The one reference builder and the one tokenizer check; settings other commands have and an
online command does not (no flag; a YAML key is refused with the reason)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from preftune.cli import build_parser, main
from preftune.errors import PreftuneError
from preftune.models import build_tiny_tokenizer, load_causal_lm
from preftune.models.loading import apply_lora, check_same_tokenizer
from preftune.models.logprobs import CompletionLogProbs
from preftune.trainers.common import lora_settings
from preftune.trainers.online_dpo import OnlineDPOConfig
from preftune.trainers.reference import Reference, build_reference


def test_same_tokenizer_passes_and_each_difference_is_named():
    check_same_tokenizer(build_tiny_tokenizer(), build_tiny_tokenizer(), "ref_model 'x'")
    other = build_tiny_tokenizer()
    other.chat_template = "{{ messages }}"
    with pytest.raises(PreftuneError, match=r"ref_model 'x'.*chat template"):
        check_same_tokenizer(build_tiny_tokenizer(), other, "ref_model 'x'")
    other = build_tiny_tokenizer()
    other.add_tokens(["<|extra|>"])
    with pytest.raises(PreftuneError, match="vocabulary sizes"):
        check_same_tokenizer(build_tiny_tokenizer(), other, "value_model 'v'")
    other = build_tiny_tokenizer()
    other.eos_token = other.bos_token
    with pytest.raises(PreftuneError, match="eos_token_id"):
        check_same_tokenizer(build_tiny_tokenizer(), other, "ref_model 'x'")


class _Engine:
    def prepare_frozen(self, model):
        model.requires_grad_(False)
        return model.eval()


def _cfg(**kw):
    base = dict(
        model="tiny",
        ref_model="",
        lora=False,
        dtype="auto",
        seed=0,
        chat_template="",
        lora_r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        lora_target_modules="all-linear",
    )
    return SimpleNamespace(**{**base, **kw})


def _batch():
    ids = torch.tensor([[256, 72, 105, 33, 257], [256, 79, 107, 257, 258]])
    attn = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    cmask = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 1, 1, 0]])
    return ids, attn, cmask


def test_reference_sources():
    policy, tokenizer = load_causal_lm("tiny", seed=0)
    ids, attn, cmask = _batch()
    expected = CompletionLogProbs(policy)(ids, attn, cmask).token_logps.detach()

    # Default: a frozen copy of the initial policy, a separate object without gradients.
    ref = build_reference(_cfg(), _Engine(), policy, tokenizer)
    assert ref.kind == "model" and ref.model.policy is not policy
    out = ref(None, ids, attn, cmask)
    torch.testing.assert_close(out.token_logps, expected)
    assert not out.token_logps.requires_grad
    with torch.no_grad():  # training the policy leaves the copy where it was
        next(policy.parameters()).add_(1.0)
    torch.testing.assert_close(ref(None, ids, attn, cmask).token_logps, expected)

    # LoRA: the policy itself with its adapters disabled, even after the adapters moved.
    policy, tokenizer = load_causal_lm("tiny", seed=0)
    peft_model = apply_lora(policy, lora_settings(_cfg(lora=True)), task_type="CAUSAL_LM")
    ref = build_reference(_cfg(lora=True), _Engine(), peft_model, tokenizer)
    assert ref.kind == "adapters" and ref.model is None
    forward = CompletionLogProbs(peft_model)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.add_(0.5)
    assert not torch.allclose(forward(ids, attn, cmask).token_logps, expected)
    peft_model.train()
    torch.testing.assert_close(ref(forward, ids, attn, cmask).token_logps, expected)
    assert peft_model.training  # the train/eval mode is restored


def test_reference_with_another_tokenizer_is_refused(tmp_path):
    model, tok = load_causal_lm("tiny", seed=0)
    model.save_pretrained(tmp_path / "ref")
    tok.chat_template = "{{ messages }}"
    tok.save_pretrained(tmp_path / "ref")
    policy, tokenizer = load_causal_lm("tiny", seed=0)
    with pytest.raises(PreftuneError, match="ref_model .*chat template"):
        build_reference(_cfg(ref_model=str(tmp_path / "ref")), _Engine(), policy, tokenizer)
    with pytest.raises(ValueError):
        Reference()


def test_settings_a_command_cannot_use_have_no_flag_and_are_refused(tmp_path, capsys):
    parser, _, _ = build_parser("online-dpo")
    shown = parser.format_help()
    for flag in ("--grad-accum", "--eval-data", "--eval-fraction", "--eval-steps", "--kl-coef"):
        assert flag not in shown
    assert "--beta" in shown and "--max-new-tokens" in shown
    config = tmp_path / "c.yaml"
    config.write_text("eval_fraction: 0.1\n")
    assert (
        main(
            [
                "online-dpo",
                "--config",
                str(config),
                "--reward-fn",
                "x.py:f",
                "--output-dir",
                str(tmp_path / "run"),
            ]
        )
        == 2
    )
    assert (
        "eval_fraction=0.1: online trainers have no held-out evaluation" in capsys.readouterr().err
    )
    with pytest.raises(SystemExit):  # online DPO's strength is --beta: no --kl-coef at all
        main(["online-dpo", "--kl-coef", "0.1", "--reward-fn", "x.py:f"])
    assert not hasattr(OnlineDPOConfig(), "kl_coef")
