"""LoraLinear against the formula h = W x + b + (alpha/r) B A x."""

import pytest
import torch
from torch import nn

from lorakit import LoraLinear


def _layer(dtype=torch.float32, r=4, alpha=8.0, dropout=0.0, in_f=12, out_f=10):
    base = nn.Linear(in_f, out_f).to(dtype)
    layer = LoraLinear(base)
    layer.add("a", r=r, lora_alpha=alpha, scaling=alpha / r, lora_dropout=dropout, init=False, dtype=dtype)
    layer.active_adapters = ["a"]
    return layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_equals_formula(dtype):
    layer = _layer(dtype)
    x = torch.randn(3, 5, 12, dtype=dtype)
    W, b = layer.base_layer.weight, layer.base_layer.bias
    A, B = layer.lora_A["a"].weight, layer.lora_B["a"].weight
    expected = x @ W.T + b + 2.0 * (x @ A.T @ B.T)
    torch.testing.assert_close(layer(x), expected)


def test_shapes_follow_peft():
    layer = _layer(r=3, in_f=7, out_f=5)
    assert layer.lora_A["a"].weight.shape == (3, 7)
    assert layer.lora_B["a"].weight.shape == (5, 3)


def test_default_init_is_kaiming_A_zero_B_and_output_unchanged():
    base = nn.Linear(64, 32)
    layer = LoraLinear(base)
    layer.add("a", r=8, lora_alpha=16, scaling=2.0)
    layer.active_adapters = ["a"]
    assert torch.count_nonzero(layer.lora_B["a"].weight) == 0
    A = layer.lora_A["a"].weight
    bound = 1 / 64**0.5  # kaiming_uniform(a=sqrt(5)) on fan_in 64
    assert A.abs().max() <= bound and A.abs().max() > 0.5 * bound
    x = torch.randn(4, 64)
    torch.testing.assert_close(layer(x), base(x))


def test_gaussian_init_std():
    layer = LoraLinear(nn.Linear(4096, 8))
    layer.add("g", r=4, lora_alpha=4, scaling=1.0, init="gaussian")
    assert abs(layer.lora_A["g"].weight.std().item() - 0.25) < 0.01


def test_merged_equals_unmerged_and_merge_is_idempotent():
    layer = _layer()
    x = torch.randn(6, 12)
    before = layer(x)
    w0 = layer.base_layer.weight.clone()
    layer.merge()
    torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=0)
    once = layer.base_layer.weight.clone()
    layer.merge()  # a second merge must not add the delta twice
    torch.testing.assert_close(layer.base_layer.weight, once, atol=0, rtol=0)
    layer.unmerge()
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, w0, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=0)


def test_safe_merge_rejects_non_finite_and_leaves_base():
    layer = _layer()
    with torch.no_grad():
        layer.lora_B["a"].weight[0, 0] = float("inf")
    w0 = layer.base_layer.weight.clone()
    with pytest.raises(ValueError, match="non-finite"):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.base_layer.weight, w0)
    assert layer.merged_adapters == []


def test_dropout_keeps_expectation_and_is_identity_in_eval():
    layer = _layer(dropout=0.5)
    x = torch.randn(1, 12)
    layer.eval()
    base = layer.base_layer(x)
    expected = layer(x) - base
    layer.train()
    torch.manual_seed(0)
    samples = torch.stack([layer(x) - base for _ in range(4000)]).detach()
    torch.testing.assert_close(samples.mean(0), expected.detach(), atol=0.05 * expected.abs().max().item() + 1e-3,
                               rtol=0)
    assert samples.std(0).max() > 0  # it really drops something in training mode


def test_bf16_base_with_fp32_adapter_returns_base_dtype():
    base = nn.Linear(8, 8).bfloat16()
    layer = LoraLinear(base)
    layer.add("a", r=2, lora_alpha=2, scaling=1.0, init=False, dtype=torch.float32)
    layer.active_adapters = ["a"]
    x = torch.randn(3, 8).bfloat16()
    out = layer(x)
    assert out.dtype == torch.bfloat16
    expected = base(x).float() + x.float() @ layer.lora_A["a"].weight.T @ layer.lora_B["a"].weight.T
    torch.testing.assert_close(out.float(), expected, atol=0.05, rtol=0.02)


def test_bad_rank_and_dropout_raise():
    layer = LoraLinear(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="r=0"):
        layer.add("a", r=0, lora_alpha=1, scaling=1.0)
    with pytest.raises(ValueError, match="lora_dropout"):
        layer.add("a", r=2, lora_alpha=1, scaling=1.0, lora_dropout=1.5)


def test_gradients_reach_only_lora():
    layer = _layer()
    layer.base_layer.requires_grad_(False)
    layer(torch.randn(3, 12)).sum().backward()
    assert layer.lora_A["a"].weight.grad is not None and layer.lora_B["a"].weight.grad is not None
    assert layer.base_layer.weight.grad is None


def test_runs_under_cpu_autocast_like_trl():
    # Trainers (TRL, HF Trainer) run the forward under autocast; the fused fast path must step aside.
    layer = _layer()
    x = torch.randn(4, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    expected = layer.base_layer(x) + 2.0 * x @ layer.lora_A["a"].weight.T @ layer.lora_B["a"].weight.T
    torch.testing.assert_close(out.float(), expected, atol=0.1, rtol=0.05)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_down_projection_keeps_the_low_precision_input_with_the_same_gradients(dtype):
    from lorakit.layer import down_projection

    x = torch.randn(2, 5, 12).to(dtype).requires_grad_()
    A = torch.randn(3, 12, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.dtype) or t, lambda t: t):
        out = down_projection(x, A)
    ref = torch.nn.functional.linear(x.to(torch.float32), A)
    assert out.dtype == torch.float32 and torch.equal(out, ref)
    assert torch.float32 in saved and saved.count(dtype) == 1 and len(saved) == 2  # x in its dtype, and A
    g = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, (x, A), g), torch.autograd.grad(ref, (x, A), g)):
        assert got.dtype == want.dtype and torch.equal(got, want)


def test_down_projection_under_autocast_follows_autocast():
    from lorakit.layer import down_projection

    x = torch.randn(4, 12, dtype=torch.bfloat16, requires_grad=True)
    A = torch.randn(3, 12, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = down_projection(x, A)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and A.grad.dtype == torch.float32
