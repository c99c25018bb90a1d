"""`preftune online-dpo`: online DPO with a reward source as the annotator (Guo et al. 2024,
"Direct Language Model Alignment from Online AI Feedback", Alg. 1).

Per training iteration:
1. rollout: two completions for each prompt from the current policy, scored by the reward;
2. pairs: the higher-scored completion is `chosen`, the other `rejected`. A tie carries no
   preference: its pair gets weight 0 (it stays in the batch so every process runs the same
   number of forward passes) and the loss is the mean over the untied pairs of all processes;
3. update: one optimizer step on the DPO-family loss of the offline trainer
   (`losses.preference.preference_loss`, Rafailov et al. 2023, Eq. 7 for `dpo`), with the
   reference log-probs computed during the rollout.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from preftune.config import arg
from preftune.engine.engine import Engine
from preftune.engine.loop import MetricWindow
from preftune.errors import PreftuneError
from preftune.losses.preference import (
    PREFERENCE_LOSSES,
    REFERENCE_FREE,
    check_preference_hparams,
    preference_loss,
)
from preftune.models.logprobs import CompletionLogProbs
from preftune.trainers import online
from preftune.trainers.reference import build_reference
from preftune.trainers.rollout import (
    GroupPackingSettings,
    collect_rollout,
    make_generator_backend,
    pack_groups,
)
from preftune.trainers.updates import add_policy_metrics, take


@dataclass
class OnlineDPOConfig(GroupPackingSettings, online.OnlineConfig):
    num_generations: int = arg(2, "Completions per prompt: online DPO compares exactly 2.")
    loss_type: str = arg(
        "dpo", "Preference loss (the offline DPO family).", choices=PREFERENCE_LOSSES
    )
    beta: float = arg(
        0.1,
        "β: strength of the implicit KL to the reference (λ for orpo); "
        "online DPO has no separate KL penalty.",
    )
    label_smoothing: float = arg(0.0, "Assumed label-flip rate, cdpo and robust only.")
    simpo_gamma: float = arg(0.5, "SimPO's target reward margin γ.")

    def check(self) -> None:
        if self.num_generations != 2:
            raise PreftuneError(
                f"num_generations: got {self.num_generations}, online DPO "
                "samples exactly 2 completions per prompt and ranks them"
            )
        check_preference_hparams(self.loss_type, self.beta, self.label_smoothing, self.simpo_gamma)


def run_online_dpo(cfg: OnlineDPOConfig) -> dict:
    engine = Engine(cfg, "online-dpo")
    setup = online.load_online(cfg, engine)
    # The reference is also what the KL metric is measured against, so every loss type has it.
    reference = build_reference(cfg, engine, setup.policy, setup.tokenizer)
    n_rollouts = online.planned_rollouts(cfg, len(setup.prompts))
    module = engine.setup(CompletionLogProbs(setup.policy), n_rollouts)  # one step per rollout
    vllm_backend = make_generator_backend(cfg, setup.tokenizer)
    start = online.resume(engine, vllm_backend)
    uses_reference = cfg.loss_type not in REFERENCE_FREE

    def forward(input_ids, attention_mask, completion_mask, temperature=cfg.temperature, **kw):
        return module(input_ids, attention_mask, completion_mask, temperature=temperature, **kw)

    # Packed rows (`--packing auto`): the two completions of a prompt share one forward of it,
    # where the model computes packed rows exactly (`models/packing.py`); else padded rows.
    pad_id = setup.tokenizer.pad_token_id

    def pack(batch, rows=None):
        return pack_groups(batch, 2, pad_id, rows) if cfg.packing == "auto" else None

    bar = engine.progress(start)
    window = MetricWindow()
    logged: dict = {}
    for step in range(start + 1, n_rollouts + 1):
        # 1. rollout: rows 2i and 2i+1 are the two completions of prompt i ------------------------
        ro = collect_rollout(
            cfg,
            engine,
            setup,
            step,
            reference=reference,
            policy_forward=forward,
            vllm_backend=vllm_backend,
            pack=pack,
        )
        batch = ro.batch

        # 2. pairs: the reward source ranks the two completions (Guo et al. 2024, Alg. 1) --------
        r = ro.rewards.view(-1, 2)
        first_wins = r[:, 0] >= r[:, 1]
        pair = torch.arange(r.shape[0], device=r.device) * 2
        chosen = torch.where(first_wins, pair, pair + 1)
        rejected = torch.where(first_wins, pair + 1, pair)
        untied = (r[:, 0] != r[:, 1]).float()
        n_pairs = engine.global_sum(untied.sum())
        window.add("pairs/tie_fraction", 1.0 - untied)
        window.add("reward/chosen", r.max(dim=1).values)
        window.add("reward/rejected", r.min(dim=1).values)

        # 3. update: one optimizer step on the preference loss of the untied pairs ---------------
        t_train = time.perf_counter()
        module.train()
        micro = torch.arange(r.shape[0]).split(cfg.batch_size)  # pairs per forward pass
        for i, pairs in enumerate(micro):
            rows = torch.cat([chosen[pairs.to(chosen.device)], rejected[pairs.to(chosen.device)]])
            b = take(batch, rows.cpu())
            m = b["completion_mask"]
            weight = untied[pairs.to(untied.device)]
            with engine.sync_context(i, len(micro)):
                out = forward(
                    b["input_ids"],
                    b["attention_mask"],
                    m,
                    return_entropy=True,
                    packed=pack(b, rows.cpu()),
                )
                ref_seq = b["ref_logps"].sum(-1)
                c, k = out.seq_logps.chunk(2)
                ref_c, ref_k = ref_seq.chunk(2) if uses_reference else (None, None)
                n_c, n_k = out.n_tokens.chunk(2)
                losses, metrics = preference_loss(
                    c,
                    k,
                    ref_c,
                    ref_k,
                    loss_type=cfg.loss_type,
                    beta=cfg.beta,
                    label_smoothing=cfg.label_smoothing,
                    simpo_gamma=cfg.simpo_gamma,
                    chosen_lengths=n_c,
                    rejected_lengths=n_k,
                )
                loss_sum = (losses * weight).sum()
                engine.backward(loss_sum, n_pairs)
            window.add("loss/policy", loss_sum.detach(), count=float(weight.sum()))
            for name, value in metrics.items():  # per pair; ties excluded
                window.add(name, value[weight > 0])
            add_policy_metrics(window, out, b, m)
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
