"""Checkpoints: what a run needs to continue bit for bit (weights, optimizer, schedule, RNG, data position), stored
as data only and written whole or not at all.

``checkpoint-<step>/`` holds ``weights/trainable.safetensors`` (the trainable parameters by module path),
``trainer.safetensors`` + ``trainer.json`` (optimizer and scheduler states and RNG states: tensors in the first, the
structure around them in the second) and ``state.json`` (:class:`TrainState`: step, data position, the run's id and
the settings it ran with). Nothing is unpickled when a checkpoint is read, so a checkpoint from a stranger cannot run
code; a pickled ``trainer.pt`` of an older lorakit is refused. Each checkpoint is written through
:func:`lorakit.atomic.atomic_dir` and older ones are removed by renaming them aside first, so a process killed at any
point leaves every ``checkpoint-<step>`` whole. Resuming reads the newest checkpoint of the run completely before it
changes anything, and falls back to the previous one (with a warning) when the newest cannot be read.
"""

from __future__ import annotations

import json
import math
import os
import random
import secrets
import shutil
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..atomic import TEMP_PREFIX, atomic_dir

__all__ = ["TrainState", "CheckpointError", "Checkpoint", "save_trainable", "load_trainable", "save_checkpoint",
           "read_checkpoint", "checkpoints_of", "resume_or_start", "RESUME_SETTINGS"]

FORMAT = 2
#: Fields of the run's arguments recorded in each checkpoint and compared when resuming.
RESUME_SETTINGS = ("method", "r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "init_lora_weights",
                   "lr", "optimizer", "weight_decay", "warmup_steps", "min_lr_ratio", "max_steps", "batch_size",
                   "grad_accum", "seed", "max_length")
