"""AdamW with blockwise 8-bit optimizer states (Dettmers et al., https://arxiv.org/abs/2110.02861).

The update is torch's AdamW, written as the same sequence of tensor ops so that 32-bit states give
bit-identical results to ``torch.optim.AdamW(foreach=False)``. Only the storage of the two moments
changes: between steps ``m`` and ``v`` live as one uint8 code per element plus one float32 ``absmax``
per block of 256 elements. A step dequantizes, updates in float32, and requantizes.

The per-parameter functions here (``_init_state``, ``_step_param_``, ``_restore_state_``) are shared
with ``paged.py``, which only adds moving the states between host and accelerator around them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from itertools import chain
from typing import Any

import torch
from torch import Tensor

from ..quant.dynamic8 import dequantize_blockwise, dynamic_map, quantize_blockwise

__all__ = ["AdamW8bit", "state_nbytes", "BLOCKSIZE", "MIN_8BIT_NUMEL"]

BLOCKSIZE = 256
"""Elements per absmax block of an 8-bit state (bitsandbytes uses 256 since 0.44)."""

MIN_8BIT_NUMEL = 4096
"""Parameters with fewer elements keep float32 states, as bitsandbytes' ``min_8bit_size``."""


def _check_hparams(lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    if not lr >= 0.0:
        raise ValueError(f"lr must be >= 0, got {lr!r}")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"betas must be two floats in [0, 1), got {betas!r}; the usual value is (0.9, 0.999)")
    if not eps >= 0.0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    if not weight_decay >= 0.0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")


@functools.lru_cache(maxsize=None)
def _state_maps(device: torch.device) -> tuple[Tensor, Tensor]:
    """(signed, unsigned) 256-entry dynamic maps on ``device``, built once per device."""
    return dynamic_map(True).to(device), dynamic_map(False).to(device)


