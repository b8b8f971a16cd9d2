"""fast_frozen_linears (applied by accelerate where oneDNN is the faster kernel): the frozen nn.Linear layers give
the same outputs and gradients through oneDNN."""

import copy
import pickle

import pytest
import torch
from torch import nn

import lorakit
from lorakit.cpu import CpuSettings, fast_frozen_linears, stop_fast_frozen_linears
from lorakit.cpu.frozen import _FrozenForward
from lorakit.cpu.matmul import onednn
from lorakit_testing import make_tiny_llama

needs_onednn = pytest.mark.skipif(not onednn().usable(torch.zeros(1)), reason="needs the oneDNN float32 path")


def _qv_model(seed=0):
    model = make_tiny_llama(seed)
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))
    return model


def _loss_and_grads(model, ids, checkpointing=False):
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


@pytest.mark.parametrize("checkpointing", [False, True])
def test_same_loss_and_adapter_grads_as_plain_linears(checkpointing):
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    plain = _qv_model()
    fast = fast_frozen_linears(copy.deepcopy(plain))
    assert sum(isinstance(m.__dict__.get("forward"), _FrozenForward) for m in fast.modules()) > 0
    assert list(fast.state_dict()) == list(plain.state_dict())
    loss_ref, grads_ref = _loss_and_grads(plain, ids, checkpointing)
    loss, grads = _loss_and_grads(fast, ids, checkpointing)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    assert grads.keys() == grads_ref.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=1e-6)


@needs_onednn
@pytest.mark.parametrize("onednn_setting", ["on", "off"])
def test_accelerate_routes_the_frozen_layers_only_where_onednn_was_chosen(onednn_setting):
    model = _qv_model()
    report = lorakit.accelerate(model, CpuSettings(onednn=onednn_setting, keep_freed_memory=False))
    routed = {n for n, m in model.named_modules() if isinstance(m.__dict__.get("forward"), _FrozenForward)}
    unwrapped = {n for n, m in model.named_modules()
                 if type(m) is nn.Linear and not m.weight.requires_grad and not n.endswith("base_layer")}
    assert report.kernels == ("onednn" if onednn_setting == "on" else "torch")
    if onednn_setting == "on":
        assert "lm_head" in unwrapped and any(n.endswith("k_proj") for n in unwrapped) and unwrapped <= routed
        assert report.frozen_linears_routed == len(routed)
    else:
        assert not routed and report.frozen_linears_routed == 0
    lorakit.restore(model)
    assert not any(isinstance(m.__dict__.get("forward"), _FrozenForward) for m in model.modules())


def test_trainable_weight_falls_back_to_f_linear_with_its_gradient():
    layer = nn.Linear(8, 3)
    fast_frozen_linears(layer)
    x = torch.randn(5, 8, requires_grad=True)
    layer(x).sum().backward()
    torch.testing.assert_close(layer.weight.grad, x.detach().sum(0).expand(3, 8))
    assert layer.bias.grad is not None


def test_bfloat16_input_is_plain_f_linear():
    layer = nn.Linear(8, 3).bfloat16().requires_grad_(False)
    fast_frozen_linears(layer)
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    assert torch.equal(layer(x), nn.functional.linear(x, layer.weight, layer.bias))


def test_twice_is_a_noop_and_stop_restores_the_class_forward():
    model = _qv_model()
    fast_frozen_linears(model)
    forwards = {id(m): m.__dict__.get("forward") for m in model.modules()}
    fast_frozen_linears(model)
    assert forwards == {id(m): m.__dict__.get("forward") for m in model.modules()}
    stop_fast_frozen_linears(model)
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_copies_and_pickles_keep_their_own_forward():
    model = fast_frozen_linears(_qv_model())
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        head = other.lm_head
        assert head.__dict__["forward"].module is head
        with torch.no_grad():
            torch.testing.assert_close(other(input_ids=ids).logits, ref, rtol=0, atol=0)


def test_before_add_adapter_and_after_unload():
    """Applied first, the wrapped layers keep it as base layers; unload hands them back with the same outputs."""
    ids = torch.randint(0, 64, (1, 7), generator=torch.Generator().manual_seed(3))
    model = fast_frozen_linears(make_tiny_llama(0).requires_grad_(False))
    with torch.no_grad():
        base_logits = model(input_ids=ids).logits
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                  init_lora_weights=False))
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    lorakit.unload(model)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, base_logits)


def test_a_dropped_model_is_freed_without_the_garbage_collector():
    import gc
    import weakref

    model = fast_frozen_linears(make_tiny_llama(0))
    head = weakref.ref(model.lm_head)
    gc.disable()
    try:
        del model
        assert head() is None  # no module -> forward -> module cycle keeps the weights alive
    finally:
        gc.enable()
