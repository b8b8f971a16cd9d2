"""Word reversal task: reverse the order of 3-6 common words.

Example prompt::

    Reverse the order of these words. Reply with the words only, separated by spaces.
    Words: apple river blue stone

Answer: ``stone blue river apple``. Words are distinct lowercase English words drawn from a fixed
list of short, common ones (mostly single tokens for typical BPE vocabularies).
"""

from __future__ import annotations

import random

__all__ = ["INSTRUCTION", "WORDS", "generate"]

INSTRUCTION = "Reverse the order of these words. Reply with the words only, separated by spaces."

WORDS = (
    "apple river blue stone green house light water table chair bread music paper cloud storm "
    "garden window winter summer orange silver forest ocean mountain yellow purple coffee pencil "
    "rabbit tiger horse bird fish candle mirror bottle basket violin piano rocket planet island "
    "desert bridge castle tower market school doctor farmer sugar salt pepper lemon cherry honey"
).split()


def generate(rng: random.Random) -> tuple[str, str]:
    """Draw one example: ``(prompt, answer)`` with 3-6 distinct words."""
    words = rng.sample(WORDS, rng.randint(3, 6))
    return f"{INSTRUCTION}\nWords: {' '.join(words)}", " ".join(reversed(words))
