"""The loss math of SFT, DPO and evaluation: pure functions of tensors, and the two that take a model.

Below both ``lorakit.evaluate`` and ``lorakit.train`` (neither is imported here), so evaluation and training share
one definition of "the loss" without importing each other.

- On logits: :func:`masked_ce_loss`, :func:`sequence_logps`; on log-probs: :func:`dpo_loss`.
- On a model and a collated batch: :func:`labelled_losses` (the training loop's loss: the head is applied to
  labelled tokens only), :func:`sft_loss` (its sum and count) and :func:`token_logps` (DPO's per-row log-probs).
- :func:`head_cross_entropy`: cross-entropy through a frozen output head without keeping ``(tokens, vocab)`` logits.

Conventions: ``logits`` are ``(B, T, V)`` in any float dtype, ``labels`` are ``(B, T)`` int64 aligned with the
inputs (``labels[:, t]`` is token t, not t+1) and -100 marks positions without loss. Each function shifts
internally: logits at position t score label t+1.

Note: memory of log-probs
    ``log_softmax`` over the full ``(B, T, V)`` logits would allocate a second vocabulary-sized tensor (and a
    float32 one when the logits are bf16). Here only the positions that carry a label are selected first, upcast
    to float32 once, and the label's log-prob is read as ``logit[label] - logsumexp(logits)``; nothing else of
    vocabulary size is kept for backward.

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

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.backend import linear, matmul
from lorakit.data.sft import IGNORE_INDEX

__all__ = ["masked_ce_loss", "sequence_logps", "dpo_loss", "labelled_losses", "sft_loss", "token_logps",
           "head_cross_entropy", "chunk_rows"]


# --- on logits


def _label_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 log-probs of the label tokens at labelled positions, and the (B, T-1) position mask.

    See Note: memory of log-probs.

    Raises:
        ValueError: shapes do not match ``(B, T, V)`` / ``(B, T)``.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"expected logits (B, T, V) and labels (B, T); got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    mask = labels[:, 1:] != IGNORE_INDEX  # (B, T-1): position t predicts label t+1
    picked_logits = logits[:, :-1][mask].float()  # (N, V), N = labelled positions
    targets = labels[:, 1:][mask]  # (N,)
    target_logits = picked_logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (N,)
    return target_logits - torch.logsumexp(picked_logits, dim=-1), mask


def masked_ce_loss(
    logits: torch.Tensor, labels: torch.Tensor, *, reduction: Literal["mean", "sum"] = "mean"
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross entropy over positions whose label is not -100.

    ``loss = -(1/N) * sum_{b,t: labels[b,t+1] != -100} log softmax(logits[b,t])[labels[b,t+1]]``

    Args:
        logits: ``(B, T, V)``, any float dtype; computed in float32.
        labels: ``(B, T)`` int64, -100 where no loss is wanted (prompt, padding).
        reduction: ``"mean"`` (default) returns the mean over the ``N`` labelled tokens (0.0 with a
            gradient path when ``N == 0``); ``"sum"`` returns ``(loss_sum, N)``, for exact
            token-weighted averaging across gradient-accumulation micro-batches.

    Returns:
        A float32 scalar, or ``(float32 scalar, int64 scalar)`` with ``reduction="sum"``.

    Raises:
        ValueError: bad shapes or an unknown ``reduction``.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    logps, mask = _label_logps(logits, labels)
    total = -logps.sum()
    count = mask.sum()
    if reduction == "sum":
        return total, count
    return total / count.clamp(min=1)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of log-probs of each row's label tokens: ``log p(completion | prompt)`` per row.

    Args:
        logits: ``(B, T, V)``; labels: ``(B, T)`` with -100 on prompt and padding.

    Returns:
        ``(B,)`` float32; 0 for a row without labels.

    Example:
        >>> batch = collate_preference(examples, pad_id)          # (2B, T), chosen rows first
        >>> logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        >>> chosen, rejected = sequence_logps(logits, batch["labels"]).chunk(2)
    """
    logps, mask = _label_logps(logits, labels)
    per_token = torch.zeros(mask.shape, dtype=logps.dtype, device=logps.device)  # (B, T-1)
    per_token = per_token.masked_scatter(mask, logps)  # row-major order, same as boolean indexing
    return per_token.sum(dim=-1)


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sigmoid DPO loss (Rafailov et al. 2023, https://arxiv.org/abs/2305.18290, eq. 7).

    ``r_c = beta * (pc - rc)``, ``r_r = beta * (pr - rr)``, ``loss = mean(-log sigmoid(r_c - r_r))``
    where ``pc, pr`` are policy and ``rc, rr`` reference sequence log-probs (``sequence_logps``).

    Args:
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps: ``(B,)``.
            The reference ones should carry no gradient (computed under ``torch.no_grad()``).
        beta (float): inverse temperature, > 0. Default 0.1.

    Returns:
        ``(loss, chosen_rewards, rejected_rewards, reward_accuracy)``: scalar loss; detached ``(B,)``
        rewards ``r_c`` and ``r_r``; detached scalar fraction of rows with ``r_c > r_r``.

    Raises:
        ValueError: ``beta <= 0`` or the four inputs differ in shape.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    shapes = {tuple(t.shape) for t in (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)}
    if len(shapes) != 1:
        raise ValueError(f"the four log-prob tensors must have one shape (B,), got {sorted(shapes)}")
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps)
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps)
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards).mean()
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    accuracy = (chosen_rewards > rejected_rewards).float().mean()
    return loss, chosen_rewards, rejected_rewards, accuracy


