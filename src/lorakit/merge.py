"""Deploying an adapter: check a merged model against the adapter model, and save it in the trained dtype."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

__all__ = ["verify_merge", "MergeReport", "save_merged"]


@dataclass(frozen=True)
class MergeReport:
    """How far a merged model's logits are from the adapter model's on the same inputs."""

    max_abs_diff: float
    mean_abs_diff: float
    max_abs_logit: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def __str__(self) -> str:
        verdict = "ok" if self.ok else "TOO LARGE"
        return (f"merged vs adapter logits: max |diff| {self.max_abs_diff:.3e} (tolerance {self.tolerance:.1e}, "
                f"{verdict}), mean |diff| {self.mean_abs_diff:.3e}, max |logit| {self.max_abs_logit:.2f}")


@torch.no_grad()
def verify_merge(adapter_model: nn.Module, merged_model: nn.Module, inputs: dict | torch.Tensor,
                 tolerance: float | None = None) -> MergeReport:
    """Run both models on ``inputs`` and report the largest logit difference.

    Args:
        adapter_model: the model with the (unmerged) adapter active.
        merged_model: the result of :func:`lorakit.merge_and_unload` on a copy of it.
        inputs: ``input_ids`` tensor, or a dict of model inputs (``input_ids``, ``attention_mask``).
        tolerance: the largest acceptable difference; default ``2e-5 · max|logit|`` (at least 1e-4) for float32
            weights and ``2e-2 · max|logit|`` for 16-bit ones: a correct float32 merge of SmolLM2-135M differs by
            about 1.6e-4 on logits of magnitude ~40, from the changed order of floating-point additions.

    Returns:
        A :class:`MergeReport`; ``report.ok`` says whether it is within tolerance.
    """
    batch = inputs if isinstance(inputs, dict) else {"input_ids": inputs}
    modes = adapter_model.training, merged_model.training
    adapter_model.eval(), merged_model.eval()
    try:
        a = adapter_model(**batch).logits.float()
        b = merged_model(**batch).logits.float()
    finally:
        adapter_model.train(modes[0]), merged_model.train(modes[1])
    scale = a.abs().max().item()
    if tolerance is None:
        dtype = next(merged_model.parameters()).dtype
        tolerance = max(1e-4, 2e-5 * scale) if dtype == torch.float32 else max(5e-2, 2e-2 * scale)
    diff = (a - b).abs()
    return MergeReport(diff.max().item(), diff.mean().item(), scale, tolerance)


def save_merged(model: nn.Module, directory: str | os.PathLike, tokenizer=None, dtype: torch.dtype | None = None,
                max_shard_size: str = "5GB") -> Path:
    """Save a merged transformers model (and its tokenizer) with ``save_pretrained``, in one dtype.

    Args:
        model: a merged model (no LoRA layers left).
        directory: output directory.
        tokenizer: saved alongside when given, so the directory loads with ``from_pretrained`` alone.
        dtype: the dtype to write; default: the dtype the model's floating parameters already have (no fp32
            doubling of a bf16 model).

    Raises:
        ValueError: if the model still holds LoRA layers (merge first).
    """
    from .layer import LoraLinear

    if any(isinstance(m, LoraLinear) for m in model.modules()):
        raise ValueError("the model still holds LoRA layers; call lorakit.merge_and_unload(model) before saving")
    if dtype is not None:
        model.to(dtype)
        model.config.dtype = dtype
    directory = Path(directory)
    model.save_pretrained(directory, max_shard_size=max_shard_size)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory
