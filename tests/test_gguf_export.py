"""GGUF export: transformers reads the file back (gguf_file=) with the merged model's logits and the tokenizer."""

import numpy as np
import pytest
import torch

import lorakit
from lorakit import LoraConfig, add_adapter, save_adapter
from lorakit.gguf_export import export_gguf, export_gguf_adapter
from lorakit.cli import main
from lorakit_testing import make_byte_tokenizer, make_tiny_llama

MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n")]
TEXT = "Hello there <|im_start|>user\nthe wörld in 2024<|im_end|>"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Base (4 query heads, 2 key/value heads: the q/k row permutation matters), adapter, the merged model."""
    root = tmp_path_factory.mktemp("gguf")
    tok = make_byte_tokenizer(merges=MERGES)
    model = make_tiny_llama(0, vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_attention_heads=4,
                            num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.05)
    model.config.bos_token_id, model.config.eos_token_id = None, tok.eos_token_id
    model.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    m, _ = lorakit.load_model(root / "base")
    add_adapter(m, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False,
                              rank_pattern={"v_proj": 2}))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.mul_(5)
    save_adapter(m, root / "adapter")
    merged = lorakit.merge_and_unload(m).eval()
    return root, merged, tok


def _rounded(model, outtype):
    """The merged model with its 2-D weights passed through the GGUF type (what the file can hold)."""
    import copy

    import gguf

    model = copy.deepcopy(model)
    q = gguf.GGMLQuantizationType
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() != 2 or outtype == "f32":
                continue
            if outtype == "q8_0":
                data = p.detach().numpy()
                p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(data, q.Q8_0), q.Q8_0)))
            else:
                p.copy_(p.to(torch.float16 if outtype == "f16" else torch.bfloat16).float())
    return model


@pytest.mark.parametrize("outtype, loose", [("f32", 1e-5), ("f16", 2e-3), ("bf16", 2e-2), ("q8_0", 2e-2)])
def test_exported_gguf_loads_in_transformers_with_the_merged_logits(tiny, tmp_path, outtype, loose):
    from transformers import AutoModelForCausalLM

    root, merged, _ = tiny
    result = export_gguf(root / "base", tmp_path / "m.gguf", [root / "adapter"], outtype)
    assert result.probe.ok and result.tensors == len(merged.state_dict())
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    ids = torch.randint(0, 250, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, exact = loaded(ids).logits, merged(ids).logits
        same_weights = _rounded(merged, outtype)(ids).logits
    scale = exact.abs().max().item()
    # The file holds exactly the merged weights rounded to the output type (names, q/k layout, scaling all right) ...
    torch.testing.assert_close(got, same_weights, atol=2e-5 * scale, rtol=0)
    # ... which is within the type's tolerance of the merged model.
    assert (got - exact).abs().max().item() <= loose * scale


def test_tokenizer_and_chat_template_round_trip(tiny, tmp_path):
    from transformers import AutoTokenizer

    root, _, tok = tiny
    export_gguf(root / "base", tmp_path / "m.gguf", [root / "adapter"], "q8_0")
    back = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    assert back(TEXT).input_ids == tok(TEXT).input_ids
    assert back.decode(tok(TEXT).input_ids) == TEXT
    assert back.chat_template == tok.chat_template and back.eos_token == tok.eos_token == "<|im_end|>"
    messages = [{"role": "user", "content": "the date?"}]
    assert back.apply_chat_template(messages, tokenize=False) == tok.apply_chat_template(messages, tokenize=False)


def test_adapter_alone_as_gguf_lora_matches_the_merged_difference(tiny, tmp_path):
    import gguf

    root, _, _ = tiny
    export_gguf(root / "base", tmp_path / "base.gguf", [], "f32")
    export_gguf(root / "base", tmp_path / "merged.gguf", [root / "adapter"], "f32")
    export_gguf_adapter(root / "adapter", tmp_path / "lora.gguf", base=root / "base")
    base = {t.name: np.array(t.data) for t in gguf.GGUFReader(tmp_path / "base.gguf").tensors}
    merged = {t.name: np.array(t.data) for t in gguf.GGUFReader(tmp_path / "merged.gguf").tensors}
    reader = gguf.GGUFReader(tmp_path / "lora.gguf")
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "llama" and fields["adapter.lora.alpha"] == 8.0
    lora = {t.name: torch.from_numpy(np.array(t.data)).double() for t in reader.tensors}
    pairs = sorted({n.rsplit(".", 1)[0] for n in lora})
    assert len(pairs) == 14
    for name in pairs:
        a, b = lora[name + ".lora_a"], lora[name + ".lora_b"]
        delta = (8.0 / a.shape[0]) * (b @ a)  # llama.cpp's scale: alpha / rank
        want = torch.from_numpy(merged[name]).double() - torch.from_numpy(base[name]).double()
        torch.testing.assert_close(delta, want, atol=1e-5, rtol=1e-4, msg=name)


def test_adapters_the_format_cannot_hold_are_refused(tiny, tmp_path):
    root, _, _ = tiny
    m, _ = lorakit.load_model(root / "base")
    add_adapter(m, LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    save_adapter(m, tmp_path / "mts")
    with pytest.raises(ValueError, match="modules_to_save=.* cannot be stored in a GGUF LoRA adapter"):
        export_gguf_adapter(tmp_path / "mts", tmp_path / "x.gguf", base=root / "base")
    assert not (tmp_path / "x.gguf").exists()


def test_export_cli_and_existing_output(capsys, tiny, tmp_path):
    root, _, _ = tiny
    out = tmp_path / "m.gguf"
    argv = ["export", "--format", "gguf", "--model", str(root / "base"), "--adapter", str(root / "adapter"),
            "--output", str(out), "--outtype", "q8_0"]
    assert main(argv) == 0
    assert "wrote" in capsys.readouterr().out and out.is_file()
    size = out.stat().st_size
    assert main(argv) == 2 and "already exists; pass --overwrite" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0 and out.stat().st_size == size
    assert main(["export", "--format", "gguf", "--model", str(root / "base"), "--adapter", str(root / "adapter"),
                 "--adapter-only", "--output", str(tmp_path / "a.gguf")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf", "m.gguf"]
