"""PEFT on-disk format, both ways, against the real `peft` package: same files, same logits (≤ 1e-5 fp32)."""

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

from lorakit_testing import make_tiny_llama
from lorakit import (LoraConfig, add_adapter, adapter_state_dict, from_pretrained, load_adapter,
                     save_adapter, set_adapter)

peft = pytest.importorskip("peft")

BIASED = dict(attention_bias=True, mlp_bias=True)

CASES = {
    "q_v": (dict(target_modules=["q_proj", "v_proj"]), {}),
    "all_linear": (dict(target_modules="all-linear", r=4, lora_alpha=16), {}),
    "patterns": (dict(target_modules=["q_proj", "v_proj", "down_proj"], r=8, lora_alpha=8,
                      rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 32}), {}),
    "rslora": (dict(target_modules=["q_proj", "k_proj"], r=16, lora_alpha=8, use_rslora=True), {}),
    "modules_to_save": (dict(target_modules=["q_proj"], modules_to_save=["lm_head"]), {}),
    "bias_all": (dict(target_modules=["q_proj", "up_proj"], bias="all"), BIASED),
    "bias_lora_only": (dict(target_modules=["q_proj", "up_proj"], bias="lora_only"), BIASED),
    "regex": (dict(target_modules=r".*layers\.1\.self_attn\.(q|v)_proj"), {}),
    "layers_to_transform": (dict(target_modules=["q_proj"], layers_to_transform=[0], layers_pattern="layers"), {}),
}


