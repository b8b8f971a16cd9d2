"""Small pieces the SFT and DPO loops share: data order, schedule, optimizer, results, metrics, plot.

Each helper takes the few values it uses, not a whole ``SFTArgs``.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapters import TrainableReport
from ..cpu import CpuSettings
from ..cpu import current as environment_cpu_settings
from ..atomic import atomic_dir, atomic_write_bytes, atomic_write_text
from ..fields import ConfigError
from ..optim import build_optimizer
from ..peft_format import save_adapter
from ..recompute import recompute_cheap_activations

__all__ = ["TrainResult", "NonFiniteError", "cpu_settings", "batch_indices", "model_device", "to_device", "check_positions",
           "save_activation_memory", "optimizer_and_schedule", "cosine_schedule", "grad_norm", "all_finite",
           "nonfinite_message", "save_result", "write_summary", "MetricsLog", "plot_losses"]


class NonFiniteError(ValueError):
    """Training met a NaN or infinite loss, gradient or weight and stopped; nothing non-finite was written."""


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


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (where its batches go); CPU for a model without parameters."""
    first = next(iter(model.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """``batch`` with every tensor on ``device`` (no copy when it is already there)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def check_positions(model: nn.Module, longest: int, max_length: int) -> None:
    """Refuse examples longer than the model's positions (``config.max_position_embeddings``), naming max_length.

    Raises:
        ConfigError: ``longest`` tokens do not fit the model's positions.
    """
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(positions, int) and longest > positions:
        raise ConfigError(f"max_length={max_length}: examples of up to {longest} tokens are longer than the model's "
                          f"{positions} positions (config.max_position_embeddings); set max_length to {positions} or "
                          "less")


def save_activation_memory(model: nn.Module, gradient_checkpointing: bool, recompute_activations: bool) -> None:
    """Gradient checkpointing when asked, else :func:`~lorakit.recompute_cheap_activations` (when
    ``recompute_activations``; models without gated-MLP blocks are left as they are)."""
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif recompute_activations:
        recompute_cheap_activations(model, strict=False)


def optimizer_and_schedule(params: list[torch.Tensor], optimizer: str, lr: float, weight_decay: float,
                           warmup_steps: int, max_steps: int, min_lr_ratio: float):
    """``build_optimizer(optimizer)`` and a warm-up + cosine ``LambdaLR`` over ``max_steps``."""
    opt = build_optimizer(optimizer, params, lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: cosine_schedule(s, warmup_steps, max_steps, min_lr_ratio))
    return opt, scheduler


def cosine_schedule(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Learning-rate multiplier: linear warm-up to 1, then cosine decay to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def grad_norm(params: list[torch.Tensor], max_grad_norm: float) -> float:
    """The total gradient norm of ``params``, after clipping it to ``max_grad_norm`` (0: no clipping)."""
    if max_grad_norm:
        return float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
    grads = [p.grad for p in params if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


def all_finite(params: list[torch.Tensor]) -> bool:
    """Whether every value of every tensor in ``params`` is finite (one device sync)."""
    return bool(torch.stack([p.detach().isfinite().all() for p in params]).all()) if params else True


def nonfinite_message(step: int, what: str, lr: float, last_checkpoint: str | None) -> str:
    """The error of a run stopped at a non-finite value: what, where, what was kept, and what to try."""
    kept = (f"the last good checkpoint is {last_checkpoint} (resume: true continues from it)" if last_checkpoint
            else "there is no checkpoint (save_every writes some)")
    return (f"step {step}: {what}; training stopped and no adapter was written; {kept}. Lower lr (now {lr:g}) or "
            "check the base model's outputs; nonfinite: skip drops such steps instead")


def save_result(model: nn.Module, path: Path, full: bool, tokenizer=None) -> Path:
    """The trained adapter (PEFT format) at ``path``, or with ``full`` the whole model (and tokenizer), written whole
    or not at all (:func:`~lorakit.atomic.atomic_dir`; an existing ``path`` is replaced in one step).

    Raises:
        NonFiniteError: a trainable weight is NaN or infinite (nothing is written).
    """
    if not all_finite([p for p in model.parameters() if p.requires_grad]):
        raise NonFiniteError(f"{path}: not written, the trained weights hold NaN or infinite values")
    with atomic_dir(path) as tmp:
        if full:
            model.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
        else:
            save_adapter(model, tmp)
    return path


def write_summary(path: Path, result: TrainResult) -> None:
    """``summary.json``: the :class:`TrainResult` as JSON (paths as strings, the trainable report flattened)."""
    data = {k: (str(v) if isinstance(v, Path) else v) for k, v in result.__dict__.items() if k != "trainable"}
    data.update(trainable=result.trainable.trainable, total=result.trainable.total, percent=result.trainable.percent)
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl`` (safe to tail while training).

    ``keep``: lines of an existing file to keep (a resumed run keeps those its checkpoint had seen, so rows written
    after that checkpoint by the interrupted process are not repeated); 0 starts a new file. ``lines`` counts the
    lines the file holds.
    """

    def __init__(self, path: Path, keep: int = 0) -> None:
        self.path = path
        old = path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True) if path.exists() else []
        kept = [line for line in old[:keep] if line.endswith("\n")]  # a torn last line is dropped
        if len(kept) != len(old):
            atomic_write_text(path, "".join(kept))
        self.lines = len(kept)

    def write(self, **row: Any) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self.lines += 1


def plot_losses(history: list[dict], path: Path, title: str) -> Path | None:
    """Training loss per step and validation loss per evaluation, as a PNG (None if matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    train = [(r["step"], r["loss"]) for r in history if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in history if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1.5)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy per completion token")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    atomic_write_bytes(path, png.getvalue())
    plt.close(fig)
    return path


def cpu_settings(threads: int) -> CpuSettings:
    """The environment's CPU settings (``lorakit.cpu``) with a run's thread count (0 keeps the environment's)."""
    env = environment_cpu_settings()
    return replace(env, threads=threads or env.threads)
