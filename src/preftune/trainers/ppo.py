"""`preftune ppo`: actor-critic PPO for RLHF (Ziegler et al. 2019; Ouyang et al. 2022; Huang et
al. 2024, "The N+ Implementation Details of RLHF with PPO").

Per training iteration, three phases:
1. rollout: completions from the current policy, scored by the reward source; π_old, V_old
   and π_ref of every completion token;
2. advantages: per-token rewards r_t = −β·KL_t (k1 by default, Ziegler et al. 2019, Eq. 2)
   plus the score on the last token; GAE(γ, λ) over the completion (Schulman et al. 2016,
   Eq. 16) against V_old; advantages whitened over the rollout;
3. updates: `ppo_epochs` passes over `num_minibatches` minibatches: clipped surrogate
   (Schulman et al. 2017, Eq. 7) + vf_coef × clipped value loss (Huang et al. 2024), and with
   `--kl-penalty loss` the KL as a loss term (k3 recommended) instead of inside the reward.

The value model is a *separate* network: a sequence classifier with a scalar head read at
every token (V(s_t) is the head on the hidden state that predicts token t), initialised from
the policy's weights, or from `--value-model` (e.g. the reward model, as Ouyang et al. 2022 and
Huang et al. 2024 do). Why not a value head on the policy: a shared trunk lets the value loss's
gradients move the policy (and needs vf_coef tuned against the policy loss); the RLHF papers
above use separate critics. The cost is a second model's memory, which LoRA (applied to both)
makes small. Both models sit in one `nn.Module`, so one optimizer, one DDP wrapper and one
checkpoint hold them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from preftune.config import arg
from preftune.engine.engine import Engine
from preftune.engine.loop import MetricWindow
from preftune.errors import PreftuneError
from preftune.losses.rl import (
    AGGREGATION_MODES,
    KL_ESTIMATORS,
    gae,
    kl_penalty,
    ppo_policy_loss,
    ppo_value_loss,
    whiten,
)
from preftune.models.loading import apply_lora, check_same_tokenizer, load_sequence_classifier
from preftune.models.logprobs import completion_logprobs
from preftune.trainers import online
from preftune.trainers.common import lora_settings, prepare_tokenizer
from preftune.trainers.reference import build_reference
from preftune.trainers.rollout import collect_rollout, make_generator_backend
from preftune.trainers.updates import (
    ClippedUpdateSettings,
    KLSettings,
    add_clipped_update_metrics,
    aggregate_loss,
    loss_units,
    minibatches,
    token_mean,
)


@dataclass
class PPOConfig(ClippedUpdateSettings, KLSettings, online.OnlineConfig):
    value_model: str = arg(
        "",
        "Initial weights of the value model (a causal LM or a reward "
        "model folder sharing the policy's tokenizer); default: the "
        "policy's `model`.",
    )
    kl_coef: float = arg(0.05, "β of the per-token KL penalty to the reference.")
    kl_estimator: str = arg(
        "k1",
        "Per-token KL estimator (Schulman 2020): k1 in the reward "
        "(Ziegler et al. 2019); use k3 with --kl-penalty loss.",
        choices=KL_ESTIMATORS,
    )
    kl_penalty: str = arg(
        "reward",
        "Where the KL penalty goes: `reward` (−β·KL_t added to "
        "each token's reward, then GAE) or `loss` (β·KL_t added to the "
        "per-token loss, as GRPO does).",
        choices=("reward", "loss"),
    )
    gamma: float = arg(1.0, "GAE discount γ.")
    lam: float = arg(0.95, "GAE λ.")
    clip_eps: float = arg(0.2, "ε of the clipped policy ratio.")
    value_clip_eps: float = arg(0.2, "ε of the value clipping around V_old.")
    vf_coef: float = arg(0.1, "Weight of the value loss in the total loss.")
    ppo_epochs: int = arg(4, "Passes over each rollout.")
    whiten_rewards: bool = arg(
        False, "Whiten the scores over the rollout before the KL penalty is added (mean 0, std 1)."
    )
    whiten_advantages: bool = arg(True, "Whiten the advantages over the rollout's tokens.")
    loss_aggregation: str = arg(
        "token",
        "How per-token losses become the loss: `token` (mean "
        "over all tokens), `sequence`, `constant` or `sequence_sum`.",
        choices=AGGREGATION_MODES,
    )

    def check(self) -> None:
        if not self.value_clip_eps > 0:
            raise PreftuneError(f"value_clip_eps: got {self.value_clip_eps}, expected a number > 0")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise PreftuneError(f"gamma and lam must lie in [0, 1], got {self.gamma}, {self.lam}")
        if not self.vf_coef > 0:
            raise PreftuneError(f"vf_coef: got {self.vf_coef}, expected a number > 0")


class PolicyAndValue(nn.Module):
    """The policy (completion log-probs) and the value model, one forward for both."""

    def __init__(self, policy: nn.Module, value_model: nn.Module):
        super().__init__()
        self.policy = policy
        self.value_model = value_model

    def forward(
        self,
        input_ids,
        attention_mask,
        completion_mask,
        *,
        temperature: float = 1.0,
        return_entropy: bool = False,
    ):
        out = completion_logprobs(
            self.policy,
            input_ids,
            attention_mask,
            completion_mask,
            temperature=temperature,
            return_entropy=return_entropy,
        )
        return out, token_values(self.value_model, input_ids, attention_mask)


def token_values(value_model: nn.Module, input_ids, attention_mask) -> torch.Tensor:
    """V [B, T] aligned with the log-probs: values[:, t] is the value of the state before token
    t, read from the hidden state at t − 1 (the one that predicts token t)."""
    model = value_model.get_base_model() if hasattr(value_model, "peft_config") else value_model
    backbone = getattr(model, model.base_model_prefix)
    head = getattr(model, "score", None) or getattr(model, "classifier")
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    v = head(hidden).squeeze(-1).float()
    values = torch.zeros_like(v)
    values[:, 1:] = v[:, :-1]
    return values


def load_value_model(cfg: PPOConfig, tokenizer) -> nn.Module:
    source = cfg.value_model or cfg.model
    model, value_tokenizer = load_sequence_classifier(
        source, num_labels=1, dtype=cfg.dtype, seed=cfg.seed
    )
    prepare_tokenizer(value_tokenizer, cfg)  # the same --chat-template as the policy's
    check_same_tokenizer(tokenizer, value_tokenizer, f"value_model {source!r}")
    if not any(hasattr(model, name) for name in ("score", "classifier")):
        raise PreftuneError(f"value_model {source!r}: no `score` or `classifier` head found")
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora:
        model = apply_lora(model, lora_settings(cfg), task_type="SEQ_CLS")
    return model


def run_ppo(cfg: PPOConfig) -> dict:
    engine = Engine(cfg, "ppo")
    setup = online.load_online(cfg, engine)
    value_model = load_value_model(cfg, setup.tokenizer)
    reference = build_reference(cfg, engine, setup.policy, setup.tokenizer)
    n_rollouts = online.planned_rollouts(cfg, len(setup.prompts))
    module = engine.setup(
        PolicyAndValue(setup.policy, value_model),
        n_rollouts,
        schedule_steps=n_rollouts * cfg.steps_per_rollout,
    )
    vllm_backend = make_generator_backend(cfg, setup.tokenizer)
    start = online.resume(engine, vllm_backend)

    def forward(input_ids, attention_mask, completion_mask, temperature=cfg.temperature, **kw):
        return module(input_ids, attention_mask, completion_mask, temperature=temperature, **kw)

    def policy_forward(*args, **kw):  # the log-probs alone, for the LoRA-base reference
        return forward(*args, **kw)[0]

    def old_policy(batch, packed):  # π_old and V_old, before any update (PPO packs nothing)
        out, values = forward(batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        return {"old_logps": out.token_logps, "old_values": values}

    bar = engine.progress(start)
    window = MetricWindow()
    logged: dict = {}
    for step in range(start + 1, n_rollouts + 1):
        # 1. rollout: completions, scores, π_ref, then π_old and V_old --------------------------
        ro = collect_rollout(
            cfg,
            engine,
            setup,
            step,
            reference=reference,
            policy_forward=policy_forward,
            old_policy=old_policy,
            vllm_backend=vllm_backend,
        )
        batch = ro.batch

        # 2. advantages: per-token rewards, GAE, whitening ---------------------------------------
        mask = batch["completion_mask"]
        scores = ro.rewards.float()
        if cfg.whiten_rewards:
            scores = whiten(scores)
        token_rewards = torch.zeros_like(batch["old_logps"])
        if cfg.kl_penalty == "reward":  # r_t = −β·KL_t, Ziegler et al. 2019, Eq. 2
            kl_tok = kl_penalty(batch["old_logps"], batch["ref_logps"], cfg.kl_estimator)
            token_rewards = -cfg.kl_coef * kl_tok * mask
        last = (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(-1)
        token_rewards[torch.arange(len(last), device=mask.device), last] += scores  # score at EOS
        advantages, returns = gae(
            token_rewards, batch["old_values"], mask, gamma=cfg.gamma, lam=cfg.lam
        )
        if cfg.whiten_advantages:
            advantages = whiten(advantages, mask)
        batch["advantages"], batch["returns"] = advantages, returns
        window.add("reward/with_kl", (token_rewards * mask).sum(-1))
        token_mean(window, "value/mean", batch["old_values"], mask)

        # 3. minibatch updates ---------------------------------------------------------------------
        t_train = time.perf_counter()
        module.train()
        for mb in minibatches(engine, cfg, batch, step):
            b, m, first_epoch = mb.batch, mb.batch["completion_mask"], mb.epoch == 0
            with engine.sync_context(mb.index, mb.count):
                out, values = forward(
                    b["input_ids"], b["attention_mask"], m, return_entropy=first_epoch
                )
                pg_tok, pg = ppo_policy_loss(
                    out.token_logps, b["old_logps"], b["advantages"], m, clip_eps=cfg.clip_eps
                )  # Schulman et al. 2017, Eq. 7
                vf_tok, vf = ppo_value_loss(
                    values, b["old_values"], b["returns"], m, clip_eps=cfg.value_clip_eps
                )
                per_token = pg_tok + cfg.vf_coef * vf_tok
                if cfg.kl_penalty == "loss":
                    per_token = per_token + cfg.kl_coef * kl_penalty(
                        out.token_logps, b["ref_logps"], cfg.kl_estimator
                    )
                loss_sum = aggregate_loss(per_token, m, cfg)
                engine.backward(loss_sum, mb.global_units)
            units = loss_units(m, cfg)
            window.add("loss/total", loss_sum.detach(), count=units)
            window.add("loss/policy", aggregate_loss(pg_tok.detach(), m, cfg), count=units)
            window.add("loss/value", aggregate_loss(vf_tok.detach(), m, cfg), count=units)
            window.add("approx_kl", pg["approx_kl"])
            window.add("value/clipfrac", vf["vf_clipfrac"])
            add_clipped_update_metrics(window, mb, out, pg)
            if mb.last:
                window.add("grad_norm", engine.optimizer_step())

        # 4. log and checkpoint ----------------------------------------------------------------
        logged = (
            online.end_iteration(
                engine,
                cfg,
                window,
                ro,
                step,
                bar,
                vllm_backend=vllm_backend,
                updates_started=t_train,
            )
            or logged
        )

    online.finish(engine, setup.tokenizer, logged, value_model=True)
    return logged
