"""nf4: 4-bit codebooks, blockwise quantization, packing and double quantization vs bitsandbytes (CPU)."""

import pytest
import torch

from lorakit.quant import nf4
from lorakit.quant.nf4 import (
    BLOCKSIZES,
    NF4_CODE,
    code_4bit,
    dequantize_4bit,
    double_dequantize,
    double_quantize,
    quantize_4bit,
)

# The NF4 table as printed in bitsandbytes' get_4bit_type (stored reference values, independent of bnb).
NF4_REFERENCE = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]  # fmt: skip
SHAPES = [(1,), (7,), (3, 5), (33, 17), (64, 64), (5, 1000), (130, 257)]


def _bnbF():
    return pytest.importorskip("bitsandbytes.functional")


def _reference_dequant(packed, absmax, shape, blocksize, quant_type):
    """Slow, obviously-correct unpacking: high nibble first, one scale per block of the flat tensor."""
    n = torch.Size(shape).numel()
    b = packed.view(-1).long()
    idx = torch.stack([b >> 4, b & 15], 1).reshape(-1)[:n]
    return (code_4bit(quant_type)[idx] * absmax.repeat_interleave(blocksize)[:n]).view(shape)


def _bnb_cpu_dequant_is_correct(shape, blocksize):
    # bitsandbytes 0.50's AVX-512 CPU kernel indexes scales per row with in_features // blocksize, which is
    # wrong when in_features % blocksize != 0 (and in_features % 16 == 0); it falls back to a correct path
    # for odd in_features.
    return shape[-1] % blocksize == 0 or shape[-1] % 2 == 1


def test_codebooks():
    assert list(NF4_CODE) == NF4_REFERENCE
    assert torch.equal(code_4bit("nf4"), torch.tensor(NF4_REFERENCE))
    fp4 = code_4bit("fp4")
    assert fp4[3] == 1.0 and fp4[11] == -1.0 and fp4[1] == pytest.approx(1 / 192)  # 0.0625 / 12
    F = _bnbF()
    for qt in ("nf4", "fp4"):
        assert torch.equal(code_4bit(qt), F.get_4bit_type(qt, device="cpu"))


