"""`preftune grpo`: group-relative policy optimisation (Shao et al. 2024, "DeepSeekMath").

Per training iteration, three phases:
1. rollout: G completions for each of `prompts_per_step` prompts, scored by the reward source;
2. advantages: within each prompt's group, A_i = (r_i − mean r) / std r (Shao et al. 2024,
   Sec. 4.1.2), or r_i − mean r without `--scale-rewards` (Dr. GRPO, Liu et al. 2025);
   every token of completion i gets A_i;
3. updates: `ppo_epochs` passes over `num_minibatches` minibatches with the clipped surrogate
   (Shao et al. 2024, Eq. 3), plus β·KL(π‖π_ref) per token as a loss term when kl_coef > 0
   (k3 by default, as in the paper's Eq. 4). Per-token losses are aggregated per sequence
   (GRPO), over all tokens (DAPO, Yu et al. 2025) or over a constant (Dr. GRPO).
With one epoch and one minibatch the policy is unchanged between rollout and update, so the
"old" log-probs are the current ones detached (ratio 1, no extra forward pass).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from preftune.config import arg
from preftune.engine.engine import Engine
from preftune.engine.loop import MetricWindow
from preftune.errors import PreftuneError
from preftune.losses.rl import AGGREGATION_MODES, aggregate_sum_and_units, group_advantages
from preftune.losses.rl import kl_penalty, ppo_policy_loss
from preftune.models.logprobs import CompletionLogProbs
from preftune.trainers import online


@dataclass
class GRPOConfig(online.OnlineConfig):
    num_generations: int = arg(8, "G: completions sampled per prompt (the group); >= 2.")
    kl_coef: float = arg(0.0, "β of the per-token KL loss to the reference (0: no KL term; "
                         "the KL is still measured and logged).")
    kl_estimator: str = arg("k3", "Per-token KL estimator of the KL loss (Schulman 2020); k3 "
                            "as in Shao et al. 2024, Eq. 4.", choices=("k1", "k2", "k3"))
    scale_rewards: bool = arg(True, "Divide group-centred rewards by the group's std (GRPO); "
                              "--no-scale-rewards keeps only the centring (Dr. GRPO).")
    loss_aggregation: str = arg("sequence", "How per-token losses become the loss: `sequence` "
                                "(mean per completion, then over completions: GRPO), `token` "
                                "(over all tokens: DAPO), `constant` (sum / (rows x "
                                "max_new_tokens): Dr. GRPO).", choices=AGGREGATION_MODES)
    clip_eps: float = arg(0.2, "ε of the clipped ratio (matters with ppo_epochs or "
                          "num_minibatches > 1).")
    ppo_epochs: int = arg(1, "μ: passes over each rollout (Shao et al. 2024, Alg. 1).")
    num_minibatches: int = arg(1, "Optimizer steps per pass: the rollout is split into this "
                               "many minibatches.")

    def validate(self) -> None:
        super().validate()
        if self.num_generations < 2:
            raise PreftuneError(f"num_generations: got {self.num_generations}, expected an "
                                "integer >= 2 (group advantages compare the completions of one "
                                "prompt; with one there is nothing to compare)")
        if not self.clip_eps > 0:
            raise PreftuneError(f"clip_eps: got {self.clip_eps}, expected a number > 0")
        if self.ppo_epochs < 1 or self.num_minibatches < 1:
            raise PreftuneError(f"ppo_epochs and num_minibatches must be >= 1, got "
                                f"{self.ppo_epochs} and {self.num_minibatches}")


def run_grpo(cfg: GRPOConfig) -> dict:
    engine = Engine(cfg, "grpo")
    setup = online.load_online(cfg, engine)
    n_rollouts = online.planned_rollouts(cfg, len(setup.prompts))
    online.setup_engine_steps(engine, CompletionLogProbs(setup.policy), n_rollouts,
                              cfg.ppo_epochs * cfg.num_minibatches)
    module = engine.model
    reference, vllm_backend, start = online.reference_backend_and_resume(cfg, engine,
                                                                          setup.tokenizer)

    def policy_logps(batch):
        return module(batch["input_ids"], batch["attention_mask"], batch["completion_mask"],
                      temperature=cfg.temperature)

    reuse_current = cfg.ppo_epochs == 1 and cfg.num_minibatches == 1
    bar = engine.progress(start)
    window = MetricWindow()
    logged: dict = {}
    for step in range(start + 1, n_rollouts + 1):
        # 1. rollout ---------------------------------------------------------------------------
        ro = online.collect_rollout(cfg, engine, setup, step, policy_logps=policy_logps,
                                    reference=reference, vllm_backend=vllm_backend)
        batch = ro.batch
        if not reuse_current:  # π_old of the clipped ratio, before any update of this rollout
            t0 = time.perf_counter()
            batch["old_logps"] = online.no_grad_logps(policy_logps, batch)
            ro.times["time/scoring_s"] += time.perf_counter() - t0

        # 2. advantages (Shao et al. 2024, Sec. 4.1.2) ------------------------------------------
        batch["advantages"] = group_advantages(ro.rewards, cfg.num_generations,
                                               normalize_std=cfg.scale_rewards)

        # 3. minibatch updates -----------------------------------------------------------------
        t_train = time.perf_counter()
        module.train()
        generator = online.update_generator(cfg, step, engine.rank)
        for epoch in range(cfg.ppo_epochs):
            for minibatch in online.minibatch_indices(len(ro.completions), cfg.num_minibatches,
                                                      generator):
                micro = minibatch.split(cfg.batch_size)
                global_units = engine.global_sum(online.loss_units(
                    batch["completion_mask"][minibatch.to(batch["completion_mask"].device)],
                    cfg.loss_aggregation, cfg.max_new_tokens))
                for i, rows in enumerate(micro):
                    b = online.take(batch, rows)
                    mask = b["completion_mask"]
                    with engine.sync_context(i, len(micro)):
                        out = module(b["input_ids"], b["attention_mask"], mask,
                                     temperature=cfg.temperature, return_entropy=epoch == 0)
                        old = out.token_logps.detach() if reuse_current else b["old_logps"]
                        per_token, pg = ppo_policy_loss(out.token_logps, old,
                                                        b["advantages"][:, None], mask,
                                                        clip_eps=cfg.clip_eps)  # Eq. 3
                        if cfg.kl_coef:  # β·D_KL(π‖π_ref) inside the objective, Eq. 3-4
                            per_token = per_token + cfg.kl_coef * kl_penalty(
                                out.token_logps, b["ref_logps"], cfg.kl_estimator)
                        loss_sum, _ = aggregate_sum_and_units(per_token, mask,
                                                              cfg.loss_aggregation,
                                                              cfg.max_new_tokens)
                        engine.backward(loss_sum, global_units)
                    window.add("loss/policy", loss_sum.detach(),
                               count=online.loss_units(mask, cfg.loss_aggregation,
                                                       cfg.max_new_tokens))
                    window.add("clipfrac", pg["clipfrac"])
                    if epoch == 0:
                        window.add_all(online.sequence_kl(out.token_logps, b["ref_logps"], mask))
                        online.token_mean(window, "entropy", out.entropy, mask)
                window.add("grad_norm", engine.optimizer_step())
        if vllm_backend is not None:
            vllm_backend.sync_weights(engine.unwrap().policy)
        ro.times["time/training_s"] = time.perf_counter() - t_train

        # 4. log and checkpoint ----------------------------------------------------------------
        logged = online.end_iteration(engine, cfg, window, ro, step, n_rollouts, bar) or logged

    online.save_policy_and_finish(engine, setup.tokenizer, logged, n_rollouts)
    return logged
