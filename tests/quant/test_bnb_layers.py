"""Adapters on bitsandbytes' own Linear4bit / Linear8bitLt (a model quantized by transformers): merge, dequantize,
save. Checked against bitsandbytes' dequantization and the formula W + s·B A in float32."""

import copy

import pytest
import torch

from lorakit_testing import make_tiny_llama
from lorakit import (LoraConfig, add_adapter, load_adapter, lora_layers, merge_and_unload, save_with_adapters,
                     verify_merge)
from lorakit.quant import dequantize_model_

bnb = pytest.importorskip("bitsandbytes")


def _bnb_model(directory, kind):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if not (directory / "config.json").exists():
        make_tiny_llama(hidden_size=64, intermediate_size=128).save_pretrained(directory)  # bnb's CPU path needs ≥ 64
    q = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                            bnb_4bit_compute_dtype=torch.float32) if kind == "4bit" else
         BitsAndBytesConfig(load_in_8bit=True))
    return AutoModelForCausalLM.from_pretrained(directory, quantization_config=q, device_map="cpu").eval()


def _dequantized(layer):
    import bitsandbytes.functional as F

    layer.state_dict()  # bitsandbytes unpacks a weight repacked for its CPU kernel when it saves
    w = layer.weight
    if isinstance(layer, bnb.nn.Linear4bit):
        return F.dequantize_4bit(w.data, w.quant_state).float()
    scb = w.SCB if getattr(w, "SCB", None) is not None else layer.state.SCB
    return w.data.float() * scb.float()[:, None] / 127


BASE = {}  # LoRA layer path -> its base weight as bitsandbytes dequantizes it


@pytest.fixture(params=["4bit", "8bit"])
def adapted(request, tmp_path, input_ids):
    model = _bnb_model(tmp_path / "base", request.param)
    add_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    with torch.no_grad():
        model(input_ids)  # a first inference call (bitsandbytes may repack the 4-bit weight for its CPU kernel)
    BASE.clear()
    BASE.update({p: _dequantized(layer.base_layer) for p, layer in lora_layers(model).items()})
    return model


def _expected(path, layer):
    A, B = layer.lora_A["default"].weight.float(), layer.lora_B["default"].weight.float()
    return BASE[path] + layer.scaling["default"] * B @ A


def test_dequantize_then_merge_is_exact(adapted, input_ids):
    wanted = {p: _expected(p, layer) for p, layer in lora_layers(adapted).items()}
    dense = dequantize_model_(copy.deepcopy(adapted), torch.float32)
    assert not any(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in dense.modules())
    assert getattr(dense, "hf_quantizer", None) is None and not hasattr(dense.config, "quantization_config")
    merged = merge_and_unload(copy.deepcopy(dense))
    for path, w in wanted.items():
        torch.testing.assert_close(merged.get_submodule(path).weight, w, atol=1e-6, rtol=1e-6)
    assert verify_merge(dense, merged, input_ids).max_abs_diff < 1e-5


def test_merge_into_the_bnb_layer_requantizes_with_a_warning(adapted):
    layers = lora_layers(adapted)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B["default"].weight.mul_(10)  # an update well above 4-bit rounding
    wanted = {p: _expected(p, layer) for p, layer in layers.items()}
    deltas = {p: (w - BASE[p]).abs().max().item() for p, w in wanted.items()}
    kind = type(next(iter(layers.values())).base_layer)
    with pytest.warns(UserWarning, match="re-quantization moved merged weights"):
        merged = merge_and_unload(adapted)
    for path, w in wanted.items():
        layer = merged.get_submodule(path)
        assert type(layer) is kind  # still a bitsandbytes layer
        error = (_dequantized(layer) - w).abs().max().item()
        assert error < 0.5 * deltas[path]  # the update is in the weight (not lost), up to re-quantization


def test_dequantize_model_to_bfloat16_runs(adapted, input_ids):
    with torch.no_grad():
        want = adapted(input_ids).logits
        dense = dequantize_model_(adapted, torch.bfloat16)
        got = merge_and_unload(dense)(input_ids).logits  # used to raise a float/bfloat16 dtype error
    assert got.dtype == torch.bfloat16
    assert (got.float() - want).abs().max() < 0.05 * want.abs().max()


def test_saved_model_loads_in_transformers_and_the_adapter_beside_it(adapted, tmp_path, input_ids):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        want = adapted(input_ids).logits
    save_with_adapters(adapted, tmp_path / "out")
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert not [k for k in keys if "lora_" in k or "base_layer" in k]
    assert lora_layers(adapted)  # the model is unchanged
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "out", device_map="cpu").eval()
    assert type(base.model.layers[0].mlp.up_proj) is type(lora_layers(adapted)["model.layers.0.mlp.up_proj"].base_layer)
    load_adapter(base, tmp_path / "out" / "adapter")
    with torch.no_grad():
        got = base(input_ids).logits
    # 4-bit: bitsandbytes' CPU kernel repacks the weight at each load / first call, rounding its block scales
    assert (got - want).abs().max() <= (1e-5 if "8bit" in type(base.model.layers[0].mlp.up_proj).__name__ else 5e-3)


def test_lorakit_quantized_model_saves_base_keys_only(tmp_path, input_ids):
    from transformers import AutoModelForCausalLM

    from lorakit.quant import quantize_model_

    model = make_tiny_llama(hidden_size=64, intermediate_size=128)
    quantize_model_(model, "nf4", compute_dtype=torch.float32)
    add_adapter(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    save_with_adapters(model, tmp_path / "out")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "out", device_map="cpu")
    assert type(theirs.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    load_adapter(theirs, tmp_path / "out" / "adapter")
    assert len(lora_layers(theirs)) == 14
