import pytest

from lorakit_testing import TinyMLP, make_tiny_llama
from lorakit import LoraConfig
from lorakit.targets import resolve_targets


def test_list_suffix_and_exact():
    model = make_tiny_llama()
    paths = resolve_targets(model, LoraConfig(target_modules=["q_proj", "model.layers.1.mlp.down_proj"]))
    assert paths == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj",
                     "model.layers.1.mlp.down_proj"]


def test_regex_full_match():
    model = make_tiny_llama()
    paths = resolve_targets(model, LoraConfig(target_modules=r".*\.1\..*_proj"))
    assert paths and all(".layers.1." in p for p in paths)


def test_regex_must_match_whole_path():
    model = make_tiny_llama()
    with pytest.raises(ValueError, match="matches no layer"):
        resolve_targets(model, LoraConfig(target_modules="q_proj"))  # fullmatch, not search


def test_all_linear_skips_lm_head_and_exclude_wins():
    model = make_tiny_llama()
    paths = resolve_targets(model, LoraConfig(target_modules="all-linear", exclude_modules=["down_proj"]))
    assert "lm_head" not in paths
    assert not any(p.endswith("down_proj") for p in paths)
    assert len(paths) == 2 * 6


def test_layers_to_transform():
    model = make_tiny_llama()
    paths = resolve_targets(model, LoraConfig(target_modules=["q_proj", "v_proj"], layers_to_transform=[1],
                                              layers_pattern="layers"))
    assert paths == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]


def test_default_targets_q_v():
    paths = resolve_targets(make_tiny_llama(), LoraConfig())
    assert [p.rsplit(".", 1)[-1] for p in paths] == ["q_proj", "v_proj"] * 2


def test_no_match_names_the_layers():
    with pytest.raises(ValueError, match="up"):
        resolve_targets(TinyMLP(), LoraConfig(target_modules=["query"]))


def test_non_linear_named_target_raises():
    with pytest.raises(ValueError, match="linear layers only"):
        resolve_targets(TinyMLP(), LoraConfig(target_modules=["act"]))


# --- the explicit list saved for "all-linear"


def test_minimal_target_list_keeps_names_that_tell_targets_apart():
    from lorakit.targets import minimal_target_list

    targets = [f"model.layers.{i}.self_attn.{p}" for i in range(12) for p in ("q_proj", "v_proj")]
    others = [f"model.layers.{i}.self_attn.k_proj" for i in range(12)] + ["model.layers.3.cross.q_proj", "lm_head"]
    short = minimal_target_list(targets, others)
    assert "v_proj" in short and "q_proj" not in short and "self_attn.q_proj" in short
    from lorakit.targets import matches

    assert all(matches(short, t) for t in targets) and not any(matches(short, o) for o in others)


@pytest.mark.parametrize("layers", [2, 3])  # 14 targets: full paths; 21: the shortened names (PEFT's threshold 20)
def test_all_linear_saved_as_the_list_peft_writes(tmp_path, layers):
    import json

    peft = pytest.importorskip("peft")
    from lorakit import LoraConfig, add_adapter, load_adapter, lora_layers, save_adapter
    from lorakit_testing import make_tiny_llama

    theirs = peft.get_peft_model(make_tiny_llama(num_hidden_layers=layers), peft.LoraConfig(target_modules="all-linear"))
    theirs.save_pretrained(tmp_path / "peft")
    model = make_tiny_llama(num_hidden_layers=layers)
    add_adapter(model, LoraConfig(target_modules="all-linear"))
    save_adapter(model, tmp_path / "ours")
    read = lambda d: json.loads((tmp_path / d / "adapter_config.json").read_text())["target_modules"]  # noqa: E731
    assert isinstance(read("ours"), list) and sorted(read("ours")) == sorted(read("peft"))
    again = make_tiny_llama(num_hidden_layers=layers)
    load_adapter(again, tmp_path / "ours")
    assert list(lora_layers(again)) == list(lora_layers(model))


@pytest.mark.parametrize("layers", [[5], 7, [2, 3]])
def test_layers_out_of_range_name_the_range(layers):
    # issue 12 "Config values": reported as "matches no layer" with the list of layer names
    from lorakit.fields import ConfigError

    cfg = LoraConfig(target_modules=["q_proj"], layers_to_transform=layers)
    with pytest.raises(ConfigError, match=r"layers_to_transform=.*numbered 0-1"):
        resolve_targets(make_tiny_llama(), cfg)
    assert resolve_targets(make_tiny_llama(), LoraConfig(target_modules=["q_proj"], layers_to_transform=[1, 5])) == \
        ["model.layers.1.self_attn.q_proj"]
