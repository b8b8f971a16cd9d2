"""LoRA on quantized bases (QLoRA): the same LoRA layer wraps NF4/int8 linears unchanged."""

import copy

import pytest
import torch

from lorakit_testing import make_tiny_llama
from lorakit import LoraConfig, add_adapter, merge_and_unload, trainable_parameters, verify_merge
from lorakit.quant import Int8Linear, NF4Linear, dequantize_model_, quantize_model_
from lorakit.losses import sft_loss


@pytest.mark.parametrize("quant", ["nf4", "fp4", "int8"])
def test_lora_on_quantized_base_equals_formula(quant):
    model = make_tiny_llama(intermediate_size=64)
    quantize_model_(model, quant, compute_dtype=torch.float32)
    add_adapter(model, LoraConfig(target_modules=["up_proj"], r=4, lora_alpha=8, init_lora_weights=False))
    layer = model.model.layers[0].mlp.up_proj
    assert isinstance(layer.base_layer, (NF4Linear, Int8Linear))
    x = torch.randn(3, 32)
    W = layer.base_layer.dequantize()
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    torch.testing.assert_close(layer(x), x @ W.T + 2.0 * x @ A.T @ B.T, atol=1e-5, rtol=1e-5)


def test_adapters_default_to_compute_dtype():
    model = make_tiny_llama(intermediate_size=64)
    quantize_model_(model, "nf4", compute_dtype=torch.bfloat16)
    add_adapter(model, LoraConfig(target_modules="all-linear"))
    assert model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.dtype == torch.bfloat16


def test_qlora_trains_only_adapters_and_loss_falls():
    model = make_tiny_llama(intermediate_size=64, initializer_range=0.3).train()
    quantize_model_(model, "nf4", compute_dtype=torch.float32)
    add_adapter(model, LoraConfig(target_modules="all-linear", r=8, lora_alpha=16))
    packed = {n: b.clone() for n, b in model.named_buffers()}
    report = trainable_parameters(model)
    assert 0 < report.percent < 50
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 96, (4, 12), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    losses = []
    for _ in range(25):
        loss, n = sft_loss(model, batch)
        (loss / n).backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item() / n)
    assert losses[-1] < 0.6 * losses[0]
    assert all(torch.equal(b, packed[n]) for n, b in model.named_buffers())  # the 4-bit base never changes


def test_merge_into_nf4_warns_and_dequantized_export_is_exact(tiny_llama, input_ids):
    model = make_tiny_llama(intermediate_size=64)
    quantize_model_(model, "nf4", compute_dtype=torch.float32)
    add_adapter(model, LoraConfig(target_modules="all-linear", init_lora_weights=False))
    with pytest.warns(UserWarning, match=r"re-quantization moved merged weights by up to \d"):
        merged_4bit = merge_and_unload(copy.deepcopy(model))
    assert isinstance(merged_4bit.model.layers[0].mlp.up_proj, NF4Linear)
    lossy = verify_merge(model, merged_4bit, input_ids)
    exported = merge_and_unload(dequantize_model_(copy.deepcopy(model), torch.float32))
    exact = verify_merge(model, exported, input_ids)
    assert exact.max_abs_diff < 1e-5 < lossy.max_abs_diff


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_saved_quantized_checkpoint_loads_in_transformers_bitsandbytes(quant, tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    model = make_tiny_llama(intermediate_size=64, hidden_size=64)
    quantize_model_(model, quant, compute_dtype=torch.float32)
    model.save_pretrained(tmp_path)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cpu")
    ours_layer, their_layer = model.model.layers[0].mlp.up_proj, theirs.model.layers[0].mlp.up_proj
    assert type(their_layer).__name__ == ("Linear4bit" if quant == "nf4" else "Linear8bitLt")
    if quant == "nf4":
        import bitsandbytes.functional as bnbf

        got = bnbf.dequantize_4bit(their_layer.weight.data, their_layer.weight.quant_state).float()
    else:
        got = their_layer.weight.data.float() * their_layer.weight.SCB.float()[:, None] / 127
    torch.testing.assert_close(got, ours_layer.dequantize().float(), atol=1e-6, rtol=1e-3)
    dequantize_model_(model, torch.float32)
    assert not hasattr(model.config, "quantization_config")
