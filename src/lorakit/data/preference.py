"""Tokenize preference rows ``{"prompt", "chosen", "rejected"}`` and batch them for a DPO loss.

A row becomes three id lists: the prompt, the chosen completion and the rejected completion.
With a message-list prompt, each pair (prompt + chosen, prompt + rejected) is rendered with the chat
template exactly as ``lorakit.data.sft`` renders SFT rows, so a completion ends with the template's
end-of-turn marker; string completions of a string prompt end with EOS.

``collate_preference`` stacks chosen rows then rejected rows into one batch of size ``2B``, so
one forward pass scores both and ``lorakit.losses.sequence_logps(logits, labels).chunk(2)``
gives ``(chosen_logps, rejected_logps)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lorakit.data.io import detect_format
from lorakit.data.sft import IGNORE_INDEX, collate_sft, encode_prompt_completion

__all__ = ["PreferenceDataset", "collate_preference", "tokenize_preference_row"]


def _split(ids: list[int], flags: list[bool]) -> tuple[list[int], list[int]]:
    """Cut ``ids`` into (prompt, completion): completion runs from the first to the last flagged token."""
    first = flags.index(True)
    last = len(flags) - 1 - flags[::-1].index(True)
    return ids[:first], ids[first : last + 1]


def tokenize_preference_row(row: dict[str, Any], tokenizer: Any, max_length: int) -> dict[str, list[int]]:
    """Tokenize one preference row.

    Args:
        row: ``{"prompt": str | messages, "chosen": str | messages, "rejected": str | messages}``.
        tokenizer: a ``transformers`` tokenizer (with ``chat_template`` for message prompts).
        max_length (int): bound on ``len(prompt_ids) + len(completion_ids)`` for each completion;
            completions are cut on the right to fit, the prompt is never cut.

    Returns:
        ``{"prompt_ids": list[int], "chosen_ids": list[int], "rejected_ids": list[int]}``.

    Raises:
        ValueError: the row is not a preference row; a completion is empty; the prompt tokenizes
            differently in the two pairs (template not prefix-stable); or the prompt leaves no room
            for a completion token within ``max_length``.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if detect_format(row) != "preference":
        raise ValueError(f"expected a preference row with keys prompt, chosen, rejected; got keys {sorted(row)}")
    parts = {}
    for key in ("chosen", "rejected"):
        ids, flags = encode_prompt_completion(row["prompt"], row[key], tokenizer)
        if not any(flags):
            raise ValueError(f"{key!r} completion produced no tokens")
        parts[key] = _split(ids, flags)
    prompt_ids = parts["chosen"][0]
    if parts["rejected"][0] != prompt_ids:
        raise ValueError("the prompt tokenizes differently before 'chosen' and 'rejected'; check the chat template")
    room = max_length - len(prompt_ids)
    if room < 1:
        raise ValueError(
            f"prompt has {len(prompt_ids)} tokens, leaving no completion token within max_length={max_length}"
        )
    return {"prompt_ids": prompt_ids, "chosen_ids": parts["chosen"][1][:room], "rejected_ids": parts["rejected"][1][:room]}


class PreferenceDataset:
    """A list of tokenized preference examples (map-style dataset for ``torch.utils.data.DataLoader``).

    Args:
        rows: preference rows. tokenizer, max_length: as in ``tokenize_preference_row``.
        skip_bad (bool): skip failing rows instead of raising (``skipped`` lists them, ``n_skipped`` counts them).

    Raises:
        ValueError: a row fails, unless ``skip_bad``; the message starts with the row's file and line (rows from
            ``lorakit.data.load_rows``) or ``row <index>:``.
    """

    def __init__(self, rows: Sequence[dict[str, Any]], tokenizer: Any, max_length: int, *, skip_bad: bool = False):
        self.examples: list[dict[str, list[int]]] = []
        self.skipped: list[str] = []
        for i, row in enumerate(rows):
            try:
                self.examples.append(tokenize_preference_row(row, tokenizer, max_length))
            except ValueError as e:
                message = f"{getattr(row, 'where', '') or f'row {i}'}: {e}"
                if not skip_bad:
                    raise ValueError(message) from None
                self.skipped.append(message)
        self.n_skipped = len(self.skipped)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.examples[i]


def collate_preference(batch: Sequence[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Batch ``B`` preference examples into ``2B`` right-padded rows: chosen first, then rejected.

    Args:
        batch: outputs of ``tokenize_preference_row``.
        pad_id (int): padding token id.

    Returns:
        ``input_ids``, ``attention_mask``, ``labels`` of shape ``(2B, T)``, ``T`` the longest
        prompt + completion. Rows ``[:B]`` are prompt + chosen, rows ``[B:]`` prompt + rejected, in
        the same example order. ``labels`` are -100 on prompt tokens and padding.

    Raises:
        ValueError: as ``collate_sft`` (empty batch, ``pad_id`` None).
    """
    rows = []
    for key in ("chosen_ids", "rejected_ids"):
        for ex in batch:
            rows.append(
                {
                    "input_ids": ex["prompt_ids"] + ex[key],
                    "labels": [IGNORE_INDEX] * len(ex["prompt_ids"]) + ex[key],
                }
            )
    return collate_sft(rows, pad_id)
