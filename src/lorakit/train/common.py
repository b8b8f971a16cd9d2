"""Small pieces the SFT and DPO loops share: the loss on labelled tokens, schedule, checkpoints, metrics, plot."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LoraConfig
from ..data import IGNORE_INDEX
from ..models import load_model
from ..optim import build_optimizer
from ..recompute import recompute_cheap_activations
from ..allocator import keep_freed_memory
from .head_loss import head_cross_entropy

__all__ = ["start_run", "lora_config", "save_activation_memory", "optimizer_and_schedule", "labelled_losses", "sft_loss", "token_logps", "cosine_schedule", "TrainState", "save_checkpoint", "load_checkpoint",
           "latest_checkpoint", "MetricsLog", "plot_losses", "seed_everything"]


def _decoder_and_head(model: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    get_decoder = getattr(model, "get_decoder", None)
    get_head = getattr(model, "get_output_embeddings", None)
    if not (callable(get_decoder) and callable(get_head)):
        return None, None
    decoder, head = get_decoder(), get_head()
    return (decoder, head) if decoder is not None and head is not None and decoder is not model else (None, None)


def labelled_losses(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 next-token cross-entropy at every position that predicts a label, and where they are.

    Returns:
        ``losses`` (N,) and ``keep`` (B, T-1), the mask that selected them (position t predicts token t + 1).

    Note: head on labelled tokens only
        The output head (vocab × hidden; 28% of SmolLM2's weights) is applied only where a label exists, so
        prompt and padding positions never pay for it, and the (batch, seq, vocab) logits tensor is never built:
        a frozen ``nn.Linear`` head goes through :func:`head_cross_entropy` (chunked, gradient computed in the
        forward pass). A trainable or wrapped head gets float32 logits at the labelled positions. Models without
        ``get_decoder``/``get_output_embeddings`` fall back to their full logits.
    """
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    targets = targets[keep]
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    decoder, head = _decoder_and_head(model)
    if decoder is None:
        logits = model(**inputs).logits[:, :-1][keep]
        return F.cross_entropy(logits.float(), targets, reduction="none"), keep
    hidden = decoder(**inputs).last_hidden_state[:, :-1][keep]  # (N, hidden)
    if type(head) is nn.Linear and not any(p.requires_grad for p in head.parameters()):
        return head_cross_entropy(hidden, head.weight, targets, head.bias), keep
    return F.cross_entropy(head(hidden).float(), targets, reduction="none"), keep


def sft_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over labelled tokens, and their count."""
    losses, _ = labelled_losses(model, batch)
    return losses.sum(), int(losses.numel())


def token_logps(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-row sum of log-probabilities of the labelled tokens, shape (B,) — DPO's sequence log-likelihood."""
    losses, keep = labelled_losses(model, batch)
    rows = torch.arange(keep.shape[0], device=keep.device)[:, None].expand_as(keep)[keep]
    return torch.zeros(keep.shape[0], dtype=losses.dtype, device=losses.device).index_add(0, rows, -losses)


def start_run(args) -> tuple[Path, nn.Module, Any]:
    """What every run does first: output dir, malloc settings, threads, seed, then the base (NF4-quantized for ``method: qlora``).

    Returns:
        ``(output_dir, model, tokenizer)``; the tokenizer gets EOS as its pad token when it has none.
    """
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    keep_freed_memory()  # See Note: why a training step pays for page faults
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    qlora = args.method == "qlora"
    model, tokenizer = load_model(args.model, quantization="nf4" if qlora else None, compute_dtype=dtype,
                                  dtype=torch.float32 if qlora else dtype)
    if tokenizer is None:
        raise ValueError(f"{args.model} holds no tokenizer, which training needs; save one there with "
                         "tokenizer.save_pretrained")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return out, model, tokenizer


def lora_config(args) -> LoraConfig:
    """The adapter config a run's arguments describe."""
    return LoraConfig(r=args.r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      target_modules=args.target_modules, init_lora_weights=args.init_lora_weights,
                      use_rslora=args.use_rslora)


def save_activation_memory(model: nn.Module, args) -> None:
    """Gradient checkpointing when ``args`` asks for it, else :func:`~lorakit.recompute_cheap_activations`
    (when ``args.recompute_activations``; models without gated-MLP blocks are left as they are)."""
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif args.recompute_activations:
        recompute_cheap_activations(model, strict=False)


def optimizer_and_schedule(args, params: list[torch.Tensor]):
    """``build_optimizer(args.optimizer)`` and a warm-up + cosine ``LambdaLR`` over ``args.max_steps``."""
    optimizer = build_optimizer(args.optimizer, params, lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: cosine_schedule(s, args.warmup_steps, args.max_steps, args.min_lr_ratio))
    return optimizer, scheduler


def cosine_schedule(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Learning-rate multiplier: linear warm-up to 1, then cosine decay to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class TrainState:
    """Where a run is: optimizer steps done, micro-batches consumed, early-stopping bookkeeping."""

    step: int = 0
    micro: int = 0
    best_val_loss: float = float("inf")
    evals_without_improvement: int = 0
    elapsed: float = 0.0
    history: list[dict] = field(default_factory=list)


def save_checkpoint(directory: Path, step: int, save_weights, optimizer, scheduler, state: TrainState,
                    keep: int = 2) -> Path:
    """Write ``directory/checkpoint-<step>`` atomically (temp dir + rename) and keep the newest ``keep``.

    Holds the trainable weights (``save_weights(path)``), optimizer and scheduler states, the RNG states and the
    :class:`TrainState` (step and data position), which is everything :func:`load_checkpoint` needs to continue
    bit for bit.
    """
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"checkpoint-{step}"
    tmp = Path(tempfile.mkdtemp(prefix=".checkpoint-", dir=directory))
    try:
        save_weights(tmp / "weights")
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}, tmp / "trainer.pt")
        (tmp / "state.json").write_text(json.dumps(asdict(state)))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in sorted(directory.glob("checkpoint-*"), key=_step_of)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _step_of(path: Path) -> int:
    try:
        return int(path.name.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def latest_checkpoint(directory: Path) -> Path | None:
    """The newest complete ``checkpoint-<step>`` under ``directory`` (None if there is none)."""
    done = [p for p in directory.glob("checkpoint-*") if (p / "state.json").is_file()]
    return max(done, key=_step_of) if done else None


def load_checkpoint(path: Path, load_weights, optimizer, scheduler) -> TrainState:
    """Restore what :func:`save_checkpoint` wrote; returns the saved :class:`TrainState`."""
    load_weights(path / "weights")
    blob = torch.load(path / "trainer.pt", weights_only=False)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    torch.set_rng_state(blob["torch_rng"])
    random.setstate(blob["python_rng"])
    return TrainState(**json.loads((path / "state.json").read_text()))


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl`` (safe to tail while training)."""

    def __init__(self, path: Path, fresh: bool) -> None:
        self.path = path
        if fresh and path.exists():
            path.unlink()

    def write(self, **row: Any) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


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
    fig.savefig(path)
    plt.close(fig)
    return path
