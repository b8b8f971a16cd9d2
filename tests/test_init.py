"""OLoRA / PiSSA: outputs unchanged at step 0, and the saved adapter applies to the ORIGINAL base."""

import pytest
import torch

from lorakit_testing import make_tiny_llama
from lorakit import LoraConfig, add_adapter, load_adapter, save_adapter
from lorakit.init import to_plain_lora


@pytest.mark.parametrize("method", ["olora", "pissa"])
def test_init_keeps_outputs_and_rewrites_base(method, input_ids):
    model = make_tiny_llama()
    before = model(input_ids).logits
    w0 = model.model.layers[0].self_attn.q_proj.weight.clone()
    add_adapter(model, LoraConfig(target_modules="all-linear", r=4, lora_alpha=8, init_lora_weights=method))
    layer = model.model.layers[0].self_attn.q_proj
    assert not torch.allclose(layer.base_layer.weight, w0)  # base was rewritten
    torch.testing.assert_close(model(input_ids).logits, before, atol=1e-5, rtol=0)


def test_olora_factors_are_qr():
    model = make_tiny_llama()
    w = model.model.layers[0].mlp.up_proj.weight.clone()  # (48, 32)
    add_adapter(model, LoraConfig(target_modules=["up_proj"], r=4, lora_alpha=4, init_lora_weights="olora"))
    layer = model.model.layers[0].mlp.up_proj
    B, A = layer.lora_B["default"].weight, layer.lora_A["default"].weight
    torch.testing.assert_close(B.T @ B, torch.eye(4), atol=1e-5, rtol=0)  # orthonormal columns of Q
    q, r = torch.linalg.qr(w)
    torch.testing.assert_close(A, r[:4], atol=1e-5, rtol=0)


def test_pissa_takes_top_singular_values():
    model = make_tiny_llama()
    w = model.model.layers[0].mlp.up_proj.weight.clone()
    add_adapter(model, LoraConfig(target_modules=["up_proj"], r=3, lora_alpha=6, init_lora_weights="pissa"))
    layer = model.model.layers[0].mlp.up_proj
    delta = 2.0 * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    torch.testing.assert_close(delta, (u[:, :3] * s[:3]) @ vh[:3], atol=1e-5, rtol=0)


def test_to_plain_lora_product():
    A, B, A0, B0 = torch.randn(2, 5), torch.randn(4, 2), torch.randn(2, 5), torch.randn(4, 2)
    A2, B2 = to_plain_lora(A, B, A0, B0)
    torch.testing.assert_close(B2 @ A2, B @ A - B0 @ A0)


@pytest.mark.parametrize("method", ["olora", "pissa"])
@pytest.mark.parametrize("rslora", [False, True])
def test_trained_adapter_converted_applies_to_original_base(method, rslora, tmp_path, input_ids):
    model = make_tiny_llama()
    add_adapter(model, LoraConfig(target_modules="all-linear", r=4, lora_alpha=8, use_rslora=rslora,
                                  init_lora_weights=method))
    with torch.no_grad():  # "training"
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    expected = model(input_ids).logits
    save_adapter(model, tmp_path)
    original = make_tiny_llama()  # same seed: the weights before OLoRA/PiSSA rewrote them
    load_adapter(original, tmp_path)
    assert original.model.layers[0].self_attn.q_proj.r["default"] == 8
    torch.testing.assert_close(original(input_ids).logits, expected, atol=1e-4, rtol=0)
    peft = pytest.importorskip("peft")
    theirs = peft.PeftModel.from_pretrained(make_tiny_llama(), tmp_path).eval()
    torch.testing.assert_close(theirs(input_ids).logits, expected, atol=1e-4, rtol=0)


def test_unconverted_save_warns_on_load(tmp_path):
    model = make_tiny_llama()
    add_adapter(model, LoraConfig(target_modules=["q_proj"], init_lora_weights="olora"))
    save_adapter(model, tmp_path, convert_to_lora=False)
    with pytest.warns(UserWarning, match="rewritten"):
        load_adapter(make_tiny_llama(), tmp_path)


def test_rank_too_large():
    model = make_tiny_llama()
    with pytest.raises(ValueError, match="lower the rank"):
        add_adapter(model, LoraConfig(target_modules=["k_proj"], r=40, init_lora_weights="pissa"))
