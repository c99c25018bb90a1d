"""The update phase of the online trainers: the clipped-update settings, the epoch → minibatch
→ micro-batch iteration over a rollout with its global loss-unit count, and the per-micro-batch
metric helpers.

PPO, GRPO and RLOO reuse each rollout for `ppo_epochs` passes of `num_minibatches` optimizer
steps (CleanRL's loop); every minibatch is cut into micro-batches of `batch_size` rows, and the
loss of the minibatch is normalised over its loss units on all processes (`engine.backward`).
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass
from typing import Iterator

import torch

from preftune.config import Settings, arg
from preftune.errors import PreftuneError
from preftune.losses.rl import AGGREGATION_MODES, KL_ESTIMATORS, aggregate_sum_and_units
from preftune.losses.rl import kl_penalty
from preftune.models.logprobs import LogProbOutput
from preftune.trainers.rollout import sampling_seed


_WARNED: set[str] = set()


def warn_once(message: str) -> None:
    """Print a warning on stderr the first time this process meets it."""
    if message not in _WARNED:
        _WARNED.add(message)
        print(f"preftune: warning: {message}", file=sys.stderr, flush=True)


@dataclass
class ClippedUpdateSettings(Settings):
    """How a rollout is reused: PPO's clipped ratio over epochs and minibatches."""

    clip_eps: float = arg(
        0.2, "ε of the clipped ratio π/π_old (matters with ppo_epochs or num_minibatches > 1)."
    )
    ppo_epochs: int = arg(1, "Passes over each rollout.")
    num_minibatches: int = arg(
        1, "Optimizer steps per pass: the rollout is split into this many minibatches."
    )
    loss_aggregation: str = arg(
        "token",
        "How per-token losses become the loss: `sequence` "
        "(mean per completion, then over completions: GRPO), `token` "
        "(over all tokens: DAPO), `constant` (sum / (rows x "
        "max_new_tokens): Dr. GRPO), `sequence_sum` (sum per "
        "completion, mean over completions: REINFORCE, RLOO).",
        choices=AGGREGATION_MODES,
    )

    def check(self) -> None:
        if not self.clip_eps > 0:
            raise PreftuneError(f"clip_eps: got {self.clip_eps}, expected a number > 0")
        if self.ppo_epochs < 1 or self.num_minibatches < 1:
            raise PreftuneError(
                f"ppo_epochs and num_minibatches must be >= 1, got "
                f"{self.ppo_epochs} and {self.num_minibatches}"
            )
        default = {f.name: f.default for f in dataclasses.fields(self)}["clip_eps"]
        if self.steps_per_rollout == 1 and self.clip_eps != default:
            # Warned, not refused: one settings file may serve runs with and without reuse.
            warn_once(
                f"clip_eps={self.clip_eps} has no effect with ppo_epochs=1 and "
                "num_minibatches=1: each rollout is used once, the ratio is 1 and never "
                "clipped"
            )

    @property
    def steps_per_rollout(self) -> int:
        return self.ppo_epochs * self.num_minibatches


@dataclass
class KLSettings(Settings):
    """The KL penalty to the reference policy: its weight β and per-token estimator."""

    kl_coef: float = arg(0.05, "Weight β of the KL penalty to the reference policy.")
    kl_estimator: str = arg(
        "k1",
        "Per-token KL estimator for the penalty (Schulman 2020): k1 "
        "= log π/π_ref, k2 = ½(log π/π_ref)², k3 = π_ref/π − 1 − log π_ref/π.",
        choices=KL_ESTIMATORS,
    )

    def check(self) -> None:
        if not (math.isfinite(self.kl_coef) and self.kl_coef >= 0):
            raise PreftuneError(f"kl_coef: got {self.kl_coef!r}, expected a finite number >= 0")
        default = {f.name: f.default for f in dataclasses.fields(self)}["kl_estimator"]
        if self.kl_coef == 0 and self.kl_estimator != default:
            raise PreftuneError(
                f"kl_estimator={self.kl_estimator!r} has no effect: kl_coef is 0, "
                "so there is no KL term (the KL is still logged with k1 and k3); "
                "set --kl-coef or drop --kl-estimator"
            )


@dataclass
class Micro:
    """One micro-batch of a minibatch."""

    epoch: int
    index: int  # position within its minibatch
    count: int  # micro-batches in its minibatch
    batch: dict[str, torch.Tensor]  # its rows of the rollout batch
    global_units: float  # loss units of the whole minibatch on all processes
    last: bool  # the last micro-batch of its minibatch: step the optimizer after it
    rows: torch.Tensor  # its rows' indices in the rollout


