"""grad_buffer: adapter gradients land in the same memory every step, and stay right under accumulation."""

import pytest
import torch
from torch import nn

import lorakit
from lorakit.grad_memory import grad_buffer
from lorakit import allocator


@pytest.fixture(autouse=True)
def kept_memory(monkeypatch):
    monkeypatch.setattr(allocator, "_KEPT", True)  # as after keep_freed_memory() (training loops call it)


def _model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
    lorakit.add_adapter(m, lorakit.LoraConfig(r=4, target_modules=["0", "2"], init_lora_weights="gaussian"))
    return m, [p for p in m.parameters() if p.requires_grad]


def _reference_grads(m, x):
    """The same gradients by plain autograd on the formula (no lorakit node, no reused memory)."""
    out = x
    for layer in m:
        if hasattr(layer, "lora_A"):
            A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            out = layer.base_layer(out) + layer.scaling["default"] * (out @ A.t()) @ B.t()
        else:
            out = layer(out)
    params = [p for p in m.parameters() if p.requires_grad]
    return torch.autograd.grad(out.pow(2).sum(), params)


def test_gradients_reuse_memory_across_steps_and_equal_autograd():
    m, params = _model()
    x = torch.randn(5, 16)
    expected = _reference_grads(m, x)
    pointers = []
    for _ in range(3):
        m(x).pow(2).sum().backward()
        for p, e in zip(params, expected):
            torch.testing.assert_close(p.grad, e)
        pointers.append([p.grad.data_ptr() for p in params])
        for p in params:
            p.grad = None  # zero_grad(set_to_none=True)
    assert pointers[0] == pointers[1] == pointers[2]


def test_accumulation_adds_instead_of_overwriting():
    m, params = _model()
    x1, x2 = torch.randn(5, 16), torch.randn(3, 16)
    m(x1).pow(2).sum().backward()
    first = [p.grad.clone() for p in params]
    m(x2).pow(2).sum().backward()  # .grad is set: a fresh tensor is added in place
    for p, f, e in zip(params, first, _reference_grads(m, x2)):
        torch.testing.assert_close(p.grad, f + e)


def test_off_switch_and_non_parameters(monkeypatch):
    p = nn.Parameter(torch.zeros(3, 2))
    assert grad_buffer(p) is not None and grad_buffer(p).data_ptr() == grad_buffer(p).data_ptr()
    assert grad_buffer(p) is not grad_buffer(p)  # a new tensor object each time over the same memory
    assert grad_buffer(torch.zeros(3, requires_grad=True)) is None  # not a Parameter
    p.grad = torch.ones(3, 2)
    assert grad_buffer(p) is None  # accumulating
    monkeypatch.setenv("LORAKIT_REUSE_GRAD_MEMORY", "0")
    assert grad_buffer(nn.Parameter(torch.zeros(2))) is None
    monkeypatch.delenv("LORAKIT_REUSE_GRAD_MEMORY")
    monkeypatch.setattr(allocator, "_KEPT", False)  # glibc defaults: nothing to gain, see the Note
    assert grad_buffer(nn.Parameter(torch.zeros(2))) is None
