"""One adapter per row: ``model(input_ids, adapter_names=[...])`` and ``model.generate(..., adapter_names=[...])``.

PEFT's mixed-batch inference: row ``i`` of the batch is computed with adapter ``adapter_names[i]`` (``"__base__"``:
no adapter), so one batch serves requests for different adapters. Each row's output equals running that row alone
with its adapter active (tested, greedy generation included).

How: :func:`add_adapter` installs a forward pre-hook on the model that takes ``adapter_names`` out of the call's
keyword arguments (so transformers never sees it) and hands the row → adapter map to every LoRA layer and
``modules_to_save`` wrapper for the duration of that call. Each of them then runs its base alone (the layer is
switched off, so every backend's path computes ``base(x)``) and a forward hook adds, for each adapter, its update
to that adapter's rows only (``modules_to_save``: replaces those rows by the adapter's copy's output). A forward
hook with ``always_call`` restores the layers even if the call raises. ``generate`` (which refuses keyword
arguments its model does not declare) is wrapped on the model instance to do the same around the whole call, so
every decoding step uses the rows' adapters; beam search and ``num_return_sequences > 1`` (which multiply the rows)
are refused with a clear error.

Rules (as PEFT's): every name must be an adapter of the model or ``"__base__"`` (ValueError otherwise, before
anything runs); one name per row; adapters merged into the base are refused (unmerge first); inside
``disable_adapter`` every row gets the base. LoRA dropout is not applied to mixed batches (inference).
"""

from __future__ import annotations

import contextlib
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from .layer import LoraLinear
from .modules_to_save import ModulesToSave

__all__ = ["install_mixed_batch", "BASE_NAME"]

#: The name that asks for the base model's output for a row.
BASE_NAME = "__base__"
_MARK = "_lorakit_mixed_batch"


def install_mixed_batch(model: nn.Module) -> None:
    """Let ``model(...)`` and ``model.generate(...)`` take ``adapter_names=``; idempotent (add_adapter calls it)."""
    if getattr(model, _MARK, False):
        return
    model.register_forward_pre_hook(_begin, with_kwargs=True)
    model.register_forward_hook(_end, always_call=True)
    if callable(getattr(type(model), "generate", None)):  # transformers refuses generate kwargs it does not know
        model.generate = _Generate(model)
    setattr(model, _MARK, True)


class _Generate:
    """``model.generate`` taking ``adapter_names=`` (one adapter per row for the whole call: every decoding step).

    Holds the model weakly (no reference cycle); copies and pickles of the model get their own."""

    def __init__(self, model: nn.Module) -> None:
        self._model = weakref.ref(model)
        self.__doc__ = type(model).generate.__doc__

    def __call__(self, *args, adapter_names: list[str] | None = None, **kwargs):
        model = self._model()
        if adapter_names is None:
            return type(model).generate(model, *args, **kwargs)
        with _activated(model, adapter_names, _batch_size(args, kwargs)):
            return type(model).generate(model, *args, **kwargs)

    def __reduce__(self):
        return _Generate, (self._model(),)


@contextlib.contextmanager
def _activated(model: nn.Module, names, batch: int | None):
    _activate(model, names, batch)
    try:
        yield
    finally:
        _deactivate(model)


def _rows(names: list[str]) -> dict[str, torch.Tensor]:
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        groups.setdefault(name, []).append(i)
    return {name: torch.tensor(rows) for name, rows in groups.items() if name != BASE_NAME}


def _begin(model: nn.Module, args: tuple, kwargs: dict):
    names = kwargs.pop("adapter_names", None)
    if names is not None:
        _activate(model, names, _batch_size(args, kwargs))
        model.__dict__["_lorakit_mixed_by_forward"] = True
    return args, kwargs


def _end(model: nn.Module, args, output):
    if model.__dict__.pop("_lorakit_mixed_by_forward", False):
        _deactivate(model)
    return output


def _activate(model: nn.Module, names, batch: int | None) -> None:
    if "_lorakit_mixed_state" in model.__dict__:
        raise ValueError("adapter_names given twice (to generate and to a forward inside it); give it once")
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"adapter_names={names!r} must be a list with one adapter name (or {BASE_NAME!r}) per row")
    known = set(model.__dict__.get("lorakit_configs", {}))
    unknown = sorted({n for n in names if n not in known and n != BASE_NAME})
    if unknown:
        raise ValueError(f"adapter_names has unknown adapters {unknown}; this model has {sorted(known)} "
                         f"(and {BASE_NAME!r} for the base model)")
    if batch is not None and batch != len(names):
        raise ValueError(f"adapter_names has {len(names)} names for a batch of {batch} rows; give one per row")
    groups = _rows(list(names))
    modules = [m for m in model.modules() if isinstance(m, (LoraLinear, ModulesToSave))]
    merged = sorted({n for m in modules if isinstance(m, LoraLinear) for n in m.merged_adapters})
    if merged:
        raise ValueError(f"adapters {merged} are merged into the base; call lorakit.unmerge_adapter(model) before "
                         "a mixed batch")
    state = []
    for module in modules:
        state.append((module, module.disabled))
        if module.disabled:  # inside disable_adapter: the base for every row
            continue
        module.disabled = True
        handle = module.register_forward_hook(_add_row_updates)
        module.__dict__["_lorakit_rows"] = (groups, handle, len(names))
    model.__dict__["_lorakit_mixed_state"] = state


def _batch_size(args: tuple, kwargs: dict) -> int | None:
    for value in (*args, kwargs.get("input_ids"), kwargs.get("inputs_embeds")):
        if isinstance(value, torch.Tensor) and value.dim() >= 2:
            return value.shape[0]
    return None


def _deactivate(model: nn.Module) -> None:
    for module, was in model.__dict__.pop("_lorakit_mixed_state", []):
        module.disabled = was
        rows = module.__dict__.pop("_lorakit_rows", None)
        if rows is not None:
            rows[1].remove()


def _add_row_updates(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    groups, _, n_rows = module.__dict__["_lorakit_rows"]
    x = args[0]
    if x.shape[0] != n_rows:
        raise ValueError(f"adapter_names has {n_rows} names but a layer got {x.shape[0]} rows (beam search or "
                         "num_return_sequences > 1 multiply the rows); use one sequence per prompt")
    for name, rows in groups.items():
        rows = rows.to(x.device)
        if isinstance(module, LoraLinear):
            if name not in module.lora_A:
                continue  # this adapter does not adapt this layer: its rows keep the base output
            A, B = module.lora_A[name].weight, module.lora_B[name].weight
            delta = F.linear(F.linear(x.index_select(0, rows).to(A.dtype), A), B) * module.scaling[name]
            output = output.index_add(0, rows, delta.to(output.dtype))
        elif name in module.modules_to_save:
            output = output.index_copy(0, rows, module.modules_to_save[name](x.index_select(0, rows)))
    return output
