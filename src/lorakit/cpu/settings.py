"""The CPU backend's settings: one frozen object, read from the environment once.

Every switch of the CPU speed code is a field here. :func:`current` reads the ``LORAKIT_*`` variables the first
time it is called and returns the same object afterwards; nothing on a per-product path reads the environment.
Tests and callers pass their own object (``CpuSettings(onednn="off")``, ``dataclasses.replace(current(), ...)``)
to :func:`lorakit.accelerate`.

=========================== ======================================= =============================================
field                       environment variable                    meaning
=========================== ======================================= =============================================
``onednn``                  ``LORAKIT_ONEDNN`` = auto | 1 | 0        float32 products through oneDNN: "auto" times
                                                                    both kernels on the model's shapes once per
                                                                    machine (cached), "on" / "off" force it
``fused_lora``              ``LORAKIT_FUSED_LORA`` = 1 | 0           LoRA layers as one autograd node with their base
                                                                    (``fused.py``); 0: the core's generic path
``native_kernels``          ``LORAKIT_CPU_KERNELS`` = 1 | 0          the AVX512-BF16 4-bit kernels (built on first
                                                                    use with g++)
``keep_freed_memory``       ``LORAKIT_KEEP_FREED_MEMORY`` = 1 | 0    glibc keeps freed memory mapped (``accelerate``
                                                                    sets it; process-wide)
``reuse_grad_memory``       ``LORAKIT_REUSE_GRAD_MEMORY`` = 1 | 0    adapter gradients written into memory kept per
                                                                    parameter (only with ``keep_freed_memory``)
``threads``                 ``LORAKIT_THREADS`` = N                  ``torch.set_num_threads(N)`` in ``accelerate``
                                                                    (unset: torch's default)
=========================== ======================================= =============================================
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

__all__ = ["CpuSettings", "current", "from_env"]

_ONEDNN = {"auto": "auto", "1": "on", "on": "on", "true": "on", "0": "off", "off": "off", "false": "off"}


@dataclass(frozen=True)
class CpuSettings:
    """What :func:`lorakit.accelerate` does on CPU models, and which kernels the CPU backend may use.

    Raises:
        ValueError: for an ``onednn`` other than "auto", "on", "off", or threads below 1.
    """

    onednn: str = "auto"
    fused_lora: bool = True
    native_kernels: bool = True
    keep_freed_memory: bool = True
    reuse_grad_memory: bool = True
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.onednn not in ("auto", "on", "off"):
            raise ValueError(f"onednn={self.onednn!r} must be 'auto', 'on' or 'off'")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"threads={self.threads!r} must be a positive integer or None")


def _flag(env: dict, name: str) -> bool:
    return env.get(name, "1").strip().lower() not in ("0", "off", "false", "no")


def from_env(env: dict | None = None) -> CpuSettings:
    """Settings from ``env`` (default ``os.environ``); unknown values raise ValueError naming the variable."""
    env = os.environ if env is None else env
    raw = env.get("LORAKIT_ONEDNN", "auto").strip().lower()
    if raw not in _ONEDNN:
        raise ValueError(f"LORAKIT_ONEDNN={raw!r}: use auto, 1 or 0")
    threads = env.get("LORAKIT_THREADS", "").strip()
    if threads and not threads.isdigit():
        raise ValueError(f"LORAKIT_THREADS={threads!r}: use a positive integer or leave it unset")
    return CpuSettings(onednn=_ONEDNN[raw], fused_lora=_flag(env, "LORAKIT_FUSED_LORA"), native_kernels=_flag(env, "LORAKIT_CPU_KERNELS"),
                       keep_freed_memory=_flag(env, "LORAKIT_KEEP_FREED_MEMORY"),
                       reuse_grad_memory=_flag(env, "LORAKIT_REUSE_GRAD_MEMORY"),
                       threads=int(threads) if threads else None)


@functools.cache
def current() -> CpuSettings:
    """The process's settings, read from the environment on the first call."""
    return from_env()
