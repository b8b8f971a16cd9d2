"""Injection keeps the model what it was: same class, same API, and unload gives the original back bit for bit."""

import copy

import pytest
import torch
from torch import nn

import lorakit
from lorakit_testing import TinyMLP, make_tiny_llama
from lorakit import LoraConfig, LoraLinear, add_adapter, merge_and_unload, unload


def _tree(model):
    return [(name, type(m).__name__) for name, m in model.named_modules()]


def test_model_stays_a_transformers_model(tiny_llama, input_ids):
    cls = type(tiny_llama)
    add_adapter(tiny_llama, LoraConfig(target_modules="all-linear"))
    assert type(tiny_llama) is cls
    assert tiny_llama.config.hidden_size == 32
    out = tiny_llama.generate(input_ids[:1, :4], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)
    layer = tiny_llama.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoraLinear) and isinstance(layer.base_layer, nn.Linear)


def test_unload_restores_tree_and_outputs_bit_for_bit(tiny_llama, input_ids):
    tree, state = _tree(tiny_llama), copy.deepcopy(tiny_llama.state_dict())
    before = tiny_llama(input_ids).logits
    add_adapter(tiny_llama, LoraConfig(target_modules="all-linear", init_lora_weights=False,
                                       modules_to_save=["lm_head"]))
    assert not torch.equal(tiny_llama(input_ids).logits, before)
    base = unload(tiny_llama)
    assert base is tiny_llama
    assert _tree(base) == tree
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in state.items())
    assert torch.equal(base(input_ids).logits, before)


def test_unload_after_merge_restores_weights(tiny_llama, input_ids):
    from lorakit import merge_adapter

    before = tiny_llama(input_ids).logits
    add_adapter(tiny_llama, LoraConfig(target_modules="all-linear", init_lora_weights=False))
    merge_adapter(tiny_llama)
    base = unload(tiny_llama)
    torch.testing.assert_close(base(input_ids).logits, before, atol=1e-5, rtol=0)


def test_merge_and_unload_matches_adapter_model(tiny_llama, input_ids):
    add_adapter(tiny_llama, LoraConfig(target_modules="all-linear", init_lora_weights=False,
                                       modules_to_save=["lm_head"]))
    with torch.no_grad():
        tiny_llama.lm_head.modules_to_save["default"].weight.mul_(1.5)
    expected = tiny_llama(input_ids).logits
    merged = merge_and_unload(tiny_llama)
    assert not any(isinstance(m, LoraLinear) for m in merged.modules())
    assert _tree(merged) == _tree(make_tiny_llama())
    torch.testing.assert_close(merged(input_ids).logits, expected, atol=1e-5, rtol=0)


def test_merge_and_unload_safe_merge_names_layer(tiny_llama):
    add_adapter(tiny_llama, LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    with torch.no_grad():
        tiny_llama.model.layers[1].self_attn.q_proj.lora_B["default"].weight.fill_(float("nan"))
    with pytest.raises(ValueError, match="layers.1.self_attn.q_proj"):
        merge_and_unload(tiny_llama, safe_merge=True)


def test_plain_module_any_tree():
    model = TinyMLP()
    x = torch.randn(5, 8)
    ref = model(x)
    add_adapter(model, LoraConfig(target_modules=["up", "down"], r=2, lora_alpha=4, init_lora_weights=False))
    up = model.up
    expected_up = x @ up.base_layer.weight.T + up.base_layer.bias + 2.0 * x @ up.lora_A["default"].weight.T @ \
        up.lora_B["default"].weight.T
    torch.testing.assert_close(model.up(x), expected_up)
    assert torch.equal(unload(model)(x), ref)


def test_gpt2_conv1d_fan_in_fan_out():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=16)).eval()
    ids = torch.randint(0, 50, (1, 6))
    add_adapter(model, LoraConfig(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, init_lora_weights=False))
    layer = model.transformer.h[0].attn.c_attn
    assert layer.lora_A["default"].weight.shape == (8, 16) and layer.lora_B["default"].weight.shape == (48, 8)
    expected = model(ids).logits
    merged = merge_and_unload(model)
    torch.testing.assert_close(merged(ids).logits, expected, atol=1e-5, rtol=0)


