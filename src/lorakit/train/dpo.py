"""`train_dpo`: preference tuning with sigmoid DPO (https://arxiv.org/abs/2305.18290), one top-to-bottom function.

The reference model is the same model with its adapter disabled (no second copy in memory), or, when training
continues from an existing adapter (``args.reference_adapter``), a frozen copy of that adapter held as a second
named adapter: disabling would give the bare base, which is not the model that produced the starting policy (TRL
PR #4723). The recipe that loads a model from a config and calls this function is :func:`lorakit.train.run_dpo`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..adapters import delete_adapter, disable_adapter, set_adapter, trainable_parameters
from ..data import PreferenceDataset, collate_preference
from ..cpu import accelerate
from ..inject import adapter_configs, add_adapter
from ..losses import dpo_loss, token_logps
from ..peft_format import load_adapter
from .args import DPOArgs
from .checkpoints import RESUME_SETTINGS, checkpoints_of, resume_or_start, save_checkpoint
from .common import (MetricsLog, NonFiniteError, TrainResult, all_finite, batch_indices, check_positions,
                     cpu_settings, grad_norm, model_device, nonfinite_message, optimizer_and_schedule, plot_losses,
                     save_activation_memory, save_result, to_device, write_summary)
from .run_dir import prepare_output_dir

__all__ = ["train_dpo", "reference_logps"]

REFERENCE = "reference"


@contextmanager
def _reference(model: nn.Module, has_reference_adapter: bool):
    """Run the block as the reference model: the frozen reference adapter, or the base with adapters disabled."""
    if has_reference_adapter:
        set_adapter(model, REFERENCE, trainable=False)  # only the active set changes; "default" stays trainable
        try:
            yield
        finally:
            set_adapter(model, "default", trainable=False)
    else:
        with disable_adapter(model):
            yield


@torch.no_grad()
def reference_logps(model: nn.Module, batch: dict[str, torch.Tensor], has_reference_adapter: bool = False
                    ) -> torch.Tensor:
    """Sequence log-probs (2B,) of a collated preference batch under the reference model."""
    with _reference(model, has_reference_adapter):
        return token_logps(model, batch)


def _dpo_step_loss(model, batch, ref, beta):
    policy = token_logps(model, batch)
    pc, pr = policy.chunk(2)
    rc, rr = ref.chunk(2)
    return dpo_loss(pc, pr, rc, rr, beta)


def train_dpo(model: nn.Module, tokenizer: Any, train_data: Sequence[dict] | PreferenceDataset, args: DPOArgs,
              val_data: Sequence[dict] | PreferenceDataset | None = None) -> TrainResult:
    """Preference-tune ``model`` on ``train_data`` and save the adapter to ``args.output_dir``.

    Trains what it is given, where it is: with ``args.reference_adapter`` that adapter is loaded twice (trainable
    ``default`` and frozen ``reference``); otherwise a model without an adapter gets one from ``args``, and a model
    that has adapters trains them as they are, with the adapters disabled as the reference.

    Args:
        model: a causal LM on any device (batches go to the device of its parameters).
        tokenizer: its tokenizer; EOS pads when it has no pad token.
        train_data: ``{"prompt", "chosen", "rejected"}`` rows (``lorakit.data.load_rows(...,
            formats=["preference"]).rows``), tokenized here with ``args.max_length`` and ``skip_bad_rows``; or a
            :class:`~lorakit.data.PreferenceDataset`.
        args: the loop's settings (``beta``, steps, batch, lr, ...).
        val_data: held-out preference rows (or a dataset) for the validation DPO loss.

    Returns:
        A :class:`~lorakit.train.TrainResult` (accuracies are None; ``best_val_loss`` is the DPO loss on the
        validation rows). Metrics per step: loss, reward accuracy, chosen/rejected rewards and margin.

    Raises:
        ConfigError, CheckpointError, NonFiniteError: as :func:`~lorakit.train.train_sft`.
    """
    started = time.perf_counter()
    if args.method == "full":
        raise ValueError("method='full' has no adapter to disable for the reference; use lora or qlora for DPO")
    out = Path(args.output_dir)
    run_id = prepare_output_dir(out, args.resume, args.overwrite)
    device = model_device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    # --- adapter(s)
    has_ref = args.reference_adapter is not None
    if has_ref:
        load_adapter(model, args.reference_adapter, "default")
        load_adapter(model, args.reference_adapter, REFERENCE)
        set_adapter(model, "default")
    elif not adapter_configs(model):
        add_adapter(model, args.lora_config())
    save_activation_memory(model, args.gradient_checkpointing, args.recompute_activations)
    accelerate(model, cpu_settings(args.threads))  # the CPU backend, now with the adapter (lorakit/cpu/accelerate.py)

    # --- data
    train_set = train_data if isinstance(train_data, PreferenceDataset) else PreferenceDataset(
        train_data, tokenizer, args.max_length, skip_bad=args.skip_bad_rows)
    val_set = val_data if isinstance(val_data, PreferenceDataset) else (
        PreferenceDataset(val_data, tokenizer, args.max_length) if val_data else None)
    if len(train_set) < args.batch_size:
        raise ValueError(f"{len(train_set)} preference rows < batch_size={args.batch_size}; add data or lower it")
    check_positions(model, max(len(ex["prompt_ids"]) + max(len(ex["chosen_ids"]), len(ex["rejected_ids"]))
                               for ex in train_set.examples), args.max_length)
    ref_cache: dict[int, torch.Tensor] = {}
    if args.precompute_reference:
        for i in tqdm(range(len(train_set)), desc="reference log-probs", disable=not args.progress):
            ref_cache[i] = reference_logps(model, to_device(collate_preference([train_set[i]], pad), device), has_ref)

    # --- optimizer and schedule
    report = trainable_parameters(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = optimizer_and_schedule(params, args.optimizer, args.lr, args.weight_decay,
                                                  args.warmup_steps, args.max_steps, args.min_lr_ratio)
    state = resume_or_start(out, run_id, args.resume, model, optimizer, scheduler,
                            {k: getattr(args, k) for k in RESUME_SETTINGS})
    metrics = MetricsLog(out / "metrics.jsonl", keep=state.metrics_lines)

    # --- loop
    model.train()
    bar = tqdm(total=args.max_steps, initial=state.step, desc="dpo", disable=not args.progress)
    while state.step < args.max_steps:
        step_start = time.perf_counter()
        sums = {"loss": 0.0, "reward_accuracy": 0.0, "margin": 0.0}
        for _ in range(args.grad_accum):
            idx = batch_indices(state.micro, len(train_set), args.batch_size, args.seed)
            state.micro += 1
            batch = to_device(collate_preference([train_set[i] for i in idx], pad), device)
            if args.precompute_reference:
                ref = torch.cat([torch.cat([ref_cache[i].chunk(2)[half] for i in idx]) for half in (0, 1)])
            else:
                ref = reference_logps(model, batch, has_ref)
            loss, chosen_r, rejected_r, acc = _dpo_step_loss(model, batch, ref, args.beta)
            (loss / args.grad_accum).backward()
            sums["loss"] += loss.item() / args.grad_accum
            sums["reward_accuracy"] += acc.item() / args.grad_accum
            sums["margin"] += (chosen_r - rejected_r).mean().item() / args.grad_accum
        norm = grad_norm(params, args.max_grad_norm)
        bad = None if math.isfinite(sums["loss"]) and math.isfinite(norm) else \
            f"loss {sums['loss']:g}, gradient norm {norm:g}"
        if bad is None:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if bad is not None and args.nonfinite == "stop" or bad is None and not all_finite(params):
            last = checkpoints_of(out, run_id)
            raise NonFiniteError(nonfinite_message(state.step + 1, bad or "the update made weights NaN or infinite",
                                                   scheduler.get_last_lr()[0], last[-1].name if last else None))
        if bad is not None:
            tqdm.write(f"step {state.step + 1}: {bad}; update skipped (nonfinite: skip)")
        scheduler.step()
        state.step += 1
        state.elapsed += time.perf_counter() - step_start
        row = {"step": state.step, **sums, "lr": scheduler.get_last_lr()[0], "grad_norm": norm,
               "elapsed_s": state.elapsed}
        if bad is not None:
            row["skipped"] = True
        if val_set is not None and args.eval_every and state.step % args.eval_every == 0:
            row["val_loss"] = _val_dpo(model, val_set, pad, args.beta, has_ref, device)
            if row["val_loss"] < state.best_val_loss:
                state.best_val_loss, state.evals_without_improvement = row["val_loss"], 0
                save_result(model, out / "best", full=False)
            else:
                state.evals_without_improvement += 1
        metrics.write(**row)
        state.history.append(row)
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['reward_accuracy']:.2f}")
        if args.save_every and state.step % args.save_every == 0:
            state.metrics_lines = metrics.lines
            save_checkpoint(out, state.step, model, optimizer, scheduler, state)
        if args.early_stopping_patience and state.evals_without_improvement >= args.early_stopping_patience:
            break
    bar.close()

    # --- save
    final_val = _val_dpo(model, val_set, pad, args.beta, has_ref, device) if val_set is not None else None
    if final_val is not None:
        state.history.append({"step": state.step, "val_loss": final_val})
        state.best_val_loss = min(state.best_val_loss, final_val)
    if has_ref:
        delete_adapter(model, REFERENCE)
    adapter_dir = save_result(model, out / "adapter", full=False)
    plot = plot_losses(state.history, out / "loss.png", f"DPO on {args.train_file or 'rows'}")
    result = TrainResult(adapter_dir, None, None, state.best_val_loss if state.best_val_loss < float("inf") else None,
                         final_val, state.step, time.perf_counter() - started, report, plot, metrics.path)
    write_summary(out / "summary.json", result)
    return result


@torch.no_grad()
def _val_dpo(model, data, pad, beta, has_ref, device) -> float:
    was = model.training
    model.eval()
    total = 0.0
    try:
        for i in range(len(data)):
            batch = to_device(collate_preference([data[i]], pad), device)
            loss, *_ = _dpo_step_loss(model, batch, reference_logps(model, batch, has_ref), beta)
            total += loss.item()
    finally:
        model.train(was)
    return total / max(len(data), 1)
