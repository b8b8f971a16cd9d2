import json
import math

import pytest

from lorakit import LoraConfig


def test_defaults_match_peft():
    peft = pytest.importorskip("peft")
    ours, theirs = LoraConfig(), peft.LoraConfig()
    for name in ("r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "bias", "use_rslora",
                 "modules_to_save", "init_lora_weights", "fan_in_fan_out", "layers_to_transform", "layers_pattern",
                 "rank_pattern", "alpha_pattern"):
        assert getattr(ours, name) == getattr(theirs, name), name


def test_json_round_trip_sorted_with_peft_type():
    cfg = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 4})
    text = cfg.to_json()
    data = json.loads(text)
    assert list(data) == sorted(data)
    assert data["peft_type"] == "LORA" and data["inference_mode"] is True
    back = LoraConfig.from_dict(data)
    assert back.r == 16 and back.rank_pattern == {"v_proj": 4} and back.target_modules == ["q_proj", "v_proj"]


def test_unknown_keys_warn_and_drop():
    with pytest.warns(UserWarning, match="some_future_field"):
        cfg = LoraConfig.from_dict({"peft_type": "LORA", "r": 4, "some_future_field": 1})
    assert cfg.r == 4


def test_unsupported_feature_raises_with_name():
    with pytest.raises(ValueError, match="use_dora"):
        LoraConfig.from_dict({"peft_type": "LORA", "use_dora": True})
    with pytest.raises(ValueError, match="peft_type"):
        LoraConfig.from_dict({"peft_type": "IA3"})


@pytest.mark.parametrize("kwargs,match", [
    (dict(target_modules=".*q_proj", layers_to_transform=[0]), "regex"),
    (dict(target_modules=["q_proj"], layers_pattern="layers"), "layers_to_transform"),
    (dict(init_lora_weights="loftq"), "init_lora_weights"),
    (dict(bias="some"), "bias"),
])
def test_impossible_combinations_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoraConfig(**kwargs)


def test_scaling_rank_and_alpha_patterns():
    cfg = LoraConfig(r=8, lora_alpha=16, rank_pattern={"v_proj": 4}, alpha_pattern={r"layers\.1\..*q_proj": 2})
    assert cfg.scaling_for("model.layers.0.self_attn.q_proj") == 2.0
    assert cfg.rank_for("model.layers.0.self_attn.v_proj") == 4
    assert cfg.scaling_for("model.layers.0.self_attn.v_proj") == 4.0
    assert cfg.alpha_for("model.layers.1.self_attn.q_proj") == 2
    rs = LoraConfig(r=16, lora_alpha=8, use_rslora=True)
    assert rs.scaling_for("x") == pytest.approx(8 / math.sqrt(16))


def test_load_missing_and_invalid(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        LoraConfig.load(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        LoraConfig.load(tmp_path)
