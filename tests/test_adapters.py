"""Several named adapters: switching, disabling, deleting, what trains."""

import warnings

import pytest
import torch

from lorakit import (LoraConfig, LoraLinear, active_adapters, add_adapter, delete_adapter, disable_adapter,
                     merge_adapter, set_adapter, trainable_parameters, unmerge_adapter)


def _two(model):
    add_adapter(model, LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False), "a")
    add_adapter(model, LoraConfig(target_modules=["o_proj"], r=2, init_lora_weights=False), "b")
    return model


def test_first_adapter_active_second_inactive(tiny_llama, input_ids):
    _two(tiny_llama)
    assert active_adapters(tiny_llama) == ["a"]
    out_a = tiny_llama(input_ids).logits
    set_adapter(tiny_llama, "b")
    out_b = tiny_llama(input_ids).logits
    assert not torch.allclose(out_a, out_b)
    set_adapter(tiny_llama, "a")
    torch.testing.assert_close(tiny_llama(input_ids).logits, out_a)


def test_disable_adapter_equals_base(tiny_llama, input_ids):
    base = tiny_llama(input_ids).logits
    _two(tiny_llama)
    merge_adapter(tiny_llama)  # disabling must also undo a merge
    with disable_adapter(tiny_llama):
        torch.testing.assert_close(tiny_llama(input_ids).logits, base, atol=1e-6, rtol=0)
    assert not torch.allclose(tiny_llama(input_ids).logits, base)


def test_trainable_set_is_exactly_active_lora(tiny_llama):
    _two(tiny_llama)
    names = {n for n, p in tiny_llama.named_parameters() if p.requires_grad}
    expected = {n for n, _ in tiny_llama.named_parameters() if (".lora_A.a." in n or ".lora_B.a." in n)}
    assert names == expected and len(names) == 8
    set_adapter(tiny_llama, "b")
    names = {n for n, p in tiny_llama.named_parameters() if p.requires_grad}
    assert names == {n for n, _ in tiny_llama.named_parameters() if ".lora_A.b." in n or ".lora_B.b." in n}


def test_trainable_report_counts(tiny_llama):
    total = sum(p.numel() for p in tiny_llama.parameters())
    add_adapter(tiny_llama, LoraConfig(r=4, target_modules=["q_proj"]))
    report = trainable_parameters(tiny_llama)
    assert report.trainable == 2 * (4 * 32 + 32 * 4)
    assert report.total == total + report.trainable
    assert f"{report.percent:.4f}" in str(report)


def test_bias_modes_make_biases_trainable():
    from lorakit_testing import TinyMLP

    model = TinyMLP()
    add_adapter(model, LoraConfig(target_modules=["up"], bias="lora_only"))
    assert model.up.base_layer.bias.requires_grad and not model.down.bias.requires_grad
    model = TinyMLP()
    add_adapter(model, LoraConfig(target_modules=["up"], bias="all"))
    assert model.up.base_layer.bias.requires_grad and model.down.bias.requires_grad


def test_delete_adapter(tiny_llama, input_ids):
    base = tiny_llama(input_ids).logits
    _two(tiny_llama)
    delete_adapter(tiny_llama, "a")
    assert active_adapters(tiny_llama) == ["b"]
    assert not any("a" in m.lora_A for m in tiny_llama.modules() if isinstance(m, LoraLinear))
    delete_adapter(tiny_llama, "b")
    torch.testing.assert_close(tiny_llama(input_ids).logits, base)
    with pytest.raises(ValueError, match="unknown adapter 'b'"):
        delete_adapter(tiny_llama, "b")


def test_set_unknown_adapter(tiny_llama):
    _two(tiny_llama)
    with pytest.raises(ValueError, match=r"unknown adapter 'c'.*\['a', 'b'\]"):
        set_adapter(tiny_llama, "c")


def test_merge_unmerge_idempotent_at_model_level(tiny_llama, input_ids):
    _two(tiny_llama)
    out = tiny_llama(input_ids).logits
    w = tiny_llama.model.layers[0].self_attn.q_proj.base_layer.weight.clone()
    merge_adapter(tiny_llama)
    merged_w = tiny_llama.model.layers[0].self_attn.q_proj.base_layer.weight.clone()
    merge_adapter(tiny_llama)
    assert torch.equal(merged_w, tiny_llama.model.layers[0].self_attn.q_proj.base_layer.weight)
    torch.testing.assert_close(tiny_llama(input_ids).logits, out, atol=1e-5, rtol=0)
    unmerge_adapter(tiny_llama)
    unmerge_adapter(tiny_llama)
    torch.testing.assert_close(tiny_llama.model.layers[0].self_attn.q_proj.base_layer.weight, w, atol=1e-6, rtol=0)


def test_switching_unmerges_the_old_adapter(tiny_llama):
    w = tiny_llama.model.layers[0].self_attn.q_proj.weight.clone()
    _two(tiny_llama)
    merge_adapter(tiny_llama)
    q = tiny_llama.model.layers[0].self_attn.q_proj
    assert not torch.allclose(q.base_layer.weight, w)
    set_adapter(tiny_llama, "b")
    assert q.merged_adapters == []
    torch.testing.assert_close(q.base_layer.weight, w, atol=1e-6, rtol=0)


