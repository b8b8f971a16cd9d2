"""Tokenize SFT rows into ``input_ids`` + ``labels``, batch them, and optionally pack them.

Labels are aligned with ``input_ids`` (not shifted); the loss shifts them
(``lorakit.losses.masked_ce_loss``). ``labels[t] == -100`` means "no loss on token t".

Which tokens carry loss (``completion_only=True``, the default):

- ``{"text"}``: every token, plus an appended EOS.
- ``{"prompt": str, "completion": str}``: raw text, no chat template. ``prompt`` is tokenized with the
  tokenizer's special tokens (e.g. BOS), ``completion`` without, then EOS is appended; loss on the
  completion and EOS only.
- ``{"prompt": messages, "completion": str | messages}``: rendered with the chat template; loss on the
  completion's assistant turns only (a string completion becomes one assistant message).
- ``{"messages"}``: rendered with the chat template; loss on every assistant turn.

Chat rows end each assistant turn with whatever the template writes after the content (ChatML:
``<|im_end|>``), which is trained, so no EOS is appended. See Note: assistant spans.

Note: assistant spans
    Templates differ too much to parse their output. Instead the conversation is rendered three
    ways per assistant turn i: all messages (the text that is tokenized), ``messages[:i]`` with the
    generation prompt (ends where turn i's content starts), and ``messages[:i+1]`` (ends after turn
    i's end-of-turn marker). Each must be a prefix of the next, which holds for ChatML-like
    templates; trailing whitespace after the marker (ChatML's ``\\n``) is left untrained, so the
    model learns to stop at the marker. The full text is tokenized once and a token is trainable
    when its character offsets overlap a span, so boundaries never change the tokenization.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lorakit.data.io import detect_format, train_val_split

__all__ = [
    "IGNORE_INDEX",
    "SFTDataset",
    "collate_sft",
    "encode_prompt",
    "encode_prompt_completion",
    "pack_sft",
    "tokenize_sft_row",
    "train_val_split",
]

IGNORE_INDEX = -100
"""Label value that carries no loss (the ``ignore_index`` of ``torch.nn.functional.cross_entropy``)."""


def _render(tokenizer: Any, messages: list[dict], add_generation_prompt: bool) -> str:
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("row uses chat messages but the tokenizer has no chat_template; set tokenizer.chat_template")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _chat_spans(tokenizer: Any, messages: list[dict], train_from: int) -> tuple[str, list[tuple[int, int]]]:
    """Render ``messages``; return the text and the (start, end) character spans of the assistant
    turns at index ``>= train_from``. See Note: assistant spans.

    Raises:
        ValueError: the template's partial renders are not prefixes of the full render.
    """
    full = _render(tokenizer, messages, add_generation_prompt=False)
    spans = []
    for i in range(train_from, len(messages)):
        if messages[i]["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], add_generation_prompt=True)
        through = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not (through.startswith(before) and full.startswith(through)):
            raise ValueError(
                f"chat template is not prefix-stable at message {i}: rendering the first {i} messages with "
                "add_generation_prompt=True is not a prefix of the full conversation, so assistant tokens "
                "cannot be located; use a ChatML-like template"
            )
        spans.append((len(before), len(before) + len(through[len(before) :].rstrip())))
    return full, spans


def _encode_spans(tokenizer: Any, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[bool]]:
    """Tokenize ``text`` (no added special tokens); flag tokens overlapping any of ``spans``."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        flags = [any(s < se and e > ss for ss, se in spans) for s, e in enc["offset_mapping"]]
        return list(enc["input_ids"]), flags
    # Slow tokenizers have no offsets: tokenize the pieces between span edges separately.
    ids: list[int] = []
    flags = []
    cuts = sorted({0, len(text), *(p for span in spans for p in span)})
    for a, b in zip(cuts[:-1], cuts[1:]):
        piece = tokenizer(text[a:b], add_special_tokens=False)["input_ids"]
        ids += piece
        flags += [any(ss <= a and b <= se for ss, se in spans)] * len(piece)
    return ids, flags


def _eos_id(tokenizer: Any) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no eos_token_id; set tokenizer.eos_token so completions can end")
    return tokenizer.eos_token_id


