"""head_cross_entropy equals F.cross_entropy on full logits, in value and in gradient, chunk by chunk."""

import pytest
import torch
import torch.nn.functional as F

from lorakit.train import head_loss
from lorakit.train.head_loss import chunk_rows, head_cross_entropy


def _inputs(n=37, d=24, vocab=101, dtype=torch.float32, bias=False):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, d, generator=g).to(dtype).requires_grad_()
    weight = torch.randn(vocab, d, generator=g).to(dtype)
    b = torch.randn(vocab, generator=g).to(dtype) if bias else None
    targets = torch.randint(0, vocab, (n,), generator=g)
    return hidden, weight, b, targets


def _reference(hidden, weight, bias, targets):
    logits = F.linear(hidden, weight, bias).float()
    return F.cross_entropy(logits, targets, reduction="none")


@pytest.mark.parametrize("rows", [1, 5, 16, 37, 100])
@pytest.mark.parametrize("bias", [False, True])
def test_value_and_gradient_equal_full_logits(rows, bias):
    hidden, weight, b, targets = _inputs(bias=bias)
    upstream = torch.rand(hidden.shape[0], generator=torch.Generator().manual_seed(1))  # not all ones
    ours = head_cross_entropy(hidden, weight, targets, b, rows=rows)
    (grad_ours,) = torch.autograd.grad((ours * upstream).sum(), hidden)
    ref = _reference(hidden, weight, b, targets)
    (grad_ref,) = torch.autograd.grad((ref * upstream).sum(), hidden)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_ours, grad_ref, atol=1e-5, rtol=1e-5)


def test_bfloat16_matches_reference_in_bfloat16():
    hidden, weight, _, targets = _inputs(dtype=torch.bfloat16)
    ours = head_cross_entropy(hidden, weight, targets, rows=8)
    (grad_ours,) = torch.autograd.grad(ours.sum(), hidden)
    ref = _reference(hidden, weight, None, targets)
    (grad_ref,) = torch.autograd.grad(ref.sum(), hidden)
    assert ours.dtype == torch.float32 and grad_ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(grad_ours.float(), grad_ref.float(), atol=2e-2, rtol=2e-2)


def test_no_grad_gives_losses_only(monkeypatch):
    hidden, weight, _, targets = _inputs()
    matmuls = []
    real_mm = head_loss.matmul
    monkeypatch.setattr(head_loss, "matmul", lambda *a, **k: matmuls.append(1) or real_mm(*a, **k))
    head_cross_entropy(hidden, weight, targets, rows=4)
    assert matmuls  # with grad: one gradient GEMM per chunk
    matmuls.clear()
    with torch.no_grad():
        ours = head_cross_entropy(hidden, weight, targets, rows=4)
    assert not ours.requires_grad and not matmuls  # no gradient GEMM under no_grad
    torch.testing.assert_close(ours, _reference(hidden.detach(), weight, None, targets), atol=1e-5, rtol=1e-5)


def test_trainable_head_and_bad_shapes_are_refused():
    hidden, weight, _, targets = _inputs()
    with pytest.raises(ValueError, match="frozen head"):
        head_cross_entropy(hidden, weight.requires_grad_(), targets)
    with pytest.raises(ValueError, match="expected hidden"):
        head_cross_entropy(hidden, weight.detach()[:, :5], targets)


def test_chunk_rows_keeps_a_chunk_within_budget():
    assert chunk_rows(49152) * 49152 * 4 <= 32 * 2**20 < (chunk_rows(49152) + 1) * 49152 * 4
    assert chunk_rows(10**9) == 16
