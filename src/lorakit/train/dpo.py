"""`train_dpo`: preference tuning with sigmoid DPO (https://arxiv.org/abs/2305.18290), one top-to-bottom function.

The reference model is the same model with its adapter disabled (no second copy in memory), or, when training
continues from an existing adapter, a frozen copy of that adapter held as a second named adapter: disabling would
give the bare base, which is not the model that produced the starting policy (TRL PR #4723).
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

from ..adapters import disable_adapter, set_adapter, trainable_parameters
from ..cpu_matmul import no_grad_linears
from ..data import PreferenceDataset, collate_preference, load_splits
from ..fast_linears import fast_frozen_linears
from ..inject import add_adapter
from ..peft_format import load_adapter
from .args import DPOArgs
from .common import lora_config, plot_losses, save_activation_memory, save_checkpoint, start_run, token_logps
from .losses import dpo_loss
from .sft import TrainResult, _save_result, _write_summary, batch_indices, save_trainable, start_or_resume

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
    with _reference(model, has_reference_adapter), no_grad_linears():  # base linears through oneDNN (cpu_matmul)
        return token_logps(model, batch)


def _dpo_step_loss(model, batch, ref, beta):
    policy = token_logps(model, batch)
    pc, pr = policy.chunk(2)
    rc, rr = ref.chunk(2)
    return dpo_loss(pc, pr, rc, rr, beta)


def train_dpo(args: DPOArgs) -> TrainResult:
    """Preference-tune ``args.model`` on ``{"prompt", "chosen", "rejected"}`` rows from ``args.train_file``.

    Returns:
        A :class:`~lorakit.train.sft.TrainResult` (accuracies are None; ``best_val_loss`` is the DPO loss on the
        validation rows). Metrics per step: loss, reward accuracy, chosen/rejected rewards and margin.
    """
    started = time.perf_counter()
    if not args.train_file:
        raise ValueError("DPO needs train_file: a JSONL file of {prompt, chosen, rejected} rows")
    if args.method == "full":
        raise ValueError("method='full' has no adapter to disable for the reference; use lora or qlora for DPO")
    # --- model, adapter(s), data
    out, model, tokenizer = start_run(args)
    has_ref = args.reference_adapter is not None
    if has_ref:
        load_adapter(model, args.reference_adapter, "default")
        load_adapter(model, args.reference_adapter, REFERENCE)
        set_adapter(model, "default")
    else:
        add_adapter(model, lora_config(args))
    save_activation_memory(model, args)
    fast_frozen_linears(model)  # the layers target_modules leave out compute through oneDNN too (cpu_matmul)
    train_rows, val_rows = load_splits(args.train_file, args.val_file, val_fraction=args.val_fraction,
                                       seed=args.seed, skip_bad=args.skip_bad_rows, formats=["preference"])
    train_set = PreferenceDataset(train_rows, tokenizer, args.max_length, skip_bad=args.skip_bad_rows)
    val_set = PreferenceDataset(val_rows, tokenizer, args.max_length) if val_rows else None
    if len(train_set) < args.batch_size:
        raise ValueError(f"{len(train_set)} preference rows < batch_size={args.batch_size}; add data or lower it")
    pad = tokenizer.pad_token_id
    ref_cache: dict[int, torch.Tensor] = {}
    if args.precompute_reference:
        for i in tqdm(range(len(train_set)), desc="reference log-probs", disable=not args.progress):
            ref_cache[i] = reference_logps(model, collate_preference([train_set[i]], pad), has_ref)

    # --- optimizer and schedule
    report = trainable_parameters(model)
    optimizer, scheduler, state, metrics = start_or_resume(args, model, out)
    params = [p for group in optimizer.param_groups for p in group["params"]]  # clipped each step

    # --- loop
    model.train()
    bar = tqdm(total=args.max_steps, initial=state.step, desc="dpo", disable=not args.progress)
    while state.step < args.max_steps:
        step_start = time.perf_counter()
        sums = {"loss": 0.0, "reward_accuracy": 0.0, "margin": 0.0}
        for _ in range(args.grad_accum):
            idx = batch_indices(state.micro, len(train_set), args.batch_size, args.seed)
            state.micro += 1
            batch = collate_preference([train_set[i] for i in idx], pad)
            if args.precompute_reference:
                ref = torch.cat([torch.cat([ref_cache[i].chunk(2)[half] for i in idx]) for half in (0, 1)])
            else:
                ref = reference_logps(model, batch, has_ref)
            loss, chosen_r, rejected_r, acc = _dpo_step_loss(model, batch, ref, args.beta)
            (loss / args.grad_accum).backward()
            sums["loss"] += loss.item() / args.grad_accum
            sums["reward_accuracy"] += acc.item() / args.grad_accum
            sums["margin"] += (chosen_r - rejected_r).mean().item() / args.grad_accum
        if args.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.elapsed += time.perf_counter() - step_start
        row = {"step": state.step, **sums, "lr": scheduler.get_last_lr()[0], "elapsed_s": state.elapsed}
        if val_set is not None and args.eval_every and state.step % args.eval_every == 0:
            row["val_loss"] = _val_dpo(model, val_set, pad, args.beta, has_ref)
            if row["val_loss"] < state.best_val_loss:
                state.best_val_loss, state.evals_without_improvement = row["val_loss"], 0
                _save_result(model, args, out / "best")
            else:
                state.evals_without_improvement += 1
        metrics.write(**row)
        state.history.append(row)
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['reward_accuracy']:.2f}")
        if args.save_every and state.step % args.save_every == 0:
            save_checkpoint(out, state.step, lambda p: save_trainable(model, p), optimizer, scheduler, state)
        if args.early_stopping_patience and state.evals_without_improvement >= args.early_stopping_patience:
            break
    bar.close()

    # --- save
    final_val = _val_dpo(model, val_set, pad, args.beta, has_ref) if val_set is not None else None
    if final_val is not None:
        state.history.append({"step": state.step, "val_loss": final_val})
        state.best_val_loss = min(state.best_val_loss, final_val)
    if has_ref:
        from ..adapters import delete_adapter

        delete_adapter(model, REFERENCE)
    adapter_dir = _save_result(model, args, out / "adapter")
    plot = plot_losses(state.history, out / "loss.png", f"DPO on {args.train_file}")
    result = TrainResult(adapter_dir, None, None, state.best_val_loss if state.best_val_loss < float("inf") else None,
                         final_val, state.step, time.perf_counter() - started, report, plot, metrics.path)
    _write_summary(out / "summary.json", result)
    return result


@torch.no_grad()
def _val_dpo(model, data, pad, beta, has_ref) -> float:
    was = model.training
    model.eval()
    total = 0.0
    try:
        for i in range(len(data)):
            batch = collate_preference([data[i]], pad)
            loss, *_ = _dpo_step_loss(model, batch, reference_logps(model, batch, has_ref), beta)
            total += loss.item()
    finally:
        model.train(was)
    return total / max(len(data), 1)
