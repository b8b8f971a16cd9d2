"""Cross-entropy through a frozen output head without keeping the (tokens × vocab) logits.

``head_cross_entropy(hidden, weight, targets)`` equals ``F.cross_entropy(hidden @ weight.T, targets,
reduction="none")`` in value and gradient, but works through the tokens a chunk at a time.

Note: gradient in the forward pass
    With the head frozen, the only gradient is the one for ``hidden``, and for token ``i`` it is
    ``(softmax(z_i) - onehot(t_i)) @ W`` times the upstream gradient of loss ``i``. Every factor but that last one
    is known in the forward pass, so each chunk computes its logits, its losses and its ``(chunk, hidden)``
    gradient, and drops the logits. Backward is one scaling of the saved ``(tokens, hidden)`` tensor. No FLOP is
    added (the head's backward GEMM moves into the forward), nothing vocabulary-sized outlives a chunk, and a
    chunk small enough to be reused by the allocator avoids the page-faulting zero-fill a fresh
    ``(tokens × vocab)`` gradient costs on CPU. Liger-Kernel's fused linear cross-entropy and Apple's
    cut-cross-entropy take the same idea further on GPUs.
    Under ``torch.no_grad()`` (evaluation, DPO's reference pass) only the losses are computed.
"""

from __future__ import annotations

import torch

from lorakit.cpu_matmul import linear, matmul

__all__ = ["head_cross_entropy", "chunk_rows"]

_CHUNK_BYTES = 32 * 2**20


def chunk_rows(vocab: int, budget_bytes: int = _CHUNK_BYTES) -> int:
    """Tokens per chunk so that one float32 ``(chunk, vocab)`` block stays within ``budget_bytes`` (at least 16)."""
    return max(16, budget_bytes // (4 * vocab))


class _HeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, rows, need_grad):
        n = hidden.shape[0]
        losses = torch.empty(n, dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_grad else None
        for start in range(0, n, rows):
            end = min(n, start + rows)
            h, t = hidden[start:end], targets[start:end]
            logits = linear(h, weight, bias)  # See Note: why not torch.mm for float32 on CPU (lorakit.cpu_matmul)
            logp = torch.log_softmax(logits.float(), dim=-1)  # (chunk, vocab), the chunk's only big block
            losses[start:end] = -logp.gather(1, t[:, None]).squeeze(1)
            if need_grad:
                probs = logp.exp_()  # softmax, in place
                probs[torch.arange(end - start, device=probs.device), t] -= 1.0  # d loss_i / d logits_i
                grad_hidden[start:end] = matmul(probs.to(weight.dtype), weight)
        ctx.save_for_backward(grad_hidden)
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_losses[:, None].to(grad_hidden.dtype), None, None, None, None, None


def head_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                       bias: torch.Tensor | None = None, *, rows: int | None = None) -> torch.Tensor:
    """Per-token cross-entropy of ``hidden @ weight.T (+ bias)`` against ``targets``, chunked.

    See Note: gradient in the forward pass.

    Args:
        hidden: ``(N, d)`` final hidden states at the positions that carry a label.
        weight: ``(vocab, d)`` the output head's weight; must not require grad (use ``F.cross_entropy`` on full
            logits to train the head).
        targets: ``(N,)`` int64 token ids.
        bias: optional ``(vocab,)``, frozen like ``weight``.
        rows: tokens per chunk (default: :func:`chunk_rows` of the vocabulary size).

    Returns:
        ``(N,)`` float32 losses ``-log softmax(logits_i)[targets_i]``; differentiable w.r.t. ``hidden``.

    Raises:
        ValueError: the head requires grad, or shapes do not fit.
    """
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("head_cross_entropy needs a frozen head (weight.requires_grad=False); "
                         "compute full logits with F.cross_entropy to train the head")
    if hidden.dim() != 2 or hidden.shape[1] != weight.shape[1] or targets.shape != hidden.shape[:1]:
        raise ValueError(f"expected hidden (N, {weight.shape[1]}) and targets (N,); "
                         f"got {tuple(hidden.shape)} and {tuple(targets.shape)}")
    need_grad = hidden.requires_grad and torch.is_grad_enabled()  # (needs_input_grad ignores no_grad)
    return _HeadCrossEntropy.apply(hidden, weight, bias, targets, rows or chunk_rows(weight.shape[0]), need_grad)
