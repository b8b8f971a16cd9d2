"""Native CPU kernels for 4-bit weights (``csrc/nf4_cpu.cpp``): fast dequantization and a fused 4-bit matmul.

Pure-PyTorch dequantization makes several passes over memory (index widening, a table gather, a scale multiply,
a dtype cast); bitsandbytes' CPU inference path is a fused C++ kernel. These kernels do each in one pass:

* :func:`dequantize` — the same bits as :func:`lorakit.quant.dequantize_4bit` (float32 or bfloat16), double
  quantization undone on the fly.
* :func:`matmul_bf16` — ``x @ dequant(W)ᵀ`` with ``x`` in bfloat16 and float32 accumulation: the weight is
  dequantized 32 rows at a time into a cache-sized buffer and multiplied with AVX512-BF16 dot products, so no
  full-size weight is ever written; for up to 8 rows of ``x`` (decoding) each weight row is dequantized in
  registers and dotted directly. Weights are rounded to bfloat16 as torch rounds them, except that values below
  2^-126 (never a real weight: the product of a 4-bit code and a block's absmax) become 0.

Built on first use with the system's ``g++`` (under a second) into ``$LORAKIT_CACHE/kernels`` and loaded with
ctypes; threads come from torch's own pool. Used only on x86-64 Linux CPUs with AVX512-BF16; anywhere else, or
if the build fails (a warning says why), :func:`available` is False and the PyTorch path runs. The CPU backend
asks for them only when its settings allow (``LORAKIT_CPU_KERNELS=0`` turns them off, see ``settings.py``).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

from lorakit.paths import kernels_dir
from lorakit.quant.nf4 import _signed_map

__all__ = ["available", "cpu_flags", "dequantize", "load", "matmul_bf16", "matmul_fits", "supports"]

_SOURCE = Path(__file__).with_name("csrc") / "nf4_cpu.cpp"
_FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-ffp-contract=off",
          "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mfma"]
_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "fma")


def cpu_flags() -> list[str]:
    """The CPU's feature flags (``/proc/cpuinfo``; empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    return next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])


def _cpu_supported() -> bool:
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    flags = cpu_flags()
    return all(f in flags for f in _CPU_FLAGS)


