"""PEFT on-disk format, both ways, against the real `peft` package: same files, same logits (≤ 1e-5 fp32)."""

import json
import shutil
from pathlib import Path
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


# --- issue 12: a failed load registers nothing; files hold data only; numbers are checked


def _saved(tmp_path, **cfg):
    model = make_tiny_llama(**cfg.pop("extra", {}))
    add_adapter(model, LoraConfig(**cfg))
    _perturb(model)
    save_adapter(model, tmp_path)
    return model


def _snapshot(model):
    return [n for n, _ in model.named_modules()], {k: v.clone() for k, v in model.state_dict().items()}, \
        {n for n, p in model.named_parameters() if p.requires_grad}


def _assert_unchanged(model, snapshot):
    tree, state, trainable = snapshot
    assert [n for n, _ in model.named_modules()] == tree
    after = model.state_dict()
    assert sorted(after) == sorted(state) and all(torch.equal(after[k], v) for k, v in state.items())
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    assert not getattr(model, "lorakit_configs", None)


def _drop_key(directory, suffix):
    from safetensors.torch import save_file

    path = directory / "adapter_model.safetensors"
    tensors = load_file(path)
    (key,) = [k for k in tensors if k.endswith(suffix)]
    del tensors[key]
    save_file(tensors, path)


@pytest.mark.parametrize("cfg,missing", [
    (dict(target_modules=["q_proj"], modules_to_save=["lm_head"]), "lm_head.weight"),
    (dict(target_modules=["q_proj"], bias="all", extra=BIASED), "layers.1.mlp.up_proj.bias"),
])
def test_a_failed_load_registers_nothing_and_a_retry_works(tmp_path, cfg, missing):
    # issue 12 item 10: a missing modules_to_save tensor left a half-registered adapter; the retry said "already exists"
    extra = cfg.get("extra", {})
    _saved(tmp_path / "good", **dict(cfg))
    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "good", bad)
    _drop_key(bad, missing)
    model = make_tiny_llama(**extra)
    before = _snapshot(model)
    with pytest.raises(ValueError, match=f"missing .*{missing}"):
        load_adapter(model, bad)
    _assert_unchanged(model, before)
    load_adapter(model, tmp_path / "good")  # the same name again, now from a good file


def _rewrite(directory, change):
    from safetensors.torch import save_file

    path = directory / "adapter_model.safetensors"
    tensors = load_file(path)
    key = sorted(k for k in tensors if k.endswith("lora_B.weight"))[-1]
    tensors[key] = change(tensors[key])
    save_file(tensors, path)
    return key


@pytest.mark.parametrize("change,match", [
    (lambda t: (t * 1000).long(), "has dtype int64, but adapter weights are floating point"),
    (lambda t: t.to(torch.int8), "has dtype int8"),
    (lambda t: torch.full_like(t, float("nan")), "NaN/inf values in .*not loaded; the model was left unchanged"),
    (lambda t: torch.full_like(t, float("inf")), "NaN/inf values"),
])
def test_integer_or_non_finite_adapter_tensors_are_refused(tmp_path, change, match):
    # issue 12 "Numbers": int64 tensors were silently cast, NaN/inf tensors loaded silently
    _saved(tmp_path, target_modules=["q_proj", "v_proj"])
    key = _rewrite(tmp_path, change)
    model = make_tiny_llama()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=match) as err:
        load_adapter(model, tmp_path)
    assert key in str(err.value)
    _assert_unchanged(model, before)


def test_an_adapter_with_nan_is_not_saved_and_the_old_one_stays(tmp_path):
    model = _saved(tmp_path, target_modules=["q_proj"])
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with torch.no_grad():
        model.model.layers[1].self_attn.q_proj.lora_A["default"].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"adapter 'default' has NaN/inf values in .*layers.1.self_attn.q_proj"):
        save_adapter(model, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == files


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickled_object_is_refused_with_lorakits_message(tmp_path):
    # issue 12 "Files": the refusal showed torch's own advice to pass weights_only=False
    from lorakit.inspect import inspect_adapter

    _saved(tmp_path, target_modules=["q_proj"])
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_model.safetensors").unlink()
    marker = tmp_path / "executed"
    torch.save({**tensors, "x": _Payload(str(marker))}, tmp_path / "adapter_model.bin")
    for read in (lambda: load_adapter(make_tiny_llama(), tmp_path), lambda: inspect_adapter(tmp_path)):
        with pytest.raises(ValueError, match="refuses to unpickle") as err:
            read()
        assert "weights_only" not in str(err.value) and not marker.exists()
    torch.save(tensors, tmp_path / "adapter_model.bin")  # a plain dict of tensors still loads
    load_adapter(make_tiny_llama(), tmp_path)


def test_a_truncated_bin_names_the_file(tmp_path):
    _saved(tmp_path, target_modules=["q_proj"])
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_model.safetensors").unlink()
    torch.save(tensors, tmp_path / "adapter_model.bin")
    data = (tmp_path / "adapter_model.bin").read_bytes()
    (tmp_path / "adapter_model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="adapter_model.bin cannot be read .*corrupt or truncated"):
        load_adapter(make_tiny_llama(), tmp_path)


def test_load_checks_the_name_before_reading(tmp_path):
    with pytest.raises(ValueError, match="one path segment"):
        load_adapter(make_tiny_llama(), tmp_path / "nowhere", adapter_name="../x")


# --- issue 12 item 4: the directory is replaced as a whole


def test_save_replaces_the_directory_whole_and_keeps_other_files(tmp_path, input_ids):
    from lorakit.atomic import TEMP_PREFIX

    out = tmp_path / "adapter"
    model = _saved(out, target_modules=["q_proj"])
    (out / "README.md").write_text("my notes")
    (out / ".lorakit-abc123").mkdir()  # what an older lorakit left when killed mid-save
    (out / ".lorakit-abc123" / "adapter_config.json").write_text("{}")
    dead = tmp_path / f"{TEMP_PREFIX}999999999-0-adapter"  # a killed writer's sibling (no such pid)
    dead.mkdir()
    set_adapter(model, "default")
    _perturb(model)
    save_adapter(model, out)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    back = load_adapter(make_tiny_llama(), out)
    torch.testing.assert_close(back(input_ids).logits, model(input_ids).logits, atol=1e-6, rtol=0)


def test_saving_into_the_working_directory_keeps_it_usable(tmp_path, monkeypatch):
    out = tmp_path / "adapter"
    model = _saved(out, target_modules=["q_proj"])
    monkeypatch.chdir(out)
    save_adapter(model, ".")
    assert sorted(p.name for p in Path.cwd().iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert Path.cwd() == out and sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
