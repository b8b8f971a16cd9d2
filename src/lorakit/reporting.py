"""Where training metrics go besides ``metrics.jsonl``: ``report_to: tensorboard`` writes TensorBoard event files.

A run's metrics rows (``{"step", "loss", "lr", "grad_norm", "tokens_per_s", "val_loss", "score", ...}``) are
passed to :meth:`Reporters.log`; every numeric key becomes a scalar under ``train/`` (``loss``, ``lr``,
``grad_norm``, ``tokens_per_s``) or ``eval/`` (``val_loss``, ``score``, ``base_score``) at that step. The event
files go to ``<output_dir>/tensorboard``; ``tensorboard --logdir runs`` shows every run. TensorBoard is an optional
extra: ``pip install 'lorakit[tensorboard]'``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["REPORT_TARGETS", "Reporters", "check_report_to", "open_reporters"]

REPORT_TARGETS = ("none", "tensorboard")
_EVAL_KEYS = {"val_loss", "score", "base_score"}
_SKIP = {"step", "elapsed_s", "epoch"}


def check_report_to(value: Any) -> list[str]:
    """``report_to`` as a list of targets (``"none"`` → ``[]``), checked, and whether its package is installed.

    Raises:
        ValueError: an unknown target, or tensorboard asked for but not installed (with the pip command).
    """
    items = [value] if isinstance(value, str) else list(value or [])
    out = []
    for item in items:
        if item not in REPORT_TARGETS:
            raise ValueError(f"report_to={value!r}: choose from {list(REPORT_TARGETS)}")
        if item == "tensorboard":
            try:
                import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it)
            except ImportError:
                raise ValueError("report_to: tensorboard needs the tensorboard package: pip install "
                                 "'lorakit[tensorboard]'") from None
        if item != "none" and item not in out:
            out.append(item)
    return out


class Reporters:
    """The open sinks of one run; ``log(row)`` sends a metrics row to each, ``close()`` flushes them."""

    def __init__(self, writers: Sequence[Any] = ()) -> None:
        self.writers = list(writers)

    def log(self, row: dict[str, Any]) -> None:
        step = row.get("step")
        if step is None or not self.writers:
            return
        for key, value in row.items():
            if key in _SKIP or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if not math.isfinite(value):
                continue
            tag = f"{'eval' if key in _EVAL_KEYS else 'train'}/{key}"
            for writer in self.writers:
                writer.add_scalar(tag, float(value), int(step))

    def close(self) -> None:
        for writer in self.writers:
            writer.flush()
            writer.close()
        self.writers = []

    def __enter__(self) -> Reporters:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_reporters(report_to: Any, output_dir: str | Path) -> Reporters:
    """Open the sinks ``report_to`` names, writing under ``output_dir`` (``tensorboard/`` for TensorBoard)."""
    writers = []
    for target in check_report_to(report_to):
        if target == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            writers.append(SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard")))
    return Reporters(writers)
