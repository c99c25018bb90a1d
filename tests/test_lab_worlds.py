import random
import statistics

import pytest

from preftune.errors import PreftuneError
from preftune.lab.worlds import (
    MAX_COMPLETION_BYTES,
    MAX_PROMPT_BYTES,
    NOISE_PRESETS,
    PRODUCTS,
    WORLDS,
    ArithmeticWorld,
    ReviewWorld,
    bt_label_pairs,
    get_world,
)

GOLD_RANGE = {"review": (-2.0, 2.0), "arithmetic": (0.0, 1.0)}


def _corpus_gold(world, n=2000, seed=0):
    rows = world.make_corpus(n, random.Random(seed))
    return rows, world.gold_reward([p for p, _ in rows], [c for _, c in rows])


# ---------------------------------------------------------------- every world


@pytest.mark.parametrize("name", sorted(WORLDS))
def test_world_is_deterministic_given_seed(name):
    world = get_world(name)
    assert world.make_corpus(50, random.Random(3)) == world.make_corpus(50, random.Random(3))
    assert world.make_prompts(50, random.Random(3)) == world.make_prompts(50, random.Random(3))
    assert world.make_corpus(50, random.Random(3)) != world.make_corpus(50, random.Random(4))
    rows = world.make_corpus(50, random.Random(3))
    prompts, completions = [p for p, _ in rows], [c for _, c in rows]
    assert world.gold_reward(prompts, completions) == world.gold_reward(prompts, completions)


@pytest.mark.parametrize("name", sorted(WORLDS))
def test_texts_are_short_ascii(name):
    world = get_world(name)
    rows = world.make_corpus(3000, random.Random(1))
    prompts = world.make_prompts(3000, random.Random(2)) + [p for p, _ in rows]
    for text in prompts:
        assert text.isascii() and 0 < len(text.encode()) <= MAX_PROMPT_BYTES, text
    for _, text in rows:
        assert text.isascii() and 0 < len(text.encode()) <= MAX_COMPLETION_BYTES, text
        assert len(text.encode()) <= world.max_new_tokens
    assert 0 < world.max_new_tokens <= MAX_COMPLETION_BYTES
    assert world.name == name and world.description.strip()


@pytest.mark.parametrize("name", sorted(WORLDS))
def test_corpus_gold_has_room_to_improve(name):
    low, high = GOLD_RANGE[name]
    _, gold = _corpus_gold(get_world(name))
    assert all(low <= g <= high for g in gold)
    mean = statistics.mean(gold)
    # Well inside the range: neither already optimal nor hopeless, and a real spread.
    assert low + 0.2 * (high - low) < mean < high - 0.2 * (high - low), mean
    assert statistics.pstdev(gold) > 0.1 * (high - low)


def test_gold_reward_checks_lengths():
    with pytest.raises(ValueError):
        get_world("review").gold_reward(["Review of the lamp:"], [])


def test_get_world_unknown_lists_names():
    with pytest.raises(PreftuneError, match="arithmetic.*review"):
        get_world("sentiment")


# ---------------------------------------------------------------- review


def _review(completion, product="lamp"):
    return ReviewWorld().gold_reward([f"Review of the {product}:"], [completion])[0]


def test_review_hand_computed_reward():
    # fluent (f=1), sentiment mean(bright 0.6, great 0.9) = 0.75, fitting attribute c=1
    assert _review(" it is bright and great.") == pytest.approx(0.75 + 1.0)
    # "tasty" is off topic for a lamp: c = -0.5; sentiment mean(0.7, 0.9) = 0.8
    assert _review(" it is tasty and great.") == pytest.approx(0.8 - 0.5)
    # no period: of <s> it, it is, is bright, bright </s> only the last is ungrammatical
    f = 3 / 4
    assert _review(" it is bright") == pytest.approx(f * (0.6 + 1.0) - 2 * (1 - f))
    # "tea" named for a lamp is off topic
    assert _review(" the tea is great.") == pytest.approx(0.9 - 0.5)


