"""4-bit NormalFloat (NF4) and FP4 blockwise quantization, packing and double quantization.

Pure torch functions whose bytes match bitsandbytes (0.50, CPU/default backend) exactly, so 4-bit checkpoints
interoperate with ``bitsandbytes.nn.Linear4bit`` and transformers' ``BitsAndBytesConfig(load_in_4bit=True)``.
QLoRA paper: Dettmers et al. 2023, https://arxiv.org/abs/2305.14314 (NF4 §3, double quantization §3).

Layout for a weight ``W`` with ``n = W.numel()`` elements and blocksize ``B``:

* flatten row-major; block ``b`` holds elements ``[b·B, (b+1)·B)``, the last block may be shorter and has its
  own scale. ``absmax_b = max |w|`` (float32, ``(ceil(n / B),)``).
* ``s = clamp(w · (1 / absmax_b), -1, 1)`` (the last partial block divides instead, as bitsandbytes does;
  the two can differ in the last bit) and each ``s`` becomes the index of the nearest code value. A value
  exactly on a midpoint goes to the lower code (``torch.bucketize``). All-zero blocks divide by 1e-38 and
  store absmax 0, except a partial last block, which stores 1e-38 (bitsandbytes does the same).
* pack two 4-bit indices per byte, element ``2i`` in the HIGH nibble and ``2i + 1`` in the LOW nibble; an odd
  count is padded with the code of 0.0. Result: uint8 ``((n + 1) // 2, 1)``.
* dequantize: ``w_hat = code[idx] · absmax_b`` in float32, then cast (round to nearest even) to ``dtype``.

Double quantization (``double_quantize``): ``offset = mean(absmax)``; the centred scales ``absmax - offset`` are
8-bit quantized with the signed dynamic map in blocks of 256 (``dynamic8.quantize_blockwise``), costing
8 + 32/256 bits per block instead of 32 (4.127 bits per weight at B = 64).

Note: FP4 order
    The FP4 code is stored in bit-pattern order (bit 3 = sign), not sorted, and holds both +0 (index 0) and -0
    (index 8). We bucketize against the sorted code and map back through ``_FP4_SORTED_TO_INDEX``, the order
    bitsandbytes gets from ``torch.argsort`` with +0 before -0. Hence 0.0 encodes as index 0 and a tiny positive
    value in (0, 0.0026] as index 8 (-0.0), exactly as bitsandbytes does.

Note: Bucketing by cells
    ``torch.bucketize`` (what bitsandbytes runs) costs ~30 ns per element on CPU. We get the identical index,
    ``#{midpoints < s}``, in ~3 ns: split [-1, 1] into 4096 cells, ``g = trunc((s + 1) · 2048)`` (the product
    is exact; ``s + 1`` is off by at most 2^-24, so ``s`` lies within 1e-6 of cell ``g``). No cell, widened by
    1e-6, holds two midpoints (the closest pair, FP4's around 0, is 0.0026 apart; a cell is 4.9e-4 wide), so
    ``#{midpoints < s} = base[g] + (s > thr[g])``, where ``thr[g]`` is the cell's midpoint (``+inf`` if none)
    and ``base[g]`` the count below it (or below the whole cell). ``_cell_tables`` builds both tables and
    checks the one-midpoint property.
"""

from __future__ import annotations

import functools

import torch

from lorakit.quant.dynamic8 import dequantize_blockwise, dynamic_map, quantize_blockwise

__all__ = [
    "BLOCKSIZES",
    "NF4_CODE",
    "FP4_CODE",
    "code_4bit",
    "quantize_4bit",
    "dequantize_4bit",
    "double_quantize",
    "double_dequantize",
]

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
"""Block sizes bitsandbytes accepts for 4-bit quantization."""

NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip
"""NF4 code, index 0..15: normal quantiles, 7 negative, 0, 8 positive, normalised to [-1, 1] (float32 exact)."""

_FP4_E2M1 = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)
FP4_CODE = tuple((torch.tensor(_FP4_E2M1) / 12.0).tolist())
"""FP4 (E2M1, exponent bias 2, bit 3 = sign) code in bit-pattern order, divided by its max 12 in float32."""

_FP4_SORTED_TO_INDEX = (11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3)  # See Note: FP4 order
_CHUNK = 1 << 18  # elements per pass; see quantize_4bit
_NESTED_BLOCKSIZE = 256
_CELLS = 4096  # See Note: Bucketing by cells
_DEQUANT_CHUNK = 1 << 20  # larger than _CHUNK: fewer Python-level ops per call for typical layers


