"""The recipes behind ``lorakit train`` and ``lorakit demo``: process settings, the base model and the data from a
config, then :func:`~lorakit.train.train_sft` / :func:`~lorakit.train.train_dpo` on what was loaded.

Everything process-wide a run changes is set here, grouped, and nowhere in the loops: the malloc setting
and CPU settings (:func:`lorakit.accelerate`: malloc, thread count, kernels) and the seed.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..cpu import accelerate
from ..data import load_splits
from ..data.prepare import prepare_sft_data
from ..data.prompt_format import save_prompt_format
from ..fields import ConfigError
from ..models import load_model
from .args import DPOArgs, SFTArgs
from .common import TrainResult, cpu_settings
from .dpo import train_dpo
from .run_dir import prepare_output_dir
from .sft import train_sft

__all__ = ["run_sft", "run_dpo", "process_settings", "load_base", "seed_everything"]


def seed_everything(seed: int) -> None:
    """Seed Python's and torch's global generators (adapter init, dropout)."""
    random.seed(seed)
    torch.manual_seed(seed)


def process_settings(threads: int, seed: int, model: nn.Module) -> None:
    """The process-wide settings of a training run: the CPU backend on ``model`` (:func:`lorakit.accelerate`:
    malloc keeps freed memory, ``threads`` torch threads (0 keeps the environment's / torch's), this machine's
    kernels), and the seed."""
    accelerate(model, cpu_settings(threads))
    seed_everything(seed)


def load_base(model: str, method: str, dtype: str) -> tuple[nn.Module, Any]:
    """The base model (NF4-quantized for ``method == "qlora"``) and its tokenizer, which gets EOS as its pad token
    when it has none."""
    compute = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    qlora = method == "qlora"
    base, tokenizer = load_model(model, quantization="nf4" if qlora else None, compute_dtype=compute,
                                 dtype=torch.float32 if qlora else compute)
    if tokenizer is None:
        raise ValueError(f"{model} holds no tokenizer, which training needs; save one there with "
                         "tokenizer.save_pretrained")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return base, tokenizer


def run_sft(args: SFTArgs) -> TrainResult:
    """Data, settings and base model from ``args``, then :func:`~lorakit.train.train_sft` (what ``lorakit train``
    and ``lorakit demo`` run). The data is read and checked before the model loads
    (:func:`lorakit.data.prepare.prepare_sft_data`, which says what it held out); the held-out rows are scored
    with ``args.metric`` before and after training, and the adapter records the prompt format."""
    prepare_output_dir(args.output_dir, args.resume, args.overwrite, create=False)  # before the model loads
    if not args.train_file and args.task is None:
        raise ConfigError("no data: set task (a built-in task) or train_file (a JSONL file)")
    data = prepare_sft_data(args, log=tqdm.write)
    model, tokenizer = load_base(args.model, args.method, args.dtype)
    process_settings(args.threads, args.seed, model)
    result = train_sft(model, tokenizer, data.train_rows, args, data.val_rows, score=data.metric)
    for written in (result.adapter_dir, Path(args.output_dir) / "best"):  # how eval / generate / chat prompt it
        if written is not None and written.is_dir():
            save_prompt_format(written, data.prompt_format)
    return result


def run_dpo(args: DPOArgs) -> TrainResult:
    """Settings, base model and preference rows from ``args``, then :func:`~lorakit.train.train_dpo`
    (what ``lorakit train --dpo`` runs)."""
    if not args.train_file:
        raise ValueError("DPO needs train_file: a JSONL file of {prompt, chosen, rejected} rows")
    if args.method == "full":
        raise ValueError("method='full' has no adapter to disable for the reference; use lora or qlora for DPO")
    prepare_output_dir(args.output_dir, args.resume, args.overwrite, create=False)
    model, tokenizer = load_base(args.model, args.method, args.dtype)
    process_settings(args.threads, args.seed, model)
    train_rows, val_rows = load_splits(args.train_file, args.val_file, val_fraction=args.val_fraction,
                                       seed=args.seed, skip_bad=args.skip_bad_rows, formats=["preference"])
    return train_dpo(model, tokenizer, train_rows, args, val_rows)
