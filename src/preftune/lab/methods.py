"""The methods the lab compares: one typed record per method, and the default grids.

Each method is trained by the same `run_*` function and config class a user runs; the lab only
chooses settings. A method's grid is its knob values x learning rates; the lab trains every
combination, chooses one on validation prompts and reports it on test prompts.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

OFFLINE, ONLINE, INFERENCE = "offline", "online", "inference"


@dataclass(frozen=True)
class Method:
    name: str
    label: str  # how the report names it
    kind: str  # offline (trained on the pairs), online (trained against a reward), inference
    module: str = ""  # trainer module ("" for best-of-N, evaluated directly)
    config: str = ""  # config class in `module`
    run: str = ""  # run function in `module`
    knob: str = ""  # the setting swept to trace a frontier: beta, kl_coef or n
    fixed: dict[str, Any] = field(default_factory=dict)  # fixed trainer settings
    grid: tuple[float, ...] = ()  # knob values of the default run
    quick_grid: tuple[float, ...] = ()
    lrs: tuple[float, ...] = ()  # learning rates of the default run (chosen on validation)
    quick_lrs: tuple[float, ...] = ()
    reward: str = "proxy"  # what an online/inference method maximises: the reward model, or gold
    oracle_of: str = ""  # the method whose gold-reward control this is
    # Optimises an ensemble of K reward models (Coste et al. 2023) instead of one; `variant_of`
    # is the single-reward-model method it is compared with.
    ensemble: bool = False
    variant_of: str = ""

    @property
    def uses_reward_model(self) -> bool:
        return self.kind in (ONLINE, INFERENCE) and self.reward == "proxy"

    @property
    def ensemble_agg(self) -> tuple[str, float]:
        """(aggregation, coefficient) of an ensemble method's reward (`EnsembleReward`)."""
        return self.fixed.get("ensemble_agg", "mean"), float(self.fixed.get("ensemble_coef", 1.0))

    @property
    def implicit_reward(self) -> str:
        """How `evaluate.implicit_rewards` scores this offline method's policy: `ratio`
        (reference-based losses and KTO), `sum` (CPO) or `mean` (SimPO, ORPO); "" for methods
        that are not trained on the pairs."""
        if self.kind != OFFLINE:
            return ""
        return {"simpo": "mean", "orpo": "mean", "cpo": "sum"}.get(
            self.fixed.get("loss", ""), "ratio"
        )

    def available(self) -> bool:
        if not self.module:
            return True
        try:
            importlib.import_module(self.module)
        except ImportError:
            return False
        return True


def _dpo(name: str, label: str, loss: str, grid, quick, **kw) -> Method:
    return Method(
        name,
        label,
        OFFLINE,
        "preftune.trainers.dpo",
        "DPOConfig",
        "run_dpo",
        "beta",
        {"loss": loss},
        grid,
        quick,
        kw.pop("lrs", (1e-4, 5e-4)),
        kw.pop("quick_lrs", (5e-4,)),
        **kw,
    )