def _perturb(model, trainable_only=True):
    """Give every trainable tensor a non-trivial value (LoRA B starts at zero, biases at the base)."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad or not trainable_only:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def _peft_model(kwargs, extra, adapter="default"):
    base = make_tiny_llama(**extra)
    cfg = peft.LoraConfig(task_type="CAUSAL_LM", **kwargs)
    model = peft.get_peft_model(base, cfg, adapter_name=adapter)
    _perturb(model)
    return model.eval()


@pytest.mark.parametrize("case", sorted(CASES))
def test_lorakit_adapter_loads_in_peft(case, tmp_path, input_ids):
    kwargs, extra = CASES[case]
    model = make_tiny_llama(**extra)
    add_adapter(model, LoraConfig(**kwargs))
    _perturb(model)
    expected = model(input_ids).logits
    save_adapter(model, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # PEFT must not warn about missing/unexpected keys or unknown fields
        loaded = peft.PeftModel.from_pretrained(make_tiny_llama(**extra), tmp_path).eval()
    torch.testing.assert_close(loaded(input_ids).logits, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_adapter_loads_in_lorakit(case, tmp_path, input_ids):
    kwargs, extra = CASES[case]
    theirs = _peft_model(kwargs, extra)
    expected = theirs(input_ids).logits
    theirs.save_pretrained(tmp_path)
    model = load_adapter(make_tiny_llama(**extra), tmp_path)
    torch.testing.assert_close(model(input_ids).logits, expected, atol=1e-5, rtol=0)


def test_file_keys_and_config_equal_peft(tmp_path):
    kwargs = dict(target_modules=["q_proj", "v_proj"], r=4, modules_to_save=["lm_head"])
    theirs = _peft_model(kwargs, {})
    theirs.save_pretrained(tmp_path / "peft")
    model = make_tiny_llama()
    add_adapter(model, LoraConfig(**kwargs))
    save_adapter(model, tmp_path / "ours")
    peft_file = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    our_file = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert sorted(our_file) == sorted(peft_file)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in our_file
    assert all(our_file[k].shape == peft_file[k].shape for k in our_file)
    ours = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    peft_cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert list(ours) == sorted(ours)
    assert set(ours) <= set(peft_cfg) | {"auto_mapping"}
    for key in ("r", "lora_alpha", "target_modules", "peft_type", "task_type", "bias", "modules_to_save"):
        assert sorted(ours[key]) == sorted(peft_cfg[key]) if isinstance(ours[key], list) else ours[key] == peft_cfg[key]


def test_two_adapters_in_subdirectories_both_ways(tmp_path, input_ids):
    model = make_tiny_llama()
    add_adapter(model, LoraConfig(target_modules=["q_proj", "v_proj"]), "default")
    add_adapter(model, LoraConfig(target_modules=["o_proj"], r=2), "other")
    _perturb(model)  # only "default" is trainable; make "other" non-zero too
    set_adapter(model, "other")
    _perturb(model)
    out_other = model(input_ids).logits
    set_adapter(model, "default")
    out_default = model(input_ids).logits
    save_adapter(model, tmp_path / "ours")
    assert (tmp_path / "ours" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "ours" / "other" / "adapter_config.json").is_file()

    theirs = peft.PeftModel.from_pretrained(make_tiny_llama(), tmp_path / "ours").eval()
    theirs.load_adapter(tmp_path / "ours" / "other", adapter_name="other")
    torch.testing.assert_close(theirs(input_ids).logits, out_default, atol=1e-5, rtol=0)
    theirs.set_adapter("other")
    torch.testing.assert_close(theirs(input_ids).logits, out_other, atol=1e-5, rtol=0)

    theirs.save_pretrained(tmp_path / "peft")  # PEFT's layout: default at the top, other/ below
    back = load_adapter(make_tiny_llama(), tmp_path / "peft")
    load_adapter(back, tmp_path / "peft" / "other", adapter_name="other")
    torch.testing.assert_close(back(input_ids).logits, out_default, atol=1e-5, rtol=0)
    set_adapter(back, "other")
    torch.testing.assert_close(back(input_ids).logits, out_other, atol=1e-5, rtol=0)


def test_adapter_names_that_look_like_paths_do_not_corrupt_keys(tmp_path, input_ids):
    # PEFT issues #3584 / #2699: adapter named like a module segment or "lora".
    model = make_tiny_llama()
    add_adapter(model, LoraConfig(target_modules=["q_proj", "down_proj"]), "mlp")
    add_adapter(model, LoraConfig(target_modules=["v_proj"]), "lora")
    _perturb(model)
    save_adapter(model, tmp_path)
    assert len(load_file(tmp_path / "mlp" / "adapter_model.safetensors")) == 8
    back = load_adapter(make_tiny_llama(), tmp_path / "mlp", adapter_name="mlp")
    torch.testing.assert_close(back(input_ids).logits, model(input_ids).logits, atol=1e-6, rtol=0)


def test_adapter_for_another_base_names_shapes(tmp_path):
    model = make_tiny_llama()
    add_adapter(model, LoraConfig(target_modules=["q_proj"]))
    save_adapter(model, tmp_path)
    other = make_tiny_llama(hidden_size=48, num_attention_heads=4)
    tree_before = [n for n, _ in other.named_modules()]
    with pytest.raises(ValueError, match=r"file has \(8, 32\), model needs \(8, 48\)"):
        load_adapter(other, tmp_path)
    assert [n for n, _ in other.named_modules()] == tree_before  # nothing was injected


def test_corrupt_file_clear_error(tmp_path):
    model = make_tiny_llama()
    add_adapter(model, LoraConfig())
    save_adapter(model, tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_adapter(make_tiny_llama(), tmp_path)


def test_failed_save_leaves_previous_adapter(tmp_path, monkeypatch):
    model = make_tiny_llama()
    add_adapter(model, LoraConfig())
    save_adapter(model, tmp_path)
    before = (tmp_path / "adapter_model.safetensors").read_bytes()
    import lorakit.peft_format as pf

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(pf, "save_file", boom)
    with pytest.raises(OSError):
        save_adapter(model, tmp_path)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] and not any(p.name.startswith(".lorakit-") for p in tmp_path.iterdir())


def test_from_pretrained_one_liner(tmp_path, input_ids):
    base_dir = tmp_path / "base"
    make_tiny_llama().save_pretrained(base_dir)
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base_dir).eval()
    add_adapter(model, LoraConfig(target_modules="all-linear"))
    _perturb(model)
    expected = model(input_ids).logits
    save_adapter(model, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str(base_dir)
    _tokenizer_stub(base_dir)
    loaded = from_pretrained(tmp_path / "adapter").eval()
    torch.testing.assert_close(loaded(input_ids).logits, expected, atol=1e-5, rtol=0)


def _tokenizer_stub(directory):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")))
    tok.save_pretrained(directory)


def test_adapter_state_dict_is_structural(tiny_llama):
    add_adapter(tiny_llama, LoraConfig(target_modules=["q_proj"]))
    keys = sorted(adapter_state_dict(tiny_llama))
    assert keys == [f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_{ab}.weight"
                    for i in range(2) for ab in "AB"]
