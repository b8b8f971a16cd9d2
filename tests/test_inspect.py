"""`lorakit.inspect`: adapter contents from the file header, and fit checks from a base's config.json alone."""

import pytest
import torch

from lorakit_testing import make_tiny_llama, tiny_llama_config
from lorakit import LoraConfig, add_adapter, load_adapter, save_adapter
from lorakit.inspect import check_fit, format_inspection, inspect_adapter


@pytest.fixture
def adapter_dir(tmp_path):
    model = make_tiny_llama()
    add_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    add_adapter(model, LoraConfig(r=2, target_modules=["q_proj"]), adapter_name="second")
    save_adapter(model, tmp_path / "adapter")
    return tmp_path / "adapter"


def _config(tmp_path, name, **overrides):
    tiny_llama_config(**overrides).save_pretrained(tmp_path / name)
    return tmp_path / name


def test_inspect_counts(adapter_dir):
    info = inspect_adapter(adapter_dir)
    assert (info["r"], info["lora_alpha"]) == (4, 8)
    assert len(info["target_modules"]) == 14  # "all-linear" is saved as the 14 layers it chose, as PEFT writes it
    assert info["n_tensors"] == 2 * 7 * 2  # A and B × 7 linear layers × 2 decoder layers
    # per layer: q, o 4·(32+32); k, v 4·(32+16); gate, up, down 4·(32+48) → 1856; × 2 layers
    assert info["n_parameters"] == 2 * (2 * 256 + 2 * 192 + 3 * 320) == 3712
    assert info["module_types"] == {n: 2 for n in ("down_proj", "gate_proj", "k_proj", "o_proj", "q_proj",
                                                   "up_proj", "v_proj")}
    assert info["layers"] == [0, 1] and info["dtypes"] == ["float32"]
    assert info["modules"]["model.layers.0.self_attn.k_proj"] == {"r": 4, "in": 32, "out": 16}
    assert info["size_bytes"] == sum(p.stat().st_size for p in adapter_dir.iterdir() if p.is_file())
    assert list(info["other_adapters"]) == ["second"]
    assert info["incomplete"] == [] and info["other_tensors"] == []


def test_inspect_bfloat16_and_modules_to_save(tmp_path):
    model = make_tiny_llama()
    add_adapter(model, LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]), dtype=torch.bfloat16)
    save_adapter(model, tmp_path)
    info = inspect_adapter(tmp_path)
    assert "bfloat16" in info["dtypes"]
    assert info["other_tensors"] == ["base_model.model.lm_head.weight"]
    assert "also saved     1 other tensors" in format_inspection(info)


def test_fits_its_own_base(adapter_dir, tmp_path):
    assert check_fit(adapter_dir, _config(tmp_path, "base")) == []
    assert check_fit(adapter_dir, _config(tmp_path, "base") / "config.json") == []


def test_rank_pattern_fits(tmp_path):
    model = make_tiny_llama()
    add_adapter(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}))
    save_adapter(model, tmp_path / "a")
    assert check_fit(tmp_path / "a", _config(tmp_path, "base")) == []
    assert "(per module: 2, 4)" in format_inspection(inspect_adapter(tmp_path / "a"))


def test_other_base_is_named_by_shape(adapter_dir, tmp_path):
    other = _config(tmp_path, "wide", hidden_size=48, num_hidden_layers=1)
    problems = check_fit(adapter_dir, other)
    assert problems[0] == ("7 modules are in layers 1-1, but the base has 1 layers "
                           "(e.g. model.layers.1.mlp.down_proj)")
    assert ("2 modules (model.layers.0.self_attn.q_proj, …): adapter is 32 → 32, base q_proj is 48 → 48"
            in problems)
    assert len(problems) == 1 + 7  # one line per module type, not per module
    # the same verdict as loading it into that base
    with pytest.raises(ValueError, match="does not fit"):
        load_adapter(make_tiny_llama(hidden_size=48, num_hidden_layers=1), adapter_dir)
    text = format_inspection(inspect_adapter(adapter_dir), problems, "wide", max_problems=3)
    assert "fits wide: NO, 8 problem(s)" in text and "… and 5 more" in text


def test_gqa_heads_change_kv_shapes(adapter_dir, tmp_path):
    problems = check_fit(adapter_dir, _config(tmp_path, "mha", num_key_value_heads=4))
    assert problems == [f"2 modules (model.layers.0.self_attn.{n}, …): adapter is 32 → 16, base {n} is 32 → 32"
                        for n in ("k_proj", "v_proj")]


def test_rank_disagreeing_with_config(adapter_dir, tmp_path):
    import json

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    (adapter_dir / "adapter_config.json").write_text(json.dumps(dict(config, r=8)))
    problems = check_fit(adapter_dir, _config(tmp_path, "base"))
    assert problems == ["14 modules (model.layers.0.mlp.down_proj, …): tensors have rank 4, adapter_config.json "
                        "says 8"]


def test_peft_written_adapter(tmp_path):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(make_tiny_llama(), peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path)
    info = inspect_adapter(tmp_path)
    assert (info["r"], info["n_tensors"], info["module_types"]) == (8, 4, {"q_proj": 2})
    assert check_fit(tmp_path, _config(tmp_path, "base")) == []


def test_missing_and_corrupt(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        inspect_adapter(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        inspect_adapter(tmp_path)
    LoraConfig(target_modules=["q_proj"]).save(tmp_path)
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        inspect_adapter(tmp_path)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="corrupt"):
        inspect_adapter(tmp_path)


@pytest.mark.parametrize("leftover", [".lorakit-x1y2", ".lorakit-tmp-123-abcd-adapter"])
def test_temporary_folders_are_not_adapters(adapter_dir, leftover):
    # issue 12 item 4: a killed save's temp folder (a full adapter copy) was listed under "other adapters"
    import shutil

    shutil.copytree(adapter_dir / "second", adapter_dir / leftover)
    info = inspect_adapter(adapter_dir)
    assert list(info["other_adapters"]) == ["second"]
    assert leftover not in format_inspection(info)
