"""The CPU backend's fused LoRA node gives the same outputs and gradients as plain autograd on the formula, with
torch's kernels and with oneDNN's."""

import functools

import pytest
import torch

from lorakit.cpu.fused import lora_linear as _lora_linear
from lorakit.cpu.matmul import TORCH, onednn

KERNELS = {"torch": TORCH, "onednn": onednn()}


@pytest.fixture(params=["torch", "onednn"])
def lora_linear(request):
    return functools.partial(_lora_linear, kernels=KERNELS[request.param])


@pytest.mark.parametrize("bias", [True, False])
def test_fused_matches_formula_and_grads(bias, lora_linear):
    x = torch.randn(2, 5, 12, requires_grad=True)
    W = torch.randn(7, 12)
    b = torch.randn(7) if bias else None
    A = torch.randn(3, 12, requires_grad=True)
    B = torch.randn(7, 3, requires_grad=True)
    out = lora_linear(x, W, b, A, B, 0.5)
    ref = x @ W.T + (b if bias else 0) + 0.5 * (x @ A.T) @ B.T
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (x, A, B), g)
    ref_grads = torch.autograd.grad(ref, (x, A, B), g)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("layout", ["column slice", "transposed"])
def test_fused_strided_input_matches_float64(layout, lora_linear):
    """Inputs that are views (a slice of wider activations, a transpose) reach the matmuls with their strides."""
    g = torch.Generator().manual_seed(3)
    shape = (4, 9, 40) if layout == "column slice" else (4, 24, 9)
    view = (lambda t: t[..., 5:29]) if layout == "column slice" else (lambda t: t.transpose(1, 2))
    base = torch.randn(*shape, generator=g, requires_grad=True)
    W, A, B = (torch.randn(*s, generator=g) for s in ((10, 24), (16, 24), (10, 16)))
    A.requires_grad_(), B.requires_grad_()
    x = view(base)
    assert not x.is_contiguous()
    out = lora_linear(x, W, None, A, B, 2.0)
    g_out = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad(out, (base, A, B), g_out)
    based, Ad, Bd = (t.detach().double().requires_grad_() for t in (base, A, B))
    xd = view(based)
    ref = xd @ W.double().T + 2.0 * (xd @ Ad.T) @ Bd.T
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, torch.autograd.grad(ref, (based, Ad, Bd), g_out.double())):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


def test_fused_dropout_mask_on_bottleneck_grads(lora_linear):
    torch.manual_seed(0)
    x = torch.randn(6, 8, requires_grad=True)
    W, A, B = torch.randn(4, 8), torch.randn(2, 8, requires_grad=True), torch.randn(4, 2, requires_grad=True)
    torch.manual_seed(1)
    out = lora_linear(x, W, None, A, B, 2.0, dropout=0.5, training=True)
    torch.manual_seed(1)
    mask = torch.empty(6, 2).bernoulli_(0.5).div_(0.5)  # the same draw
    ref = x @ W.T + 2.0 * ((x @ A.T) * mask) @ B.T
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, (x, A, B), g), torch.autograd.grad(ref, (x, A, B), g)):
        torch.testing.assert_close(got, want)


def test_frozen_input_skips_input_grad(lora_linear):
    x = torch.randn(3, 4)
    A, B = torch.randn(2, 4, requires_grad=True), torch.randn(5, 2, requires_grad=True)
    lora_linear(x, torch.randn(5, 4), None, A, B, 1.0).sum().backward()
    assert A.grad is not None and B.grad is not None


@pytest.mark.parametrize("kind", ["nf4", "int8"])
@pytest.mark.parametrize("bias", [True, False])
def test_quantized_base_takes_the_fused_node_with_the_same_result(kind, bias):
    """A QuantizedBase needs nothing but its Protocol methods for the fused node."""
    from lorakit import LoraConfig, add_adapter
    from lorakit.quant import quantize_model_

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 48, bias=bias))
    quantize_model_(model, kind, compute_dtype=torch.float32, skip_modules=())
    add_adapter(model, LoraConfig(target_modules=["0"], r=4, lora_alpha=8, init_lora_weights=False))
    layer = model[0]
    x = torch.randn(3, 5, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        out = layer(x)
    assert type(out.grad_fn.next_functions[0][0]).__name__ == "_LoraLinearBackward"  # the fused node
    assert (48, 64) not in saved  # no dequantized weight is kept for backward
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    ref = layer.base_layer(x) + 2.0 * (x @ A.T) @ B.T  # NF4Linear / Int8Linear alone + the formula
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, (x, A, B), g), torch.autograd.grad(ref, (x, A, B), g)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_fused_node_takes_a_non_contiguous_output_gradient(lora_linear):
    """Autograd may hand the node a transposed gradient (a transposed use of the output downstream)."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(12, 24, generator=g, requires_grad=True)
    W, A, B = (torch.randn(*s, generator=g) for s in ((10, 24), (16, 24), (10, 16)))
    A.requires_grad_(), B.requires_grad_()
    out = lora_linear(x, W, None, A, B, 2.0)
    g_t = torch.randn(10, 12, generator=g)
    (out.t() * g_t).sum().backward()  # d/d out = g_t.t(): strides (1, 12)
    xd, Ad, Bd = (t.detach().double().requires_grad_() for t in (x, A, B))
    ref = xd @ W.double().T + 2.0 * (xd @ Ad.T) @ Bd.T
    (ref.t() * g_t.double()).sum().backward()
    for got, want in ((x.grad, xd.grad), (A.grad, Ad.grad), (B.grad, Bd.grad)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


def test_lora_model_compiles_with_the_same_loss_and_grads():
    """torch.compile traces the fused node with torch's own ops (the oneDNN op has no lowering for its strides)."""
    import lorakit
    from lorakit.cpu import CpuSettings
    from lorakit_testing import make_tiny_llama

    model = make_tiny_llama(0)
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                  init_lora_weights=False))
    lorakit.accelerate(model, CpuSettings(onednn="on", keep_freed_memory=False))  # frozen linears routed too
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    params = [p for p in model.parameters() if p.requires_grad]
    eager = model(input_ids=ids, labels=ids).loss
    want = torch.autograd.grad(eager, params)
    try:
        compiled = torch.compile(model)(input_ids=ids, labels=ids).loss
    except Exception as e:  # a machine without a working C++ toolchain cannot compile anything
        from torch._inductor.exc import CppCompileError, InvalidCxxCompiler
        if isinstance(e, (CppCompileError, InvalidCxxCompiler)) or isinstance(e.__cause__, (CppCompileError,
                                                                                          InvalidCxxCompiler)):
            pytest.skip(f"torch.compile needs a C++ toolchain here: {type(e).__name__}")
        raise
    got = torch.autograd.grad(compiled, params)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
