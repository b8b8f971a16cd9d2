"""Tiny in-process tokenizers for the data tests (no hub access).

``chatml_tokenizer``: byte-level BPE with no merges, so every ASCII character is one token and
character offsets are exact; ``<|im_start|>``, ``<|im_end|>`` (also EOS) and ``<pad>`` are
single special tokens. Its chat template is ChatML with a default system turn, like SmolLM2's.
"""

import pytest

CHATML_TEMPLATE = (
    "{% for m in messages %}"
    "{% if loop.first and m['role'] != 'system' %}<|im_start|>system\nBe brief.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_byte_tokenizer(chat_template=CHATML_TEMPLATE):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>", additional_special_tokens=["<|im_start|>"]
    )
    hf.chat_template = chat_template
    return hf


@pytest.fixture(scope="session")
def chatml_tokenizer():
    return make_byte_tokenizer()


@pytest.fixture
def make_tokenizer():
    """Factory for a byte tokenizer with another chat template (or ``None`` for no template)."""
    return make_byte_tokenizer