def minibatches(engine, cfg, batch: dict[str, torch.Tensor], step: int) -> Iterator[Micro]:
    """`ppo_epochs` passes over the rollout's rows in `num_minibatches` random minibatches of
    micro-batches of `batch_size` rows. The split's RNG is a function of (seed, step, rank),
    like the sampling RNG, so a resumed run splits as the interrupted one would have."""
    mask = batch["completion_mask"]
    n_rows = mask.shape[0]
    if cfg.num_minibatches > n_rows:
        raise PreftuneError(
            f"num_minibatches={cfg.num_minibatches} exceeds the {n_rows} rows of "
            "a rollout on this process; lower it or raise prompts_per_step"
        )
    generator = torch.Generator().manual_seed(sampling_seed(cfg.seed + 7, step, engine.rank))
    for epoch in range(cfg.ppo_epochs):
        for rows in torch.randperm(n_rows, generator=generator).chunk(cfg.num_minibatches):
            micro = rows.split(cfg.batch_size)
            global_units = engine.global_sum(loss_units(mask[rows.to(mask.device)], cfg))
            for i, r in enumerate(micro):
                yield Micro(
                    epoch,
                    i,
                    len(micro),
                    take(batch, r),
                    global_units,
                    last=i == len(micro) - 1,
                    rows=r,
                )


def take(batch: dict[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Rows of every tensor in `batch`, with [N, T] tensors cut to these rows' longest length
    (batches are right-padded, so the trailing all-padding columns carry nothing)."""
    rows = rows.to(batch["attention_mask"].device)
    width = int(batch["attention_mask"][rows].sum(-1).max())
    T = batch["attention_mask"].shape[1]
    out = {}
    for k, v in batch.items():
        v = v[rows]
        out[k] = v[:, :width] if v.dim() == 2 and v.shape[1] == T else v
    return out


def take_rows(out: LogProbOutput, rows: torch.Tensor, width: int) -> LogProbOutput:
    """`take` for a forward's output over the whole rollout: these rows, [N, T] tensors cut
    to `width` columns (the same rows and columns as the micro-batch's tensors)."""
    rows = rows.to(out.token_logps.device)
    return LogProbOutput(
        *(None if t is None else t[rows][:, :width] if t.dim() == 2 else t[rows] for t in out)
    )


def aggregate_loss(per_token: torch.Tensor, mask: torch.Tensor, cfg) -> torch.Tensor:
    """This micro-batch's summed loss under `cfg.loss_aggregation` (for `engine.backward`)."""
    return aggregate_sum_and_units(per_token, mask, cfg.loss_aggregation, cfg.max_new_tokens)[0]


def loss_units(mask: torch.Tensor, cfg) -> float:
    """The loss units (rows or tokens) these rows contribute under `cfg.loss_aggregation`."""
    return float(
        aggregate_sum_and_units(
            torch.zeros_like(mask, dtype=torch.float32),
            mask,
            cfg.loss_aggregation,
            cfg.max_new_tokens,
        )[1]
    )


def add_policy_metrics(window, out, batch: dict[str, torch.Tensor], mask: torch.Tensor) -> None:
    """The micro-batch's KL to the reference (`kl/k1`, `kl/k3`) and its per-token `entropy`."""
    window.add_all(sequence_kl(out.token_logps, batch["ref_logps"], mask))
    token_mean(window, "entropy", out.entropy, mask)


def add_clipped_update_metrics(window, mb: Micro, out, pg: dict) -> None:
    """Every micro-batch of a clipped update: its `clipfrac`; on the first pass over the
    rollout, also the policy's KL to the reference and entropy (`add_policy_metrics`)."""
    window.add("clipfrac", pg["clipfrac"])
    if mb.epoch == 0:
        add_policy_metrics(window, out, mb.batch, mb.batch["completion_mask"])


def sequence_kl(
    logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """KL(π ‖ π_ref) per sequence [B], summed over its tokens, with two estimators (Schulman
    2020): `kl/k1` (unbiased, can be negative per sample) and `kl/k3` (unbiased, ≥ 0)."""
    m = mask.float()
    with torch.no_grad():
        return {
            f"kl/{k}": (kl_penalty(logps.detach(), ref_logps, k) * m).sum(-1) for k in ("k1", "k3")
        }


def token_mean(window, name: str, values: torch.Tensor, mask: torch.Tensor) -> None:
    """Add a per-token quantity to the metric window as a mean over the masked tokens."""
    m = mask.float()
    window.add(name, float((values.detach().float() * m).sum()), count=float(m.sum()))