@pytest.mark.parametrize(
    "degenerate",
    [
        "",
        "   ",
        " great great great great",
        " excellent great lovely good nice excellent great lovely good nice",
        " it is excellent and excellent.",
        " it is great and lovely and excellent and nice.",
        " it is bright. it is bright. it is bright.",
        " xq zzv brrr!!",
        " IT IS BRIGHT AND GREAT.",
    ],
)
def test_review_degenerate_outputs_score_clearly_below_good_ones(degenerate):
    good = [" it is bright and great.", " i love it, it is sturdy.", " the lamp is very bright."]
    worst_good = min(_review(text) for text in good)
    assert worst_good > 1.0
    assert _review(degenerate) < worst_good - 1.0
    # and below a merely neutral, fluent review
    assert _review(degenerate) < _review(" it is fine.")


def test_review_prefers_on_topic_and_positive():
    assert _review(" it is bright.") > _review(" it is tasty.")  # content
    assert _review(" it is great.") > _review(" it is good.") > _review(" it is bad.")  # style
    assert _review(" it is bright.") > _review(" it is dim.")
    assert _review(" it is bright.", "lamp") > _review(" it is bright.", "soup")


def test_review_every_product_has_positive_and_negative_attribute():
    world = ReviewWorld()
    assert len(PRODUCTS) >= 24
    for product in PRODUCTS:
        parts = [
            world.parts(f"Review of the {product}:", f" it is {w}.")
            for w in (
                "bright",
                "dim",
                "tasty",
                "bland",
                "comfy",
                "stiff",
                "sharp",
                "dull",
                "fast",
                "slow",
                "quiet",
                "noisy",
                "clear",
                "crackly",
                "warm",
                "rough",
                "soft",
                "lumpy",
                "sturdy",
                "flimsy",
                "leaky",
                "roomy",
                "cramped",
                "fresh",
                "stale",
                "hot",
                "cold",
                "crisp",
            )
        ]
        on_topic = [p for p in parts if p.content == 1.0]
        assert any(p.sentiment > 0 for p in on_topic), product
        assert any(p.sentiment < 0 for p in on_topic), product


def test_review_unknown_prompt_is_an_error():
    with pytest.raises(PreftuneError, match="Review of the"):
        ReviewWorld().gold_reward(["Review of the spaceship:"], [" it is great."])


def test_review_gold_is_fast():
    import time

    rows = ReviewWorld().make_corpus(2000, random.Random(0))
    start = time.perf_counter()
    ReviewWorld().gold_reward([p for p, _ in rows], [c for _, c in rows])
    assert time.perf_counter() - start < 1.0  # thousands per second, with a wide margin


# ---------------------------------------------------------------- arithmetic


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("42", 1.0),
        (" 42", 1.0),
        ("42\n", 1.0),
        ("42 \n", 1.0),
        ("42 and more", 0.0),
        ("42\n17+3=20", 0.0),
        ("41 42", 0.0),
        ("042", 0.0),
        ("+42", 0.0),
        ("42.0", 0.0),
        ("", 0.0),
        ("4 2", 0.0),
        ("41", 0.0),
        ("forty-two", 0.0),
    ],
)
def test_arithmetic_parsing(completion, expected):
    assert ArithmeticWorld().gold_reward(["17+25="], [completion]) == [expected]


def test_arithmetic_subtraction_and_prompts():
    world = ArithmeticWorld(ops=("+", "-"))
    assert world.gold_reward(["53-17="], ["36"]) == [1.0]
    assert world.gold_reward(["50-50="], ["0"]) == [1.0]
    prompts = world.make_prompts(500, random.Random(0))
    assert {c for p in prompts for c in p if c in "+-"} == {"+", "-"}
    assert all(world.answer(p) >= 0 for p in prompts)
    with pytest.raises(PreftuneError):
        world.gold_reward(["what is 2+2?"], ["4"])


def test_arithmetic_corpus_is_a_noisy_demonstrator():
    world = ArithmeticWorld()
    rows, gold = _corpus_gold(world, n=4000)
    assert 0.4 < statistics.mean(gold) < 0.6
    for (prompt, completion), g in zip(rows, gold):
        assert completion.isdigit() and completion == str(int(completion))
        if g == 0.0:  # wrong answers are near misses, as a careless adder makes
            assert abs(int(completion) - world.answer(prompt)) in (1, 2, 10)


# ---------------------------------------------------------------- preference labels


def test_bt_none_is_the_argmax():
    labels = bt_label_pairs([1.0, 0.0, 0.5], [0.0, 1.0, 0.4], noise="none", rng=random.Random(0))
    assert labels == [True, False, True]


