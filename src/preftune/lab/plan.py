"""What a lab run will do: its settings (`LabConfig`), the resolved grid (`Plan`) and the cells.

A cell is one unit of work with a result file: a base policy, one noise setting's data or
reward model, the base policy's evaluation, one trained (method, knob, lr) setting, or the
best-of-N sweep. Cells run in the order `cells(plan)` lists them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from preftune.config import arg
from preftune.errors import PreftuneError
from preftune.lab.methods import (
    DEFAULT_METHODS,
    INFERENCE,
    METHODS,
    OFFLINE,
    ONLINE,
    QUICK_METHODS,
)
from preftune.lab.worlds import NOISE_PRESETS, WORLDS, get_world

DEFAULT_NOISE = ("none", "human")


@dataclass
class LabConfig:
    """Settings of `preftune lab`. Grid settings left empty (or 0) take the preset's value:
    the default comparison, or the smoke-test grid of --quick."""

    quick: bool = arg(
        False,
        "Smoke run: the default methods with one knob value and one "
        "learning rate each, two seeds, shorter training: about 3 minutes on 2 "
        "CPU cores; its claims are underpowered.",
    )
    worlds: list[str] = arg([], "Worlds to run, of: " + ", ".join(WORLDS) + " (default: review).")
    methods: list[str] = arg(
        [],
        "Methods to compare, of: "
        + ", ".join(METHODS)
        + " (default: "
        + " ".join(DEFAULT_METHODS)
        + "). *_gold are the oracle controls "
        "that optimise the gold reward itself.",
    )
    seeds: list[int] = arg(
        [],
        "Seeds; each seed trains its own base policy, data, reward "
        "models and methods, and is the unit of the t-intervals (default: "
        "0 1 2; quick: 0 1).",
    )
    sweep: list[str] = arg(
        [],
        "Knob values per method, e.g. `dpo=0.1,1,5 ppo=0,0.05 "
        "best_of_n=1,4,16` (beta for the DPO family, KTO and online DPO; the "
        "KL coefficient for PPO, GRPO, RLOO; N for best-of-N).",
    )
    lrs: list[str] = arg(
        [],
        "Learning rates per method, e.g. `dpo=1e-4,5e-4`; each is trained "
        "at every knob value and the pair with the best validation gold "
        "reward is reported.",
    )
    noise: list[str] = arg(
        [],
        "Label noise settings compared (default: none human): each a "
        "flip rate in [0, 0.5], `human` (0.3 flips), `gpt4` (0.2) or `none` "
        "(the gold order).",
    )
    pairs: int = arg(
        0,
        "Preference pairs per world and seed, sampled from the base policy on "
        "training prompts (default: 1024; quick: 384).",
    )
    eval_prompts: int = arg(
        0,
        "Test prompts per part (seen, unseen) and validation prompts "
        "per evaluation (default: 64; quick: 32).",
    )
    model: str = arg(
        "tiny-64x2",
        "Architecture of the base policy: `tiny-<hidden>x<layers>`, "
        "trained from scratch on the world's corpus.",
    )
    sft_steps: int = arg(0, "SFT steps of the base policy (default: 800; quick: 300).")
    offline_steps: int = arg(
        0, "Optimizer steps of each offline method, 16 pairs per step (default: 100; quick: 30)."
    )
    online_steps: int = arg(
        0, "Rollouts of each online method, 32 completions per rollout (default: 30; quick: 10)."
    )
    ensemble_size: int = arg(
        3,
        "Reward models in the ensemble that the ensemble variants "
        "(ppo_ensemble, best_of_n_ensemble) optimise, trained with seeds "
        "seed, seed+1, ... "
        "(Coste et al. 2023); unused by the other methods.",
    )
    eval_points: int = arg(
        5,
        "Evaluations along each training run (checkpoints), at least 5: "
        "the trajectories of the report.",
    )
    output_dir: str = arg(
        "runs/lab",
        "Report folder; finished cells are kept in it and skipped "
        "when the lab runs again with the same settings.",
    )
    cache_dir: str = arg(
        "",
        "Where trained base policies are cached (default: "
        "$XDG_CACHE_HOME/preftune/lab or ~/.cache/preftune/lab).",
    )
    restart: bool = arg(
        False, "Run every cell again instead of resuming (cached base policies are still reused)."
    )
    threads: int = arg(
        1,
        "CPU threads torch uses while the lab runs (0: torch's default). The "
        "tiny models gain little from more, and on a busy machine several "
        "threads per process can run many times slower.",
    )

    def validate(self) -> None:
        for name in self.worlds:
            get_world(name)
        for name in self.methods:
            if name not in METHODS:
                raise PreftuneError(
                    f"methods: unknown method {name!r}; choose from " + ", ".join(METHODS)
                )
            if not METHODS[name].available():
                raise PreftuneError(
                    f"methods: {name} needs {METHODS[name].module}, which is "
                    "not installed in this preftune"
                )
        if len(set(self.seeds)) != len(self.seeds):
            raise PreftuneError(f"seeds: got {self.seeds}, expected distinct integers")
        if any(s < 0 for s in self.seeds):
            raise PreftuneError(f"seeds: got {self.seeds}, expected integers >= 0")
        parse_grid(self.sweep, "sweep")
        parse_grid(self.lrs, "lrs")
        for n in self.noise:
            noise_rate(n)
        for name in ("pairs", "eval_prompts", "sft_steps", "offline_steps", "online_steps"):
            if getattr(self, name) < 0:
                raise PreftuneError(
                    f"{name}: got {getattr(self, name)}, expected an integer "
                    ">= 0 (0: the preset's value)"
                )
        if 0 < self.pairs < 64:
            raise PreftuneError(
                f"pairs: got {self.pairs}, expected at least 64 (the methods "
                "train on batches of 16-32 pairs)"
            )
        if 0 < self.eval_prompts < 8:
            raise PreftuneError(f"eval_prompts: got {self.eval_prompts}, expected at least 8")
        if self.ensemble_size < 2:
            raise PreftuneError(
                f"ensemble_size: got {self.ensemble_size}, expected an integer "
                ">= 2 (an ensemble has at least two members)"
            )
        if self.eval_points < 5:
            raise PreftuneError(
                f"eval_points: got {self.eval_points}, expected at least 5 "
                "(a trajectory needs points to be a curve)"
            )
        for name in ("offline_steps", "online_steps"):
            if 0 < getattr(self, name) < self.eval_points:
                raise PreftuneError(
                    f"{name}: got {getattr(self, name)}, expected at least "
                    f"eval_points={self.eval_points}"
                )
        from preftune.models.tiny import parse_tiny_spec

        if not self.model.startswith("tiny") or parse_tiny_spec(self.model) is None:
            raise PreftuneError(
                f"model: got {self.model!r}, expected `tiny` or "
                "`tiny-<hidden>x<layers>` (the lab trains its base policy from "
                "scratch on the world's corpus)"
            )
        if not self.output_dir:
            raise PreftuneError("output_dir: expected a folder for the report")
        if self.threads < 0:
            raise PreftuneError(f"threads: got {self.threads}, expected an integer >= 0")


def noise_rate(noise: str) -> float | str:
    """`noise` as bt_label_pairs takes it: a preset name or a float in [0, 0.5]."""
    if noise in NOISE_PRESETS or noise == "none":
        return noise
    try:
        value = float(noise)
    except ValueError:
        raise PreftuneError(
            f"noise: got {noise!r}, expected a number in [0, 0.5] or one of: "
            "none, " + ", ".join(NOISE_PRESETS)
        ) from None
    if not 0 <= value <= 0.5:
        raise PreftuneError(f"noise: got {noise}, expected a flip rate in [0, 0.5]")
    return value


def flip_rate(noise: str) -> float:
    """The label flip rate `noise` stands for (0 for `none`)."""
    rate = noise_rate(noise)
    if rate == "none":
        return 0.0
    return NOISE_PRESETS[rate] if isinstance(rate, str) else float(rate)


def parse_grid(entries: list[str], field_name: str) -> dict[str, tuple[float, ...]]:
    """`METHOD=V1,V2 ...` -> {method: values}, checked."""
    out: dict[str, tuple[float, ...]] = {}
    for entry in entries:
        method, sep, values = entry.partition("=")
        method = method.strip().replace("-", "_")
        if not sep or method not in METHODS:
            raise PreftuneError(
                f"{field_name}: {entry!r} is not METHOD=V1,V2,... with METHOD "
                "one of " + ", ".join(METHODS)
            )
        try:
            parsed = tuple(float(v) for v in values.split(",") if v.strip())
        except ValueError:
            raise PreftuneError(
                f"{field_name}: {entry!r} has a value that is not a number"
            ) from None
        if not parsed:
            raise PreftuneError(f"{field_name}: {entry!r} lists no values")
        kind = METHODS[method].kind
        if field_name == "lrs":
            if kind == INFERENCE or any(v <= 0 for v in parsed):
                raise PreftuneError(
                    f"lrs: {entry!r}: learning rates must be > 0, for trained methods"
                )
        elif kind == INFERENCE:
            if any(v < 1 or v != int(v) for v in parsed):
                raise PreftuneError(f"{field_name}: {entry!r}: N must be integers >= 1")
            parsed = tuple(int(v) for v in parsed)
        elif any(v < 0 for v in parsed):
            raise PreftuneError(f"{field_name}: {entry!r}: values must be >= 0")
        out[method] = parsed
    return out


@dataclass
class Plan:
    """The resolved grid: every value concrete."""

    quick: bool
    worlds: list[str]
    methods: list[str]
    seeds: list[int]
    noises: list[str]
    sweeps: dict[str, list[float]]
    lrs: dict[str, list[float]]
    pairs: int
    eval_prompts: int
    model: str
    sft_steps: int
    sft_examples: int
    offline_steps: int
    online_steps: int
    reward_max_steps: int
    eval_points: int
    ensemble_size: int = 3
    left_out: dict[str, str] = field(default_factory=dict)  # method -> why


def resolve(cfg: LabConfig) -> Plan:
    q = cfg.quick
    left_out = {}
    if cfg.methods:
        methods = list(dict.fromkeys(cfg.methods))
    else:
        methods = []
        for m in QUICK_METHODS if q else DEFAULT_METHODS:
            if METHODS[m].available():
                methods.append(m)
            else:
                left_out[m] = f"its trainer ({METHODS[m].module}) is not available"
    sweep = parse_grid(cfg.sweep, "sweep")
    lrs = parse_grid(cfg.lrs, "lrs")
    return Plan(
        quick=q,
        worlds=list(dict.fromkeys(cfg.worlds)) or ["review"],
        methods=methods,
        seeds=list(cfg.seeds) or ([0, 1] if q else [0, 1, 2]),
        noises=list(dict.fromkeys(cfg.noise)) or list(DEFAULT_NOISE),
        sweeps={
            m: list(sweep.get(m, METHODS[m].quick_grid if q else METHODS[m].grid)) for m in methods
        },
        lrs={
            m: list(lrs.get(m, METHODS[m].quick_lrs if q else METHODS[m].lrs))
            for m in methods
            if METHODS[m].kind != INFERENCE
        },
        pairs=cfg.pairs or (384 if q else 1024),
        eval_prompts=cfg.eval_prompts or (32 if q else 64),
        model=cfg.model,
        sft_steps=cfg.sft_steps or (300 if q else 800),
        sft_examples=8000,
        offline_steps=cfg.offline_steps or (30 if q else 100),
        online_steps=cfg.online_steps or (10 if q else 30),
        reward_max_steps=200 if q else 600,
        eval_points=cfg.eval_points,
        ensemble_size=cfg.ensemble_size,
        left_out=left_out,
    )


@dataclass(frozen=True)
class Cell:
    """One unit of work. `noise` is None for cells that do not depend on the labels (the base
    policy, the oracle controls); `value`/`lr` are set for trained settings."""

    kind: str  # base, data, reward_model, reward_ensemble, eval, offline, online, inference
    world: str
    seed: int
    method: str = ""
    noise: str | None = None
    value: float | None = None
    lr: float | None = None

    @property
    def name(self) -> str:
        parts = [self.method or self.kind]
        if self.value is not None:
            parts.append(f"{self.value:g}")
        if self.lr is not None:
            parts.append(f"lr{self.lr:g}")
        return "-".join(parts)

    @property
    def group(self) -> str:
        """Folder of the cell: world/seed/noise."""
        return f"{self.world}/seed{self.seed}/noise-{self.noise or 'any'}"

    def describe(self) -> str:
        where = f"{self.world} seed {self.seed}" + (f" noise {self.noise}" if self.noise else "")
        what = {
            "base": "base policy (SFT)",
            "data": "preference data",
            "reward_model": "reward model",
            "eval": "evaluate base policy",
            "reward_ensemble": "reward-model ensemble",
        }.get(self.kind)
        if what is None:
            m = METHODS[self.method]
            what = (
                "best-of-N sweep (every reward)"
                if self.kind == INFERENCE
                else (f"train {m.label} {m.knob}={self.value:g} lr={self.lr:g}")
            )
        return f"{where} | {what}"


def cells(plan: Plan) -> list[Cell]:
    """Every cell, in run order: per world and seed the base policy, the oracle controls, then
    per noise setting the data, reward model, base evaluation and the methods."""
    out: list[Cell] = []
    needs_rm = any(METHODS[m].uses_reward_model and not METHODS[m].ensemble for m in plan.methods)
    needs_ensemble = any(METHODS[m].ensemble for m in plan.methods)
    for world in plan.worlds:
        for seed in plan.seeds:
            out.append(Cell("base", world, seed))
            out.append(Cell("eval", world, seed, "base_policy"))
            for noise in plan.noises:
                out.append(Cell("data", world, seed, noise=noise))
                if needs_rm:
                    out.append(Cell("reward_model", world, seed, noise=noise))
                if needs_ensemble:
                    out.append(Cell("reward_ensemble", world, seed, noise=noise))
                out += _method_cells(plan, world, seed, noise, oracle=False)
            out += _method_cells(plan, world, seed, None, oracle=True)
            if any(METHODS[m].kind == INFERENCE for m in plan.methods):
                # One sampling of the base policy serves best-of-N under every reward.
                out.append(Cell(INFERENCE, world, seed, "best_of_n"))
    return out


def _method_cells(plan: Plan, world: str, seed: int, noise: str | None, oracle: bool):
    out = []
    for m in plan.methods:
        method = METHODS[m]
        if (method.reward == "gold") != oracle:
            continue
        if method.kind in (OFFLINE, ONLINE):
            out += [
                Cell(method.kind, world, seed, m, noise, v, lr)
                for v in plan.sweeps[m]
                for lr in plan.lrs[m]
            ]
    return out
