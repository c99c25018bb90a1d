"""Synthetic worlds for `preftune lab`: prompts, a demonstration corpus and a GOLD reward.

A controlled benchmark in the spirit of the DPO paper's controlled-sentiment experiment
(Rafailov et al. 2023, sec. 6.1) and "Unpacking DPO and PPO" (Ivison et al. 2024): because the
gold reward is a program, we can measure how much each method improves it and at what KL cost
to the base policy, without human raters.

Every world is sized for the `tiny` model (byte-level tokenizer): prompts are at most 40 bytes,
completions at most 48 bytes, both ASCII; a few fixed templates and small vocabularies so that
a ~100k-1M parameter model learns the *format* from a few thousand demonstrations in a minute.
The demonstrations are natural but not gold-optimal (a spread of gold rewards), so preference
optimisation has room to improve on the base policy.

A world offers:
    name, description, max_new_tokens
    make_prompts(n, rng) -> list[str]
    make_corpus(n, rng) -> list[(prompt, completion)]
    split_prompts(rng) -> PromptSplit                     # train / validation / test strings
    gold_reward(prompts, completions) -> list[float]     # deterministic, pure Python

`bt_label_pairs` turns gold rewards of two completions into noisy preference labels
(Bradley-Terry plus a flip rate), the way a human or an LLM judge would label them.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from preftune.errors import PreftuneError

MAX_PROMPT_BYTES = 40
MAX_COMPLETION_BYTES = 48


class World(Protocol):
    """What the lab needs from a world (both worlds below are frozen dataclasses)."""

    name: str
    description: str
    max_new_tokens: int

    def make_prompts(self, n: int, rng: random.Random) -> list[str]: ...

    def make_corpus(self, n: int, rng: random.Random) -> list[tuple[str, str]]: ...

    def gold_reward(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]: ...

    def split_prompts(self, rng: random.Random, unseen_fraction: float = 0.2) -> PromptSplit: ...


def _check_lengths(prompts: Sequence[str], completions: Sequence[str]) -> None:
    if len(prompts) != len(completions):
        raise ValueError(f"gold_reward: {len(prompts)} prompts but {len(completions)} completions")


# --------------------------------------------------------------------------------------------
# review: controlled sentiment with content and fluency
# --------------------------------------------------------------------------------------------

# Hidden sentiment lexicon. Weights differ on purpose ("good" is only mildly positive, "fine"
# barely), so the best word is not simply the most frequent positive word in the corpus.
_GENERIC_ADJ = {
    "pos": {"excellent": 1.0, "great": 0.9, "lovely": 0.8, "good": 0.6, "nice": 0.5},
    "neu": {"decent": 0.3, "fine": 0.2, "okay": 0.1, "plain": 0.0},
    "neg": {"mediocre": -0.3, "poor": -0.6, "bad": -0.7, "awful": -0.9, "terrible": -1.0},
}
_VERBS = {
    "pos": {"love": 0.8, "recommend": 0.7, "enjoy": 0.6, "like": 0.5},
    "neg": {"hate": -1.0, "regret": -0.7, "dislike": -0.6},
}
_ADVERBS = ("very", "quite", "really", "so", "rather")  # sentiment-neutral

# Attribute adjectives: (sentiment weight, products the attribute fits). Mentioning a fitting
# attribute is "on topic"; an attribute of some other product ("tasty lamp") is off topic.
_ATTRIBUTES: dict[str, tuple[float, tuple[str, ...]]] = {
    "bright": (0.6, ("lamp", "torch", "screen")),
    "dim": (-0.5, ("lamp", "torch", "screen")),
    "tasty": (0.7, ("soup", "bread", "pizza", "cake", "salad")),
    "bland": (-0.5, ("soup", "bread", "pizza", "cake", "salad", "tea", "coffee")),
    "fresh": (0.5, ("bread", "cake", "salad", "tea", "coffee")),
    "stale": (-0.6, ("bread", "cake")),
    "hot": (0.3, ("soup", "coffee", "tea", "pizza")),
    "cold": (-0.3, ("soup", "coffee", "tea", "pizza")),
    "crisp": (0.4, ("pizza", "salad", "bread")),
    "comfy": (0.6, ("chair", "sofa", "bed", "shoe", "pillow")),
    "stiff": (-0.4, ("chair", "sofa", "bed", "shoe", "jacket")),
    "lumpy": (-0.5, ("pillow", "bed", "sofa")),
    "soft": (0.4, ("pillow", "blanket", "towel", "scarf", "glove", "bed", "sofa")),
    "rough": (-0.4, ("towel", "blanket", "scarf", "glove")),
    "warm": (0.4, ("jacket", "blanket", "scarf", "glove")),
    "sharp": (0.6, ("knife", "axe", "pencil")),
    "dull": (-0.5, ("knife", "axe", "pencil")),
    "fast": (0.6, ("laptop", "phone", "car", "bike", "router", "kettle")),
    "slow": (-0.6, ("laptop", "phone", "car", "bike", "router", "kettle")),
    "quiet": (0.4, ("fan", "fridge", "laptop", "car")),
    "noisy": (-0.5, ("fan", "fridge", "laptop", "car", "speaker")),
    "clear": (0.5, ("speaker", "radio", "screen", "phone")),
    "crackly": (-0.5, ("radio", "speaker", "phone")),
    "sturdy": (0.4, ("chair", "table", "desk", "lamp", "bike", "tent", "umbrella", "bottle")),
    "flimsy": (-0.6, ("chair", "table", "desk", "lamp", "tent", "umbrella")),
    "leaky": (-0.6, ("tent", "umbrella", "kettle", "bottle")),
    "roomy": (0.4, ("tent", "bag", "car", "fridge")),
    "cramped": (-0.4, ("tent", "bag", "car")),
}
PRODUCTS: tuple[str, ...] = tuple(
    sorted({product for _, fits in _ATTRIBUTES.values() for product in fits})
)

_SENTIMENT: dict[str, float] = {
    **{w: s for bucket in _GENERIC_ADJ.values() for w, s in bucket.items()},
    **{w: s for bucket in _VERBS.values() for w, s in bucket.items()},
    **{w: s for w, (s, _) in _ATTRIBUTES.items()},
}

# The grammar: each template is a sequence of literal words and word classes. Fluency is
# judged by word bigrams (with sentence start/end markers) that some template produces.
_CLASSES: dict[str, tuple[str, ...]] = {
    "ADJ": tuple(w for bucket in _GENERIC_ADJ.values() for w in bucket) + tuple(_ATTRIBUTES),
    "ADV": _ADVERBS,
    "VERB": tuple(w for bucket in _VERBS.values() for w in bucket),
    "PRODUCT": PRODUCTS,
}
# (template, corpus weight, usable for a neutral review)
_TEMPLATES: tuple[tuple[tuple[str, ...], float, bool], ...] = (
    (("it", "is", "ADJ", "."), 3.0, True),
    (("it", "is", "ADV", "ADJ", "."), 2.0, True),
    (("it", "is", "ADJ", "and", "ADJ", "."), 2.0, True),
    (("the", "PRODUCT", "is", "ADJ", "."), 2.0, True),
    (("the", "PRODUCT", "is", "ADV", "ADJ", "."), 1.0, True),
    (("i", "VERB", "it", "."), 1.0, False),
    (("i", "VERB", "it", ",", "it", "is", "ADJ", "."), 1.5, False),
    (("ADV", "ADJ", "."), 1.0, True),
)
_START, _END = "<s>", "</s>"


def _grammar_bigrams() -> frozenset[tuple[str, str]]:
    pairs = set()
    for template, _, _ in _TEMPLATES:
        symbols = (_START, *template, _END)
        for left, right in zip(symbols, symbols[1:]):
            for a in _CLASSES.get(left, (left,)):
                for b in _CLASSES.get(right, (right,)):
                    pairs.add((a, b))
    return frozenset(pairs)


_BIGRAMS = _grammar_bigrams()
# How often a token may occur before it counts as a repetition ("i love it, it is ..." has two).
_ALLOWED_COUNT = {"it": 2}
_TOKEN = re.compile(r"[a-z]+|\S")  # words, then any other non-space character on its own
# Prompt templates: several strings per product, so that a product can be "seen" in training
# while the test prompt string itself is new (the three-way split needs disjoint strings).
REVIEW_TEMPLATES: tuple[str, ...] = (
    "Review of the {}:",
    "A review of the {}:",
    "My review of the {}:",
    "Rate the {}:",
    "Thoughts on the {}:",
    "About the {}:",
)
_REVIEW_PROMPT = re.compile(
    r"^(?:Review of|A review of|My review of|Rate|Thoughts on|About) "
    r"the ([a-z]+):$"
)


def _review_prompt(product: str, template: int = 0) -> str:
    return REVIEW_TEMPLATES[template].format(product)


def _render(words: Sequence[str]) -> str:
    """[it, is, good, .] -> ' it is good.' (completions start with a space after the colon)."""
    return " " + " ".join(words).replace(" ,", ",").replace(" .", ".")


@dataclass(frozen=True)
class ReviewParts:
    """The three components of the review gold reward, for reports and debugging."""

    fluency: float  # [0, 1]
    sentiment: float  # [-1, 1]
    content: float  # {-0.5, 0, 0.5, 1}
    reward: float  # [-2, 2]


@dataclass(frozen=True)
class ReviewWorld:
    """Short product reviews; the gold reward wants fluent, positive, on-topic text.

    Prompt: "Review of the <product>:" (or one of five other templates) for one of 39 products.
    Completion: one sentence from a small grammar, e.g. " it is bright and great." or
    " i love it, it is comfy.".

    Gold reward, in [-2, 2]:  f * (s + c) - 2 * (1 - f)
      f  fluency in [0, 1]: the fraction of word bigrams (with sentence start and end) that the
         grammar can produce, halved for every repeated token (beyond two "it"). Case-sensitive;
         whitespace is ignored; punctuation and unknown characters are tokens of their own.
      s  sentiment in [-1, 1]: the MEAN hidden lexicon weight of the sentiment-bearing words
         (adjectives, attributes, verbs), 0 if there are none. A mean, so piling up positive
         words never beats the single best one.
      c  content: +1 if an attribute that fits the product is mentioned ("bright" for a lamp),
         -0.5 if an attribute of other products or another product's name is mentioned.
    A fluent, positive, on-topic review scores about 1.5-1.8; a fluent neutral one about 0;
    the worst fluent one -1.5; gibberish, repeated words and the empty string score about -2.

    Why KL matters here: a reward model learned from noisy pairs mostly learns "positive words
    are good". Over-optimising it drifts towards lists of praise ("great lovely excellent"),
    repeated words or positive-but-off-topic attributes ("tasty lamp"): the proxy keeps rising
    while the gold reward falls (fluency and content collapse). Staying close to the base
    policy keeps the text grammatical.
    """

    name: str = "review"
    max_new_tokens: int = 48
    description: str = (
        "review: short product reviews ('Review of the lamp:' -> ' it is bright and great.').\n"
        "Gold reward in [-2, 2] = fluency * (sentiment + content) - 2 * (1 - fluency):\n"
        "hidden sentiment lexicon (mean weight), +1 for an attribute that fits the product,\n"
        "fluency = grammatical word bigrams, halved per repeated word.\n"
        "Over-optimising a learned proxy shows up as lists of praise, repeated or off-topic\n"
        "words: the proxy rises while gold falls."
    )

    def make_prompts(self, n: int, rng: random.Random) -> list[str]:
        return [
            _review_prompt(rng.choice(PRODUCTS), rng.randrange(len(REVIEW_TEMPLATES)))
            for _ in range(n)
        ]

    def split_prompts(self, rng: random.Random, unseen_fraction: float = 0.2) -> PromptSplit:
        """Disjoint prompt strings. Unseen: every template of a fifth of the products (never in
        training). Seen products: each (product, template) string goes to train (at least one
        per product), validation or the seen part of test."""
        products = list(PRODUCTS)
        rng.shuffle(products)
        n_unseen = max(1, round(unseen_fraction * len(products)))
        unseen = [
            _review_prompt(p, t) for p in products[:n_unseen] for t in range(len(REVIEW_TEMPLATES))
        ]
        strings = [
            [_review_prompt(p, t) for t in range(len(REVIEW_TEMPLATES))]
            for p in products[n_unseen:]
        ]
        return _split_groups(strings, unseen, rng)

    def make_corpus(self, n: int, rng: random.Random) -> list[tuple[str, str]]:
        """Demonstrations from a noisy reviewer: 45% positive, 25% neutral, 30% negative; about
        a third of adjectives are fitting attributes, a tenth off-topic ones, some repeat."""
        templates = [t for t, _, _ in _TEMPLATES]
        weights = [w for _, w, _ in _TEMPLATES]
        neutral = [t for t, _, ok in _TEMPLATES if ok]
        neutral_weights = [w for _, w, ok in _TEMPLATES if ok]
        rows = []
        for _ in range(n):
            product = rng.choice(PRODUCTS)
            polarity = rng.choices(("pos", "neu", "neg"), weights=(0.45, 0.25, 0.30))[0]
            if polarity == "neu":
                template = rng.choices(neutral, weights=neutral_weights)[0]
            else:
                template = rng.choices(templates, weights=weights)[0]
            words = [self._fill(slot, product, polarity, rng) for slot in template]
            template = rng.randrange(len(REVIEW_TEMPLATES))
            rows.append((_review_prompt(product, template), _render(words)))
        return rows

    @staticmethod
    def _fill(slot: str, product: str, polarity: str, rng: random.Random) -> str:
        if slot == "ADV":
            return rng.choice(_ADVERBS)
        if slot == "VERB":
            return rng.choice(tuple(_VERBS[polarity]))
        if slot == "PRODUCT":  # one review in ten names the wrong product: a sloppy reviewer
            return product if rng.random() < 0.9 else rng.choice(PRODUCTS)
        if slot != "ADJ":
            return slot
        r = rng.random()
        if r < 0.45 and polarity != "neu":
            want_fit = r < 0.35
            pool = [
                w
                for w, (s, fits) in _ATTRIBUTES.items()
                if (product in fits) == want_fit and (s > 0) == (polarity == "pos")
            ]
            return rng.choice(pool)
        return rng.choice(tuple(_GENERIC_ADJ[polarity]))

    def parts(self, prompt: str, completion: str) -> ReviewParts:
        """The gold reward of one completion, with its components (see the class docstring)."""
        match = _REVIEW_PROMPT.match(prompt)
        if match is None or match.group(1) not in PRODUCTS:
            raise PreftuneError(
                f"review world: prompt {prompt!r} is not 'Review of the <product>:' (or another "
                f"of {REVIEW_TEMPLATES}) for a known product ({', '.join(PRODUCTS)})"
            )
        product = match.group(1)
        tokens = _TOKEN.findall(completion)

        symbols = [_START, *tokens, _END]
        n_pairs = len(symbols) - 1
        good = sum((a, b) in _BIGRAMS for a, b in zip(symbols, symbols[1:]))
        counts: dict[str, int] = {}
        for token in tokens:
            counts[token] = counts.get(token, 0) + 1
        repeats = sum(max(0, c - _ALLOWED_COUNT.get(t, 1)) for t, c in counts.items())
        fluency = (good / n_pairs) * 0.5**repeats

        weights = [_SENTIMENT[t] for t in tokens if t in _SENTIMENT]
        sentiment = sum(weights) / len(weights) if weights else 0.0

        fits = any(t in _ATTRIBUTES and product in _ATTRIBUTES[t][1] for t in tokens)
        off_topic = any(
            (t in _ATTRIBUTES and product not in _ATTRIBUTES[t][1])
            or (t in PRODUCTS and t != product)
            for t in tokens
        )
        content = (1.0 if fits else 0.0) - (0.5 if off_topic else 0.0)

        reward = fluency * (sentiment + content) - 2.0 * (1.0 - fluency)
        return ReviewParts(fluency, sentiment, content, reward)

    def gold_reward(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        _check_lengths(prompts, completions)
        return [self.parts(p, c).reward for p, c in zip(prompts, completions)]


# --------------------------------------------------------------------------------------------
# arithmetic: a verifiable reward
# --------------------------------------------------------------------------------------------

_ARITH_PROMPT = re.compile(r"^(\d+)([+-])(\d+)=$")
_CANONICAL_INT = re.compile(r"^(0|-?[1-9][0-9]*)$")


@dataclass(frozen=True)
class ArithmeticWorld:
    """Small-number arithmetic with a verifiable 0/1 reward.

    Prompt: "7+15=" (operands in [min_operand, max_operand]; with "-" in `ops`, "17-5=" with
    the larger operand first, so answers are never negative). Completion: the answer, "22".
    The default range 0-19 (400 sums) is what a 0.2M-parameter byte-level base policy learns
    in the lab's 1,000 SFT steps: with two-digit operands (8,100 sums) it was right 9% of the
    time against the demonstrator's 50% and no reward model learned anything from its pairs
    (measured); with 0-19 it is right about a third of the time.

    Gold reward: 1.0 if `completion.strip()` (surrounding spaces, tabs and newlines removed) is
    exactly the canonical decimal of the answer, else 0.0. Canonical: digits only, no sign, no
    leading zero, no decimal point. So "42", " 42", "42\\n" score 1; "042", "+42", "42.0",
    "4 2", "42 and more", "41 42" and "" score 0. Extra text never helps: the answer must be the
    whole completion, so hedging with several numbers or padding after the answer scores 0.

    The corpus is a noisy demonstrator: right `p_correct` of the time, otherwise off by a small
    amount (+-1, +-2, or +-10 for a carry mistake), so the base policy starts well below 1.

    Why KL matters here: the gold reward cannot be gamed, but a learned reward model can: it
    may reward answers that merely look right (the right number of digits, the right last digit)
    or stray text it never saw, and a policy pushed far from the base one finds those.
    """

    name: str = "arithmetic"
    max_new_tokens: int = 8
    min_operand: int = 0
    max_operand: int = 19
    ops: tuple[str, ...] = ("+",)
    p_correct: float = 0.5
    description: str = (
        "arithmetic: addition of numbers 0-19 ('7+15=' -> '22'), a verifiable reward.\n"
        "Gold reward 1 if the completion, stripped of surrounding whitespace, is exactly the\n"
        "answer (no leading zeros, no extra text), else 0. The demonstrator is right half the\n"
        "time, otherwise off by 1, 2 or 10. A learned proxy can be fooled by answers that only\n"
        "look right; gold cannot."
    )

    def _question(self, rng: random.Random) -> tuple[str, int]:
        a = rng.randint(self.min_operand, self.max_operand)
        b = rng.randint(self.min_operand, self.max_operand)
        op = rng.choice(self.ops)
        if op == "-":
            a, b = max(a, b), min(a, b)
        return f"{a}{op}{b}=", a + b if op == "+" else a - b

    def make_prompts(self, n: int, rng: random.Random) -> list[str]:
        return [self._question(rng)[0] for _ in range(n)]

    def split_prompts(self, rng: random.Random, unseen_fraction: float = 0.2) -> PromptSplit:
        """Disjoint prompt strings. Unseen: a fifth of the operand pairs {a, b}, in both orders,
        never in training. Seen pairs: one order goes to train, the other (a "seen" operand
        pair as a new string) to train, validation or test; a + a goes to train."""
        if self.ops != ("+",):
            raise PreftuneError("arithmetic world: split_prompts supports ops ('+',) only")
        values = range(self.min_operand, self.max_operand + 1)
        pairs = [(a, b) for a in values for b in values if a < b]
        rng.shuffle(pairs)
        n_unseen = max(1, round(unseen_fraction * len(pairs)))
        unseen = [s for a, b in pairs[:n_unseen] for s in (f"{a}+{b}=", f"{b}+{a}=")]
        groups = [
            [f"{a}+{b}=", f"{b}+{a}="] if rng.random() < 0.5 else [f"{b}+{a}=", f"{a}+{b}="]
            for a, b in pairs[n_unseen:]
        ]
        groups += [[f"{a}+{a}="] for a in values]
        return _split_groups(groups, unseen, rng)

    def make_corpus(self, n: int, rng: random.Random) -> list[tuple[str, str]]:
        rows = []
        for _ in range(n):
            prompt, answer = self._question(rng)
            if rng.random() >= self.p_correct:
                # A near miss that stays a plausible non-negative number.
                answer += rng.choice([d for d in (-10, -2, -1, 1, 2, 10) if answer + d >= 0])
            rows.append((prompt, str(answer)))
        return rows

    @staticmethod
    def answer(prompt: str) -> int:
        match = _ARITH_PROMPT.match(prompt)
        if match is None:
            raise PreftuneError(
                f"arithmetic world: prompt {prompt!r} is not '<a>+<b>=' or '<a>-<b>='"
            )
        a, op, b = int(match.group(1)), match.group(2), int(match.group(3))
        return a + b if op == "+" else a - b

    def gold_reward(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        _check_lengths(prompts, completions)
        rewards = []
        for prompt, completion in zip(prompts, completions):
            text = completion.strip()
            ok = _CANONICAL_INT.match(text) is not None and int(text) == self.answer(prompt)
            rewards.append(1.0 if ok else 0.0)
        return rewards


# --------------------------------------------------------------------------------------------
# prompt splits
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptSplit:
    """Distinct prompt strings, pairwise disjoint. `test_seen`: new strings whose product (or
    operand pair) is in training; `test_unseen`: products (operand pairs) never in training."""

    train: tuple[str, ...]
    validation: tuple[str, ...]
    test_seen: tuple[str, ...]
    test_unseen: tuple[str, ...]

    @property
    def test(self) -> tuple[str, ...]:
        return self.test_seen + self.test_unseen

    def overlap(self) -> int:
        """Strings in more than one part (0 by construction; results.json reports it)."""
        parts = (self.train, self.validation, self.test_seen, self.test_unseen)
        return sum(len(p) for p in parts) - len(set().union(*parts))


def _split_groups(
    groups: list[list[str]],
    unseen: list[str],
    rng: random.Random,
    validation: float = 0.2,
    test: float = 0.2,
) -> PromptSplit:
    """The first string of every group goes to train; each other one to validation, test or
    train with probabilities (validation, test, rest)."""
    train, val, test_seen = [], [], []
    for group in groups:
        train.append(group[0])
        for s in group[1:]:
            r = rng.random()
            (val if r < validation else test_seen if r < validation + test else train).append(s)
    return PromptSplit(tuple(train), tuple(val), tuple(test_seen), tuple(unseen))


# --------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------

WORLDS: dict[str, World] = {
    "review": ReviewWorld(),
    "arithmetic": ArithmeticWorld(),
}


def get_world(name: str) -> World:
    try:
        return WORLDS[name]
    except KeyError:
        raise PreftuneError(
            f"unknown world {name!r}; choose one of: {', '.join(sorted(WORLDS))}"
        ) from None


# --------------------------------------------------------------------------------------------
# preference labels
# --------------------------------------------------------------------------------------------

# Flip rates of the named labellers. Human annotators of summaries/dialogue agree with each
# other roughly 65-75% of the time, GPT-4 as a judge agrees with humans about as often as
# humans do; these presets are round numbers in that spirit, not measurements.
NOISE_PRESETS: dict[str, float] = {"human": 0.3, "gpt4": 0.2}


def bt_label_pairs(
    gold_a: Sequence[float],
    gold_b: Sequence[float],
    *,
    noise: str | float,
    rng: random.Random,
    temperature: float = 1.0,
) -> list[bool]:
    """Preference labels for pairs (a, b): True where a is preferred.

    Each label is drawn by Bradley-Terry on the gold reward, P(a > b) = sigmoid((g_a - g_b) /
    temperature), and then flipped with probability `noise` (a labeller's careless mistakes,
    independent of how different a and b are). So
        P(label = a) = (1 - noise) * sigmoid(d / T) + noise * (1 - sigmoid(d / T)).
    `noise`: a float in [0, 0.5], or a preset: "human" (0.3), "gpt4" (0.2), or "none":
    no sampling at all, the gold argmax (a tie is a fair coin), so `temperature` is unused.

    "Agreement" means the fraction of labels equal to the gold argmax (the label a noiseless
    judge gives). It is 1 - noise only where |g_a - g_b| >> temperature; for close pairs the
    Bradley-Terry draw itself disagrees too, so the measured agreement is lower than 1 - noise.
    """
    if len(gold_a) != len(gold_b):
        raise ValueError(f"bt_label_pairs: {len(gold_a)} rewards for a but {len(gold_b)} for b")
    if isinstance(noise, str):
        if noise == "none":
            return [a > b if a != b else rng.random() < 0.5 for a, b in zip(gold_a, gold_b)]
        if noise not in NOISE_PRESETS:
            raise PreftuneError(
                f"label noise {noise!r} is not a number in [0, 0.5] or one of: none, "
                f"{', '.join(NOISE_PRESETS)}"
            )
        flip = NOISE_PRESETS[noise]
    else:
        flip = float(noise)
        if not 0.0 <= flip <= 0.5:
            raise PreftuneError(
                f"label noise must be in [0, 0.5] (a flip rate; above 0.5 labels would be "
                f"anti-correlated with the gold reward), got {noise}"
            )
    if not temperature > 0:
        raise PreftuneError(f"label temperature must be > 0, got {temperature}")

    labels = []
    for a, b in zip(gold_a, gold_b):
        p_a = _sigmoid((a - b) / temperature)
        label = rng.random() < p_a
        if rng.random() < flip:
            label = not label
        labels.append(label)
    return labels


def _sigmoid(x: float) -> float:
    # Split by sign so that exp never overflows.
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)