def test_set_adapter_without_touching_trainability(tiny_llama, input_ids):
    _two(tiny_llama)
    before = {n for n, p in tiny_llama.named_parameters() if p.requires_grad}
    out_a = tiny_llama(input_ids).logits
    set_adapter(tiny_llama, "b", trainable=False)
    assert {n for n, p in tiny_llama.named_parameters() if p.requires_grad} == before  # still adapter "a"'s
    assert not torch.allclose(tiny_llama(input_ids).logits, out_a)  # but "b" computes


@pytest.mark.parametrize("names", [["a", "a"], ["a", "b", "a"]])
def test_set_adapter_refuses_a_name_twice(tiny_llama, input_ids, names):
    # issue 12 item 8: set_adapter(model, ["default", "default"]) applied the adapter twice
    _two(tiny_llama)
    out = tiny_llama(input_ids).logits
    with pytest.raises(ValueError, match=r"\['a'\] named more than once"):
        set_adapter(tiny_llama, names)
    assert active_adapters(tiny_llama) == ["a"]
    torch.testing.assert_close(tiny_llama(input_ids).logits, out, atol=0, rtol=0)


def _quantized(quant):
    from lorakit.quant import quantize_model_
    from lorakit_testing import make_tiny_llama

    model = make_tiny_llama(intermediate_size=64)
    quantize_model_(model, quant, compute_dtype=torch.float32)
    add_adapter(model, LoraConfig(target_modules="all-linear", init_lora_weights=False))
    return model


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_unmerge_on_a_quantized_base_restores_it_bit_for_bit(input_ids, quant):
    # issue 12 "Numbers": unmerge on an NF4 base changed logits with no warning
    model = _quantized(quant)
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    out = model(input_ids).logits
    with pytest.warns(UserWarning, match="re-quantization"):
        merge_adapter(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        unmerge_adapter(model)
    after = model.state_dict()
    assert sorted(after) == sorted(buffers) and all(torch.equal(after[k], v) for k, v in buffers.items())
    assert torch.equal(model(input_ids).logits, out)


def test_unmerging_part_of_a_quantized_merge_warns():
    model = _quantized("nf4")
    add_adapter(model, LoraConfig(target_modules=["q_proj"], init_lora_weights=False), "b")
    set_adapter(model, ["default", "b"])
    with pytest.warns(UserWarning):
        merge_adapter(model)
    with pytest.warns(UserWarning, match="could not restore the exact base weights"):
        set_adapter(model, "default")  # unmerges "b" only


def test_bf16_merge_unmerge_warns_with_the_drift(tiny_llama):
    # issue 12 "Numbers": bf16 merge -> unmerge drifted the base silently
    tiny_llama.to(torch.bfloat16)
    add_adapter(tiny_llama, LoraConfig(target_modules="all-linear", init_lora_weights=False))
    weight = tiny_llama.model.layers[0].mlp.up_proj.base_layer.weight.clone()
    merge_adapter(tiny_llama)
    with pytest.warns(UserWarning, match="could not restore the exact base weights") as record:
        unmerge_adapter(tiny_llama)
    drift = (tiny_llama.model.layers[0].mlp.up_proj.base_layer.weight.float() - weight.float()).abs().max().item()
    assert drift > 0
    reported = float(str(record[0].message).split("up to ")[1].split(" ")[0])
    assert reported >= drift * (1 - 1e-3)  # the message rounds to 4 digits


def test_backward_while_merged_is_a_clear_error(tiny_llama, input_ids):
    add_adapter(tiny_llama, LoraConfig(init_lora_weights=False))
    tiny_llama.train()
    merge_adapter(tiny_llama)
    loss = tiny_llama(input_ids).logits.sum()
    with pytest.raises(RuntimeError, match="merged into the base weights.*unmerge_adapter"):
        loss.backward()
    with torch.no_grad():  # inference while merged is fine
        tiny_llama(input_ids)
    unmerge_adapter(tiny_llama)
    tiny_llama(input_ids).logits.sum().backward()  # and training after unmerge works
    assert tiny_llama.model.layers[0].self_attn.q_proj.lora_A["default"].weight.grad is not None


def test_merge_refuses_nan_adapter_and_leaves_every_layer(tiny_llama):
    add_adapter(tiny_llama, LoraConfig(target_modules="all-linear", init_lora_weights=False))
    with torch.no_grad():
        tiny_llama.model.layers[1].mlp.down_proj.lora_A["default"].weight[0, 0] = float("nan")
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    with pytest.raises(ValueError, match="layers.1.mlp.down_proj: adapter 'default' has non-finite"):
        merge_adapter(tiny_llama)
    after = tiny_llama.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items() if torch.isfinite(v).all())
    assert not any(m.merged_adapters for m in tiny_llama.modules() if isinstance(m, LoraLinear))