def _check(blocksize: int, quant_type: str) -> None:
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES} (bitsandbytes' set), got {blocksize!r}; use 64.")
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}.")


def code_4bit(quant_type: str = "nf4") -> torch.Tensor:
    """The 16 code values as a ``(16,)`` float32 tensor in index order (bitsandbytes' ``quant_map``).

    Raises:
        ValueError: for a quant_type other than 'nf4' / 'fp4'.
    """
    _check(64, quant_type)
    return torch.tensor(NF4_CODE if quant_type == "nf4" else FP4_CODE, dtype=torch.float32)


@functools.lru_cache(maxsize=4)
def _byte_table(quant_type: str) -> torch.Tensor:
    """``(256,)`` uint8: byte of two *sorted* bucket indices ``hi·16 + lo`` -> byte of the code indices."""
    if quant_type == "nf4":  # the NF4 code is sorted: identity
        return torch.arange(256, dtype=torch.int32).to(torch.uint8)
    order = torch.tensor(_FP4_SORTED_TO_INDEX, dtype=torch.int32)
    return (order.view(16, 1) * 16 + order.view(1, 16)).reshape(256).to(torch.uint8)


@functools.lru_cache(maxsize=4)
def _cell_tables(quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``base`` uint8 and ``thr`` float32, both ``(_CELLS + 1,)``. See Note: Bucketing by cells."""
    code = code_4bit(quant_type).sort().values
    mids = ((code[:-1] + code[1:]) / 2).double()  # (15,) float32 values, exact in float64
    lo = torch.arange(_CELLS + 1, dtype=torch.float64) / (_CELLS // 2) - 1 - 1e-6
    hi = lo + 2 / _CELLS + 2e-6
    inside = (mids[None, :] >= lo[:, None]) & (mids[None, :] <= hi[:, None])  # (cells, 15)
    if int(inside.sum(1).max()) > 1 or bool((mids[1:] <= mids[:-1]).any()):
        raise RuntimeError(f"{quant_type} midpoints are too close for {_CELLS} cells; raise _CELLS.")
    has = inside.any(1)
    thr = torch.where(has, (inside.double() * mids).sum(1), torch.full_like(lo, float("inf")))
    ref = torch.where(has, thr, (lo + hi) / 2)
    base = (mids[None, :] < ref[:, None]).sum(1).to(torch.uint8)
    return base, thr.float()


def _bucket(s: torch.Tensor, base: torch.Tensor, thr: torch.Tensor, out: torch.Tensor, scratch: tuple) -> None:
    """``out = #{midpoints < s}`` (uint8), equal to ``torch.bucketize(s, midpoints)``.

    ``scratch`` = (float32, int32, bool) buffers at least as long as ``s``, reused across chunks.
    """
    m = s.numel()
    tmp, g, above = (t[:m] for t in scratch)
    torch.add(s, 1.0, out=tmp).mul_(_CELLS // 2)
    g.copy_(tmp)  # float -> int32 truncates: cell index in [0, _CELLS]
    torch.index_select(base, 0, g, out=out)
    torch.index_select(thr, 0, g, out=tmp)
    out.add_(torch.gt(s, tmp, out=above))


@functools.lru_cache(maxsize=4)
def _pair_table(quant_type: str) -> torch.Tensor:
    """``(256,)`` float64 whose 8 bytes are the float32 pair ``(code[b >> 4], code[b & 15])`` for byte ``b``."""
    code = code_4bit(quant_type)
    b = torch.arange(256)
    return torch.stack([code[b >> 4], code[b & 15]], dim=1).contiguous().view(torch.float64).view(256)


def quantize_4bit(
    w: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise absmax 4-bit quantization of ``w`` (see the module docstring for the exact layout).

    Works in chunks of ~256k elements so temporaries stay in cache and peak memory stays near the output size
    (the idea of torchao's "Quantize in Chunks" note).

    Args:
        w (Tensor): float32, bfloat16 or float16 tensor, any shape (a linear weight is ``(out, in)``).
        blocksize (int): elements per scale, one of ``BLOCKSIZES``. Default 64 (QLoRA).
        quant_type (str): ``"nf4"`` or ``"fp4"``. Default ``"nf4"``.

    Returns:
        tuple[Tensor, Tensor]: ``packed`` uint8 ``((n + 1) // 2, 1)`` and ``absmax`` float32 ``(ceil(n / blocksize),)``.

    Raises:
        TypeError: if ``w`` is not a 16/32-bit float tensor.
        ValueError: for an unsupported blocksize or quant_type, or NaN / inf in ``w``.

    Example:
        >>> packed, absmax = quantize_4bit(torch.randn(128, 64))
        >>> w_hat = dequantize_4bit(packed, absmax, (128, 64))
    """
    _check(blocksize, quant_type)
    if w.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"quantize_4bit needs a float32/bfloat16/float16 tensor, got {w.dtype}; cast it first.")
    device = w.device
    base, thr = (t.to(device) for t in _cell_tables(quant_type))
    table = None if quant_type == "nf4" else _byte_table(quant_type).to(device)
    flat = w.detach().reshape(-1)
    n = flat.numel()
    full = (n // blocksize) * blocksize
    n_blocks = -(-n // blocksize)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=device)
    absmax = torch.empty(n_blocks, dtype=torch.float32, device=device)
    step = max(1, _CHUNK // blocksize) * blocksize
    scaled = torch.empty(min(step, n) + 1, dtype=torch.float32, device=device)  # +1: odd-count padding
    idx = torch.empty_like(scaled, dtype=torch.uint8)
    scratch = (  # for _bucket
        torch.empty_like(scaled), torch.empty_like(scaled, dtype=torch.int32), torch.empty_like(idx, dtype=torch.bool)
    )
    starts = list(range(0, full, step)) + ([full] if full < n else [])
    for start in starts:
        stop = min(start + step, full) if start < full else n
        b0 = start // blocksize
        m = stop - start
        src = flat[start:stop].float()  # exact for bf16/fp16; no copy for float32
        s = scaled[:m]
        if start < full:  # whole blocks: multiply by the reciprocal scale
            k = m // blocksize
            rows = src.view(k, blocksize)
            torch.amax(torch.abs(rows, out=s.view(k, blocksize)), 1, out=absmax[b0 : b0 + k])  # ~20x vector_norm(inf)
            recip = 1.0 / absmax[b0 : b0 + k].clamp(min=1e-38)
            torch.mul(rows, recip[:, None], out=s.view(k, blocksize))
        else:  # the last, shorter block: stores the clamped absmax and divides (as bitsandbytes does)
            absmax[-1] = src.abs().max().clamp(min=1e-38)
            torch.div(src, absmax[-1], out=s)
        if not bool(torch.isfinite(absmax[b0 : b0 + -(-m // blocksize)]).all()):
            raise ValueError(f"w has NaN or inf in elements {start}..{stop - 1}; 4-bit codes need finite weights.")
        s.clamp_(-1.0, 1.0)
        if m % 2:  # only the final chunk can be odd
            scaled[m] = 0.0
            m += 1
        q = idx[:m]
        _bucket(scaled[:m], base, thr, q, scratch)  # == torch.bucketize(s, midpoints); see Note: Bucketing by cells
        # (m/2,) int16 holding the pair (q[2i], q[2i+1]) little-endian; byte = q[2i] << 4 | q[2i+1]
        pairs = q.view(torch.int16)
        byte = (pairs << 4).bitwise_or_(pairs >> 8)  # low 8 bits are the packed byte
        out = packed[start // 2 : start // 2 + m // 2]
        if table is None:
            out.copy_(byte)  # int16 -> uint8 keeps the low byte
        else:
            torch.index_select(table, 0, byte.bitwise_and_(0xFF).to(torch.int32), out=out)
    return packed.view(-1, 1), absmax


def dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    shape: tuple[int, ...] | torch.Size,
    blocksize: int = 64,
    quant_type: str = "nf4",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of ``quantize_4bit``: ``w_hat = code[idx] · absmax_b`` (float32), cast to ``dtype``.

    Each byte is looked up once in a 256-entry table of float32 pairs, so one gather yields both nibbles.

    Args:
        packed (Tensor): uint8 ``((n + 1) // 2, 1)`` (any shape with that many bytes; other 1-byte-per-element
            storage dtypes are not supported).
        absmax (Tensor): ``(ceil(n / blocksize),)`` float32 scales (undo double quantization first with
            ``double_dequantize``).
        shape (tuple[int, ...]): shape of the original tensor, ``n = prod(shape)``.
        blocksize (int): blocksize used to quantize. Default 64.
        quant_type (str): ``"nf4"`` or ``"fp4"``. Default ``"nf4"``.
        dtype (torch.dtype): output dtype. Default float32.

    Returns:
        Tensor: ``dtype`` tensor of ``shape``.

    Raises:
        ValueError: for an unsupported blocksize / quant_type, or sizes that do not fit ``shape``.
    """
    _check(blocksize, quant_type)
    shape = torch.Size(shape)
    n = shape.numel()
    if packed.dtype != torch.uint8 or packed.numel() != (n + 1) // 2:
        raise ValueError(
            f"packed must be uint8 with (n + 1) // 2 = {(n + 1) // 2} bytes for shape {tuple(shape)}, "
            f"got {packed.dtype} with {packed.numel()}; pass the shape used to quantize."
        )
    if absmax.numel() != -(-n // blocksize):
        raise ValueError(
            f"absmax has {absmax.numel()} entries, shape {tuple(shape)} in blocks of {blocksize} needs "
            f"{-(-n // blocksize)}; pass the blocksize used to quantize (or double_dequantize it first)."
        )
    device = packed.device
    pair_table = _pair_table(quant_type).to(device)
    absmax = absmax.to(device=device, dtype=torch.float32)
    src = packed.reshape(-1)
    step = max(1, _DEQUANT_CHUNK // blocksize) * blocksize  # even, whole blocks
    out = torch.empty(n + n % 2, dtype=dtype, device=device)  # +1 when odd: the pad nibble lands there
    # float32 output: gather straight into it; otherwise into a one-chunk float32 scratch
    scratch = out if dtype == torch.float32 else torch.empty(min(step, n) + 1, dtype=torch.float32, device=device)
    index = torch.empty((min(step, n) + 1) // 2, dtype=torch.int32, device=device)  # reused: no page faults
    for start in range(0, n, step):
        m = min(step, n - start)
        m2 = m + m % 2
        vals = scratch[start : start + m2] if scratch is out else scratch[:m2]  # (m2,) float32
        byte_index = index[: m2 // 2]
        byte_index.copy_(src[start // 2 : (start + m2) // 2])
        torch.index_select(pair_table, 0, byte_index, out=vals.view(torch.float64))
        k, b0 = m // blocksize, start // blocksize
        vals[: k * blocksize].view(k, blocksize).mul_(absmax[b0 : b0 + k, None])  # code · absmax, float32
        if k * blocksize < m:  # last, shorter block
            vals[k * blocksize : m].mul_(absmax[-1])
        if scratch is not out:
            out[start : start + m].copy_(vals[:m])  # round to nearest even
    return out[:n].view(shape)


def double_quantize(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Quantize 4-bit block scales to 8 bits (QLoRA double quantization).

    ``offset = mean(absmax)``; ``qabsmax, nested_absmax = quantize_blockwise(absmax - offset, dynamic_map(), 256)``.

    Args:
        absmax (Tensor): ``(n_blocks,)`` float32 scales from ``quantize_4bit``.

    Returns:
        tuple[Tensor, Tensor, float]: ``qabsmax`` uint8 ``(n_blocks,)``, ``nested_absmax`` float32
        ``(ceil(n_blocks / 256),)`` and ``offset`` (a float32 value as a Python float).

    Raises:
        ValueError: if ``absmax`` is not a 1-D float32 tensor.
    """
    if absmax.dtype != torch.float32 or absmax.dim() != 1:
        raise ValueError(
            f"absmax must be a 1-D float32 tensor from quantize_4bit, got {absmax.dtype} {tuple(absmax.shape)}."
        )
    offset = absmax.mean()  # float32, the same reduction bitsandbytes uses
    qabsmax, nested_absmax = quantize_blockwise(absmax - offset, dynamic_map(signed=True), _NESTED_BLOCKSIZE)
    return qabsmax, nested_absmax, offset.item()


def double_dequantize(qabsmax: torch.Tensor, nested_absmax: torch.Tensor, offset: float) -> torch.Tensor:
    """Inverse of ``double_quantize``: ``absmax_i = code8[q_i] · nested_absmax[i // 256] + offset`` (float32).

    Args:
        qabsmax (Tensor): ``(n_blocks,)`` uint8.
        nested_absmax (Tensor): ``(ceil(n_blocks / 256),)`` float32.
        offset (float): the mean subtracted before quantizing.

    Returns:
        Tensor: ``(n_blocks,)`` float32 scales for ``dequantize_4bit``.
    """
    absmax = dequantize_blockwise(qabsmax, nested_absmax, _signed_map(qabsmax.device), _NESTED_BLOCKSIZE)
    return absmax.add_(torch.tensor(offset, dtype=torch.float32, device=absmax.device))


@functools.lru_cache(maxsize=8)
def _signed_map(device: torch.device) -> torch.Tensor:
    return dynamic_map(signed=True).to(device)  # read-only use: saves a rebuild per dequantization
