"""Training arguments: flat, typed dataclasses whose fields are the keys of a YAML config file.

``SFTArgs.from_yaml("configs/sft_lora.yaml", overrides=["lr=1e-4"])`` reads a file and applies ``key=value``
overrides; an unknown key is an error that suggests the closest field.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["SFTArgs", "DPOArgs", "load_args", "parse_overrides"]


@dataclass
class SFTArgs:
    """Supervised fine-tuning with LoRA, QLoRA or all weights trainable."""

    # --- model
    model: str = "SmolLM2-135M-Instruct"
    """Base model: a local transformers checkpoint directory or the embedded default."""
    method: str = "lora"
    """``lora``, ``qlora`` (4-bit NF4 base + double quantization) or ``full`` (every weight trains)."""
    dtype: str = "float32"
    """Compute dtype of the base: ``float32`` or ``bfloat16``."""
    # --- adapter
    r: int = 16
    """LoRA rank."""
    lora_alpha: float = 32
    """LoRA alpha (scaling = alpha / r)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA branch."""
    target_modules: Any = "all-linear"
    """Modules that get adapters (list of names, a regex, or ``all-linear``)."""
    init_lora_weights: Any = True
    """``true``, ``gaussian``, ``olora`` or ``pissa``."""
    use_rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r)."""
    # --- data
    task: str | None = "dates"
    """A built-in task (``dates``, ``extract``, ``reverse``); ignored when ``train_file`` is set."""
    train_file: str | None = None
    """A JSONL/JSON file of prompt/completion, messages or text rows."""
    val_file: str | None = None
    """A separate validation file; otherwise ``val_fraction`` of the training file is held out."""
    val_fraction: float = 0.0
    """Fraction of ``train_file`` held out for validation when there is no ``val_file``."""
    n_train: int = 480
    """Training examples drawn from a built-in task."""
    n_eval: int = 200
    """Held-out examples for a built-in task (exact-match accuracy and validation loss)."""
    max_length: int = 256
    """Tokens per example (longer ones are truncated)."""
    completion_only: bool = True
    """Loss on completion / assistant tokens only."""
    packing: bool = False
    """Pack short examples into rows of ``max_length`` tokens."""
    skip_bad_rows: bool = False
    """Count and skip malformed rows instead of stopping at the first one."""
    # --- optimisation
    lr: float = 2e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Cosine schedule floor, as a fraction of ``lr``."""
    warmup_steps: int = 3
    """Linear warm-up steps."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    optimizer: str = "adamw"
    """``adamw``, ``adamw_8bit``, ``paged_adamw_8bit`` or ``paged_adamw_32bit``."""
    batch_size: int = 8
    """Examples per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    max_steps: int = 30
    """Optimizer steps."""
    max_grad_norm: float = 1.0
    """Gradient clipping (0 disables)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, ~30% more time)."""
    recompute_activations: bool = True
    """Recompute the cheap activations (norm outputs, SwiGLU product) in backward: ~40% less activation memory
    at a few elementwise passes per layer, same gradients (``lorakit.recompute_cheap_activations``)."""
    seed: int = 0
    """Seed for data order, adapter init and dropout."""
    threads: int = 0
    """CPU threads (0 keeps torch's default)."""
    # --- evaluation, checkpoints, output
    eval_every: int = 0
    """Validation loss every N steps (0: only at the end)."""
    eval_accuracy: bool = True
    """Measure exact-match accuracy on the held-out set before and after training (built-in tasks)."""
    val_loss_rows: int = 0
    """Validation rows used for the validation loss (0: all); accuracy always uses every held-out row."""
    early_stopping_patience: int = 0
    """Stop after this many evaluations without a better validation loss (0: never)."""
    save_every: int = 0
    """Checkpoint every N steps (0: only at the end)."""
    output_dir: str = "runs/sft"
    """Where the adapter, checkpoints, metrics.jsonl and loss.png go."""
    resume: bool = False
    """Continue from the latest checkpoint in ``output_dir``."""
    progress: bool = True
    """Show progress bars."""

    def __post_init__(self) -> None:
        if self.method not in ("lora", "qlora", "full"):
            raise ValueError(f"method={self.method!r}; use 'lora', 'qlora' or 'full'")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r}; use 'float32' or 'bfloat16'")
        if self.train_file is None and self.task is None:
            raise ValueError("no data: set task (a built-in task) or train_file (a JSONL file)")
        if self.val_file and self.val_fraction:
            raise ValueError("set val_file or val_fraction, not both")
        for name in ("batch_size", "grad_accum", "max_steps", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be at least 1")


@dataclass
class DPOArgs(SFTArgs):
    """Preference tuning (sigmoid DPO); the reference model is the same model with its adapter disabled."""

    beta: float = 0.1
    """DPO temperature: larger keeps the policy closer to the reference."""
    reference_adapter: str | None = None
    """Start from this adapter directory; its frozen copy is the reference (instead of the bare base)."""
    precompute_reference: bool = False
    """Compute reference log-probs once before training (saves a forward per step)."""
    task: str | None = None
    lr: float = 5e-4
    output_dir: str = "runs/dpo"


def _coerce(value: str, annotation: Any) -> Any:
    """Turn a ``--set key=value`` string into the field's type (YAML rules: numbers, booleans, lists, null)."""
    import yaml

    parsed = yaml.safe_load(value)
    if annotation in (str, "str") and parsed is not None:
        return str(value)
    return parsed


def parse_overrides(cls: type, overrides: list[str]) -> dict[str, Any]:
    """``["lr=1e-4", "max_steps=10"]`` → ``{"lr": 1e-4, "max_steps": 10}``, checked against ``cls``'s fields."""
    hints = typing.get_type_hints(cls)
    out = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not key=value")
        _check_key(cls, key.strip())
        out[key.strip()] = _coerce(value, hints.get(key.strip()))
    return out


def _check_key(cls: type, key: str) -> None:
    names = [f.name for f in dataclasses.fields(cls)]
    if key not in names:
        close = difflib.get_close_matches(key, names, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(names)}"
        raise ValueError(f"unknown key {key!r} for {cls.__name__}{hint}")


def load_args(cls: type, path: str | Path | None = None, overrides: list[str] | None = None) -> Any:
    """Build ``cls`` from a YAML file (keys = field names) plus ``key=value`` overrides.

    Raises:
        ValueError: for an unknown key (with the closest field), or a file that is not a YAML mapping.
    """
    import yaml

    data: dict[str, Any] = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text())
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(f"{path}: a config file is a mapping of field: value, got {type(loaded).__name__}")
        data = dict(loaded or {})
        for key in data:
            _check_key(cls, key)
    data.update(parse_overrides(cls, overrides or []))
    return cls(**data)
