"""Where lorakit keeps files between runs. No imports from lorakit: every module may use it.

``cache_dir()`` holds the converted embedded model (``models.py``), the native CPU kernels (``cpu/kernels.py``)
and the per-machine choice of CPU fast paths (``cpu/choice.py``).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir", "kernels_dir", "machine_choices_dir"]


def cache_dir() -> Path:
    """``$LORAKIT_CACHE`` or ``~/.cache/lorakit``."""
    return Path(os.environ.get("LORAKIT_CACHE") or Path.home() / ".cache" / "lorakit")


def kernels_dir() -> Path:
    """Built native kernels (one file per source, flags and torch version)."""
    return cache_dir() / "kernels"


def machine_choices_dir() -> Path:
    """Per-machine measurements of which product kernels are faster (one small JSON file per machine and model)."""
    return cache_dir() / "machine"
