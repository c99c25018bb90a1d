"""Gold rewards as reward functions (`--reward-fn preftune.lab.gold:review`): what the lab's
oracle controls (PPO on gold, best-of-N on gold) optimise instead of a learned reward model."""

from __future__ import annotations

from preftune.lab.worlds import get_world


def review(prompts, completions) -> list[float]:
    return get_world("review").gold_reward(prompts, completions)


def arithmetic(prompts, completions) -> list[float]:
    return get_world("arithmetic").gold_reward(prompts, completions)


def spec(world: str) -> str:
    """The `module:function` spec of a world's gold reward."""
    get_world(world)
    return f"{__name__}:{world}"
