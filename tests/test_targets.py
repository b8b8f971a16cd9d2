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
