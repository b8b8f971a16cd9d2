"""Word reversal task: reverse the order of 3-6 common words.

Example prompt::

    Reverse the order of these words. Reply with the words only, separated by spaces.
    Words: apple river blue stone

Answer: ``stone blue river apple``. Words are distinct lowercase English nouns and colours drawn
from a fixed list of short, common ones.
"""

from __future__ import annotations

import random

__all__ = ["INSTRUCTION", "WORDS", "generate"]

INSTRUCTION = "Reverse the order of these words. Reply with the words only, separated by spaces."

# Each word is one token in SmolLM2's vocabulary both with and without a leading space, so the
# model reverses tokens rather than re-spelling words (multi-token words like "farmer" came back
# as "faster" after short training).
WORDS = (
    "apple river blue stone green house light water table chair bread music paper cloud storm "
    "window winter summer orange forest ocean yellow purple horse bird fish planet bridge castle "
    "tower market school doctor sugar salt moon star tree leaf rock sand snow rain wind fire gold "
    "iron milk rice door road boat ship train king girl dog cat bear wolf lion fox coat shirt cup "
    "pen book card map key bell phone clock ring coin ball song park lake hill farm city shop"
).split()


def generate(rng: random.Random) -> tuple[str, str]:
    """Draw one example: ``(prompt, answer)`` with 3-6 distinct words."""
    words = rng.sample(WORDS, rng.randint(3, 6))
    return f"{INSTRUCTION}\nWords: {' '.join(words)}", " ".join(reversed(words))