_SHAPE_SETTINGS = ("method", "r", "target_modules")  # a change here changes the trainable tensors


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (damaged, of another run or version, or not matching the model); the
    message names the file and what to do."""


@dataclass
class TrainState:
    """Where a run is: optimizer steps done, micro-batches consumed, early-stopping bookkeeping, and which run."""

    step: int = 0
    micro: int = 0
    best_val_loss: float = float("inf")
    evals_without_improvement: int = 0
    elapsed: float = 0.0
    history: list[dict] = field(default_factory=list)
    run_id: str = ""
    metrics_lines: int = 0
    """Lines of ``metrics.jsonl`` written when the checkpoint was taken (a resumed run drops the ones after)."""
    settings: dict = field(default_factory=dict)
    """The ``RESUME_SETTINGS`` values the run started with."""


@dataclass
class Checkpoint:
    """A checkpoint read completely into memory (nothing applied yet)."""

    path: Path
    state: TrainState
    weights: dict[str, torch.Tensor]
    trainer: dict[str, Any]


# --- data-only encoding of optimizer / scheduler / RNG states: tensors to safetensors, the rest to JSON


def _encode(obj: Any, tensors: dict[str, torch.Tensor], key: str) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{key}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{key}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        return {"__items__": [[_encode(k, tensors, f"{key}.k{i}"), _encode(v, tensors, f"{key}.{k}")]
                              for i, (k, v) in enumerate(obj.items())]}
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"__float__": repr(obj)}
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint ({key})")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        if "__items__" in obj:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
        if "__float__" in obj:
            return float(obj["__float__"])
        raise ValueError(f"unknown entry {sorted(obj)[:3]}")
    return obj


# --- trainable weights


def save_trainable(model: nn.Module, path: Path) -> None:
    """Every trainable parameter under its module path, as safetensors (checkpoints for LoRA and full runs)."""
    path.mkdir(parents=True, exist_ok=True)
    tensors = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    save_file(tensors, path / "trainable.safetensors")


def _check_fits(model: nn.Module, weights: dict[str, torch.Tensor], source: Path, hint: str = "") -> None:
    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    missing, extra = sorted(trainable - set(weights)), sorted(set(weights) - set(params))
    wrong = [(n, tuple(t.shape), tuple(params[n].shape)) for n, t in weights.items()
             if n in params and t.shape != params[n].shape]
    if wrong:
        name, saved, now = wrong[0]
        raise CheckpointError(f"{source}: {name} has shape {saved} in the checkpoint but {now} in this model{hint}; "
                              "resume with the adapter settings the run started with, or start again with "
                              "overwrite: true")
    if missing or extra:
        which = f"tensors {extra[:2]} are not in this model" if extra else f"this model's {missing[:2]} are missing"
        raise CheckpointError(f"{source}: {which}{hint}; resume with the settings the run started with, or start "
                              "again with overwrite: true")


def load_trainable(model: nn.Module, path: Path) -> None:
    """Copy the tensors :func:`save_trainable` wrote back into ``model`` (names and shapes must match)."""
    file = path / "trainable.safetensors"
    weights = _read_tensors(file)
    _check_fits(model, weights, file)
    _copy_into(model, weights)


def _copy_into(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)


# --- write


def save_checkpoint(directory: Path, step: int, model: nn.Module, optimizer, scheduler, state: TrainState,
                    keep: int = 2) -> Path:
    """Write ``directory/checkpoint-<step>`` whole or not at all, then keep the newest ``keep`` of this run.

    Holds the trainable weights, optimizer and scheduler states, the RNG states and the :class:`TrainState` (step,
    data position, run id), which is everything :func:`resume_or_start` needs to continue bit for bit.
    """
    tensors: dict[str, torch.Tensor] = {}
    trainer = {"format": FORMAT,
               "optimizer": _encode(optimizer.state_dict(), tensors, "optimizer"),
               "scheduler": _encode(scheduler.state_dict(), tensors, "scheduler"),
               "torch_rng": _encode(torch.get_rng_state(), tensors, "rng.torch"),
               "python_rng": _encode(random.getstate(), tensors, "rng.python")}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        trainer["cuda_rng"] = _encode(torch.cuda.get_rng_state_all(), tensors, "rng.cuda")
    final = directory / f"checkpoint-{step}"
    with atomic_dir(final) as tmp:
        save_trainable(model, tmp / "weights")
        save_file(tensors, tmp / "trainer.safetensors")
        (tmp / "trainer.json").write_text(json.dumps(trainer))
        (tmp / "state.json").write_text(json.dumps({"format": FORMAT, **asdict(state)}))
    for old in checkpoints_of(directory, state.run_id)[:-keep]:
        aside = directory / f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}-{old.name}"
        old.rename(aside)  # gone from its name in one step; a kill during the delete leaves only a hidden leftover
        shutil.rmtree(aside, ignore_errors=True)
    return final


# --- read


def _step_of(path: Path) -> int:
    try:
        return int(path.name.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def _run_of(path: Path) -> str | None:
    try:
        return json.loads((path / "state.json").read_text(encoding="utf-8")).get("run_id")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return None


def checkpoints_of(directory: Path, run_id: str | None = None) -> list[Path]:
    """``checkpoint-<step>`` directories under ``directory``, oldest first; with ``run_id``, only those whose
    ``state.json`` names that run or cannot be read (a damaged one is reported when it is read)."""
    found = sorted((p for p in directory.glob("checkpoint-*") if p.is_dir() and _step_of(p) >= 0), key=_step_of)
    if run_id is None:
        return found
    return [p for p in found if _run_of(p) in (run_id, None)]


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(file)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{file}: cannot be read ({' '.join(str(err).split())}); the file is damaged or "
                              "missing") from None


def _read_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{file}: missing; the checkpoint is incomplete") from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"{file}: not valid JSON ({err}); the checkpoint is damaged") from None


def read_checkpoint(path: Path) -> Checkpoint:
    """Read every file of ``path`` into memory, unpickling nothing.

    Raises:
        CheckpointError: naming the file that is missing, damaged, of another format, or a pickle.
    """
    if (path / "trainer.pt").exists() and not (path / "trainer.json").exists():
        raise CheckpointError(
            f"{path / 'trainer.pt'}: a checkpoint of an older lorakit, stored as a pickle; lorakit no longer loads "
            "pickles (loading one can run any code it holds). Its weights are in weights/trainable.safetensors; to "
            "go on, start the run again (overwrite: true) or in another output_dir")
    raw = _read_json(path / "state.json")
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise CheckpointError(f"{path / 'state.json'}: not a lorakit checkpoint of format {FORMAT} "
                              f"(format={raw.get('format') if isinstance(raw, dict) else raw!r})")
    known = {f.name for f in fields(TrainState)}
    try:
        state = TrainState(**{k: v for k, v in raw.items() if k in known})
        state.step, state.micro = int(state.step), int(state.micro)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path / 'state.json'}: {err}; the checkpoint is damaged") from None
    weights = _read_tensors(path / "weights" / "trainable.safetensors")
    blob = _read_json(path / "trainer.json")
    tensors = _read_tensors(path / "trainer.safetensors")
    try:
        trainer = {k: _decode(v, tensors) for k, v in blob.items() if k != "format"}
        missing = [k for k in ("optimizer", "scheduler", "torch_rng", "python_rng") if k not in trainer]
        if missing:
            raise KeyError(f"no {missing}")
        torch.Generator().set_state(trainer["torch_rng"])  # checked on scratch generators, applied later
        random.Random().setstate(trainer["python_rng"])
    except (KeyError, ValueError, TypeError, AttributeError, RuntimeError) as err:
        raise CheckpointError(f"{path / 'trainer.json'}: {type(err).__name__} {err}; the checkpoint is damaged"
                              ) from None
    return Checkpoint(path, state, weights, trainer)


# --- resume


def _changes(saved: dict, now: dict) -> dict[str, tuple[Any, Any]]:
    return {k: (saved[k], now[k]) for k in now if k in saved and saved[k] != now[k]}


def resume_or_start(out: Path, run_id: str, resume: bool, model: nn.Module, optimizer, scheduler,
                    settings: dict[str, Any]) -> TrainState:
    """A fresh :class:`TrainState` for run ``run_id``, or with ``resume``, the newest readable checkpoint of that run
    restored into ``model``, ``optimizer``, ``scheduler`` and the RNGs (an unreadable newer one is skipped with a
    warning naming its file).

    ``settings`` are the run's current :data:`RESUME_SETTINGS`; against the checkpoint's: a change of the adapter's
    shape is an error, a changed ``lr``/``weight_decay`` (the checkpoint's values continue), ``optimizer`` (its state
    starts again), schedule, batch or seed gives a warning.

    Raises:
        CheckpointError: no checkpoint of the run can be read (naming each file), the model does not fit the
            checkpoint, or ``max_steps`` is below the checkpoint's step.
    """
    if not resume:
        return TrainState(run_id=run_id, settings=settings)
    for path in checkpoints_of(out):
        if _run_of(path) not in (run_id, None):
            warnings.warn(f"ignored {path}: written by another run ({_run_of(path)!r}, this run is {run_id!r})",
                          stacklevel=2)
    candidates = checkpoints_of(out, run_id)
    if not candidates:
        return TrainState(run_id=run_id, settings=settings)
    problems = []
    for path in reversed(candidates):
        try:
            ckpt = read_checkpoint(path)
        except CheckpointError as err:
            problems.append(str(err))
            continue
        if ckpt.state.run_id != run_id:
            problems.append(f"{path}: written by run {ckpt.state.run_id!r}, not by this run ({run_id!r})")
            continue
        break
    else:
        raise CheckpointError("no checkpoint to resume from: " + "; ".join(problems))
    for problem in problems:
        warnings.warn(f"skipped {problem}; resuming from {ckpt.path.name}", stacklevel=2)
    return _apply(ckpt, model, optimizer, scheduler, settings)


def _apply(ckpt: Checkpoint, model: nn.Module, optimizer, scheduler, settings: dict[str, Any]) -> TrainState:
    state, changed = ckpt.state, _changes(ckpt.state.settings, settings)
    hint = "".join(f"; {k} was {a!r} when the checkpoint was written, now {b!r}" for k, (a, b) in changed.items()
                   if k in _SHAPE_SETTINGS)
    _check_fits(model, ckpt.weights, ckpt.path / "weights" / "trainable.safetensors", hint)
    if settings.get("max_steps", state.step) < state.step:
        raise CheckpointError(f"{ckpt.path}: the run is at step {state.step}, beyond max_steps="
                              f"{settings['max_steps']}; raise max_steps to continue it, or start again with "
                              "overwrite: true")
    _copy_into(model, ckpt.weights)
    if "optimizer" in changed:
        warnings.warn(f"{ckpt.path.name}: optimizer changed from {changed['optimizer'][0]!r} to "
                      f"{changed['optimizer'][1]!r}; the new optimizer starts with an empty state", stacklevel=3)
    else:
        try:
            optimizer.load_state_dict(ckpt.trainer["optimizer"])
        except (ValueError, KeyError, TypeError, RuntimeError) as err:
            raise CheckpointError(f"{ckpt.path / 'trainer.json'}: the optimizer state does not fit this run ({err})"
                                  "; start again with overwrite: true") from None
    scheduler.load_state_dict(ckpt.trainer["scheduler"])
    for key, effect in (("lr", "the checkpoint's learning rate and schedule continue"),
                        ("weight_decay", "the checkpoint's value continues"),
                        ("warmup_steps", "the schedule follows the new value from here"),
                        ("min_lr_ratio", "the schedule follows the new value from here"),
                        ("max_steps", "the schedule now decays over the new number of steps"),
                        ("batch_size", "the data order differs from an uninterrupted run"),
                        ("grad_accum", "the data order differs from an uninterrupted run"),
                        ("seed", "the data order differs from an uninterrupted run"),
                        ("lora_alpha", "the adapter's scaling changes from here"),
                        ("lora_dropout", "dropout follows the new value from here"),
                        ("max_length", "examples are cut at the new length from here")):
        if key in changed:
            warnings.warn(f"{ckpt.path.name}: {key} changed from {changed[key][0]!r} to {changed[key][1]!r} since "
                          f"the checkpoint; {effect}", stacklevel=3)
    torch.set_rng_state(ckpt.trainer["torch_rng"])
    random.setstate(ckpt.trainer["python_rng"])
    if "cuda_rng" in ckpt.trainer and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt.trainer["cuda_rng"])
    kept = {k: state.settings[k] for k in ("lr", "weight_decay") if k in changed}  # these continue as saved
    state.settings = {**state.settings, **settings, **kept}
    return state
