"""The critic-free policy-gradient trainer behind `preftune grpo` and `preftune rloo`.

Per training iteration, four phases:
1. rollout: G completions for each of `prompts_per_step` prompts, scored by the reward source,
   with π_ref's log-probs (and π_old's when the update or the advantages need them);
2. advantages, the one place where the two methods differ (`BASELINE` of the config):
   - `group` (GRPO): within each prompt's group, A_i = (r_i − mean r) / std r (Shao et al.
     2024, Sec. 4.1.2), or r_i − mean r without `--scale-rewards` (Dr. GRPO, Liu et al. 2025);
     the KL to the reference is a per-token loss term (Eq. 3-4);
   - `leave_one_out` (RLOO): the whole completion is one action whose reward is the score
     minus the sequence KL, r(x, y) − β·Σ_t KL_t (Ahmadian et al. 2024, Sec. 2), and
     A_i = r_i − mean_{j≠i} r_j within each prompt's k samples (Eq. 8);
   every token of completion i gets A_i;
3. updates: `ppo_epochs` passes over `num_minibatches` minibatches with the clipped surrogate
   (Shao et al. 2024, Eq. 3); with one epoch and one minibatch the ratio is exactly 1 and the
   gradient is REINFORCE's. Per-token losses are aggregated as `loss_aggregation` says;
4. log and checkpoint.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

from preftune.engine.engine import Engine
from preftune.engine.loop import MetricWindow
from preftune.errors import PreftuneError
from preftune.losses.rl import group_advantages, kl_penalty, leave_one_out_advantages
from preftune.losses.rl import ppo_policy_loss, whiten
from preftune.models.logprobs import CompletionLogProbs
from preftune.trainers import online
from preftune.trainers.reference import build_reference
from preftune.trainers.rollout import (
    GroupPackingSettings,
    collect_rollout,
    make_generator_backend,
    pack_groups,
)
from preftune.trainers.updates import (
    ClippedUpdateSettings,
    KLSettings,
    add_clipped_update_metrics,
    aggregate_loss,
    loss_units,
    minibatches,
    take_rows,
)

# π_old taken from the update's own forward when the policy cannot have changed in between;
# tests switch it off to compare with the separate no-grad forward.
REUSE_CURRENT = True


@dataclass
class PolicyGradientConfig(
    GroupPackingSettings, ClippedUpdateSettings, KLSettings, online.OnlineConfig
):
    """GRPO's and RLOO's settings; each command sets its defaults and its `BASELINE`."""

    BASELINE: ClassVar[str] = "group"  # or "leave_one_out"; not a flag: it is the command

    def check(self) -> None:
        if self.num_generations < 2:
            raise PreftuneError(
                f"num_generations: got {self.num_generations}, expected an "
                "integer >= 2 (the advantage of a completion compares it with "
                "the other completions of its prompt)"
            )


def run_policy_gradient(cfg: PolicyGradientConfig, command: str) -> dict:
    engine = Engine(cfg, command)
    setup = online.load_online(cfg, engine)
    reference = build_reference(cfg, engine, setup.policy, setup.tokenizer)
    n_rollouts = online.planned_rollouts(cfg, len(setup.prompts))
    module = engine.setup(
        CompletionLogProbs(setup.policy),
        n_rollouts,
        schedule_steps=n_rollouts * cfg.steps_per_rollout,
    )
    vllm_backend = make_generator_backend(cfg, setup.tokenizer)
    start = online.resume(engine, vllm_backend)

    def forward(input_ids, attention_mask, completion_mask, temperature=cfg.temperature, **kw):
        return module(input_ids, attention_mask, completion_mask, temperature=temperature, **kw)

    # Packed rows (`--packing auto`): the G completions of a prompt share one forward of it,
    # where the model computes packed rows exactly (`models/packing.py`); else padded rows.
    pad_id = setup.tokenizer.pad_token_id

    def pack(batch, rows=None):
        return (
            pack_groups(batch, cfg.num_generations, pad_id, rows) if cfg.packing == "auto" else None
        )

    def old_policy(batch, packed):  # π_old of the ratio (and of RLOO's sequence KL)
        return {
            "old_logps": forward(
                batch["input_ids"], batch["attention_mask"], batch["completion_mask"], packed=packed
            ).token_logps
        }

    # With one epoch and one minibatch the policy is unchanged between rollout and update, so
    # π_old is the update's own forward detached (ratio exactly 1, no extra forward pass).
    # RLOO's reward needs π_old before the advantages: its update forward then runs first, on
    # the whole rollout, so only when one micro-batch holds it (`batch_size` bounds memory).
    rows = cfg.prompts_per_step // engine.world_size * cfg.num_generations
    reuse_current = (
        REUSE_CURRENT
        and cfg.steps_per_rollout == 1
        and (cfg.BASELINE == "group" or rows <= cfg.batch_size)
    )
    bar = engine.progress(start)
    window = MetricWindow()
    logged: dict = {}
    for step in range(start + 1, n_rollouts + 1):
        # 1. rollout ---------------------------------------------------------------------------
        ro = collect_rollout(
            cfg,
            engine,
            setup,
            step,
            reference=reference,
            policy_forward=forward,
            vllm_backend=vllm_backend,
            pack=pack,
            old_policy=None if reuse_current else old_policy,
        )
        batch = ro.batch
        t_train = time.perf_counter()
        module.train()

        # 2. advantages ------------------------------------------------------------------------
        current = None  # RLOO with reuse: the update's forward over the whole rollout
        if cfg.BASELINE == "group":  # Shao et al. 2024, Sec. 4.1.2
            advantages = group_advantages(
                ro.rewards, cfg.num_generations, normalize_std=cfg.scale_rewards
            )
        else:  # KL-penalised sequence reward, leave-one-out baseline: Ahmadian et al. 2024, Eq. 8
            if "old_logps" not in batch:  # π_old = π: the update's forward, run now
                current = forward(
                    batch["input_ids"],
                    batch["attention_mask"],
                    batch["completion_mask"],
                    return_entropy=True,
                    packed=pack(batch),
                )
                batch["old_logps"] = current.token_logps.detach()
            seq_kl = (
                kl_penalty(batch["old_logps"], batch["ref_logps"], cfg.kl_estimator)
                * batch["completion_mask"].float()
            ).sum(-1)
            penalised = ro.rewards - cfg.kl_coef * seq_kl  # r(x, y) − β·KL(y), Sec. 2
            window.add("reward/penalised", penalised)
            advantages = leave_one_out_advantages(penalised, cfg.num_generations)
            if cfg.normalize_advantages:
                advantages = whiten(advantages)
        batch["advantages"] = advantages

        # 3. minibatch updates -----------------------------------------------------------------
        for mb in minibatches(engine, cfg, batch, step):
            b, mask, first_epoch = mb.batch, mb.batch["completion_mask"], mb.epoch == 0
            with engine.sync_context(mb.index, mb.count):
                if current is not None:  # the one micro-batch: the rollout's rows, reordered
                    out = take_rows(current, mb.rows, mask.shape[1])
                else:
                    out = forward(
                        b["input_ids"],
                        b["attention_mask"],
                        mask,
                        return_entropy=first_epoch,
                        packed=pack(b, mb.rows),
                    )
                old = b["old_logps"] if "old_logps" in b else out.token_logps.detach()
                per_token, pg = ppo_policy_loss(
                    out.token_logps, old, b["advantages"][:, None], mask, clip_eps=cfg.clip_eps
                )  # Shao et al. Eq. 3
                if cfg.BASELINE == "group" and cfg.kl_coef:  # β·D_KL in the objective, Eq. 3-4
                    per_token = per_token + cfg.kl_coef * kl_penalty(
                        out.token_logps, b["ref_logps"], cfg.kl_estimator
                    )
                loss_sum = aggregate_loss(per_token, mask, cfg)
                engine.backward(loss_sum, mb.global_units)
            window.add("loss/policy", loss_sum.detach(), count=loss_units(mask, cfg))
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

    online.finish(engine, setup.tokenizer, logged)
    return logged
