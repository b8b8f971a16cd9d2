"""Evaluation: exact-match accuracy by greedy generation, and validation loss on completion tokens.

Both run on the device the model is on (inputs are moved there).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .adapters import active_adapters, merge_adapter, unmerge_adapter
from .base import is_quantized
from .data import SFTDataset, collate_sft, encode_prompt
from .losses import sft_loss
from .tasks import row_answer, score_exact

__all__ = ["generate_answers", "exact_match", "validation_loss"]


def _device(model: nn.Module) -> torch.device:
    first = next(iter(model.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


def _stop_ids(tokenizer: Any) -> list[int]:
    """EOS plus the end-of-turn tokens of common chat templates that this tokenizer has."""
    vocab = tokenizer.get_vocab()
    ids = {tokenizer.eos_token_id} | {vocab[t] for t in ("<|im_end|>", "<|eot_id|>", "<|end|>") if t in vocab}
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def generate_answers(model: nn.Module, tokenizer: Any, prompts: Sequence[Any], batch_size: int = 32,
                     max_new_tokens: int = 32, progress: bool = False, desc: str = "generate") -> list[str]:
    """Greedy answers to chat prompts (message lists) or plain strings, batched with left padding.

    Prompts are sorted by length so that each batch pads little; answers come back in the input order. Active
    adapters are merged for the duration (no LoRA overhead per decoded token) and unmerged afterwards.
    """
    encoded = [encode_prompt(p, tokenizer) for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stop = _stop_ids(tokenizer)
    answers: list[str] = [""] * len(encoded)
    device = _device(model)
    was_training = model.training
    model.eval()
    # Merging removes the per-token LoRA cost while decoding; a quantized base would be re-quantized by it, so it
    # keeps its adapters unmerged.
    merged = bool(active_adapters(model)) and not any(is_quantized(m) for m in model.modules())
    if merged:
        merge_adapter(model)
    try:
        bar = tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, leave=False)
        for start in bar:
            idx = order[start:start + batch_size]
            width = max(len(encoded[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                n = len(encoded[i])
                ids[row, width - n:] = torch.tensor(encoded[i])
                mask[row, width - n:] = 1
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad, eos_token_id=stop)
            for row, i in enumerate(idx):
                answers[i] = tokenizer.decode(out[row, width:], skip_special_tokens=True).strip()
    finally:
        if merged:
            unmerge_adapter(model)
        model.train(was_training)
    return answers


def exact_match(model: nn.Module, tokenizer: Any, rows: Sequence[dict], score: Callable[[str, str], bool] = score_exact,
                batch_size: int = 32, max_new_tokens: int = 32, progress: bool = False, desc: str = "eval"
                ) -> tuple[float, list[str]]:
    """Fraction of ``rows`` whose greedy answer matches the reference completion under ``score``.

    Returns:
        ``(accuracy, answers)``.
    """
    if not rows:
        raise ValueError("exact_match needs at least one row")
    answers = generate_answers(model, tokenizer, [r["prompt"] for r in rows], batch_size, max_new_tokens, progress,
                               desc)
    hits = sum(bool(score(a, row_answer(r))) for a, r in zip(answers, rows))
    return hits / len(rows), answers


@torch.no_grad()
def validation_loss(model: nn.Module, tokenizer: Any, rows: Sequence[dict] | SFTDataset, max_length: int = 256,
                    batch_size: int = 16) -> float:
    """Mean cross-entropy per completion token over ``rows`` (the same loss training minimises)."""
    data = rows if isinstance(rows, SFTDataset) else SFTDataset(rows, tokenizer, max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = _device(model)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, len(data), batch_size):
            batch = collate_sft([data[i] for i in range(start, min(start + batch_size, len(data)))], pad)
            batch = {k: v.to(device) for k, v in batch.items()}
            loss_sum, n = sft_loss(model, batch)
            total, count = total + loss_sum.item(), count + n
    finally:
        model.train(was_training)
    return total / max(count, 1)
