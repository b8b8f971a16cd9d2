"""convert: in-place quantization, streaming load from safetensors, and transformers + bitsandbytes checkpoints."""

import json

import pytest
import torch
from torch import nn

from lorakit_testing import TinyMLP, tiny_llama_config
from lorakit.quant import Int8Linear, NF4Linear, load_quantized, quantize_model_

QUANTIZED = (NF4Linear, Int8Linear)


def _config(**overrides):
    # Sizes are multiples of 64 so bitsandbytes' CPU dequantization (used as the reference) is exact.
    return tiny_llama_config(vocab_size=128, hidden_size=64, intermediate_size=128, **overrides)


def _save_fp32(path, tie=False):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(_config(tie_word_embeddings=tie))
    model.save_pretrained(path)
    return path


def _load_fp32(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _quantized_paths(model):
    return [n for n, m in model.named_modules() if isinstance(m, QUANTIZED)]


def test_quantize_model_replaces_linears_and_skips(tmp_path):
    model = TinyMLP()
    quantize_model_(model, "nf4", compute_dtype=torch.float32, skip_modules=("down",))
    assert isinstance(model.up, NF4Linear) and isinstance(model.down, nn.Linear)
    model = _load_fp32(_save_fp32(tmp_path))
    quantize_model_(model, "int8", skip_modules=("lm_head", "model.layers.1.mlp.up_proj"))
    paths = _quantized_paths(model)
    assert len(paths) == 13 and "model.layers.1.mlp.up_proj" not in paths
    assert isinstance(model.lm_head, nn.Linear)
    with pytest.raises(ValueError, match="quantization"):
        quantize_model_(TinyMLP(), "int4")


@pytest.mark.parametrize("quantization", ["nf4", "fp4", "int8"])
@pytest.mark.parametrize("tie", [False, True])
def test_load_quantized_equals_quantize_model(tmp_path, quantization, tie):
    path = _save_fp32(tmp_path, tie=tie)
    reference = quantize_model_(_load_fp32(path), quantization, compute_dtype=torch.float32)
    model = load_quantized(path, quantization, compute_dtype=torch.float32)
    assert _quantized_paths(model) == _quantized_paths(reference) and len(_quantized_paths(model)) == 14
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    ours, theirs = model.state_dict(), reference.state_dict()
    assert list(ours) == list(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
    assert not any(t.device.type == "meta" for t in ours.values())


def test_load_quantized_keeps_non_quantized_in_dtype(tmp_path):
    path = _save_fp32(tmp_path)
    model = load_quantized(path, "nf4", dtype=torch.bfloat16)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.model.layers[0].self_attn.q_proj.compute_dtype == torch.bfloat16
    assert model.model.rotary_emb.inv_freq.device.type == "cpu"  # non-persistent buffers are real


def test_tied_target_raises(tmp_path):
    path = _save_fp32(tmp_path, tie=True)
    with pytest.raises(ValueError, match="tied"):
        load_quantized(path, "nf4", skip_modules=())


def test_checkpoint_mismatch_raises(tmp_path):
    from safetensors.torch import load_file, save_file

    _config().save_pretrained(tmp_path / "empty")
    with pytest.raises(ValueError, match="safetensors"):
        load_quantized(tmp_path / "empty", "nf4")
    path = _save_fp32(tmp_path / "extra")
    tensors = load_file(path / "model.safetensors")
    save_file({**tensors, "model.extra.weight": torch.zeros(2)}, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="model.extra.weight"):
        load_quantized(path, "nf4")
    del tensors["model.norm.weight"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="model.norm.weight"):
        load_quantized(path, "nf4")


def _bnb_checkpoint(src, dst):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(src, quantization_config=config, device_map="cpu", dtype=torch.float32)
    model.save_pretrained(dst)
    return model, config


def _bnb_weights(model):
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbF

    return {n: bnbF.dequantize_4bit(m.weight.data, m.weight.quant_state)
            for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def test_bitsandbytes_checkpoint_loads_into_ours(tmp_path):
    src = _save_fp32(tmp_path / "fp32")
    bnb_model, _ = _bnb_checkpoint(src, tmp_path / "bnb")
    expected = _bnb_weights(bnb_model)
    assert len(expected) == 14
    # 1) streaming loader on the pre-quantized checkpoint
    model = load_quantized(tmp_path / "bnb", "nf4", compute_dtype=torch.float32)
    for name, w in expected.items():
        assert torch.equal(model.get_submodule(name).dequantize(), w), name
    # 2) our own quantization of the fp32 checkpoint gives the same bytes
    ours = quantize_model_(_load_fp32(src), "nf4", compute_dtype=torch.float32)
    bnb_sd = bnb_model.state_dict()
    for key, value in ours.state_dict().items():
        assert torch.equal(value, bnb_sd[key]), key
    # 3) load_state_dict of the in-memory transformers state dict into our modules
    fresh = quantize_model_(_load_fp32(src), "fp4", double_quant=False, compute_dtype=torch.float32)
    fresh.load_state_dict(bnb_sd)
    for name, w in expected.items():
        assert torch.equal(fresh.get_submodule(name).dequantize(), w), name


def test_our_checkpoint_loads_into_transformers_bitsandbytes(tmp_path):
    from transformers import AutoModelForCausalLM

    src = _save_fp32(tmp_path / "fp32")
    _, config = _bnb_checkpoint(src, tmp_path / "unused")
    ours = load_quantized(src, "nf4", compute_dtype=torch.float32)
    ours.save_pretrained(tmp_path / "ours")
    cfg_file = tmp_path / "ours" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["quantization_config"] = config.to_dict()
    cfg_file.write_text(json.dumps(cfg))
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "ours", device_map="cpu")
    weights = _bnb_weights(theirs)
    assert len(weights) == 14
    for name, w in weights.items():
        assert torch.equal(ours.get_submodule(name).dequantize(), w), name
