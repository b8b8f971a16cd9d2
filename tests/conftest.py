"""Shared fixtures: seeded tiny models built in-process (no hub, no embedded model)."""

import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    kwargs = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def make_tiny_llama(seed: int = 0, **overrides):
    """A 2-layer random Llama; the same seed always gives the same weights."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**overrides)).eval()


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture
def input_ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 96, (2, 10), generator=g)


class TinyMLP(torch.nn.Module):
    """A plain PyTorch model (not transformers) for the "any nn.Module" tests."""

    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(8, 16)
        self.act = torch.nn.GELU()
        self.down = torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.down(self.act(self.up(x)))


def save_tiny_model_dir(directory, seed: int = 0):
    """A tiny Llama + byte-level ChatML tokenizer saved with ``save_pretrained`` (loads with ``lorakit.load_model``)."""
    from data.conftest import make_byte_tokenizer

    tokenizer = make_byte_tokenizer()
    model = make_tiny_llama(seed, vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, initializer_range=0.3)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture
def tiny_model_dir(tmp_path):
    return save_tiny_model_dir(tmp_path / "tiny-base")
