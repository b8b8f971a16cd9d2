"""`train_sft`: supervised fine-tuning with LoRA, QLoRA or every weight trainable, as one top-to-bottom function."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..adapters import TrainableReport, trainable_parameters
from ..data import SFTDataset, collate_sft
from ..data.prepare import describe_skipped, prepare_sft_data
from ..data.prompt_format import save_prompt_format
from ..evaluate import validation_loss
from ..fast_linears import fast_frozen_linears
from ..inject import add_adapter
from ..peft_format import save_adapter
from ..scoring import RunScorer
from .args import SFTArgs
from .common import (MetricsLog, TrainState, latest_checkpoint, load_checkpoint, lora_config, optimizer_and_schedule,
                     plot_losses, save_activation_memory, save_checkpoint, sft_loss, start_run)

__all__ = ["train_sft", "TrainResult", "batch_indices", "save_trainable", "load_trainable"]


@dataclass
class TrainResult:
    """What a run produced and measured."""

    adapter_dir: Path | None
    base_accuracy: float | None
    tuned_accuracy: float | None
    best_val_loss: float | None
    final_val_loss: float | None
    steps: int
    seconds: float
    trainable: TrainableReport
    plot_path: Path | None
    metrics_path: Path


def batch_indices(micro: int, n_examples: int, batch_size: int, seed: int) -> list[int]:
    """Example indices of micro-batch number ``micro``: a fresh seeded permutation each epoch.

    A pure function of its arguments, so resuming at micro-batch ``k`` replays exactly the data order of an
    uninterrupted run.
    """
    per_epoch = max(1, n_examples // batch_size)
    epoch, slot = divmod(micro, per_epoch)
    perm = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return perm[slot * batch_size:(slot + 1) * batch_size].tolist()


def save_trainable(model: nn.Module, path: Path) -> None:
    """Every trainable parameter under its module path, as safetensors (checkpoints for LoRA and full runs)."""
    path.mkdir(parents=True, exist_ok=True)
    tensors = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    save_file(tensors, path / "trainable.safetensors")


def load_trainable(model: nn.Module, path: Path) -> None:
    """Copy the tensors :func:`save_trainable` wrote back into ``model`` (names must match exactly)."""
    tensors = load_file(path / "trainable.safetensors")
    params = dict(model.named_parameters())
    missing = sorted(set(tensors) - set(params))
    if missing:
        raise ValueError(f"{path}: checkpoint tensors {missing[:3]} are not in this model; was the config changed?")
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)


def start_or_resume(args, model: nn.Module,
                    out: Path) -> tuple[torch.optim.Optimizer, Any, TrainState, MetricsLog]:
    """Optimizer and schedule over the trainable parameters, a fresh :class:`TrainState` and metrics log, or, with
    ``args.resume`` and a checkpoint in ``out``, all of them restored from the newest one."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = optimizer_and_schedule(args, params)
    state = TrainState()
    resume_from = latest_checkpoint(out) if args.resume else None
    if resume_from is not None:
        state = load_checkpoint(resume_from, lambda p: load_trainable(model, p), optimizer, scheduler)
    metrics = MetricsLog(out / "metrics.jsonl", fresh=resume_from is None)
    return optimizer, scheduler, state, metrics


