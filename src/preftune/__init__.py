"""preftune: teach language models from preference feedback.

The Python API: each command's config class and run function, imported on first use (so that
`import preftune` stays fast and loads no torch):

    from preftune import DPOConfig, run_dpo, load_config
    cfg = load_config(DPOConfig, "run.yaml", max_steps=100)   # or DPOConfig(model=..., ...)
    metrics = run_dpo(cfg)

`load_config` resolves settings as the command line does: defaults, then the YAML file (TRL's
key names accepted), then the keyword arguments; then it validates.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> module; one config class and one run function per command (see preftune.cli).
_EXPORTS = {
    "SFTConfig": "preftune.trainers.sft",
    "run_sft": "preftune.trainers.sft",
    "DPOConfig": "preftune.trainers.dpo",
    "run_dpo": "preftune.trainers.dpo",
    "KTOConfig": "preftune.trainers.kto",
    "run_kto": "preftune.trainers.kto",
    "RewardConfig": "preftune.trainers.reward",
    "run_reward": "preftune.trainers.reward",
    "EvalRMConfig": "preftune.evaluation.eval_rm",
    "run_eval_rm": "preftune.evaluation.eval_rm",
    "PPOConfig": "preftune.trainers.ppo",
    "run_ppo": "preftune.trainers.ppo",
    "GRPOConfig": "preftune.trainers.grpo",
    "run_grpo": "preftune.trainers.grpo",
    "RLOOConfig": "preftune.trainers.rloo",
    "run_rloo": "preftune.trainers.rloo",
    "OnlineDPOConfig": "preftune.trainers.online_dpo",
    "run_online_dpo": "preftune.trainers.online_dpo",
    "BestOfNConfig": "preftune.trainers.best_of_n",
    "run_best_of_n": "preftune.trainers.best_of_n",
    "LabConfig": "preftune.lab.run",
    "run_lab": "preftune.lab.run",
    "PlotConfig": "preftune.engine.curves",
    "run_plot": "preftune.engine.curves",
    "DataToolConfig": "preftune.datatools.cli",
    "run_data": "preftune.datatools.cli",
    "PreftuneError": "preftune.errors",
}

__all__ = [  # noqa: RUF022 - in the order of the commands
    "SFTConfig",
    "run_sft",
    "DPOConfig",
    "run_dpo",
    "KTOConfig",
    "run_kto",
    "RewardConfig",
    "run_reward",
    "EvalRMConfig",
    "run_eval_rm",
    "PPOConfig",
    "run_ppo",
    "GRPOConfig",
    "run_grpo",
    "RLOOConfig",
    "run_rloo",
    "OnlineDPOConfig",
    "run_online_dpo",
    "BestOfNConfig",
    "run_best_of_n",
    "LabConfig",
    "run_lab",
    "PlotConfig",
    "run_plot",
    "DataToolConfig",
    "run_data",
    "PreftuneError",
    "load_config",
    "__version__",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'preftune' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def load_config(cls: type, path: str | None = None, **settings: Any) -> Any:
    """A validated config of class `cls`: its defaults, then the YAML file at `path`, then
    `settings` (preftune or TRL names, e.g. `learning_rate=1e-6`)."""
    import dataclasses

    from preftune import trl_compat
    from preftune.config import _coerce, load_yaml_config

    values = load_yaml_config(path, cls) if path else {}
    fields = {f.name: f for f in dataclasses.fields(cls)}

    def coerce(value: Any, name: str) -> Any:
        return _coerce(cls, fields[name], value, "load_config")

    own = {k: coerce(v, k) for k, v in settings.items() if k in fields}
    trl = {f"trl:{k}": v for k, v in settings.items() if k not in fields}
    resolved = trl_compat.resolve_namespace(
        {**own, **trl}, cls, values, coerce, tokens=False, where="load_config"
    )
    values.update(resolved)
    cfg = cls(**values)
    cfg.validate()
    return cfg
