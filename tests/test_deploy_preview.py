"""`lorakit inspect --plan`: what a merge / GGUF export will write, and which engines serve the adapter unmerged."""

import pytest
import torch

import lorakit
from lorakit import LoraConfig, add_adapter, save_adapter
from lorakit.cli import main
from lorakit.deploy_preview import deploy_preview, serving_support
from lorakit.gguf_export import export_gguf
from lorakit.streamed_merge import merge_to_disk
from lorakit_testing import make_byte_tokenizer, make_tiny_llama


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("preview")
    tok = make_byte_tokenizer(merges=[("h", "e")])
    make_tiny_llama(0, vocab_size=len(tok), hidden_size=64, intermediate_size=128).save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    return root / "base"


def _adapter(base, directory, **cfg):
    model, _ = lorakit.load_model(base)
    add_adapter(model, LoraConfig(**{"r": 4, "target_modules": ["q_proj", "down_proj"], **cfg}))
    save_adapter(model, directory)
    return directory


def _engines(adapter):
    return {row["engine"]: row for row in serving_support(adapter)}


def test_plain_adapter_serves_unmerged_everywhere(base, tmp_path):
    rows = _engines(_adapter(base, tmp_path / "a"))
    assert all(r["unmerged"] for r in rows.values()), rows
    assert "--enable-lora" in rows["vLLM"]["why"] and "--max-lora-rank" not in rows["vLLM"]["why"]
    assert "--lora adapter.gguf" in rows["llama.cpp"]["why"] and "ADAPTER" in rows["Ollama"]["why"]


def test_rank_above_vllm_default_names_the_flag(base, tmp_path):
    rows = _engines(_adapter(base, tmp_path / "a", r=24))
    assert rows["vLLM"]["unmerged"] and "rank 24 needs --max-lora-rank 32 (the default is 16)" in rows["vLLM"]["why"]


@pytest.mark.parametrize("cfg, reason", [({"modules_to_save": ["lm_head"]}, "modules_to_save"),
                                         ({"bias": "all"}, "bias='all'")])
def test_features_the_engines_lack_say_merge(base, tmp_path, cfg, reason):
    rows = _engines(_adapter(base, tmp_path / "a", **cfg))
    assert rows["transformers + PEFT"]["unmerged"]
    for engine in ("vLLM", "llama.cpp", "Ollama"):
        assert not rows[engine]["unmerged"] and reason in rows[engine]["why"]
    assert "merge" in rows["vLLM"]["why"] and "lorakit export --format gguf --adapter" in rows["llama.cpp"]["why"]


def test_merge_preview_matches_what_the_merge_writes(base, tmp_path):
    adapter = _adapter(base, tmp_path / "a", modules_to_save=["lm_head"])
    preview = deploy_preview(adapter, base, dtype="bfloat16")
    result = merge_to_disk(base, adapter, tmp_path / "out", dtype=torch.bfloat16)
    assert preview["touched"] == result.touched == 5 and preview["tensors"] == result.tensors
    assert preview["touched_by_type"] == {"down_proj": 2, "q_proj": 2} and preview["replaced"] == ["lm_head.weight"]
    assert preview["output_bytes"] == result.nbytes and preview["dtype"] == "bfloat16" and preview["shards"] == 1
    on_disk = (tmp_path / "out" / "model.safetensors").stat().st_size
    assert preview["output_bytes"] < on_disk < preview["output_bytes"] + 8192  # + the header
    assert preview["peak_bytes"] > 2**20


def test_gguf_preview_size_matches_the_file(base, tmp_path):
    adapter = _adapter(base, tmp_path / "a")
    preview = deploy_preview(adapter, base, outtype="q8_0")
    export_gguf(base, tmp_path / "m.gguf", [adapter], "q8_0")
    size = (tmp_path / "m.gguf").stat().st_size
    assert preview["format"] == "gguf q8_0" and preview["output_bytes"] < size < preview["output_bytes"] + 64_000


def test_wrong_adapter_is_reported_by_the_preview(base, tmp_path):
    other = tmp_path / "other"
    make_tiny_llama(0, vocab_size=300, hidden_size=48).save_pretrained(other)
    make_byte_tokenizer().save_pretrained(other)
    adapter = _adapter(other, tmp_path / "a")
    with pytest.raises(ValueError, match="does not fit"):
        deploy_preview(adapter, base)


def test_inspect_plan_cli(capsys, base, tmp_path):
    adapter = _adapter(base, tmp_path / "a")
    assert main(["inspect", str(adapter), "--model", str(base), "--plan", "merge"]) == 0
    out = capsys.readouterr().out
    assert "merge plan" in out and "touches      4 of 21 tensors (down_proj ×2, q_proj ×2)" in out
    assert "peak memory  about" in out and "serve unmerged" in out and "vLLM" in out
    assert not (tmp_path / "out").exists()