def train_sft(args: SFTArgs) -> TrainResult:
    """Fine-tune ``args.model`` on ``args``' data and save the adapter (or full model) to ``args.output_dir``.

    Steps: load the base (quantized for QLoRA) → tokenize the data → base accuracy → add the adapter → loop
    (accumulate, clip, step, schedule, log, evaluate, checkpoint) → save → tuned accuracy → plot.

    Returns:
        A :class:`TrainResult`. Files: ``adapter/`` (PEFT format) or ``model/`` (full fine-tuning), ``best/``
        (lowest validation loss, when evaluating during training), ``checkpoint-<step>/``, ``metrics.jsonl``,
        ``loss.png``, ``summary.json``.
    """
    started = time.perf_counter()
    # --- data (read and checked before the model loads), model
    data = prepare_sft_data(args, log=tqdm.write)
    train_rows, val_rows = data.train_rows, data.val_rows
    out, model, tokenizer = start_run(args)
    train_set = SFTDataset(train_rows, tokenizer, args.max_length, completion_only=args.completion_only,
                           skip_bad=args.skip_bad_rows, pack=args.packing)
    if train_set.skipped:
        tqdm.write(describe_skipped("the training rows (tokenizing)", train_set.skipped))
    loss_rows = val_rows[:args.val_loss_rows] if args.val_loss_rows else val_rows
    val_set = SFTDataset(loss_rows, tokenizer, args.max_length) if loss_rows else None
    if len(train_set) < args.batch_size:
        raise ValueError(f"{len(train_set)} training examples < batch_size={args.batch_size}; add data or lower it")
    scorer = RunScorer(val_rows, data.metric if args.eval_accuracy else None, out, args.report_to, args.progress)
    base_accuracy = scorer.base(model, tokenizer) if not args.resume else None

    # --- adapter (or every weight for the full fine-tuning baseline)
    if args.method == "full":
        model.requires_grad_(True)
    else:
        add_adapter(model, lora_config(args))
    save_activation_memory(model, args)
    fast_frozen_linears(model)  # the layers target_modules leave out compute through oneDNN too (cpu_matmul)
    report = trainable_parameters(model)

    # --- optimizer and schedule
    optimizer, scheduler, state, metrics = start_or_resume(args, model, out)
    if base_accuracy is not None:
        metrics.write(step=0, score=base_accuracy)
    params = [p for group in optimizer.param_groups for p in group["params"]]  # clipped each step
    pad = tokenizer.pad_token_id

    # --- loop
    model.train()
    bar = tqdm(total=args.max_steps, initial=state.step, desc="train", disable=not args.progress)
    while state.step < args.max_steps:
        step_start = time.perf_counter()
        batches = []
        for _ in range(args.grad_accum):
            idx = batch_indices(state.micro, len(train_set), args.batch_size, args.seed)
            batches.append(collate_sft([train_set[i] for i in idx], pad))
            state.micro += 1
        window_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        loss_total = 0.0
        for batch in batches:
            loss_sum, _ = sft_loss(model, batch)
            (loss_sum / window_tokens).backward()  # mean over every labelled token of the window
            loss_total += loss_sum.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm) if args.max_grad_norm else None
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        seconds = time.perf_counter() - step_start
        state.elapsed += seconds
        n_tokens = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
                       for b in batches)
        row = {"step": state.step, "loss": loss_total / window_tokens, "lr": scheduler.get_last_lr()[0],
               "tokens_per_s": n_tokens / seconds, "grad_norm": float(grad_norm) if grad_norm is not None else None,
               "elapsed_s": state.elapsed}
        if val_set is not None and args.eval_every and state.step % args.eval_every == 0:
            row["val_loss"] = validation_loss(model, tokenizer, val_set)
            if row["val_loss"] < state.best_val_loss:
                state.best_val_loss, state.evals_without_improvement = row["val_loss"], 0
                _save_result(model, args, out / "best")
            else:
                state.evals_without_improvement += 1
            scorer.at_step(model, tokenizer, row)
        metrics.write(**row)
        scorer.log(row)
        state.history.append(row)
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.1e}", tok_s=f"{row['tokens_per_s']:.0f}")
        if args.save_every and state.step % args.save_every == 0:
            save_checkpoint(out, state.step, lambda p: save_trainable(model, p), optimizer, scheduler, state)
        if args.early_stopping_patience and state.evals_without_improvement >= args.early_stopping_patience:
            tqdm.write(f"early stop at step {state.step}: no better validation loss in "
                       f"{args.early_stopping_patience} evaluations")
            break
    bar.close()

    # --- save and evaluate
    last = state.history[-1] if state.history else {}
    final_val = last.get("val_loss") if last.get("step") == state.step else None  # evaluated at the last step
    if final_val is None and val_set is not None:
        final_val = validation_loss(model, tokenizer, val_set)
        state.history.append({"step": state.step, "val_loss": final_val})
        metrics.write(step=state.step, val_loss=final_val)
        scorer.log({"step": state.step, "val_loss": final_val})
    if final_val is not None:
        state.best_val_loss = min(state.best_val_loss, final_val)
    adapter_dir = _save_result(model, args, out / ("model" if args.method == "full" else "adapter"), tokenizer)
    save_prompt_format(adapter_dir, data.prompt_format)  # how eval / generate / chat prompt this adapter
    if (out / "best").is_dir():
        save_prompt_format(out / "best", data.prompt_format)
    tuned_accuracy = scorer.final(model, tokenizer, state.step, metrics)
    scorer.close()
    plot = plot_losses(state.history, out / "loss.png", f"{args.method} on {args.train_file or args.task}")
    result = TrainResult(adapter_dir, base_accuracy, tuned_accuracy,
                         state.best_val_loss if state.best_val_loss < float("inf") else None, final_val, state.step,
                         time.perf_counter() - started, report, plot, metrics.path)
    _write_summary(out / "summary.json", result)
    return result


def _save_result(model: nn.Module, args: SFTArgs, path: Path, tokenizer=None) -> Path:
    if args.method == "full":
        model.save_pretrained(path)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
    else:
        save_adapter(model, path)
    return path


def _write_summary(path: Path, result: TrainResult) -> None:
    import json

    data = {k: (str(v) if isinstance(v, Path) else v) for k, v in result.__dict__.items() if k != "trainable"}
    data.update(trainable=result.trainable.trainable, total=result.trainable.total, percent=result.trainable.percent)
    path.write_text(json.dumps(data, indent=2) + "\n")