# --- on a model: the head applied to labelled tokens only


def _decoder_and_head(model: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    get_decoder = getattr(model, "get_decoder", None)
    get_head = getattr(model, "get_output_embeddings", None)
    if not (callable(get_decoder) and callable(get_head)):
        return None, None
    decoder, head = get_decoder(), get_head()
    return (decoder, head) if decoder is not None and head is not None and decoder is not model else (None, None)


def labelled_losses(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 next-token cross-entropy at every position that predicts a label, and where they are.

    Returns:
        ``losses`` (N,) and ``keep`` (B, T-1), the mask that selected them (position t predicts token t + 1).

    Note: head on labelled tokens only
        The output head (vocab × hidden; 28% of SmolLM2's weights) is applied only where a label exists, so
        prompt and padding positions never pay for it, and the (batch, seq, vocab) logits tensor is never built:
        a frozen ``nn.Linear`` head goes through :func:`head_cross_entropy` (chunked, gradient computed in the
        forward pass). A trainable or wrapped head gets float32 logits at the labelled positions. Models without
        ``get_decoder``/``get_output_embeddings`` fall back to their full logits.
    """
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    targets = targets[keep]
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    decoder, head = _decoder_and_head(model)
    if decoder is None:
        logits = model(**inputs).logits[:, :-1][keep]
        return F.cross_entropy(logits.float(), targets, reduction="none"), keep
    hidden = decoder(**inputs).last_hidden_state[:, :-1][keep]  # (N, hidden)
    if type(head) is nn.Linear and not any(p.requires_grad for p in head.parameters()):
        return head_cross_entropy(hidden, head.weight, targets, head.bias), keep
    return F.cross_entropy(head(hidden).float(), targets, reduction="none"), keep


def sft_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over labelled tokens, and their count."""
    losses, _ = labelled_losses(model, batch)
    return losses.sum(), int(losses.numel())


def token_logps(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-row sum of log-probabilities of the labelled tokens, shape (B,) — DPO's sequence log-likelihood."""
    losses, keep = labelled_losses(model, batch)
    rows = torch.arange(keep.shape[0], device=keep.device)[:, None].expand_as(keep)[keep]
    return torch.zeros(keep.shape[0], dtype=losses.dtype, device=losses.device).index_add(0, rows, -losses)


# --- cross-entropy through a frozen head, chunked (See Note: gradient in the forward pass)

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
            logits = linear(h, weight, bias)  # the device backend's chosen kernel
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

    Equals ``F.cross_entropy(hidden @ weight.T, targets, reduction="none")`` in value and gradient, but works through
    the tokens a chunk at a time. See Note: gradient in the forward pass.

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
