"""Paged AdamW: on CPU paging is a no-op and the updates equal AdamW / AdamW8bit bit for bit;
on CUDA (``gpu`` marker) the states live in pinned host memory between steps."""

import copy

import pytest
import torch

from lorakit.optim import AdamW8bit, PagedAdamW, PagedAdamW8bit

SHAPES = [(64, 128), (4096,), (33, 200), (96, 40), (300,)]  # 8-bit-sized and 32-bit-sized tensors


def _params(shapes, device="cpu"):
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter((0.02 * torch.randn(s, generator=g)).to(device)) for s in shapes]


def _grads(shapes, n_steps, device="cpu"):
    g = torch.Generator().manual_seed(1)
    scales = [torch.randn(s, generator=g).exp() for s in shapes]
    means = [torch.randn(s, generator=g) for s in shapes]
    return [[(sc * (mu + torch.randn(s, generator=g))).to(device) for s, sc, mu in zip(shapes, scales, means)]
            for _ in range(n_steps)]


def _steps(opt, params, grads):
    for step_grads in grads:
        for p, grad in zip(params, step_grads):
            p.grad = grad.clone()
        opt.step()


def _tensor_states(opt, p):
    return {k: v for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_paged_32bit_equals_torch_adamw_on_cpu(weight_decay):
    grads = _grads(SHAPES, 10)
    ours, ref, ref_default = _params(SHAPES), _params(SHAPES), _params(SHAPES)
    _steps(PagedAdamW(ours, lr=1e-2, weight_decay=weight_decay), ours, grads)
    _steps(torch.optim.AdamW(ref, lr=1e-2, weight_decay=weight_decay, foreach=False), ref, grads)
    _steps(torch.optim.AdamW(ref_default, lr=1e-2, weight_decay=weight_decay), ref_default, grads)
    for p, r, d in zip(ours, ref, ref_default):
        assert torch.equal(p, r)  # same op sequence as torch's single-tensor AdamW
        torch.testing.assert_close(p, d, rtol=1e-6, atol=1e-6)


def test_paged_8bit_equals_adamw8bit_on_cpu():
    grads = _grads(SHAPES, 10)
    ours, ref = _params(SHAPES), _params(SHAPES)
    opt, ref_opt = PagedAdamW8bit(ours, weight_decay=0.1), AdamW8bit(ref, weight_decay=0.1)
    _steps(opt, ours, grads)
    _steps(ref_opt, ref, grads)
    for p, r in zip(ours, ref):
        assert torch.equal(p, r)
        states, ref_states = _tensor_states(opt, p), _tensor_states(ref_opt, r)
        assert states.keys() == ref_states.keys()
        for key in states:
            assert torch.equal(states[key], ref_states[key]), key
    assert opt.state[ours[0]]["exp_avg"].dtype == torch.uint8


def test_cpu_states_stay_on_param_device_unpinned():
    params = _params(SHAPES)
    opt = PagedAdamW(params)
    _steps(opt, params, _grads(SHAPES, 1))
    for p in params:
        for value in _tensor_states(opt, p).values():
            assert value.device == p.device and not value.is_pinned()


@pytest.mark.parametrize("cls", [PagedAdamW, PagedAdamW8bit])
def test_state_dict_round_trip_resumes_identically(cls):
    grads = _grads(SHAPES, 8)
    params = _params(SHAPES)
    opt = cls(params)
    _steps(opt, params, grads[:4])
    saved = copy.deepcopy(opt.state_dict())
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in params]
    _steps(opt, params, grads[4:])

    opt2 = cls(resumed)
    opt2.load_state_dict(saved)
    _steps(opt2, resumed, grads[4:])
    for p, q in zip(params, resumed):
        assert torch.equal(p, q)


def test_step_returns_closure_loss():
    params = _params([(8,)])
    opt = PagedAdamW8bit(params)

    def closure():
        opt.zero_grad()
        loss = (params[0] ** 2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.is_tensor(loss) and opt.state[params[0]]["step"] == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("cls", [PagedAdamW, PagedAdamW8bit])
def test_cuda_states_live_in_pinned_host_memory_between_steps(cls):
    device = torch.device("cuda")
    grads = _grads(SHAPES, 4, device)
    params, ref = _params(SHAPES, device), _params(SHAPES, device)
    opt = cls(params, weight_decay=0.1)
    ref_opt = (AdamW8bit(ref, weight_decay=0.1) if cls is PagedAdamW8bit
               else torch.optim.AdamW(ref, weight_decay=0.1, foreach=False))
    _steps(ref_opt, ref, grads)
    for step_grads in grads:
        for p, grad in zip(params, step_grads):
            p.grad = grad.clone()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        opt.step()
        # Only the once-per-device 8-bit maps (2 x 1 KiB) may stay; the states alone are > 100 KiB.
        assert torch.cuda.memory_allocated() - before <= 4096
        for p in params:
            for key, value in _tensor_states(opt, p).items():
                assert value.device.type == "cpu" and value.is_pinned(), key
    for p, r in zip(params, ref):
        assert p.device.type == "cuda"
        torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-6)

    # Loading a checkpoint must not move the states onto the GPU either.
    opt2 = cls(_params(SHAPES, device))
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for states in opt2.state.values():
        for key, value in states.items():
            if isinstance(value, torch.Tensor):
                assert value.device.type == "cpu" and value.is_pinned(), key
