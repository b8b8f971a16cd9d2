"""Data loading and tokenization for SFT and preference (DPO) training.

Typical use::

    from lorakit.data import load_splits, SFTDataset, collate_sft

    train_rows, val_rows = load_splits("train.jsonl", val_fraction=0.05, seed=0)
    train = SFTDataset(train_rows, tokenizer, max_length=512)
    loader = DataLoader(train, batch_size=8, shuffle=True,
                        collate_fn=lambda b: collate_sft(b, tokenizer.pad_token_id))
"""

from lorakit.data.io import ROW_FORMATS, LoadedRows, detect_format, load_rows, load_splits, train_val_split
from lorakit.data.preference import PreferenceDataset, collate_preference, tokenize_preference_row
from lorakit.data.sft import (
    IGNORE_INDEX,
    SFTDataset,
    collate_sft,
    encode_prompt,
    encode_prompt_completion,
    pack_sft,
    tokenize_sft_row,
)

__all__ = [
    "IGNORE_INDEX",
    "ROW_FORMATS",
    "LoadedRows",
    "PreferenceDataset",
    "SFTDataset",
    "collate_preference",
    "collate_sft",
    "detect_format",
    "encode_prompt",
    "encode_prompt_completion",
    "load_rows",
    "load_splits",
    "pack_sft",
    "tokenize_preference_row",
    "tokenize_sft_row",
    "train_val_split",
]
