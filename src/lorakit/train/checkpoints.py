"""Checkpoints: what a run needs to continue bit for bit (weights, optimizer, schedule, RNG, data position)."""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

__all__ = ["TrainState", "save_trainable", "load_trainable", "save_checkpoint", "load_checkpoint",
           "latest_checkpoint"]


@dataclass
class TrainState:
    """Where a run is: optimizer steps done, micro-batches consumed, early-stopping bookkeeping."""

    step: int = 0
    micro: int = 0
    best_val_loss: float = float("inf")
    evals_without_improvement: int = 0
    elapsed: float = 0.0
    history: list[dict] = field(default_factory=list)


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


def save_checkpoint(directory: Path, step: int, model: nn.Module, optimizer, scheduler, state: TrainState,
                    keep: int = 2) -> Path:
    """Write ``directory/checkpoint-<step>`` atomically (temp dir + rename) and keep the newest ``keep``.

    Holds the trainable weights, optimizer and scheduler states, the RNG states and the :class:`TrainState` (step
    and data position), which is everything :func:`load_checkpoint` needs to continue bit for bit.
    """
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"checkpoint-{step}"
    tmp = Path(tempfile.mkdtemp(prefix=".checkpoint-", dir=directory))
    try:
        save_trainable(model, tmp / "weights")
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


def load_checkpoint(path: Path, model: nn.Module, optimizer, scheduler) -> TrainState:
    """Restore what :func:`save_checkpoint` wrote; returns the saved :class:`TrainState`."""
    load_trainable(model, path / "weights")
    blob = torch.load(path / "trainer.pt", weights_only=False)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    torch.set_rng_state(blob["torch_rng"])
    random.setstate(blob["python_rng"])
    return TrainState(**json.loads((path / "state.json").read_text()))


def resume_or_start(out: Path, resume: bool, model: nn.Module, optimizer, scheduler) -> tuple[TrainState, bool]:
    """A fresh :class:`TrainState`, or with ``resume`` and a checkpoint in ``out``, the newest one restored into
    ``model``, ``optimizer`` and ``scheduler``. Returns ``(state, fresh)``."""
    resume_from = latest_checkpoint(out) if resume else None
    if resume_from is None:
        return TrainState(), True
    return load_checkpoint(resume_from, model, optimizer, scheduler), False