def _init_state(p: Tensor, *, quantize: bool, pin: bool) -> dict[str, Any]:
    """Zero AdamW state for ``p``.

    8-bit when ``quantize`` and ``p.numel() >= MIN_8BIT_NUMEL``: ``exp_avg`` / ``exp_avg_sq`` are flat
    uint8 codes ``(numel,)`` with float32 ``exp_avg_absmax`` / ``exp_avg_sq_absmax`` ``(ceil(numel/256),)``.
    Otherwise both moments are float32 with ``p``'s shape (also for bf16/fp16 params: 32-bit states).
    ``pin=True`` allocates on the host in page-locked memory (for ``paged.py``), else on ``p.device``.
    """
    if not p.is_floating_point():
        raise TypeError(f"AdamW needs floating-point parameters, got dtype {p.dtype}")
    device = torch.device("cpu") if pin else p.device

    def zeros(shape: Iterable[int], dtype: torch.dtype) -> Tensor:
        return torch.zeros(tuple(shape), dtype=dtype, device=device, pin_memory=pin)

    state: dict[str, Any] = {"step": 0}
    n = p.numel()
    if quantize and n >= MIN_8BIT_NUMEL:
        n_blocks = -(-n // BLOCKSIZE)
        for key in ("exp_avg", "exp_avg_sq"):
            # All-zero codes with absmax 0 dequantize to 0, the same start as torch's zero moments.
            state[key] = zeros((n,), torch.uint8)
            state[f"{key}_absmax"] = zeros((n_blocks,), torch.float32)
    else:
        state["exp_avg"] = zeros(p.shape, torch.float32)
        state["exp_avg_sq"] = zeros(p.shape, torch.float32)
    return state


def _adamw_math_(
    p32: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """One AdamW step in place on float32 tensors of one shape.

    Same op order as torch's single-tensor AdamW (so results are bit-identical): decay first, then the
    moments, then ``p -= lr/c1 * m / (sqrt(v)/sqrt(c2) + eps)`` with ``c_i = 1 - beta_i**step``.
    """
    if weight_decay != 0:
        p32.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = (1 - beta2**step) ** 0.5
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    p32.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)


@torch.no_grad()
def _step_param_(p: Tensor, state: dict[str, Any], group: Mapping[str, Any]) -> None:
    """Advance ``state["step"]`` and apply one AdamW step to ``p`` from ``p.grad``.

    ``state`` must be on ``p.device``. It is 8-bit iff it holds ``exp_avg_absmax``; then the moments are
    dequantized to float32, updated, and requantized into the same tensors (so a caller holding the
    dict, e.g. the paged copy-back, sees the new codes). Non-finite gradients are not skipped (as in
    torch); in an 8-bit state a NaN poisons the absmax and so its whole 256-element block.
    """
    grad = p.grad
    if grad.is_sparse:
        raise TypeError("AdamW8bit does not support sparse gradients; use torch.optim.SparseAdam")
    step = int(state["step"]) + 1  # int() also accepts the tensor step of a torch AdamW checkpoint
    state["step"] = step
    beta1, beta2 = group["betas"]
    hp = dict(step=step, lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
              weight_decay=group["weight_decay"])
    # Update a float32 view of p; for bf16/fp16 params this is a copy written back at the end.
    p32 = p if p.dtype == torch.float32 else p.float()
    g32 = grad if grad.dtype == torch.float32 else grad.float()

    if "exp_avg_absmax" not in state:
        _adamw_math_(p32, g32, state["exp_avg"], state["exp_avg_sq"], **hp)
    else:
        signed, unsigned = _state_maps(p.device)
        # m can take either sign -> signed map; v >= 0 -> unsigned map spends its sign bit on precision.
        m = dequantize_blockwise(state["exp_avg"], state["exp_avg_absmax"], signed, BLOCKSIZE, torch.float32)
        v = dequantize_blockwise(state["exp_avg_sq"], state["exp_avg_sq_absmax"], unsigned, BLOCKSIZE,
                                 torch.float32)
        m, v = m.reshape(p.shape), v.reshape(p.shape)  # (numel,) -> p.shape
        _adamw_math_(p32, g32, m, v, **hp)
        for key, x, code in (("exp_avg", m, signed), ("exp_avg_sq", v, unsigned)):
            q, absmax = quantize_blockwise(x.reshape(-1), code, BLOCKSIZE)
            state[key].copy_(q.reshape(-1))
            state[f"{key}_absmax"].copy_(absmax.reshape(-1))
    if p32 is not p:
        p.copy_(p32)


def _restore_state_(optimizer: torch.optim.Optimizer, state_dict: Mapping[str, Any], *, paged: bool) -> None:
    """Load per-parameter states from ``state_dict`` keeping each tensor's saved dtype.

    See Note: load_state_dict casts. Saved states are matched to parameters by position, as torch does.
    Tensors go to ``p.device``, or to page-locked host memory when ``paged`` and ``p`` is on CUDA.
    """
    saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
    params = chain.from_iterable(g["params"] for g in optimizer.param_groups)
    for pid, p in zip(saved_ids, params):
        saved = state_dict["state"].get(pid)
        if saved is None:
            continue
        pin = paged and p.is_cuda
        device = torch.device("cpu") if pin else p.device
        restored: dict[str, Any] = {}
        for key, value in saved.items():
            if isinstance(value, Tensor) and key != "step":
                copy = torch.empty(value.shape, dtype=value.dtype, device=device, pin_memory=pin)
                value = copy.copy_(value)
            elif isinstance(value, Tensor):
                value = int(value)
            restored[key] = value
        optimizer.state[p] = restored


# Note: load_state_dict casts
# torch.optim.Optimizer.load_state_dict casts every non-"step" state tensor of a floating-point param to
# that param's dtype and device. That would turn uint8 codes into floats, round float32 absmax/32-bit
# moments to bf16 for bf16 params, and (for paged optimizers) put every state on the GPU at once. So our
# optimizers hand torch only the param groups and restore the states themselves (_restore_state_).


def state_nbytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the optimizer's state tensors, counting a storage shared by several states once.

    Works for any torch optimizer (e.g. to compare with ``torch.optim.AdamW`` or bitsandbytes).
    """
    seen: dict[tuple[str, int], int] = {}
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, Tensor):
                storage = value.untyped_storage()
                seen[(str(value.device), storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


class AdamW8bit(torch.optim.Optimizer):
    """AdamW whose moments are stored blockwise in 8 bits (about 2 bytes of state per parameter).

    .. math::
        m_t = \\beta_1 m_{t-1} + (1-\\beta_1) g_t, \\quad v_t = \\beta_2 v_{t-1} + (1-\\beta_2) g_t^2

        \\theta_t = \\theta_{t-1}(1 - \\eta\\lambda)
            - \\eta \\frac{m_t / (1-\\beta_1^t)}{\\sqrt{v_t / (1-\\beta_2^t)} + \\epsilon}

    Between steps ``m`` is stored with the signed 8-bit dynamic map and ``v`` with the unsigned one,
    each with a float32 absmax per block of 256 elements (bitsandbytes' layout). Parameters with fewer
    than 4096 elements keep float32 moments and then match ``torch.optim.AdamW(foreach=False)`` bit for
    bit. The quantization error of the moments is relative to each block's largest value, so elements
    much smaller than their block's max are stored coarsely; the update still uses the unrounded new
    moments of the current step.

    Args:
        params (Iterable[Tensor] | Iterable[dict]): parameters or param groups, as for torch optimizers.
        lr (float): learning rate ``eta``. Default: 1e-3.
        betas (tuple[float, float]): ``(beta1, beta2)``, each in [0, 1). Default: (0.9, 0.999).
        eps (float): added to the denominator. Default: 1e-8.
        weight_decay (float): decoupled decay ``lambda``. Default: 1e-2 (torch AdamW's default).

    Raises:
        ValueError: a hyperparameter out of range (named in the message).
        TypeError: on ``step()``, a non-floating-point parameter or a sparse gradient.

    Example:
        >>> opt = AdamW8bit(model.parameters(), lr=2e-4)
        >>> loss.backward(); opt.step(); opt.zero_grad()
    """

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

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Apply one update to every parameter that has a gradient; returns ``closure()`` if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(_init_state(p, quantize=True, pin=False))
                _step_param_(p, state, group)
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a ``state_dict()`` keeping uint8 codes and float32 states as saved (see Note above)."""
        super().load_state_dict({**state_dict, "state": {}})
        _restore_state_(self, state_dict, paged=False)
