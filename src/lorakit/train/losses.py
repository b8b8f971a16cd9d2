"""Loss functions for SFT and DPO: pure functions, tensors in, tensors out.

Conventions: ``logits`` are ``(B, T, V)`` in any float dtype, ``labels`` are ``(B, T)`` int64 aligned
with the inputs (``labels[:, t]`` is token t, not t+1) and -100 marks positions without loss. Each
function shifts internally: logits at position t score label t+1.

Note: memory of log-probs
    ``log_softmax`` over the full ``(B, T, V)`` logits would allocate a second vocabulary-sized tensor
    (and a float32 one when the logits are bf16). Here only the positions that carry a label are
    selected first, upcast to float32 once, and the label's log-prob is read as
    ``logit[label] - logsumexp(logits)``; nothing else of vocabulary size is kept for backward.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from lorakit.data.sft import IGNORE_INDEX

__all__ = ["dpo_loss", "masked_ce_loss", "sequence_logps"]


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
