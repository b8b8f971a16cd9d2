"""dynamic8: the dynamic code map and 8-bit blockwise quantization, byte for byte against bitsandbytes (CPU)."""

import pytest
import torch

from lorakit.quant.dynamic8 import dequantize_blockwise, dynamic_map, quantize_blockwise


def _bnbF():
    return pytest.importorskip("bitsandbytes.functional")


def test_dynamic_map_shape_and_order():
    for signed in (True, False):
        code = dynamic_map(signed)
        assert code.shape == (256,) and code.dtype == torch.float32
        assert torch.all(code[1:] >= code[:-1])
        assert code.max() == 1.0
    assert dynamic_map(True).min() == pytest.approx(-0.99297, abs=1e-5)  # the signed map has no -1
    assert dynamic_map(False).min() == 0.0


@pytest.mark.parametrize("args", [(True, 7, 8), (False, 7, 8), (True, 5, 8), (True, 4, 6), (True, 3, 4)])
def test_dynamic_map_equals_bitsandbytes(args):
    F = _bnbF()
    assert torch.equal(dynamic_map(*args), F.create_dynamic_map(*args))


def test_dynamic_map_is_not_shared_state():
    code = dynamic_map()
    code[0] = 5.0
    assert dynamic_map()[0] != 5.0


@pytest.mark.parametrize(
    "kwargs", [dict(signed=False, max_exponent_bits=5), dict(total_bits=9), dict(max_exponent_bits=0)]
)
def test_dynamic_map_bad_args_raise(kwargs):
    with pytest.raises(ValueError):
        dynamic_map(**kwargs)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("blocksize", [64, 256, 1000, 4096])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_blockwise_bytes_equal_bitsandbytes(signed, blocksize, dtype):
    F = _bnbF()
    code = dynamic_map(signed)
    for n in (1, 255, 5000, 70_001):  # one element, one partial block, several blocks + a partial one
        x = torch.randn(n).to(dtype)
        if not signed:
            x = x.abs()
        if n > 2 * blocksize:
            x[blocksize : 2 * blocksize] = 0  # an all-zero block: bitsandbytes writes byte 0, absmax 0
        q, absmax = quantize_blockwise(x, code, blocksize)
        q_ref, state = F.quantize_blockwise(x, code=code, blocksize=blocksize)
        assert q.shape == x.shape and q.dtype == torch.uint8
        assert torch.equal(q, q_ref), (n, (q != q_ref).sum())
        assert torch.equal(absmax, state.absmax)
        x_hat = dequantize_blockwise(q, absmax, code, blocksize, dtype)
        ref_hat = torch.ops.bitsandbytes.dequantize_blockwise(q_ref, state.absmax, code, blocksize, dtype)
        assert torch.equal(x_hat, ref_hat)


def test_grid_rounding_edges_equal_bitsandbytes():
    """Values a few ulps around every grid cell where the code changes (see Note: 16-bit grid rounding)."""
    F = _bnbF()
    code = dynamic_map(True)
    mids = 0.5 * (code[:-1] + code[1:])
    grid = -1.0 + (2.0 * torch.arange(65536, dtype=torch.float32)) / 65535.0
    table = torch.bucketize(grid, mids)
    edges = torch.nonzero(table[1:] != table[:-1]).view(-1) + 1
    center = ((edges.double() - 0.5) / 65535.0 * 2 - 1).float()
    up, down, values = center.clone(), center.clone(), [center]
    for _ in range(8):
        up, down = torch.nextafter(up, torch.tensor(2.0)), torch.nextafter(down, torch.tensor(-2.0))
        values += [up, down]
    v = torch.cat(values)
    rows = -(-v.numel() // 255)
    v = torch.nn.functional.pad(v, (0, rows * 255 - v.numel()))
    x = torch.cat([v.view(rows, 255), torch.ones(rows, 1)], 1).reshape(-1)  # absmax 1 per block of 256
    for scale in (1.0, 0.37):
        q, absmax = quantize_blockwise(x * scale, code, 256)
        q_ref, state = F.quantize_blockwise(x * scale, code=code, blocksize=256)
        assert torch.equal(q, q_ref)


def test_grid_rounding_is_not_nearest_rounding():
    """Guards the Note: exact nearest rounding would give different bytes than bitsandbytes' grid."""
    code = dynamic_map(True)
    x = torch.tensor([1.0, 2e-6, -3e-6, 1e-7])  # below the grid resolution (~1.5e-5 of absmax)
    q, _ = quantize_blockwise(x, code, 4)
    nearest = torch.bucketize(x, 0.5 * (code[:-1] + code[1:]))
    assert not torch.equal(q.long(), nearest)


def test_roundtrip_error_bound():
    code = dynamic_map(True)
    x = torch.randn(10_000) * 3
    q, absmax = quantize_blockwise(x, code, 256)
    x_hat = dequantize_blockwise(q, absmax, code, 256)
    half_gap = ((code[1:] - code[:-1]).max() / 2).item()
    bound = absmax.repeat_interleave(256)[: x.numel()] * (half_gap + 2 / 65535)
    assert torch.all((x - x_hat).abs() <= bound)
    assert (x - x_hat).abs().mean() < 0.02 * x.abs().mean()  # measured 0.011


def test_bad_inputs_raise():
    code = dynamic_map(True)
    with pytest.raises(TypeError):
        quantize_blockwise(torch.arange(10), code, 4)
    with pytest.raises(ValueError, match="blocksize"):
        quantize_blockwise(torch.randn(10), code, 0)
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_blockwise(torch.tensor([1.0, float("inf")]), code, 4)
    with pytest.raises(ValueError, match="sorted"):
        quantize_blockwise(torch.randn(10), code.flip(0), 4)
    q, absmax = quantize_blockwise(torch.randn(10), code, 4)
    with pytest.raises(ValueError, match="absmax"):
        dequantize_blockwise(q, absmax, code, 8)
