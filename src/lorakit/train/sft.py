"""`train_sft`: supervised fine-tuning of the model it is given, as one top-to-bottom function.

The model arrives loaded and placed (any device, any loader); batches go to the device of its parameters. The recipe
that loads a model from a config and calls this function is :func:`lorakit.train.run_sft`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from ..adapters import trainable_parameters
from ..data import SFTDataset, collate_sft
from ..data.prepare import describe_skipped
from ..evaluate import validation_loss
from ..cpu import accelerate
from ..inject import adapter_configs, add_adapter
from ..losses import sft_loss
from ..scoring import RunScorer
from .args import SFTArgs
from .checkpoints import RESUME_SETTINGS, checkpoints_of, resume_or_start, save_checkpoint
from .common import (MetricsLog, NonFiniteError, TrainResult, all_finite, batch_indices, check_positions,
                     cpu_settings, grad_norm, model_device, nonfinite_message, optimizer_and_schedule, plot_losses,
                     save_activation_memory, save_result, to_device, write_summary)
from .run_dir import prepare_output_dir

__all__ = ["train_sft"]


def train_sft(model: nn.Module, tokenizer: Any, train_data: Sequence[dict] | SFTDataset, args: SFTArgs,
              val_data: Sequence[dict] | SFTDataset | None = None, *,
              score: Callable[[str, str], bool] | None = None) -> TrainResult:
    """Fine-tune ``model`` on ``train_data`` and save the adapter (or full model) to ``args.output_dir``.

    Trains what it is given, where it is: a model without an adapter gets one from ``args`` (``r``, ``lora_alpha``,
    ``target_modules``, ...; every weight with ``method: full``); a model that already has adapters trains its
    trainable parameters as they are. Nothing process-wide is set here (threads, malloc, seed: the recipe's job).

    Args:
        model: a causal LM (transformers-style: ``model(input_ids, attention_mask).logits``), on any device.
        tokenizer: its tokenizer; EOS pads when it has no pad token.
        train_data: SFT rows (``{"prompt", "completion"}``, ``{"messages"}`` or ``{"text"}`` dicts, as
            ``lorakit.data.load_rows(...).rows`` or ``lorakit.tasks.make_split`` give), tokenized here with
            ``args.max_length``, ``completion_only``, ``packing`` and ``skip_bad_rows``; or an
            :class:`~lorakit.data.SFTDataset` already tokenized.
        args: the loop's settings (steps, batch, lr, schedule, clipping, evaluation and checkpoint cadence, output).
        val_data: held-out rows (or an ``SFTDataset``) for the validation loss (the first ``args.val_loss_rows``
            rows) and, with ``score``, exact-match accuracy before and after training (every row).
        score: ``score(prediction, target) -> bool`` (a task's ``score``, ``lorakit.tasks.get_metric(name)``):
            the held-out rows are scored before training (step 0), at each evaluation and after training
            (:class:`lorakit.scoring.RunScorer`, as ``lorakit eval`` scores); None: no score.

    Returns:
        A :class:`TrainResult`. Files in ``args.output_dir``: ``adapter/`` (PEFT format) or ``model/`` (full
        fine-tuning), ``best/`` (lowest validation loss, when evaluating during training), ``checkpoint-<step>/``,
        ``metrics.jsonl``, ``loss.png``, ``summary.json``, ``run.json`` (the run's id, which its checkpoints carry).

    Raises:
        ConfigError: ``output_dir`` holds another run (and neither ``resume`` nor ``overwrite`` is set), or examples
            are longer than the model's positions.
        CheckpointError: ``resume`` found no usable checkpoint of this run (each file named).
        NonFiniteError: a loss, gradient or weight became NaN/inf (with ``nonfinite: stop``, or a weight with either
            setting); no adapter is written and the checkpoints before that step stay.
    """
    started = time.perf_counter()
    out = Path(args.output_dir)
    run_id = prepare_output_dir(out, args.resume, args.overwrite)
    device = model_device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    full = args.method == "full"

    # --- data
    train_set = train_data if isinstance(train_data, SFTDataset) else SFTDataset(
        train_data, tokenizer, args.max_length, completion_only=args.completion_only, skip_bad=args.skip_bad_rows,
        pack=args.packing)
    if getattr(train_set, "skipped", None) and not isinstance(train_data, SFTDataset):
        tqdm.write(describe_skipped("the training rows (tokenizing)", train_set.skipped))
    if len(train_set) < args.batch_size:
        raise ValueError(f"{len(train_set)} training examples < batch_size={args.batch_size}; add data or lower it")
    check_positions(model, max(len(ex["input_ids"]) for ex in train_set.examples), args.max_length)
    val_rows = list(val_data) if val_data is not None and not isinstance(val_data, SFTDataset) else []
    val_set = val_data if isinstance(val_data, SFTDataset) else None
    if val_rows:
        loss_rows = val_rows[:args.val_loss_rows] if args.val_loss_rows else val_rows
        val_set = SFTDataset(loss_rows, tokenizer, args.max_length)
    scorer = RunScorer(val_rows, score if args.eval_accuracy else None, out, args.report_to, args.progress)
    base_accuracy = scorer.base(model, tokenizer) if not args.resume else None

    # --- adapter (or every weight for the full fine-tuning baseline)
    if full:
        model.requires_grad_(True)
    elif not adapter_configs(model):
        add_adapter(model, args.lora_config())
    save_activation_memory(model, args.gradient_checkpointing, args.recompute_activations)
    accelerate(model, cpu_settings(args.threads))  # the CPU backend, now with the adapter (lorakit/cpu/accelerate.py)
    report = trainable_parameters(model)

    # --- optimizer and schedule
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = optimizer_and_schedule(params, args.optimizer, args.lr, args.weight_decay,
                                                  args.warmup_steps, args.max_steps, args.min_lr_ratio)
    state = resume_or_start(out, run_id, args.resume, model, optimizer, scheduler,
                            {k: getattr(args, k) for k in RESUME_SETTINGS})
    metrics = MetricsLog(out / "metrics.jsonl", keep=state.metrics_lines)
    if base_accuracy is not None:
        metrics.write(step=0, score=base_accuracy)

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
        n_tokens = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
                       for b in batches)
        loss_total = 0.0
        for batch in batches:
            loss_sum, _ = sft_loss(model, to_device(batch, device))
            (loss_sum / window_tokens).backward()  # mean over every labelled token of the window
            loss_total += loss_sum.item()
        norm = grad_norm(params, args.max_grad_norm)
        loss = loss_total / window_tokens
        bad = None if math.isfinite(loss) and math.isfinite(norm) else f"loss {loss:g}, gradient norm {norm:g}"
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
        seconds = time.perf_counter() - step_start
        state.elapsed += seconds
        row = {"step": state.step, "loss": loss, "lr": scheduler.get_last_lr()[0], "tokens_per_s": n_tokens / seconds,
               "grad_norm": norm, "elapsed_s": state.elapsed}
        if bad is not None:
            row["skipped"] = True
        if val_set is not None and args.eval_every and state.step % args.eval_every == 0:
            row["val_loss"] = validation_loss(model, tokenizer, val_set)
            if row["val_loss"] < state.best_val_loss:
                state.best_val_loss, state.evals_without_improvement = row["val_loss"], 0
                save_result(model, out / "best", full)
            else:
                state.evals_without_improvement += 1
            scorer.at_step(model, tokenizer, row)
        metrics.write(**row)
        scorer.log(row)
        state.history.append(row)
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.1e}", tok_s=f"{row['tokens_per_s']:.0f}")
        if args.save_every and state.step % args.save_every == 0:
            state.metrics_lines = metrics.lines
            save_checkpoint(out, state.step, model, optimizer, scheduler, state)
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
    adapter_dir = save_result(model, out / ("model" if full else "adapter"), full, tokenizer)
    tuned_accuracy = scorer.final(model, tokenizer, state.step, metrics)
    scorer.close()
    plot = plot_losses(state.history, out / "loss.png", f"{args.method} on {args.task or args.train_file or 'rows'}")
    result = TrainResult(adapter_dir, base_accuracy, tuned_accuracy,
                         state.best_val_loss if state.best_val_loss < float("inf") else None, final_val, state.step,
                         time.perf_counter() - started, report, plot, metrics.path)
    write_summary(out / "summary.json", result)
    return result
