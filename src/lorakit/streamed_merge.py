"""Streamed merge: a base checkpoint on disk + adapters → a merged checkpoint on disk, one tensor in memory at a time.

Memory stays at the interpreter plus the largest tensor being merged (plus the adapters), whatever the model's size:
each targeted weight is read (a 4-bit one dequantized), ``scaling · B @ A`` of every adapter is added in float32 with
the same ``addmm_`` the in-memory :func:`lorakit.merge_and_unload` runs (so a float32 merge is bit-identical to it),
the result is cast to the output dtype and written; every other tensor's bytes are copied from file to file.

Verification streams too (see Note: probe check). Everything that can be refused (adapter keys, shapes, output
path) is checked by :func:`lorakit.merge_plan.plan_merge` before the output directory exists; the files are written
into a hidden sibling and renamed into place at the end (:func:`lorakit.atomic.atomic_dir`), so a killed merge
leaves no directory a loader would take.

Note: probe check
    For each merged weight ``W'`` (as written, in the output dtype) and ``k`` random probe vectors ``v``, compare
    ``W' v`` with ``W v + Σ s·B (A v)`` computed from the base weight and the adapter factors in float32. The
    difference can only come from rounding: ``|Δ_i| ≤ (u_out + 4 (n + r) u_32) · (‖W'_i‖ + Σ |s| ‖B_i‖ ‖A‖_F) ‖v‖``
    for row ``i`` (Cauchy-Schwarz on the rounding of ``W'`` to the output dtype, unit roundoff ``u_out``, plus the
    float32 products' accumulation). A merge into the wrong tensor, a transposed or mis-scaled update, or a corrupt
    write breaks the bound by orders of magnitude; the largest ratio to the bound and the largest error are reported.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .atomic import atomic_dir, remove_leftovers
from .init import decompose
from .merge_plan import LowRank, MergePlan, OutTensor, load, plan_merge, quant_state
from .st_stream import INDEX_NAME, DTYPE_CODES, ShardWriter, read_tensor

__all__ = ["merge_to_disk", "StreamedMerge", "materialize", "ProbeStats", "check_output_path", "MergeCheckError"]

_UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
_PROBES = 4
_ROWS = 1024  # rows per chunk when the written weight is multiplied back in float32


class MergeCheckError(ValueError):
    """A merged weight failed the probe check; nothing was written."""


@dataclass
class ProbeStats:
    """Running result of the probe check over the merged weights."""

    checked: int = 0
    max_abs_err: float = 0.0
    max_ratio: float = 0.0  # error / bound; ≤ 1 passes
    worst: str = ""

    @property
    def ok(self) -> bool:
        return self.max_ratio <= 1.0

    def __str__(self) -> str:
        verdict = "ok" if self.ok else "FAILED"
        return (f"probe check of {self.checked} merged weights: max |W'v - (Wv + s·B(Av))| {self.max_abs_err:.3e}, "
                f"{self.max_ratio:.3f} of the rounding bound ({verdict})")


@dataclass(frozen=True)
class StreamedMerge:
    """What :func:`merge_to_disk` wrote."""

    output: Path
    dtype: torch.dtype
    touched: int
    tensors: int
    shards: int
    nbytes: int
    probe: ProbeStats | None
    requant_error: float | None = None

    def __str__(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        lines = [f"merged {self.touched} of {self.tensors} tensors ({dtype}) into {self.output}: {self.shards} "
                 f"shard(s), {self.nbytes / 1e6:.1f} MB"]
        if self.probe is not None:
            lines.append(str(self.probe))
        if self.requant_error is not None:
            lines.append(f"re-quantized to 4 bits: merged weights moved by up to {self.requant_error:.3e} (lossy)")
        return "\n".join(lines)


def _read_float(t: OutTensor) -> torch.Tensor:
    """The base tensor in float32 (a 4-bit weight dequantized in its compute dtype first, as ``dequantize_model_``
    does, so that merging it equals the in-memory merge of the dequantized model)."""
    if t.quant is None:
        w = read_tensor(t.source)
        return w if w.dtype == torch.float32 else w.float()
    from .quant.nf4 import dequantize_4bit, double_dequantize

    state = quant_state(t.quant)
    absmax = read_tensor(t.quant[".weight.absmax"])
    if "nested_offset" in state:
        absmax = double_dequantize(absmax, read_tensor(t.quant[".weight.nested_absmax"]).float(),
                                   float(state["nested_offset"]))
    stored = t.dequant_dtype or getattr(torch, state.get("dtype", "bfloat16"))
    packed = read_tensor(t.quant[".weight"]).reshape(-1).view(torch.uint8).reshape(-1, 1)
    w = dequantize_4bit(packed, absmax.float(), tuple(state["shape"]), int(state["blocksize"]), state["quant_type"],
                        stored)
    return w.float()


def _decomposition_terms(t: OutTensor, w: torch.Tensor) -> list[LowRank]:
    """An unconverted OLoRA/PiSSA adapter applies to the base minus its initial product: subtract it here."""
    terms = []
    for d in t.decompositions:
        dense = w.T if d.transposed else w
        A0, B0 = decompose(dense, d.r, d.scaling, d.method)
        A0, B0 = A0.to(d.dtype).float(), B0.to(d.dtype).float()  # the values the adapter was initialised with
        left, right = (A0.T.contiguous(), B0.T.contiguous()) if d.transposed else (B0, A0)
        terms.append(LowRank(left, right, -d.scale, d.adapter))
    return terms


@torch.no_grad()
def materialize(t: OutTensor, dtype: torch.dtype, stats: ProbeStats | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor | None:
    """The output tensor ``t`` in its output dtype, or None when its bytes are to be copied unchanged.

    Raises:
        ValueError: for non-finite merged weights, or a probe check beyond the rounding bound (naming the tensor).
    """
    out_dtype = DTYPE_CODES[t.code]
    if t.replacement is not None:
        tensor = load(t.replacement)
        return tensor.to(out_dtype) if tensor.is_floating_point() else tensor
    if t.raw_copy:
        return None
    if not t.updates and not t.decompositions:
        w = read_tensor(t.source) if t.quant is None else _read_float(t)
        return w.to(out_dtype) if w.is_floating_point() else w
    w = _read_float(t)
    terms = [*(u.resolve() for u in t.updates), *_decomposition_terms(t, w)]
    probes = ref = None
    if stats is not None:
        probes = torch.randn(w.shape[1], _PROBES, generator=generator)
        ref = w @ probes
        for u in terms:
            ref.add_(u.left @ (u.right @ probes), alpha=u.scale)
    _apply(w, terms)
    result = w if out_dtype == torch.float32 else w.to(out_dtype)
    # One reduction finds NaN/inf (a sum of finite weights does not overflow); with the probe check, the products
    # W'v do it on the way (every probe entry is non-zero, so a NaN or inf weight reaches them).
    if stats is None and not math.isfinite(float(result.sum(dtype=torch.float32))):
        raise ValueError(f"{t.key}: the merged weight has NaN/inf values in {out_dtype}; nothing was written")
    if stats is not None:
        _probe(t, result, terms, probes, ref, stats)
    return result


def _apply(w: torch.Tensor, terms: list[LowRank]) -> None:
    for u in terms:  # the same operation as LoraLinear.merge, in the same order
        w.addmm_(u.left, u.right, alpha=u.scale)


def _probe(t: OutTensor, result: torch.Tensor, terms: list[LowRank], probes: torch.Tensor, ref: torch.Tensor,
           stats: ProbeStats) -> None:
    n, r = result.shape[1], sum(u.right.shape[0] for u in terms)
    unit = _UNIT_ROUNDOFF[result.dtype] + 4 * (n + r) * 2.0**-24
    vnorm = probes.norm(dim=0).max()
    err = torch.empty(result.shape[0])
    bound = torch.empty(result.shape[0])
    for i in range(0, result.shape[0], _ROWS):
        rows = result[i:i + _ROWS].float()
        got = rows @ probes
        if not torch.isfinite(got).all():
            raise ValueError(f"{t.key}: the merged weight has NaN/inf values in {result.dtype} (an overflow of the "
                             "output dtype, or a non-finite base); nothing was written")
        err[i:i + _ROWS] = (got - ref[i:i + _ROWS]).abs().amax(dim=1)
        bound[i:i + _ROWS] = rows.norm(dim=1)
    for u in terms:
        bound += abs(u.scale) * u.left.norm(dim=1) * u.right.norm()
    bound = unit * bound * vnorm + 1e-30
    ratio = (err / bound).max().item()
    stats.checked += 1
    stats.max_abs_err = max(stats.max_abs_err, err.max().item())
    if ratio > stats.max_ratio:
        stats.max_ratio, stats.worst = ratio, t.key
    if ratio > 1.0:
        raise MergeCheckError(f"{t.key}: the merged weight fails the probe check ({err.max().item():.3e} off, {ratio:.1f}× "
                         "the rounding bound); nothing was written")


def _inside(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def check_output_path(output: str | os.PathLike, protected: list[tuple[str, Path]], overwrite: bool) -> Path:
    """Refuse an output that is (or contains, or lies inside) the base or an adapter, a file, or a non-empty
    directory without ``overwrite``; returns the output path."""
    out = Path(output)
    resolved = out.resolve()
    for what, path in protected:
        p = Path(path).resolve()
        if _inside(resolved, p) or _inside(p, resolved):
            relation = "is" if resolved == p else "overlaps"
            raise ValueError(f"--output {out} {relation} the {what} directory ({path}); writing there would change "
                             f"the {what} itself. Choose a new directory for the merged model")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output {out} is a file; choose a directory path")
    if out.is_dir() and any(p for p in out.iterdir()) and not overwrite:
        raise ValueError(f"--output {out} already exists and is not empty; pass --overwrite (overwrite=True) to "
                         "replace it as a whole, or choose a new directory")
    return out


def merge_to_disk(base_dir: str | os.PathLike, adapters, out_dir: str | os.PathLike, dtype: torch.dtype | str | None = None,
                  *, verify: bool = True, overwrite: bool = False, max_shard_size: int | None = None,
                  requantize: bool = False, seed: int = 0) -> StreamedMerge:
    """Merge adapters into a base checkpoint on disk and write the merged checkpoint, tensor by tensor.

    Args:
        base_dir: a safetensors checkpoint directory (one file or shards with the index JSON; float or 4-bit
            bitsandbytes / lorakit NF4 keys), or the embedded model's name.
        adapters: an adapter directory, or a list of directories or ``(directory, weight)`` pairs. OLoRA/PiSSA
            adapters saved unconverted are converted on the way (their initial product is recomputed from the base).
        out_dir: the output directory (config.json, safetensors shards, index JSON when sharded, tokenizer and
            every other file of the base directory).
        dtype: output dtype; default: the base's (for a 4-bit base its stored dtype, usually bfloat16).
        verify: run the probe check on every merged weight (see Note: probe check).
        overwrite: replace an existing non-empty ``out_dir`` (as a whole, in one rename).
        max_shard_size: bytes per shard; default: the base's shard layout.
        requantize: for a 4-bit base, write the merged weights 4-bit again with the base's settings (bitsandbytes
            layout, loads like the base); lossy, the rounding is reported and warned about.
        seed: seed of the probe vectors.

    Returns:
        A :class:`StreamedMerge` (prints as a two-line summary).

    Raises:
        ValueError / FileNotFoundError: an adapter that does not fit, an output that overlaps the base or an
            adapter, an existing output without ``overwrite``, non-finite weights or a failed probe check. Nothing
            is left under ``out_dir`` in any of these cases.

    Example:
        >>> lorakit.streamed_merge("SmolLM2-135M-Instruct", ["runs/a/adapter", ("runs/b/adapter", 0.5)], "out/merged")
    """
    plan = plan_merge(base_dir, adapters, dtype=dtype, max_shard_size=max_shard_size, requantize=requantize)
    out = check_output_path(out_dir, [("base model", plan.base_dir)] + [("adapter", p) for p, _, _ in plan.adapters],
                            overwrite)
    return write_plan(plan, out, verify=verify, seed=seed)


def write_plan(plan: MergePlan, out: Path, verify: bool = True, seed: int = 0) -> StreamedMerge:
    """Write a checked :class:`MergePlan` to ``out`` atomically."""
    if out.parent.is_dir():
        remove_leftovers(out.parent)  # temp siblings of earlier merges that were killed
    stats = ProbeStats() if verify else None
    generator = torch.Generator().manual_seed(seed)
    weight_map = {}
    requant_error = 0.0
    with atomic_dir(out, replace=True) as tmp:
        for name, tensors in plan.shards:
            writer = ShardWriter(tmp / name, [e for t in tensors for e in t.entries()], plan.metadata)
            with writer:
                for t in tensors:
                    if t.requant is not None and not t.touched:
                        for key, _, _ in t.entries():
                            writer.copy(key, next(e for e in t.quant.values() if e.key == key))
                    elif t.requant is not None:
                        pieces, error = _requantize(materialize(t, plan.dtype, stats, generator), t.requant)
                        requant_error = max(requant_error, error)
                        for (key, _, _), piece in zip(t.entries(), pieces):
                            writer.write(key, piece)
                        del pieces
                    else:
                        data = materialize(t, plan.dtype, stats, generator)
                        if data is None:
                            writer.copy(t.key, t.source)
                        else:
                            writer.write(t.key, data)
                        del data
                    weight_map.update({key: name for key, _, _ in t.entries()})
        if len(plan.shards) > 1:
            index = {"metadata": {"total_size": plan.nbytes}, "weight_map": weight_map}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        (tmp / "config.json").write_text(json.dumps(plan.config, indent=2, sort_keys=True) + "\n")
        for path in plan.extra_files:
            shutil.copyfile(path, tmp / path.name)  # content only: the output's own default permissions
    if requant_error:
        warnings.warn(f"re-quantized merged weights to 4 bits: rounding moved them by up to {requant_error:.3e}, so "
                      "outputs differ from base + adapter; merge without --requantize for an exact result", stacklevel=2)
    return StreamedMerge(out, plan.dtype, len(plan.touched), len(plan.tensors), len(plan.shards), plan.nbytes, stats,
                         requant_error if plan.tensors and any(t.requant for t in plan.tensors) else None)


def _requantize(w: torch.Tensor, state: dict) -> tuple[list[torch.Tensor], float]:
    """A merged float32 weight → the bitsandbytes 4-bit pieces (in :meth:`OutTensor.entries` order) with the base's
    settings, as ``NF4Linear.set_weight_`` quantizes it; and the largest change the rounding made."""
    from .merge_plan import QUANT_STATE_BYTES
    from .quant.dynamic8 import dynamic_map
    from .quant.nf4 import code_4bit, dequantize_4bit, double_dequantize, double_quantize, quantize_4bit

    blocksize, quant_type = int(state["blocksize"]), state["quant_type"]
    packed, absmax = quantize_4bit(w, blocksize, quant_type)
    info = {k: state[k] for k in ("quant_type", "blocksize", "dtype", "shape")}
    pieces = [packed]
    if "nested_offset" in state:
        qabsmax, nested, offset = double_quantize(absmax)
        pieces += [qabsmax, code_4bit(quant_type), nested, dynamic_map(signed=True)]
        info.update(nested_blocksize=256, nested_dtype="float32", nested_offset=offset)
        scales = double_dequantize(qabsmax, nested, offset)
    else:
        pieces += [absmax, code_4bit(quant_type)]
        scales = absmax
    blob = json.dumps(info).encode("utf-8")
    if len(blob) > QUANT_STATE_BYTES:
        raise ValueError(f"quant_state of {len(blob)} bytes exceeds {QUANT_STATE_BYTES}")
    pieces.append(torch.frombuffer(bytearray(blob.ljust(QUANT_STATE_BYTES)), dtype=torch.uint8))
    error = (dequantize_4bit(packed, scales, w.shape, blocksize, quant_type, torch.float32) - w).abs().max().item()
    return pieces, error

