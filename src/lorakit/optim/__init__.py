"""Optimizers for LoRA/QLoRA: 8-bit AdamW, paged AdamW, and ``build_optimizer`` by name."""

from .adamw8bit import AdamW8bit, state_nbytes
from .factory import OPTIMIZER_NAMES, build_optimizer
from .paged import PagedAdamW, PagedAdamW8bit

__all__ = ["AdamW8bit", "OPTIMIZER_NAMES", "PagedAdamW", "PagedAdamW8bit", "build_optimizer", "state_nbytes"]
