"""Which float32 product kernel (torch's or oneDNN's) is faster on this machine, for a model's shapes.

Note: chosen by measurement, per machine
    oneDNN's float32 products were about 2x MKL's on an AMD EPYC (Zen 5), where MKL runs AVX2 code; on an Intel
    Xeon with AVX-512 MKL runs its own AVX-512 code and oneDNN gained nothing on SmolLM2's adapted layers and
    cost 12% on its frozen ones. So neither is a safe default. :func:`choose` times both kernels on the model's
    own linear shapes (the forward product ``x Wᵀ`` and the input gradient ``g W`` of every distinct weight
    shape, each weighted by how many layers have it), ``tokens`` rows of input, the two kernels back to back in
    each of several rounds, and keeps oneDNN only when the median per-round ratio says it is at least ``margin``
    faster, so that neither a busy machine nor one interrupted round makes it slower than stock torch. The result
    is cached as JSON under ``$LORAKIT_CACHE/machine`` keyed by the CPU's model name, the torch version, the
    thread count and the shapes, like the native kernel build: a SmolLM2 model costs about a second once.
    Inputs are drawn from a private generator, so measuring never moves torch's global random state.
"""

from __future__ import annotations

import hashlib
import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from lorakit.atomic import atomic_write_text
from lorakit.paths import machine_choices_dir

from .matmul import TORCH, onednn

__all__ = ["Choice", "cpu_name", "model_shapes", "choose"]


@dataclass(frozen=True)
class Choice:
    """The kernels chosen and why: seconds per pass over the model's shapes with each (None: not measured)."""

    kernels: str  # "torch" or "onednn"
    torch_s: float | None
    onednn_s: float | None
    cpu: str
    source: str  # "measured", "cached", "settings" or "unavailable"


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def model_shapes(model: nn.Module) -> list[tuple[int, int, int]]:
    """``(out, in, layers)`` for each distinct float32 CPU ``nn.Linear`` weight shape of ``model``: the frozen
    layers, LoRA base layers and the output head (not the adapters' own rank-r weights, whose products follow the
    same kernel and are a few percent of the work)."""
    from lorakit.layer import LoraLinear

    adapters = {id(p) for m in model.modules() if isinstance(m, LoraLinear)
                for p in list(m.lora_A.parameters()) + list(m.lora_B.parameters())}
    found: dict[tuple[int, int], int] = {}
    for module in model.modules():
        w = getattr(module, "weight", None)
        if type(module) is not nn.Linear or id(w) in adapters or w.dtype != torch.float32 or w.device.type != "cpu":
            continue
        found[tuple(w.shape)] = found.get(tuple(w.shape), 0) + 1
    return sorted((o, i, n) for (o, i), n in found.items())


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(shapes, tokens: int = 128, rounds: int = 7) -> tuple[float, float]:
    """Seconds of one pass over ``shapes`` (each distinct shape timed once and counted ``layers`` times) with
    torch's and with oneDNN's kernels, as ``(torch_s, onednn_s)``.

    Each round times every shape with both kernels back to back (in turns: which goes first alternates), so a
    busy machine slows both alike; the first round only warms caches. ``onednn_s`` is ``torch_s`` times the
    median over rounds of the per-round ratio, and ``torch_s`` the median per-round pass: a round that another
    process interrupted moves neither (see the module Note)."""
    g = torch.Generator().manual_seed(0)  # private: torch's global random state is left alone
    kernels = (TORCH, onednn())
    operands = [(n, *(torch.randn(*s, generator=g) for s in ((out, inp), (tokens, inp), (tokens, out))))
                for out, inp, n in shapes]
    passes, ratios = [], []
    with torch.no_grad():
        for rnd in range(rounds + 1):
            totals = [0.0, 0.0]
            for n, w, x, grad in operands:
                order = (0, 1) if rnd % 2 else (1, 0)
                for i in order:
                    k = kernels[i]
                    totals[i] += n * _timed(lambda: (k.linear(x, w), k.matmul(grad, w)))  # x Wᵀ and g W
            if rnd:
                passes.append(totals[0])
                ratios.append(totals[1] / totals[0])
    t_torch = statistics.median(passes)
    return t_torch, t_torch * statistics.median(ratios)


def _cache_file(shapes, threads: int, tokens: int) -> Path:
    key = json.dumps(["median-of-ratios", cpu_name(), torch.__version__, threads, tokens, shapes])
    return machine_choices_dir() / f"kernels-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def choose(shapes: list[tuple[int, int, int]], margin: float = 0.05, tokens: int = 128, rounds: int = 7,
           measure_fn: Callable[..., tuple[float, float]] = measure, cache: bool = True) -> Choice:
    """oneDNN when it is at least ``margin`` faster than torch on ``shapes`` (see the module Note), else torch.

    ``measure_fn(shapes, tokens, rounds)`` returns ``(torch_s, onednn_s)``; with ``cache`` a result measured
    before on this machine, torch version, thread count and shapes is read back instead of measuring again.
    """
    name = cpu_name()
    if not shapes or onednn().name != "onednn" or not onednn().usable(torch.zeros(1)):
        return Choice("torch", None, None, name, "unavailable")
    path = _cache_file(shapes, torch.get_num_threads(), tokens)
    if cache:
        try:
            data = json.loads(path.read_text())
            return Choice(**{**data, "source": "cached"})
        except (OSError, ValueError, TypeError):
            pass
    t_torch, t_onednn = measure_fn(shapes, tokens, rounds)
    kernels = "onednn" if t_onednn < (1 - margin) * t_torch else "torch"
    choice = Choice(kernels, round(t_torch, 5), round(t_onednn, 5), name, "measured")
    if cache:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(asdict(choice)))
        except OSError:
            pass  # a read-only cache only costs a measurement next time
    return choice
