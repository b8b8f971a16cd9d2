"""accelerate / restore: the CPU fast paths give the generic path's loss and gradients (float64 reference), what
accelerate reports, and that CPU settings reach only CPU models."""

import copy

import pytest
import torch

import lorakit
from lorakit.cpu import CpuSettings
from lorakit_testing import make_tiny_llama

QUIET = dict(keep_freed_memory=False)  # leave this process's malloc alone


def _model(dtype=torch.float32, dropout=0.0):
    model = make_tiny_llama(0)
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                  lora_dropout=dropout, init_lora_weights=False))
    return model.to(dtype)


def _loss_and_grads(model, ids):
    logits = model(input_ids=ids).logits[:, :-1]  # the loss in the model's dtype (float64 for the reference)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    params = [p for p in model.parameters() if p.requires_grad]
    return loss.detach(), torch.autograd.grad(loss, params)


@pytest.mark.parametrize("fast", [CpuSettings(onednn="off", **QUIET), CpuSettings(onednn="on", **QUIET)],
                         ids=["fused+torch", "fused+onednn"])
def test_fast_path_and_generic_path_match_float64(fast):
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    ref = _model(torch.float64)
    lorakit.accelerate(ref, CpuSettings(fused_lora=False, onednn="off", **QUIET))
    loss_ref, grads_ref = _loss_and_grads(ref, ids)
    results = {}
    for name, settings in (("generic", CpuSettings(fused_lora=False, onednn="off", **QUIET)), ("fast", fast)):
        model = _model()
        lorakit.accelerate(model, settings)
        out = model(input_ids=ids)
        fn = model.model.layers[0].self_attn.q_proj(torch.randn(1, 2, 32, requires_grad=True)).grad_fn
        fused = "_LoraLinearBackward" in (type(fn).__name__, type(fn.next_functions[0][0]).__name__)
        assert fused == (name == "fast")
        results[name] = _loss_and_grads(model, ids)
        del out
    for loss, grads in results.values():
        torch.testing.assert_close(loss.double(), loss_ref.double(), rtol=1e-5, atol=1e-6)
        for g, want in zip(grads, grads_ref):
            torch.testing.assert_close(g.double(), want.double(), rtol=1e-4, atol=1e-6)


def test_report_and_restore():
    model = _model()
    report = lorakit.accelerate(model, CpuSettings(onednn="off", threads=torch.get_num_threads(), **QUIET))
    assert report.applied and report.kernels == "torch" and report.choice.source == "settings"
    assert report.threads == torch.get_num_threads() and not report.freed_memory_kept
    assert report.grad_memory_params == 0 and isinstance(report.bf16_compute, bool)
    assert lorakit.restore(model) is model


def test_a_model_with_nothing_on_the_cpu_is_left_alone():
    model = _model().to("meta")
    report = lorakit.accelerate(model, CpuSettings(onednn="on", **QUIET))
    assert not report.applied and not any("forward" in m.__dict__ for m in model.modules())


def test_a_cpu_model_dispatches_by_the_tensors_device():
    """The CPU backend answers for CPU tensors only: a device type without a backend takes the generic path."""
    from lorakit import backend

    layer = lorakit.lora_layers(_model())["model.layers.0.self_attn.q_proj"]
    x = torch.randn(2, 32)
    assert backend.lora_forward(layer, x) is not None
    assert backend.lora_forward(layer, x.to("meta")) is None  # no backend registered for "meta"
    with torch.no_grad():
        torch.testing.assert_close(layer(x), copy.deepcopy(layer).to(torch.float64)(x.double()).float(),
                                   rtol=1e-5, atol=1e-5)