def encode_prompt(prompt: str | list[dict], tokenizer: Any) -> list[int]:
    """Token ids of a prompt exactly as training saw them, ready for ``model.generate``.

    A message list is rendered with the chat template and the generation prompt; a string is
    tokenized with the tokenizer's special tokens (no template), as in ``tokenize_sft_row``.
    """
    if isinstance(prompt, str):
        return list(tokenizer(prompt)["input_ids"])
    text = _render(tokenizer, prompt, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_prompt_completion(
    prompt: str | list[dict], completion: str | list[dict], tokenizer: Any
) -> tuple[list[int], list[bool]]:
    """Token ids of prompt + completion and per-token flags marking the completion tokens.

    Shared by SFT and preference tokenization. String completions get EOS appended; message
    completions end with the template's end-of-turn marker.
    """
    if isinstance(prompt, str):
        if not isinstance(completion, str):
            raise ValueError("a string prompt needs a string completion")
        p_ids = list(tokenizer(prompt)["input_ids"])
        c_ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"]) + [_eos_id(tokenizer)]
        return p_ids + c_ids, [False] * len(p_ids) + [True] * len(c_ids)
    if isinstance(completion, str):
        completion = [{"role": "assistant", "content": completion}]
    text, spans = _chat_spans(tokenizer, list(prompt) + list(completion), train_from=len(prompt))
    return _encode_spans(tokenizer, text, spans)


def tokenize_sft_row(
    row: dict[str, Any], tokenizer: Any, max_length: int, *, completion_only: bool = True
) -> dict[str, list[int]]:
    """Tokenize one SFT row into ``{"input_ids": list[int], "labels": list[int]}`` of equal length.

    Args:
        row: a ``prompt_completion``, ``messages`` or ``text`` row (see module docstring).
        tokenizer: a ``transformers`` tokenizer; chat rows need ``chat_template``.
        max_length (int): keep the first ``max_length`` tokens (right truncation; a truncated
            completion loses its EOS / end-of-turn marker).
        completion_only (bool): loss only on completion / assistant tokens. ``False`` trains on
            every token. Default ``True``.

    Raises:
        ValueError: ``max_length < 1``; the row is malformed or a preference row; the tokenizer lacks
            a chat template / EOS it needs; or no trainable token is left after truncation (the
            prompt fills ``max_length``, or a ``messages`` row has no assistant turn).
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    fmt = detect_format(row)
    if fmt == "preference":
        raise ValueError("is a preference row (prompt/chosen/rejected), which SFT cannot train on: train preference "
                         "data with `lorakit train --dpo` (train_dpo / tokenize_preference_row)")
    if fmt == "text":
        ids = list(tokenizer(row["text"])["input_ids"]) + [_eos_id(tokenizer)]
        flags = [True] * len(ids)
    elif fmt == "messages":
        text, spans = _chat_spans(tokenizer, row["messages"], train_from=0)
        ids, flags = _encode_spans(tokenizer, text, spans)
    else:
        ids, flags = encode_prompt_completion(row["prompt"], row["completion"], tokenizer)
    if not completion_only:
        flags = [True] * len(ids)
    if not any(flags[:max_length]):
        n_lead = next((i for i, f in enumerate(flags) if f), len(flags))
        raise ValueError(
            f"no trainable token left after truncation to max_length={max_length} (the first trainable "
            f"token is at position {n_lead} of {len(ids)}); raise max_length or shorten the prompt"
        )
    ids, flags = ids[:max_length], flags[:max_length]
    return {"input_ids": ids, "labels": [t if f else IGNORE_INDEX for t, f in zip(ids, flags)]}


class SFTDataset:
    """A list of tokenized SFT examples, usable as a map-style ``torch.utils.data`` dataset.

    Args:
        rows: SFT rows (``lorakit.data.load_rows(...).rows``).
        tokenizer, max_length, completion_only: as in ``tokenize_sft_row``.
        skip_bad (bool): skip rows that fail to tokenize instead of raising; ``skipped`` lists them
            (``"<file> line <n>: <reason>"``) and ``n_skipped`` counts them.
        pack (bool): greedily pack examples into rows of up to ``max_length`` (``pack_sft``).

    Raises:
        ValueError: a row fails to tokenize, unless ``skip_bad``. The message starts with the row's file and line
            (rows from ``lorakit.data.load_rows``) or ``row <index>:`` (other dicts).
    """

    def __init__(
        self,
        rows: Sequence[dict[str, Any]],
        tokenizer: Any,
        max_length: int,
        *,
        completion_only: bool = True,
        skip_bad: bool = False,
        pack: bool = False,
    ) -> None:
        self.examples: list[dict[str, list[int]]] = []
        self.skipped: list[str] = []
        for i, row in enumerate(rows):
            try:
                self.examples.append(tokenize_sft_row(row, tokenizer, max_length, completion_only=completion_only))
            except ValueError as e:
                message = f"{getattr(row, 'where', '') or f'row {i}'}: {e}"
                if not skip_bad:
                    raise ValueError(message) from None
                self.skipped.append(message)
        self.n_skipped = len(self.skipped)
        if pack:
            self.examples = pack_sft(self.examples, max_length)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.examples[i]


def collate_sft(batch: Sequence[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad examples to the longest one.

    Args:
        batch: examples with ``input_ids`` and ``labels`` (and ``position_ids`` when packed).
        pad_id (int): token id written into padding (e.g. ``tokenizer.pad_token_id``); it never
            carries loss.

    Returns:
        ``input_ids`` and ``labels`` of shape ``(B, T)`` (int64, labels -100 on padding), and either
        ``attention_mask`` ``(B, T)`` (1 on real tokens), or, for packed examples, ``position_ids``
        ``(B, T)`` and no ``attention_mask``: transformers builds a block-diagonal causal mask from
        restarting ``position_ids`` only when ``attention_mask`` is None. Padding positions restart
        at 0 so that they form a sequence of their own.

    Raises:
        ValueError: empty batch, ``pad_id`` is None, or only some examples carry ``position_ids``.
    """
    if not batch:
        raise ValueError("cannot collate an empty batch")
    if pad_id is None:
        raise ValueError("pad_id is None; use tokenizer.pad_token_id, or tokenizer.eos_token_id if there is no pad")
    packed = ["position_ids" in ex for ex in batch]
    if any(packed) and not all(packed):
        raise ValueError("batch mixes packed examples (with position_ids) and unpacked ones")
    T = max(len(ex["input_ids"]) for ex in batch)
    B = len(batch)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    positions = torch.arange(T).repeat(B, 1)
    for b, ex in enumerate(batch):
        n = len(ex["input_ids"])
        input_ids[b, :n] = torch.tensor(ex["input_ids"], dtype=torch.long)
        labels[b, :n] = torch.tensor(ex["labels"], dtype=torch.long)
        mask[b, :n] = 1
        if packed[0]:
            positions[b, :n] = torch.tensor(ex["position_ids"], dtype=torch.long)
            positions[b, n:] = torch.arange(T - n)
    if packed[0]:
        return {"input_ids": input_ids, "labels": labels, "position_ids": positions}
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


def pack_sft(examples: Sequence[dict[str, list[int]]], max_length: int) -> list[dict[str, list[int]]]:
    """Pack short examples into rows of at most ``max_length`` tokens (first-fit, longest first).

    Each packed row concatenates whole examples (none is split) and gets ``position_ids`` that
    restart at 0 for each example. The first label of every example is set to -100, so the
    (shifted) loss never asks the last token of one example to predict the next example.

    Raises:
        ValueError: an example is longer than ``max_length``.
    """
    bins: list[list[dict[str, list[int]]]] = []
    room: list[int] = []
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))  # stable
    for i in order:
        n = len(examples[i]["input_ids"])
        if n > max_length:
            raise ValueError(f"example {i} has {n} tokens, more than max_length={max_length}; truncate it first")
        j = next((j for j, r in enumerate(room) if r >= n), None)
        if j is None:
            bins.append([])
            room.append(max_length)
            j = len(bins) - 1
        bins[j].append(examples[i])
        room[j] -= n
    packed = []
    for members in bins:
        row: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
        for ex in members:
            row["input_ids"] += ex["input_ids"]
            row["labels"] += [IGNORE_INDEX] + list(ex["labels"][1:])
            row["position_ids"] += list(range(len(ex["input_ids"])))
        packed.append(row)
    return packed
