"""grad_buffer: adapter gradients land in the same memory every step, and stay right under accumulation; whether
they do follows accelerate's settings, not what ran before in the process."""

import torch
from torch import nn

import lorakit
from lorakit.cpu import CpuSettings
from lorakit.cpu.grad_memory import drop_grad_memory, grad_buffer, keep_grad_memory

KEEP = CpuSettings(onednn="off", keep_freed_memory=True, reuse_grad_memory=True)


def _model(settings=KEEP):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
    lorakit.add_adapter(m, lorakit.LoraConfig(r=4, target_modules=["0", "2"], init_lora_weights="gaussian"))
    if settings is not None:
        lorakit.accelerate(m, settings)
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


def test_buffer_only_for_parameters_given_memory():
    p = nn.Parameter(torch.zeros(3, 2))
    assert grad_buffer(p) is None  # no memory given: allocate as torch does
    keep_grad_memory(p)
    assert grad_buffer(p) is not None and grad_buffer(p).data_ptr() == grad_buffer(p).data_ptr()
    assert grad_buffer(p) is not grad_buffer(p)  # a new tensor object each time over the same memory
    keep_grad_memory(t := torch.zeros(3, requires_grad=True))
    assert grad_buffer(t) is None  # not a Parameter
    p.grad = torch.ones(3, 2)
    assert grad_buffer(p) is None  # accumulating
    p.grad = None
    drop_grad_memory(p)
    assert grad_buffer(p) is None


def test_the_settings_decide_not_the_process_history():
    """The same process, the same malloc state: only the settings passed to accelerate differ."""
    x = torch.randn(5, 16)
    for settings, reused in ((KEEP, True), (CpuSettings(onednn="off", keep_freed_memory=True,
                                                        reuse_grad_memory=False), False),
                             (CpuSettings(onednn="off", keep_freed_memory=False), False), (None, False)):
        m, params = _model(settings)
        pointers = []
        for _ in range(2):
            m(x).pow(2).sum().backward()
            pointers.append([p.grad.data_ptr() for p in params])
            for p in params:
                p.grad = None
        memory = [p.__dict__.get("_lorakit_grad_memory") for p in params]
        assert all((t is not None and t.data_ptr() == q) if reused else t is None
                   for t, q in zip(memory, pointers[1])), settings


def test_restore_takes_the_memory_away():
    m, params = _model()
    lorakit.restore(m)
    m(torch.randn(5, 16)).pow(2).sum().backward()
    assert all("_lorakit_grad_memory" not in p.__dict__ for p in params)
