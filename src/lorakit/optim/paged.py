"""Paged AdamW: optimizer states live in host memory and visit the accelerator only for the step.

For a parameter on CUDA, its states sit in page-locked (pinned) host memory. ``step()`` handles one
parameter at a time: copy its states to the GPU (non-blocking), run the AdamW update there, copy the
new states back into the same pinned buffers (non-blocking), then the next parameter. At most one
parameter's states are on the GPU at any time, so GPU memory for states is ``O(largest parameter)``
instead of ``O(all parameters)``, at the cost of moving every state over PCIe twice per step.

For parameters on any other device (CPU-only machines included) paging is a no-op: the states stay on
``p.device`` and the update is exactly ``AdamW8bit`` / ``torch.optim.AdamW(foreach=False)`` (bit for bit
for float32 params).

See Note: why not unified memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from .adamw8bit import _check_hparams, _init_state, _restore_state_, _step_param_

__all__ = ["PagedAdamW", "PagedAdamW8bit"]

# Note: why not unified memory
# bitsandbytes allocates paged states with cudaMallocManaged and prefetches them, letting the driver
# evict pages only under memory pressure. That needs its C++ extension and hides where memory lives.
# Explicit pinned buffers plus stream-ordered copies are plain torch, work on every CUDA build, make
# the placement testable (states are CPU tensors between steps), and pay the PCIe cost every step even
# when everything would fit: choose paged optimizers only when GPU memory is the constraint.


def _paged_step(optimizer: torch.optim.Optimizer, *, quantize: bool) -> None:
    """One AdamW step over all params of ``optimizer``, paging CUDA params' states through the GPU.

    Copies are issued ``non_blocking`` on the current stream, so each H2D copy, its update kernels and
    the D2H copy back are ordered by the stream; the temporary GPU copies are freed right after being
    queued, which the caching allocator makes safe for later work on the same stream. Before returning
    we wait for the streams we used, so the host buffers hold the new states when ``step()`` returns
    (``state_dict()`` or user code may read them).
    """
    used_streams: dict[torch.device, torch.cuda.Stream] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is None:
                continue
            state = optimizer.state[p]
            if not state:
                state.update(_init_state(p, quantize=quantize, pin=p.is_cuda))
            if not p.is_cuda:
                _step_param_(p, state, group)
                continue
            on_device = {
                k: v.to(p.device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in state.items()
            }
            _step_param_(p, on_device, group)
            for key, value in state.items():
                if isinstance(value, Tensor):
                    value.copy_(on_device[key], non_blocking=True)
            state["step"] = on_device["step"]
            used_streams.setdefault(p.device, torch.cuda.current_stream(p.device))
    for stream in used_streams.values():
        stream.synchronize()


def _step_with_closure(
    optimizer: torch.optim.Optimizer, closure: Callable[[], Tensor] | None, *, quantize: bool
) -> Tensor | None:
    loss = None
    if closure is not None:
        with torch.enable_grad():
            loss = closure()
    with torch.no_grad():
        _paged_step(optimizer, quantize=quantize)
    return loss


class PagedAdamW(torch.optim.Optimizer):
    """AdamW with float32 states kept in pinned host memory for CUDA params (8 bytes/param on the host).

    Update: ``torch.optim.AdamW``'s (see ``AdamW8bit`` for the equation); bit-identical to
    ``torch.optim.AdamW(foreach=False)`` for float32 params on CPU, and equal up to kernel rounding on
    CUDA. Peak GPU memory for states is two float32 copies of the largest parameter.

    Args:
        params (Iterable[Tensor] | Iterable[dict]): parameters or param groups, as for torch optimizers.
        lr (float): learning rate. Default: 1e-3.
        betas (tuple[float, float]): ``(beta1, beta2)``, each in [0, 1). Default: (0.9, 0.999).
        eps (float): added to the denominator. Default: 1e-8.
        weight_decay (float): decoupled weight decay. Default: 1e-2.

    Raises:
        ValueError: a hyperparameter out of range (named in the message).
        TypeError: on ``step()``, a non-floating-point parameter or a sparse gradient.
    """

    _quantize = False  # 8-bit states (PagedAdamW8bit) or float32 ones

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:
        _check_hparams(lr, betas, eps, weight_decay)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Apply one update to every parameter that has a gradient; returns ``closure()`` if given."""
        return _step_with_closure(self, closure, quantize=self._quantize)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a ``state_dict()``; states go to pinned host memory for CUDA params, never to the GPU."""
        super().load_state_dict({**state_dict, "state": {}})
        _restore_state_(self, state_dict, paged=True)


class PagedAdamW8bit(PagedAdamW):
    """``AdamW8bit`` with its states (uint8 codes + absmax, ~2 bytes/param) in pinned host memory.

    On CPU params it is ``AdamW8bit`` exactly. On CUDA, dequantize/update/requantize run on the GPU on
    the paged-in copy, so the numbers match ``AdamW8bit`` on CUDA.

    Args:
        params (Iterable[Tensor] | Iterable[dict]): parameters or param groups, as for torch optimizers.
        lr (float): learning rate. Default: 1e-3.
        betas (tuple[float, float]): ``(beta1, beta2)``, each in [0, 1). Default: (0.9, 0.999).
        eps (float): added to the denominator. Default: 1e-8.
        weight_decay (float): decoupled weight decay. Default: 1e-2.

    Raises:
        ValueError: a hyperparameter out of range (named in the message).
        TypeError: on ``step()``, a non-floating-point parameter or a sparse gradient.
    """

    _quantize = True  # the only difference from PagedAdamW: AdamW8bit's blockwise 8-bit states
