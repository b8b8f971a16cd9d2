import json
import math

import pytest

from lorakit import LoraConfig
from lorakit.fields import ConfigError


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


# issue 12 item 11 and "Config values": every field is checked for type, range and finiteness when a config is built
@pytest.mark.parametrize("kwargs,match", [
    (dict(r=2.5), r"r=2.5: expected a whole number \(got a fraction; use 2 or 3\)"),
    (dict(r="eight"), r"r='eight': expected a whole number"),
    (dict(r=0), r"r=0 must be a finite number at least 1"),
    (dict(r=-4), r"r=-4 must be"),
    (dict(r=None), r"r=None"),
    (dict(r=True), r"r=True"),
    (dict(lora_alpha=float("nan")), r"lora_alpha=nan must be a finite number"),
    (dict(lora_alpha=float("inf")), r"lora_alpha=inf must be a finite number"),
    (dict(lora_alpha="x"), r"lora_alpha='x'"),
    (dict(lora_alpha=None), r"lora_alpha=None"),
    (dict(lora_dropout=1.0), r"lora_dropout=1.0 must be a finite number at least 0 and below 1"),
    (dict(lora_dropout=-0.1), r"lora_dropout=-0.1"),
    (dict(target_modules=["q_proj", 3]), r"target_modules\[1\]=3: expected a string"),
    (dict(target_modules=3), r"target_modules=3"),
    (dict(target_modules="(q_proj"), r"target_modules='\(q_proj' is not a valid regular expression"),
    (dict(exclude_modules="*"), r"exclude_modules='\*' is not a valid regular expression"),
    (dict(rank_pattern={"q_proj": 0}), r"rank_pattern\['q_proj'\]=0"),
    (dict(rank_pattern={"(": 4}), r"rank_pattern key='\(' is not a valid regular expression"),
    (dict(alpha_pattern={"v": float("nan")}), r"alpha_pattern\['v'\]=nan"),
    (dict(layers_to_transform=[0, -1]), r"layers_to_transform=-1"),
    (dict(layers_to_transform=[0.5]), r"layers_to_transform\[0\]=0.5"),
    (dict(target_modules=["q_proj"], layers_to_transform=[0], layers_pattern="("), r"layers_pattern='\('"),
    (dict(use_rslora="maybe"), r"use_rslora='maybe': expected true or false"),
    (dict(modules_to_save="lm_head"), r"modules_to_save='lm_head': expected a list of strings or null"),
    (dict(init_lora_weights=1), r"init_lora_weights=1"),
])
def test_every_field_is_checked(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        LoraConfig(**kwargs)


def test_nan_alpha_can_no_longer_reach_the_layers(tiny_llama):
    # issue 12 item 11: lora_alpha NaN gave scaling NaN but logits as if scaling were 1 (addmm_ with alpha NaN)
    with pytest.raises(ConfigError, match="lora_alpha=nan"):
        LoraConfig.from_dict({"r": 8, "lora_alpha": float("nan")})


def test_fractional_rank_is_refused_not_truncated(tmp_path):
    # issue 12 item 11: r=2.5 trained at rank 2 and wrote "r": 2.5 that PEFT cannot load
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2.5}))
    with pytest.raises(ConfigError, match=r"adapter_config.json: r=2.5: expected a whole number"):
        LoraConfig.load(tmp_path)


@pytest.mark.parametrize("text", ["[1, 2]", "null", "\"r\"", "3"])
def test_a_config_that_is_not_an_object_names_the_file(tmp_path, text):
    (tmp_path / "adapter_config.json").write_text(text)
    with pytest.raises(ConfigError, match=r"adapter_config.json: an adapter config is a JSON object"):
        LoraConfig.load(tmp_path)


def test_numbers_written_as_text_are_numbers_and_ints_stay_ints():
    cfg = LoraConfig(r="16", lora_alpha=32, lora_dropout="0.05", layers_to_transform=[0, 1.0], target_modules=("v", "q"))
    assert cfg.r == 16 and cfg.lora_dropout == 0.05 and cfg.layers_to_transform == [0, 1]
    assert cfg.target_modules == ["q", "v"]
    assert isinstance(cfg.lora_alpha, int) and json.loads(cfg.to_json())["lora_alpha"] == 32
    assert LoraConfig(lora_alpha=0.5).lora_alpha == 0.5
    assert LoraConfig.from_dict({"rank_pattern": None, "alpha_pattern": None}).rank_pattern == {}


def test_every_value_peft_writes_still_loads(tmp_path):
    # peft's own defaults, and a config written by peft.save_pretrained with most fields set
    peft = pytest.importorskip("peft")
    assert LoraConfig.from_dict(peft.LoraConfig().to_dict()).r == 8
    from lorakit_testing import make_tiny_llama

    cfg = peft.LoraConfig(r=4, lora_alpha=16, lora_dropout=0.1, target_modules=["q_proj", "v_proj"],
                          layers_to_transform=[0], layers_pattern="layers", rank_pattern={"v_proj": 2},
                          alpha_pattern={"q_proj": 8}, modules_to_save=["lm_head"], use_rslora=True,
                          task_type="CAUSAL_LM")
    peft.get_peft_model(make_tiny_llama(), cfg).save_pretrained(tmp_path)
    ours = LoraConfig.load(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    for key in ("r", "lora_alpha", "lora_dropout", "layers_to_transform", "layers_pattern", "rank_pattern",
                "alpha_pattern", "modules_to_save", "use_rslora"):
        assert getattr(ours, key) == data[key], key
    assert sorted(ours.target_modules) == sorted(data["target_modules"])