# Learning rates: the tiny policy needs far larger ones than the trainers' defaults (which suit
# real models). β of the DPO family reaches 5, as the DPO paper's sweep did; SimPO's β scales a
# length-normalised reward (its paper uses 2-2.5); ORPO's β is λ, its odds-ratio weight.
# Online methods sample 32 completions per rollout.
_ONLINE_LRS = (5e-4,)
METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        _dpo("dpo", "DPO", "dpo", (0.5, 5.0), (1.0,)),
        _dpo("ipo", "IPO", "ipo", (0.1, 1.0), (0.3,)),
        _dpo("cdpo", "cDPO", "cdpo", (0.1, 1.0), (0.1,)),
        _dpo("robust", "robust DPO", "robust", (0.1, 1.0), (0.1,)),
        _dpo("hinge", "SLiC (hinge)", "hinge", (0.1, 1.0), (0.1,)),
        _dpo("simpo", "SimPO", "simpo", (0.5, 2.0), (2.0,)),
        _dpo("orpo", "ORPO", "orpo", (0.1, 0.5), (0.5,)),
        _dpo("cpo", "CPO", "cpo", (0.1, 1.0), (0.1,)),
        Method(
            "kto",
            "KTO",
            OFFLINE,
            "preftune.trainers.kto",
            "KTOConfig",
            "run_kto",
            "beta",
            {},
            (0.1, 1.0),
            (0.1,),
            (1e-4, 5e-4),
            (5e-4,),
        ),
        Method(
            "ppo",
            "PPO",
            ONLINE,
            "preftune.trainers.ppo",
            "PPOConfig",
            "run_ppo",
            "kl_coef",
            {"prompts_per_step": 32, "num_generations": 1},
            (0.0, 0.05),
            (0.05,),
            _ONLINE_LRS,
            _ONLINE_LRS,
        ),
        Method(
            "grpo",
            "GRPO",
            ONLINE,
            "preftune.trainers.grpo",
            "GRPOConfig",
            "run_grpo",
            "kl_coef",
            {"prompts_per_step": 8, "num_generations": 4},
            (0.0, 0.1),
            (0.05,),
            _ONLINE_LRS,
            _ONLINE_LRS,
        ),
        Method(
            "rloo",
            "RLOO",
            ONLINE,
            "preftune.trainers.rloo",
            "RLOOConfig",
            "run_rloo",
            "kl_coef",
            {"prompts_per_step": 8, "num_generations": 4},
            (0.0, 0.05),
            (0.05,),
            _ONLINE_LRS,
            _ONLINE_LRS,
        ),
        Method(
            "online_dpo",
            "online DPO",
            ONLINE,
            "preftune.trainers.online_dpo",
            "OnlineDPOConfig",
            "run_online_dpo",
            "beta",
            {"prompts_per_step": 16, "num_generations": 2},
            (0.1, 0.3),
            (0.1,),
            _ONLINE_LRS,
            _ONLINE_LRS,
        ),
        # Ensemble variant (issue 13; Coste et al. 2023): PPO on K reward models trained with
        # different seeds, optimising their mean minus one standard deviation. Not a default method.
        Method(
            "ppo_ensemble",
            "PPO on an RM ensemble",
            ONLINE,
            "preftune.trainers.ppo",
            "PPOConfig",
            "run_ppo",
            "kl_coef",
            {
                "prompts_per_step": 32,
                "num_generations": 1,
                "ensemble_agg": "mean-minus-std",
                "ensemble_coef": 1.0,
            },
            (0.0, 0.05),
            (0.05,),
            _ONLINE_LRS,
            _ONLINE_LRS,
            ensemble=True,
            variant_of="ppo",
        ),
        Method(
            "best_of_n_ensemble",
            "best-of-N on an RM ensemble",
            INFERENCE,
            knob="n",
            fixed={"ensemble_agg": "mean-minus-std", "ensemble_coef": 1.0},
            grid=(1, 2, 4, 8, 16, 32),
            quick_grid=(1, 4, 16),
            ensemble=True,
            variant_of="best_of_n",
        ),
        Method(
            "best_of_n",
            "best-of-N",
            INFERENCE,
            knob="n",
            grid=(1, 2, 4, 8, 16, 32),
            quick_grid=(1, 4, 16),
        ),
        # Oracle controls (the DPO paper's PPO-GT): the same algorithms optimising the gold reward
        # itself, so that reward-model error and the algorithm can be told apart.
        Method(
            "ppo_gold",
            "PPO on gold",
            ONLINE,
            "preftune.trainers.ppo",
            "PPOConfig",
            "run_ppo",
            "kl_coef",
            {"prompts_per_step": 32, "num_generations": 1},
            (0.05,),
            (0.05,),
            _ONLINE_LRS,
            _ONLINE_LRS,
            reward="gold",
            oracle_of="ppo",
        ),
        Method(
            "rloo_gold",
            "RLOO on gold",
            ONLINE,
            "preftune.trainers.rloo",
            "RLOOConfig",
            "run_rloo",
            "kl_coef",
            {"prompts_per_step": 8, "num_generations": 4},
            (0.05,),
            (0.05,),
            _ONLINE_LRS,
            _ONLINE_LRS,
            reward="gold",
            oracle_of="rloo",
        ),
        Method(
            "best_of_n_gold",
            "best-of-N on gold",
            INFERENCE,
            knob="n",
            grid=(1, 2, 4, 8, 16, 32),
            quick_grid=(1, 4, 16),
            reward="gold",
            oracle_of="best_of_n",
        ),
    )
}

DEFAULT_METHODS = ("dpo", "ppo", "best_of_n", "ppo_gold", "best_of_n_gold")
QUICK_METHODS = ("dpo", "ppo", "best_of_n", "ppo_gold", "best_of_n_gold")
