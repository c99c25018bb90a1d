"""Rule-based rewards for the online-trainer tests, loaded by file path
(`tests/rewards_for_tests.py:lowercase_fraction`): tests/ is not a package.

A random `tiny` model samples each of its 263 tokens about equally often, so a reward that
counts one byte is almost always 0 at the start; `lowercase_fraction` (26 of 256 byte values)
starts near 0.1 and gives every rollout a spread of rewards a few dozen steps can climb.
"""

import math
import string

LOWERCASE = set(string.ascii_lowercase)


def lowercase_fraction(prompts, completions, **extra):
    """Share of the completion's characters that are ASCII lowercase letters (0 if empty)."""
    return [sum(ch in LOWERCASE for ch in c) / max(len(c), 1) for c in completions]


def count_letter(prompts, completions, letter=None, **extra):
    """How often the row's `letter` column (default "a") occurs in its completion."""
    letters = letter if letter is not None else ["a"] * len(completions)
    return [float(c.count(x or "a")) for c, x in zip(completions, letters)]


def completion_length(prompts, completions):
    """Characters in the completion: a second source for weighted combinations."""
    return [float(len(c)) for c in completions]


def raises(prompts, completions):
    raise ValueError("this reward function is broken on purpose")


def wrong_shape(prompts, completions):
    return [1.0] * (len(completions) + 1)


def returns_nan(prompts, completions):
    return [math.nan] * len(completions)


def column_value(prompts, completions, value):
    """The row's `value` column as its reward: proves the column reached its own row."""
    return [float(v) for v in value]
