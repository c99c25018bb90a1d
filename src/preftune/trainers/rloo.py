"""`preftune rloo`: REINFORCE with the leave-one-out baseline (Ahmadian et al. 2024, "Back to
Basics: Revisiting REINFORCE Style Optimization for Learning from Human Feedback in LLMs").

Per training iteration:
1. rollout: k completions for each prompt, scored by the reward source;
2. advantages: the whole completion is one action. Its reward is the score minus the KL
   penalty of the sequence, r(x, y) − β·Σ_t KL_t (Ahmadian et al. 2024, Sec. 2: the KL enters
   the reward), and A_i = r_i − mean_{j≠i} r_j within each prompt's k samples (Eq. 8);
3. update: the REINFORCE loss −A_i · log π(y_i|x) = −A_i · Σ_t log π(y_t|…): per-token losses
   summed over each completion and divided by a constant (rows × max_new_tokens), so that
   long and short completions weigh as their log-probabilities do (`constant` aggregation).
   `ppo_epochs`/`num_minibatches` > 1 reuse the rollout with PPO's clipped ratio (as TRL's
   RLOO does); with the defaults (1, 1) the ratio is exactly 1 and the loss is REINFORCE.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from preftune.config import arg
from preftune.engine.engine import Engine
from preftune.engine.loop import MetricWindow
from preftune.errors import PreftuneError
from preftune.losses.rl import AGGREGATION_MODES, aggregate_sum_and_units, kl_penalty
from preftune.losses.rl import leave_one_out_advantages, ppo_policy_loss
from preftune.models.logprobs import CompletionLogProbs
from preftune.trainers import online


@dataclass
class RLOOConfig(online.OnlineConfig):
    num_generations: int = arg(4, "k: completions sampled per prompt; >= 2 (each one's "
                               "baseline is the mean reward of the other k − 1).")
    kl_coef: float = arg(0.05, "β of the sequence KL penalty subtracted from the reward.")
    kl_estimator: str = arg("k1", "Per-token KL estimator summed into the sequence penalty "
                            "(k1: the log-ratio, as in Ahmadian et al. 2024).",
                            choices=("k1", "k2", "k3"))
    normalize_advantages: bool = arg(False, "Whiten the advantages over the rollout (mean 0, "
                                     "std 1) before the update.")
    loss_aggregation: str = arg("constant", "How per-token losses become the loss: `constant` "
                                "(Σ over each completion / (rows x max_new_tokens): REINFORCE's "
                                "sequence log-prob), `sequence` (mean per completion), `token`.",
                                choices=AGGREGATION_MODES)
    clip_eps: float = arg(0.2, "ε of the clipped ratio when a rollout is reused.")
    ppo_epochs: int = arg(1, "Passes over each rollout (1: plain REINFORCE).")
    num_minibatches: int = arg(1, "Optimizer steps per pass over the rollout.")

    def validate(self) -> None:
        super().validate()
        if self.num_generations < 2:
            raise PreftuneError(f"num_generations: got {self.num_generations}, expected an "
                                "integer >= 2 (the leave-one-out baseline of a completion is "
                                "the mean reward of the other completions of its prompt)")
        if not self.clip_eps > 0:
            raise PreftuneError(f"clip_eps: got {self.clip_eps}, expected a number > 0")
        if self.ppo_epochs < 1 or self.num_minibatches < 1:
            raise PreftuneError(f"ppo_epochs and num_minibatches must be >= 1, got "
                                f"{self.ppo_epochs} and {self.num_minibatches}")


def run_rloo(cfg: RLOOConfig) -> dict:
    engine = Engine(cfg, "rloo")
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

    bar = engine.progress(start)
    window = MetricWindow()
    logged: dict = {}
    for step in range(start + 1, n_rollouts + 1):
        # 1. rollout, with π_old: the sequence KL of the reward needs it ------------------------
        ro = online.collect_rollout(cfg, engine, setup, step, policy_logps=policy_logps,
                                    reference=reference, vllm_backend=vllm_backend)
        batch = ro.batch
        t0 = time.perf_counter()
        batch["old_logps"] = online.no_grad_logps(policy_logps, batch)
        ro.times["time/scoring_s"] += time.perf_counter() - t0

        # 2. advantages: KL-penalised sequence reward, leave-one-out baseline (Eq. 8) ------------
        mask = batch["completion_mask"].float()
        seq_kl = (kl_penalty(batch["old_logps"], batch["ref_logps"], cfg.kl_estimator)
                  * mask).sum(-1)
        penalised = ro.rewards - cfg.kl_coef * seq_kl  # r(x, y) − β·KL(y), Ahmadian et al. Sec. 2
        advantages = leave_one_out_advantages(penalised, cfg.num_generations)
        if cfg.normalize_advantages:
            advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
        batch["advantages"] = advantages
        window.add("reward/penalised", penalised)

        # 3. updates -----------------------------------------------------------------------------
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
                    m = b["completion_mask"]
                    with engine.sync_context(i, len(micro)):
                        out = module(b["input_ids"], b["attention_mask"], m,
                                     temperature=cfg.temperature, return_entropy=epoch == 0)
                        # ratio π/π_old; its gradient at ratio 1 is REINFORCE's ∇log π
                        per_token, pg = ppo_policy_loss(out.token_logps, b["old_logps"],
                                                        b["advantages"][:, None], m,
                                                        clip_eps=cfg.clip_eps)
                        loss_sum, _ = aggregate_sum_and_units(per_token, m, cfg.loss_aggregation,
                                                              cfg.max_new_tokens)
                        engine.backward(loss_sum, global_units)
                    window.add("loss/policy", loss_sum.detach(),
                               count=online.loss_units(m, cfg.loss_aggregation,
                                                       cfg.max_new_tokens))
                    window.add("clipfrac", pg["clipfrac"])
                    if epoch == 0:
                        window.add_all(online.sequence_kl(out.token_logps, b["ref_logps"], m))
                        online.token_mean(window, "entropy", out.entropy, m)
                window.add("grad_norm", engine.optimizer_step())
        if vllm_backend is not None:
            vllm_backend.sync_weights(engine.unwrap().policy)
        ro.times["time/training_s"] = time.perf_counter() - t_train

        # 4. log and checkpoint ----------------------------------------------------------------
        logged = online.end_iteration(engine, cfg, window, ro, step, n_rollouts, bar) or logged

    online.save_policy_and_finish(engine, setup.tokenizer, logged, n_rollouts)
    return logged

