"""Tiny in-process tokenizers for the data tests (no hub access).

``chatml_tokenizer``: byte-level BPE with no merges, so every ASCII character is one token and
character offsets are exact; ``<|im_start|>``, ``<|im_end|>`` (also EOS) and ``<pad>`` are
single special tokens. Its chat template is ChatML with a default system turn, like SmolLM2's.
"""

import pytest

from lorakit_testing import CHATML_TEMPLATE, make_byte_tokenizer  # noqa: F401


@pytest.fixture(scope="session")
def chatml_tokenizer():
    return make_byte_tokenizer()


@pytest.fixture
def make_tokenizer():
    """Factory for a byte tokenizer with another chat template (or ``None`` for no template)."""
    return make_byte_tokenizer