@pytest.mark.parametrize("noise, flip", [(0.3, 0.3), (0.0, 0.0), ("human", 0.3), ("gpt4", 0.2)])
def test_bt_flip_rate_on_clear_pairs(noise, flip):
    n = 5000
    # a gap of 40 makes the Bradley-Terry draw certain, so only the flips disagree
    labels = bt_label_pairs([20.0] * n, [-20.0] * n, noise=noise, rng=random.Random(0))
    disagreement = 1 - sum(labels) / n
    assert abs(disagreement - flip) < 0.02  # 3.5 standard errors at p = 0.3
    assert NOISE_PRESETS.get(noise, flip) == flip


def test_bt_probability_follows_the_sigmoid():
    n = 5000
    # sigmoid(1 / 1) = 0.7311; sigmoid(1 / 0.5) = 0.8808; with 0.1 flips on top of 0.7311:
    # 0.9 * 0.7311 + 0.1 * 0.2689 = 0.6849
    for temperature, noise, expected in [
        (1.0, 0.0, 0.7311),
        (0.5, 0.0, 0.8808),
        (1.0, 0.1, 0.6849),
    ]:
        labels = bt_label_pairs(
            [1.0] * n, [0.0] * n, noise=noise, rng=random.Random(1), temperature=temperature
        )
        assert abs(sum(labels) / n - expected) < 0.02, (temperature, noise)
    ties = bt_label_pairs([0.0] * n, [0.0] * n, noise="none", rng=random.Random(2))
    assert abs(sum(ties) / n - 0.5) < 0.025


def test_bt_is_deterministic_and_validates():
    a, b = [0.1, 0.9, 0.4] * 10, [0.5, 0.2, 0.4] * 10
    assert bt_label_pairs(a, b, noise=0.2, rng=random.Random(5)) == bt_label_pairs(
        a, b, noise=0.2, rng=random.Random(5)
    )
    for bad in [0.7, -0.1, "expert"]:
        with pytest.raises(PreftuneError, match="noise"):
            bt_label_pairs(a, b, noise=bad, rng=random.Random(0))
    with pytest.raises(PreftuneError, match="temperature"):
        bt_label_pairs(a, b, noise=0.1, rng=random.Random(0), temperature=0.0)
    with pytest.raises(ValueError):
        bt_label_pairs([1.0], [], noise=0.1, rng=random.Random(0))


# ---------------------------------------------------------------- three-way prompt split


@pytest.mark.parametrize("name", sorted(WORLDS))
@pytest.mark.parametrize("seed", [0, 1, 7])
def test_prompt_split_is_disjoint_with_an_unseen_part(name, seed):
    world = get_world(name)
    split = world.split_prompts(random.Random(seed))
    parts = [split.train, split.validation, split.test_seen, split.test_unseen]
    assert all(len(p) == len(set(p)) and p for p in parts)
    union = set().union(*map(set, parts))
    assert len(union) == sum(map(len, parts)) and split.overlap() == 0
    # Every string is a prompt the gold reward accepts.
    world.gold_reward(sorted(union), [""] * len(union))
    assert split.test == split.test_seen + split.test_unseen
    assert world.split_prompts(random.Random(seed)) == split  # deterministic


def _product(prompt):
    return prompt.rsplit(" ", 1)[1].rstrip(":")


def test_review_unseen_products_never_in_training():
    split = ReviewWorld().split_prompts(random.Random(3))
    train_products = {_product(p) for p in split.train}
    assert {_product(p) for p in split.test_unseen}.isdisjoint(train_products)
    assert {_product(p) for p in split.validation + split.test_seen} <= train_products
    # 39 products, a fifth unseen: 8 products x 6 templates.
    assert len(split.test_unseen) == 8 * 6


def test_arithmetic_unseen_operand_pairs_never_in_training():
    split = ArithmeticWorld().split_prompts(random.Random(3))

    def pair(prompt):
        a, b = prompt.rstrip("=").split("+")
        return frozenset((int(a), int(b)))

    train_pairs = {pair(p) for p in split.train}
    assert {pair(p) for p in split.test_unseen}.isdisjoint(train_pairs)
    # A seen test prompt is the commuted order of a training prompt: new string, known pair.
    assert {pair(p) for p in split.test_seen} <= train_pairs
    assert all(p not in split.train for p in split.test_seen)
