"""recompute_cheap_activations: the same gradients bit for bit, fewer tensors kept, and out of the way when it must be."""

import pytest
import torch

import lorakit.recompute as recompute
from lorakit_testing import TinyMLP, make_tiny_llama
from lorakit import LoraConfig, add_adapter, recompute_cheap_activations, stop_recomputing
from lorakit.quant import quantize_model_
from lorakit.losses import sft_loss

N_LAYERS = 2
# per layer: input-norm output (kept once by the fused q/k/v LoRA nodes, or 3x on other paths), post-norm output
# (gate, up), act(gate) (kept by the product) and the product (kept by down_proj's LoRA)


def _batch(seed=0):
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def _grads(model, batch, dropout_seed=0):
    torch.manual_seed(dropout_seed)
    loss, n = sft_loss(model, batch)
    (loss / n).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads


def _count_recipes(monkeypatch):
    """How many saved tensors were replaced by a recipe (counted as autograd packs them)."""
    count = [0]
    real = recompute._Saved.__init__

    def counting(self, *args):
        count[0] += 1
        real(self, *args)

    monkeypatch.setattr(recompute._Saved, "__init__", counting)
    return count


def _lora_llama(dropout=0.0, quantized=False):
    model = make_tiny_llama()
    if quantized:
        quantize_model_(model, "nf4", compute_dtype=torch.float32, skip_modules=("lm_head",))
    add_adapter(model, LoraConfig(target_modules="all-linear", init_lora_weights=False, lora_dropout=dropout))
    return model.train()


@pytest.mark.parametrize("dropout,quantized", [(0.0, False), (0.1, False), (0.0, True)])
def test_gradients_are_bitwise_the_same_and_tensors_are_dropped(monkeypatch, dropout, quantized):
    model = _lora_llama(dropout, quantized)
    batch = _batch()
    expected = _grads(model, batch)
    count = _count_recipes(monkeypatch)
    recompute_cheap_activations(model)
    got = _grads(model, batch)
    assert expected.keys() == got.keys() and len(got) == 14 * N_LAYERS
    assert all(torch.equal(expected[k], got[k]) for k in got)
    assert count[0] >= 5 * N_LAYERS  # norm outputs, act(gate) and the product of every layer


def test_full_finetuning_gradients_are_the_same():
    model = make_tiny_llama().train().requires_grad_(True)
    batch = _batch(1)
    expected = _grads(model, batch)
    recompute_cheap_activations(model)
    got = _grads(model, batch)
    assert all(torch.equal(expected[k], got[k]) for k in got)


def test_adapter_added_afterwards_is_seen(monkeypatch):
    model = make_tiny_llama().train()
    recompute_cheap_activations(model)
    add_adapter(model, LoraConfig(target_modules="all-linear", init_lora_weights=False))
    count = _count_recipes(monkeypatch)
    _grads(model, _batch())
    assert count[0] >= 5 * N_LAYERS


def test_no_grad_and_gradient_checkpointing_are_left_alone(monkeypatch):
    model = _lora_llama()
    batch = _batch()
    expected = _grads(model, batch)
    recompute_cheap_activations(model)
    count = _count_recipes(monkeypatch)
    with torch.no_grad():
        model(input_ids=batch["input_ids"])
    assert count[0] == 0
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    got = _grads(model, batch)
    assert count[0] == 0
    for k in got:
        torch.testing.assert_close(got[k], expected[k], atol=1e-6, rtol=1e-5)


def test_stop_and_twice_and_unsupported_models(monkeypatch):
    model = _lora_llama()
    hooks_before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    recompute_cheap_activations(model)
    recompute_cheap_activations(model)  # no-op
    added = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) - hooks_before
    assert added == N_LAYERS * (2 + 2 + 2)  # layer enter/exit, two norms, MLP install/remove
    stop_recomputing(model)
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks_before
    count = _count_recipes(monkeypatch)
    _grads(model, _batch())
    assert count[0] == 0
    with pytest.raises(ValueError, match="gated MLP"):
        recompute_cheap_activations(TinyMLP())
    plain = TinyMLP()
    assert recompute_cheap_activations(plain, strict=False) is plain and not plain._forward_hooks


def test_exception_in_forward_does_not_leave_hooks_active():
    model = _lora_llama()
    recompute_cheap_activations(model)
    def fail(module, args):
        assert torch._C._autograd._top_saved_tensors_default_hooks(True) is not None  # inside the layer: active
        raise RuntimeError("boom")

    model.model.layers[0].mlp.down_proj.register_forward_pre_hook(fail)
    with pytest.raises(RuntimeError, match="boom"):
        model(input_ids=torch.zeros((1, 4), dtype=torch.long))
    assert torch._C._autograd._top_saved_tensors_default_hooks(True) is None


def test_bfloat16_model_gradients_are_bitwise_the_same(monkeypatch):
    model = make_tiny_llama().to(torch.bfloat16)
    add_adapter(model, LoraConfig(target_modules="all-linear", init_lora_weights=False))
    model.train()
    batch = _batch(2)
    expected = _grads(model, batch)
    count = _count_recipes(monkeypatch)
    recompute_cheap_activations(model)
    got = _grads(model, batch)
    assert next(iter(got.values())).dtype == torch.float32  # float32 adapters on a bfloat16 base
    assert all(torch.equal(expected[k], got[k]) for k in got)
    assert count[0] >= 5 * N_LAYERS  # they keep the bfloat16 x (no float32 copy), so it is rebuilt too
