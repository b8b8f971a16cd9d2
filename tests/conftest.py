"""Shared fixtures: seeded tiny models built in-process (no hub, no embedded model). Helpers: lorakit_testing.py."""

import os

import pytest
import torch

from lorakit_testing import make_tiny_llama, save_tiny_model_dir

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _cpu_backend_as_before():
    """A test that calls lorakit.accelerate leaves the process's CPU kernel choice as it found it."""
    from lorakit.cpu import CPU

    before = CPU.snapshot()
    yield
    CPU.use(*before)


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture
def input_ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 96, (2, 10), generator=g)


@pytest.fixture
def tiny_model_dir(tmp_path):
    return save_tiny_model_dir(tmp_path / "tiny-base")