def test_packing_order_by_hand():
    # nf4 indices: 1.0 -> 15, -1.0 -> 0, 0.0 -> 7, pad -> 7: bytes 0xF0, 0x77
    packed, absmax = quantize_4bit(torch.tensor([1.0, -1.0, 0.0]), 64, "nf4")
    assert packed.shape == (2, 1) and packed.dtype == torch.uint8
    assert packed.view(-1).tolist() == [0xF0, 0x77]
    assert absmax.tolist() == [1.0]
    # fp4: 0.0 -> index 0 (+0), tiny positive -> index 8 (-0): bitsandbytes' tie order (Note: FP4 order)
    packed, _ = quantize_4bit(torch.tensor([1.0, 0.0, 1e-4, -1.0]), 64, "fp4")
    assert packed.view(-1).tolist() == [0x30, 0x8B]


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_quantize_bytes_equal_bitsandbytes(quant_type, blocksize):
    F = _bnbF()
    for shape in SHAPES:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            w = torch.randn(shape).to(dtype)
            n = w.numel()
            if n > 2 * blocksize:
                w.view(-1)[blocksize : 2 * blocksize] = 0  # an all-zero block
            packed, absmax = quantize_4bit(w, blocksize, quant_type)
            ref, state = F.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=False)
            assert packed.shape == ((n + 1) // 2, 1)
            assert torch.equal(packed, ref), (shape, dtype)
            assert torch.equal(absmax, state.absmax), (shape, dtype)


def test_zero_partial_last_block_stores_clamped_absmax():
    F = _bnbF()
    w = torch.cat([torch.randn(64), torch.zeros(10)])
    packed, absmax = quantize_4bit(w, 64)
    ref, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    assert torch.equal(packed, ref) and torch.equal(absmax, state.absmax)
    assert absmax[-1].item() == pytest.approx(1e-38)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_cell_bucketing_equals_bucketize(quant_type):
    """Note: Bucketing by cells: identical to torch.bucketize a few ulps around every midpoint and cell edge."""
    code = code_4bit(quant_type).sort().values
    mids = (code[:-1] + code[1:]) / 2
    edges = (torch.arange(nf4._CELLS + 1, dtype=torch.float64) / (nf4._CELLS // 2) - 1).float()
    centers = torch.cat([mids, edges, torch.tensor([-1.0, 0.0, 1.0])])
    up, down, values = centers.clone(), centers.clone(), [centers]
    for _ in range(6):
        up, down = torch.nextafter(up, torch.tensor(2.0)), torch.nextafter(down, torch.tensor(-2.0))
        values += [up, down]
    s = torch.cat(values + [torch.rand(100_000) * 2 - 1]).clamp(-1, 1)
    base, thr = nf4._cell_tables(quant_type)
    out = torch.empty(s.numel(), dtype=torch.uint8)
    n = s.numel()
    scratch = (torch.empty(n), torch.empty(n, dtype=torch.int32), torch.empty(n, dtype=torch.bool))
    nf4._bucket(s, base, thr, out, scratch)
    assert torch.equal(out.long(), torch.bucketize(s, mids))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
def test_double_quant_equals_bitsandbytes(quant_type, blocksize):
    F = _bnbF()
    for shape in [(33, 17), (256, 300), (1000, 70)]:  # 9 .. 1094 blocks: one and several nested blocks
        w = torch.randn(shape)
        packed, absmax = quantize_4bit(w, blocksize, quant_type)
        qabsmax, nested, offset = double_quantize(absmax)
        ref, state = F.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=True)
        assert torch.equal(packed, ref)
        assert qabsmax.dtype == torch.uint8 and torch.equal(qabsmax, state.absmax)
        assert torch.equal(nested, state.state2.absmax)
        assert offset == state.offset.item()
        restored = double_dequantize(qabsmax, nested, offset)
        assert torch.equal(restored, F.dequantize_blockwise(state.absmax, state.state2) + state.offset)
        assert torch.allclose(restored, absmax, rtol=0.02, atol=1e-3)  # 8-bit scales: ~1% error


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_equals_reference_and_bitsandbytes(quant_type, dtype):
    F = _bnbF()
    for blocksize in (32, 64, 128, 4096):
        for shape in SHAPES + [(16, 128)]:
            w = torch.randn(shape)
            packed, absmax = quantize_4bit(w, blocksize, quant_type)
            out = dequantize_4bit(packed, absmax, shape, blocksize, quant_type, dtype)
            assert out.shape == shape and out.dtype == dtype
            assert torch.equal(out, _reference_dequant(packed, absmax, shape, blocksize, quant_type).to(dtype))
            if _bnb_cpu_dequant_is_correct(shape, blocksize):
                _, state = F.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=True)
                state.dtype = dtype
                scales = double_dequantize(*double_quantize(absmax))
                assert torch.equal(dequantize_4bit(packed, scales, shape, blocksize, quant_type, dtype),
                                   F.dequantize_4bit(packed, state))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_error_bound(quant_type):
    w = torch.randn(300, 129) * 0.02
    packed, absmax = quantize_4bit(w, 64, quant_type)
    w_hat = dequantize_4bit(packed, absmax, w.shape, 64, quant_type)
    code = code_4bit(quant_type).sort().values
    half_gap = ((code[1:] - code[:-1]).max() / 2).item()  # nf4: 0.152, fp4: 0.167
    scale = absmax.repeat_interleave(64)[: w.numel()].view(w.shape)
    assert torch.all((w - w_hat).abs() <= scale * half_gap * (1 + 1e-6))
    rel = ((w - w_hat).norm() / w.norm()).item()
    assert rel < (0.11 if quant_type == "nf4" else 0.14)  # measured 0.094 (nf4), 0.12 (fp4)


def test_bad_inputs_raise():
    w = torch.randn(8, 8)
    with pytest.raises(ValueError, match="blocksize"):
        quantize_4bit(w, 48)
    with pytest.raises(ValueError, match="quant_type"):
        quantize_4bit(w, 64, "int4")
    with pytest.raises(TypeError):
        quantize_4bit(w.double(), 64)
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_4bit(torch.cat([torch.randn(100), torch.tensor([float("nan")])]), 64)
    packed, absmax = quantize_4bit(w, 64)
    with pytest.raises(ValueError, match="packed"):
        dequantize_4bit(packed, absmax, (8, 10))
    with pytest.raises(ValueError, match="absmax"):
        dequantize_4bit(packed, absmax, (8, 8), blocksize=32)
    with pytest.raises(ValueError):
        double_quantize(absmax.double())