def test_duplicate_and_bad_names():
    model = TinyMLP()
    add_adapter(model, LoraConfig(target_modules=["up"]))
    with pytest.raises(ValueError, match="already exists"):
        add_adapter(model, LoraConfig(target_modules=["up"]))
    with pytest.raises(ValueError, match="one path segment"):
        add_adapter(model, LoraConfig(target_modules=["up"]), adapter_name="a.b")


@pytest.mark.parametrize("name", ["/abs", "a/b", "..", ".", "", "a b", "x" * 65, "é", "-x", None, 3])
def test_adapter_names_are_one_safe_path_segment(tmp_path, name):
    # issue 12 item 7: "/abs" made save_adapter write at the filesystem root, "a/b" nested.
    model = TinyMLP()
    add_adapter(model, LoraConfig(target_modules=["up"]))
    with pytest.raises(ValueError, match="one path segment"):
        add_adapter(model, LoraConfig(target_modules=["down"]), adapter_name=name)
    assert list(lorakit.adapter_configs(model)) == ["default"]


def test_a_failed_add_registers_nothing(tiny_llama):
    # modules_to_save that matches nothing used to fail after the LoRA layers were injected: "already exists" on retry
    tree = [n for n, _ in tiny_llama.named_modules()]
    with pytest.raises(ValueError, match="modules_to_save"):
        add_adapter(tiny_llama, LoraConfig(target_modules=["q_proj"], modules_to_save=["no_such_module"]))
    assert [n for n, _ in tiny_llama.named_modules()] == tree and not lorakit.adapter_configs(tiny_llama)
    add_adapter(tiny_llama, LoraConfig(target_modules=["q_proj"]))  # the retry works
    assert list(lorakit.adapter_configs(tiny_llama)) == ["default"]


def _poison_last_layer(model):
    layers = list(lorakit.lora_layers(model).values())
    with torch.no_grad():
        layers[-1].lora_B["default"].weight[0, 0] = float("inf")
    return layers


@pytest.mark.parametrize("safe_merge", [True, False])
def test_merge_and_unload_checks_every_layer_before_merging(tiny_llama, safe_merge):
    # issue 12 item 9: inf in the last layer raised after 13 of 14 layers were merged and unwrapped
    add_adapter(tiny_llama, LoraConfig(target_modules="all-linear", init_lora_weights=False))
    _poison_last_layer(tiny_llama)
    state = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    n_layers = len(lorakit.lora_layers(tiny_llama))
    with pytest.raises(ValueError, match=r"down_proj: adapter 'default' has non-finite"):
        merge_and_unload(tiny_llama, safe_merge=safe_merge)
    assert len(lorakit.lora_layers(tiny_llama)) == n_layers
    after = tiny_llama.state_dict()
    assert all(torch.equal(after[k], v) for k, v in state.items() if torch.isfinite(v).all())


def test_safe_merge_refuses_float16_overflow_everywhere_first():
    model = TinyMLP().half()
    add_adapter(model, LoraConfig(target_modules=["up", "down"], init_lora_weights=False))
    with torch.no_grad():
        model.down.lora_B["default"].weight.fill_(1e3)
        model.down.lora_A["default"].weight.fill_(1e3)
    before = model.up.base_layer.weight.clone()
    with pytest.raises(ValueError, match="down: merging adapters \\['default'\\] gives non-finite float16"):
        merge_and_unload(model, safe_merge=True)
    assert torch.equal(model.up.base_layer.weight, before) and not model.up.merged_adapters


def test_merge_without_adapters_raises():
    with pytest.raises(ValueError, match="no LoRA layers"):
        merge_and_unload(TinyMLP())


def test_fields_assigned_after_the_config_was_built_are_checked_too():
    cfg = LoraConfig(target_modules=["up"])
    cfg.lora_alpha = float("nan")
    model = TinyMLP()
    with pytest.raises(lorakit.fields.ConfigError, match="lora_alpha=nan"):
        add_adapter(model, cfg)
    assert not lorakit.adapter_configs(model)


def test_unload_of_a_merged_bf16_model_warns_about_rounding(tiny_llama):
    tiny_llama.to(torch.bfloat16)
    add_adapter(tiny_llama, LoraConfig(target_modules="all-linear", init_lora_weights=False))
    lorakit.merge_adapter(tiny_llama)
    with pytest.warns(UserWarning, match="could not restore the exact base weights"):
        unload(tiny_llama)
