"""A synthetic corpus for pretraining the tiny base: arithmetic, strings, counting and formats.

Every example is a ``(prompt, answer)`` pair. The RL tasks reuse these exact prompt formats, so a
base pretrained here starts RL from a non-trivial, but far from perfect, accuracy.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable, Iterator

Example = tuple[str, str]
LETTERS = string.ascii_lowercase[:8]


def arithmetic(rng: random.Random) -> Example:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    if rng.random() < 0.5:
        return f"{a}+{b}=", f"{a + b}"
    a, b = max(a, b), min(a, b)
    return f"{a}-{b}=", f"{a - b}"


def reverse(rng: random.Random) -> Example:
    word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 6)))
    return f"reverse {word}:", word[::-1]


def sort_letters(rng: random.Random) -> Example:
    word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 6)))
    return f"sort {word}:", "".join(sorted(word))


def count(rng: random.Random) -> Example:
    word = "".join(rng.choice(LETTERS[:4]) for _ in range(rng.randint(4, 8)))
    letter = rng.choice(LETTERS[:4])
    return f"count {letter} in {word}:", str(word.count(letter))


def key_value(rng: random.Random) -> Example:
    key = rng.choice(["x", "y", "n", "id"])
    value = rng.randint(0, 99)
    return f"format {key} {value}:", f'{{"{key}": {value}}}'


GENERATORS: dict[str, Callable[[random.Random], Example]] = {
    "arithmetic": arithmetic,
    "reverse": reverse,
    "sort": sort_letters,
    "count": count,
    "format": key_value,
}


def examples(seed: int, kinds: tuple[str, ...] = tuple(GENERATORS), answer_noise: float = 0.0) -> Iterator[Example]:
    """An endless, seed-determined stream mixing the given kinds uniformly.

    With probability ``answer_noise`` an example keeps its prompt but takes the answer of another
    example of the same kind: plausible and usually wrong, as in web text. A base trained on that
    knows the answer yet samples it only part of the time, which is the gap RL with a verifier
    closes on real models (it sharpens; it rarely teaches a new skill).
    """
    if not 0.0 <= answer_noise < 1.0:
        raise ValueError(f"answer_noise must be in [0, 1), got {answer_noise}")
    rng = random.Random(seed)
    while True:
        generate = GENERATORS[rng.choice(kinds)]
        prompt, answer = generate(rng)
        if answer_noise and rng.random() < answer_noise:
            answer = generate(rng)[1]
        yield prompt, answer


def render(example: Example) -> str:
    """The text the base model is pretrained on: prompt, one space, answer."""
    prompt, answer = example
    return f"{prompt} {answer}"