def _build(source: Path, target: Path) -> None:
    torch_dir = Path(torch.__file__).parent
    includes = [f"-I{p}" for p in (torch_dir / "include", torch_dir / "include" / "torch" / "csrc" / "api" / "include")]
    libs = [f"-L{torch_dir / 'lib'}", "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{torch_dir / 'lib'}"]
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)  # build aside, then rename: never half-written
    os.close(fd)
    try:
        cmd = [os.environ.get("CXX", "g++"), *_FLAGS, *includes, str(source), "-o", tmp, *libs]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(done.stderr.strip()[-2000:] or f"exit status {done.returncode}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load(source: Path = _SOURCE, directory: Path | None = None) -> ctypes.CDLL | None:
    """Build ``source`` into ``directory`` (default ``$LORAKIT_CACHE/kernels``) if not built yet, and load it;
    None (with a warning saying why) where it cannot be built or loaded, or the CPU lacks AVX512-BF16."""
    if not _cpu_supported():
        return None
    key = hashlib.sha256(source.read_bytes() + " ".join(_FLAGS).encode() + torch.__version__.encode())
    target = (directory or kernels_dir()) / f"nf4_cpu-{key.hexdigest()[:16]}.so"
    try:
        if not target.exists():
            _build(source, target)
        lib = ctypes.CDLL(str(target))
    except (OSError, RuntimeError) as e:
        warnings.warn(f"lorakit: native 4-bit CPU kernels unavailable, using the slower PyTorch path ({e}). "
                      "They need g++ (set CXX for another compiler); LORAKIT_CPU_KERNELS=0 skips the build.",
                      stacklevel=3)
        return None
    i64, ptr, f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
    lib.lk_dequant_4bit.argtypes = [ptr, i64, i64, ptr, ptr, ptr, ptr, ptr, f32, ptr, ctypes.c_int]
    lib.lk_dequant_4bit.restype = None
    lib.lk_gemm_4bit_bf16.argtypes = [i64, i64, i64, ptr, i64, ptr, i64, ptr, ptr, ptr, ptr, ptr, f32, ptr, i64,
                                      ctypes.c_int]
    lib.lk_gemm_4bit_bf16.restype = None
    return lib


@functools.cache
def _library() -> ctypes.CDLL | None:
    return load()


def available() -> bool:
    """Whether the native kernels are built and usable on this machine (built on the first call)."""
    return _library() is not None


def supports(*tensors: torch.Tensor | None) -> bool:
    """Whether the kernels can take these tensors: available, and all on the CPU and contiguous."""
    if not available():
        return False
    for t in tensors:
        if t is not None and not (t.is_cpu and t.is_contiguous()):
            return False
    return True


def _lib() -> ctypes.CDLL:
    if not available():
        raise RuntimeError("lorakit's native CPU kernels are unavailable here; check cpu_kernels.available() first.")
    return _library()


def _p(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _scale_args(absmax: torch.Tensor, nested: torch.Tensor | None, offset: float | None) -> tuple:
    """(absmax_f32, q, code8, nested, offset) pointers for the kernels, and the tensors to keep alive."""
    if nested is None:
        a = absmax.float().contiguous()
        return (_p(a), None, None, None, 0.0), (a,)
    code8 = _signed_map(absmax.device)
    return (None, _p(absmax), _p(code8), _p(nested), float(offset)), (absmax, code8, nested)


def dequantize(packed: torch.Tensor, absmax: torch.Tensor, nested: torch.Tensor | None, offset: float | None,
               shape: torch.Size, blocksize: int, code: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The ``shape`` weight in ``dtype`` (float32 or bfloat16), bit-identical to the PyTorch dequantization (in
    bfloat16, values below 2^-126 become 0 instead of a subnormal; see the module docstring).

    ``absmax`` is float32 scales (``nested`` None) or the uint8 double-quantized ones with their float32
    ``nested`` scales and ``offset``; ``code`` is the ``(16,)`` float32 code. Callers check :func:`supports`.
    """
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"native dequantization writes float32 or bfloat16, not {dtype}.")
    out = torch.empty(shape, dtype=dtype)
    args, _keep = _scale_args(absmax, nested, offset)
    _lib().lk_dequant_4bit(packed.data_ptr(), out.numel(), blocksize, code.data_ptr(), *args, out.data_ptr(),
                         int(dtype == torch.bfloat16))
    return out


def matmul_bf16(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, nested: torch.Tensor | None,
                offset: float | None, shape: tuple[int, int], blocksize: int, code: torch.Tensor,
                out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``x @ dequant(W)ᵀ`` as ``(M, N)`` in ``out_dtype`` (float32 or bfloat16), for a bfloat16 ``x`` ``(M, K)``
    and ``W`` of ``shape (N, K)``.

    Requires ``K % blocksize == 0`` (see :func:`matmul_fits`). Products are float32 sums of bfloat16 products of
    ``x`` and the bfloat16-dequantized weight: the values ``x @ dequantize(..., torch.bfloat16).T`` gives, up to
    summation order; a bfloat16 output is that sum rounded to nearest even.
    """
    if out_dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"the native 4-bit matmul writes float32 or bfloat16, not {out_dtype}.")
    n, k = shape
    m = x.shape[0]
    y = torch.empty(m, n, dtype=out_dtype)
    args, _keep = _scale_args(absmax, nested, offset)
    _lib().lk_gemm_4bit_bf16(m, n, k, x.data_ptr(), x.stride(0), packed.data_ptr(), blocksize, code.data_ptr(), *args,
                           y.data_ptr(), n, int(out_dtype == torch.bfloat16))
    return y


def matmul_fits(x: torch.Tensor, shape: tuple[int, int], blocksize: int, *buffers: torch.Tensor | None) -> bool:
    """Whether :func:`matmul_bf16` takes this input and these weight buffers: 2-D contiguous bfloat16 CPU ``x``,
    weight rows of whole blocks."""
    return (x.dim() == 2 and x.dtype == torch.bfloat16 and x.shape[1] == shape[1] and shape[1] % blocksize == 0
            and supports(x, *buffers))
