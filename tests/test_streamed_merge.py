"""Streamed merge (lorakit.streamed_merge): the same bits as the in-memory merge, one tensor in memory at a time."""

import copy
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from lorakit import LoraConfig, add_adapter, load_adapter, merge_and_unload, save_adapter
from lorakit.atomic import TEMP_PREFIX
from lorakit.streamed_merge import MergeCheckError, materialize, merge_to_disk
from lorakit.merge_plan import plan_merge
from lorakit.st_stream import read_header
from lorakit_testing import make_byte_tokenizer, make_tiny_llama


def _save_base(directory, dtype=torch.float32, seed=0, shard=None, **overrides):
    tokenizer = make_byte_tokenizer()
    kwargs = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, initializer_range=0.3)
    kwargs.update(overrides)
    model = make_tiny_llama(seed, **kwargs).to(dtype)
    model.save_pretrained(directory, **({"max_shard_size": shard} if shard else {}))
    tokenizer.save_pretrained(directory)
    return directory


def _adapter(base, directory, seed=1, **cfg):
    model, _ = lorakit.load_model(base)
    torch.manual_seed(seed)
    add_adapter(model, LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": "all-linear",
                                     "init_lora_weights": False, **cfg}))
    save_adapter(model, directory)
    return directory


def _in_memory(base, adapters, dtype=torch.float32):
    model, _ = lorakit.load_model(base, dtype=dtype)
    for i, a in enumerate(adapters):
        load_adapter(model, a, adapter_name=f"a{i}")
    lorakit.set_adapter(model, [f"a{i}" for i in range(len(adapters))])
    return merge_and_unload(model).state_dict()


def _written(directory):
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return _save_base(tmp_path_factory.mktemp("base") / "base")


@pytest.mark.parametrize("cfg", [{}, {"use_rslora": True, "rank_pattern": {"q_proj": 2}, "alpha_pattern": {"down_proj": 3}},
                                 {"target_modules": ["q_proj", "v_proj"], "r": 8}])
def test_float32_streamed_merge_is_bit_identical_to_merge_and_unload(base, tmp_path, cfg):
    adapter = _adapter(base, tmp_path / "adapter", **cfg)
    result = merge_to_disk(base, adapter, tmp_path / "out")
    want = _in_memory(base, [adapter])
    got = _written(tmp_path / "out")
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want), [k for k in want if not torch.equal(got[k], want[k])]
    assert result.probe.ok and result.probe.checked == result.touched > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_merge_matches_the_in_memory_merge(tmp_path, dtype):
    base = _save_base(tmp_path / "base", dtype=dtype)
    adapter = _adapter(base, tmp_path / "adapter")
    merge_to_disk(base, adapter, tmp_path / "out")
    want, got = _in_memory(base, [adapter], dtype=dtype), _written(tmp_path / "out")
    for k in want:
        assert got[k].dtype == dtype
        torch.testing.assert_close(got[k], want[k], rtol=2 * torch.finfo(dtype).eps, atol=0)


def test_sharded_base_gives_sharded_output_transformers_loads(tmp_path):
    from transformers import AutoModelForCausalLM

    base = _save_base(tmp_path / "base", shard="60KB")
    n_shards = len(list(base.glob("*.safetensors")))
    assert n_shards > 2 and (base / "model.safetensors.index.json").is_file()
    adapter = _adapter(base, tmp_path / "adapter")
    result = merge_to_disk(base, adapter, tmp_path / "out")
    out = tmp_path / "out"
    assert result.shards == n_shards == len(list(out.glob("*.safetensors")))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in out.glob("*.safetensors")}
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    model, _ = lorakit.load_model(base)
    load_adapter(model, adapter)
    ids = torch.randint(0, 200, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model.eval()(ids).logits, atol=1e-5, rtol=0)
    assert (out / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()


def test_repacked_shards_and_untouched_tensors_are_byte_identical(base, tmp_path):
    adapter = _adapter(base, tmp_path / "adapter", target_modules=["q_proj"])
    result = merge_to_disk(base, adapter, tmp_path / "out", max_shard_size=30_000)
    assert result.shards > 1
    src, _ = read_header(base / "model.safetensors")
    out = {}
    for path in (tmp_path / "out").glob("*.safetensors"):
        out.update(read_header(path)[0])
    touched = {k for k in src if k.endswith("q_proj.weight")}
    assert len(touched) == 2 and set(out) == set(src)

    def raw(e):
        with open(e.file, "rb") as fh:
            fh.seek(e.start)
            return fh.read(e.nbytes)

    for key in set(src) - touched:
        assert raw(out[key]) == raw(src[key]), key
    assert all(raw(out[k]) != raw(src[k]) for k in touched)


def test_several_adapters_with_weights(base, tmp_path):
    a = _adapter(base, tmp_path / "a", seed=1)
    b = _adapter(base, tmp_path / "b", seed=2, r=2, lora_alpha=6, target_modules=["v_proj", "up_proj"])
    merge_to_disk(base, [(a, 0.7), (b, -1.5)], tmp_path / "out")
    got = _written(tmp_path / "out")
    w0 = load_file(base / "model.safetensors")
    fa, fb = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    for key, w in w0.items():
        want = w.double()
        for f, weight, s in ((fa, 0.7, 2.0), (fb, -1.5, 3.0)):
            A = f.get(f"base_model.model.{key[:-len('.weight')]}.lora_A.weight")
            if A is not None:
                B = f[f"base_model.model.{key[:-len('.weight')]}.lora_B.weight"]
                want += weight * s * (B.double() @ A.double())
        torch.testing.assert_close(got[key].double(), want, atol=1e-5, rtol=1e-6)


def test_modules_to_save_and_trained_biases(tmp_path):
    base = _save_base(tmp_path / "base", attention_bias=True)
    model, _ = lorakit.load_model(base)
    add_adapter(model, LoraConfig(r=4, target_modules=["q_proj", "k_proj"], bias="all", modules_to_save=["lm_head"],
                                  init_lora_weights=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and ("bias" in name or "lm_head" in name):
                p.add_(torch.randn_like(p))
    save_adapter(model, tmp_path / "adapter")
    merge_to_disk(base, tmp_path / "adapter", tmp_path / "out")
    want = merge_and_unload(model).state_dict()
    got = _written(tmp_path / "out")
    assert all(torch.equal(got[k], want[k]) for k in want), [k for k in want if not torch.equal(got[k], want[k])]
    with pytest.raises(ValueError, match="weight of 0.5 cannot scale"):
        merge_to_disk(base, [(tmp_path / "adapter", 0.5)], tmp_path / "out2")


@pytest.mark.parametrize("method", ["olora", "pissa"])
def test_olora_pissa_adapters_converted_or_not(tmp_path, method, base):
    model, _ = lorakit.load_model(base)
    add_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights=method))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.05 * torch.randn_like(p))
    save_adapter(model, tmp_path / "converted")
    save_adapter(model, tmp_path / "raw", convert_to_lora=False)
    want = merge_and_unload(model).state_dict()  # the rewritten base + the trained adapter
    for name in ("converted", "raw"):
        merge_to_disk(base, tmp_path / name, tmp_path / f"out-{name}")
        got = _written(tmp_path / f"out-{name}")
        for k in want:
            torch.testing.assert_close(got[k], want[k], atol=2e-5, rtol=0, msg=f"{name} {k}")


def test_4bit_base_merges_by_dequantizing(tmp_path):
    from lorakit.quant import dequantize_model_, quantize_model_

    model = make_tiny_llama(0, vocab_size=96, hidden_size=64, intermediate_size=128)
    quantize_model_(model, "nf4", compute_dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "nf4")
    make_byte_tokenizer().save_pretrained(tmp_path / "nf4")
    dense = dequantize_model_(copy.deepcopy(model), torch.bfloat16)
    torch.manual_seed(3)
    add_adapter(dense, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    save_adapter(dense, tmp_path / "adapter")
    adapter = tmp_path / "adapter"
    result = merge_to_disk(tmp_path / "nf4", adapter, tmp_path / "out")
    assert result.dtype == torch.bfloat16
    got = _written(tmp_path / "out")
    want = merge_and_unload(dense).state_dict()
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k].to(torch.bfloat16)) for k in want)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config


def test_wrong_adapter_is_refused_before_anything_is_written(base, tmp_path):
    other = _save_base(tmp_path / "other", hidden_size=48)
    adapter = _adapter(other, tmp_path / "adapter")
    with pytest.raises(ValueError, match=r"does not fit .*q_proj.lora_A.weight: file has \(4, 48\), base .* needs "
                                         r"\(4, 32\)"):
        merge_to_disk(base, adapter, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "other"]


def test_adapter_tensor_matching_nothing_is_refused(base, tmp_path):
    adapter = _adapter(base, tmp_path / "adapter")
    tensors = load_file(adapter / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.7.mlp.up_proj.lora_A.weight"] = torch.zeros(4, 32)
    from safetensors.torch import save_file

    save_file(tensors, adapter / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="1 adapter tensors match nothing.*layers.7"):
        merge_to_disk(base, adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_files_get_the_default_permissions(base, tmp_path):
    adapter = _adapter(base, tmp_path / "adapter")
    merge_to_disk(base, adapter, tmp_path / "out")
    mask = os.umask(0)
    os.umask(mask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "out").iterdir()}
    assert set(modes.values()) == {0o666 & ~mask}, modes
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~mask


@pytest.mark.parametrize("where", ["adapter", "base", "inside-adapter", "parent-of-adapter"])
def test_output_overlapping_base_or_adapter_is_refused(tmp_path, where):
    base = _save_base(tmp_path / "m" / "base")
    adapter = _adapter(base, tmp_path / "m" / "adapter")
    output = {"adapter": adapter, "base": base, "inside-adapter": adapter / "merged",
              "parent-of-adapter": tmp_path / "m"}[where]
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    with pytest.raises(ValueError, match="--output .* (is|overlaps) the (adapter|base model) directory"):
        merge_to_disk(base, adapter, output, overwrite=True)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_existing_output_needs_overwrite_and_is_replaced_whole(base, tmp_path):
    a, b = _adapter(base, tmp_path / "a", seed=1), _adapter(base, tmp_path / "b", seed=2)
    out = tmp_path / "out"
    merge_to_disk(base, a, out)
    (out / "stale.txt").write_text("from an older run")
    with pytest.raises(ValueError, match="already exists and is not empty; pass --overwrite"):
        merge_to_disk(base, b, out)
    merge_to_disk(base, b, out, overwrite=True)
    assert not (out / "stale.txt").exists()
    want = _in_memory(base, [b])
    assert all(torch.equal(v, want[k]) for k, v in _written(out).items())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(TEMP_PREFIX)]


def test_probe_check_catches_a_wrong_merge(base, tmp_path, monkeypatch):
    import lorakit.streamed_merge as m

    adapter = _adapter(base, tmp_path / "adapter")
    plan = plan_merge(base, adapter)
    stats = m.ProbeStats()
    for t in plan.touched:
        materialize(t, plan.dtype, stats)
    assert stats.ok and stats.max_ratio < 0.5

    def mis_scaled(w, terms):  # an update added twice, as a merge into an already merged weight would
        for u in terms:
            w.addmm_(u.left, u.right, alpha=2 * u.scale)

    monkeypatch.setattr(m, "_apply", mis_scaled)
    with pytest.raises(MergeCheckError, match=r"down_proj.weight: the merged weight fails the probe check \(.* the rounding bound\)"):
        materialize(plan.touched[0], plan.dtype, m.ProbeStats())
    with pytest.raises(MergeCheckError):
        merge_to_disk(base, adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(TEMP_PREFIX)]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_adapter_is_refused_before_writing(base, tmp_path, bad):
    from safetensors.torch import save_file

    adapter = _adapter(base, tmp_path / "adapter")
    tensors = load_file(adapter / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"][3, 1] = bad
    save_file(tensors, adapter / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="layers.1.mlp.down_proj.lora_B.weight is not finite; the adapter is corrupt"):
        merge_to_disk(base, adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_merged_weight_overflowing_float16_is_refused(tmp_path):
    base = _save_base(tmp_path / "base", dtype=torch.float16)
    adapter = _adapter(base, tmp_path / "adapter")
    tensors = load_file(adapter / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    tensors[key] = tensors[key] * 1e9
    from safetensors.torch import save_file

    save_file(tensors, adapter / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="q_proj.weight: the merged weight has NaN/inf values in torch.float16"):
        merge_to_disk(base, adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_plan_keeps_adapter_tensors_on_disk(base, tmp_path):
    from lorakit.st_stream import TensorEntry

    adapter = _adapter(base, tmp_path / "adapter")
    plan = plan_merge(base, adapter)
    updates = [u for t in plan.touched for u in t.updates]
    assert len(updates) == 14 and all(isinstance(u.A, TensorEntry) and isinstance(u.B, TensorEntry) for u in updates)


def test_4bit_base_requantized_on_request_equals_the_in_memory_merge(tmp_path):
    from lorakit.quant import load_quantized, quantize_model_

    model = make_tiny_llama(0, vocab_size=96, hidden_size=64, intermediate_size=128)
    quantize_model_(model, "nf4", compute_dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "nf4")
    torch.manual_seed(4)
    add_adapter(model, LoraConfig(r=4, target_modules=["q_proj", "down_proj"], init_lora_weights=False))
    save_adapter(model, tmp_path / "adapter")
    with pytest.warns(UserWarning, match="re-quantized merged weights to 4 bits"):
        result = merge_to_disk(tmp_path / "nf4", tmp_path / "adapter", tmp_path / "out", requantize=True)
    assert 0 < result.requant_error < 0.1 and result.probe.ok
    with pytest.warns(UserWarning, match="re-quantization moved"):
        want = merge_and_unload(model).state_dict()  # lorakit's in-memory merge into the 4-bit base
    got = _written(tmp_path / "out")
    assert set(got) == set(want)
    for key, value in want.items():
        if "quant_state" in key:
            assert json.loads(bytes(got[key].tolist())) == json.loads(bytes(value.tolist())), key
        else:
            assert torch.equal(got[key], value), key
    base = load_file(tmp_path / "nf4" / "model.safetensors")
    assert torch.equal(got["model.layers.0.self_attn.k_proj.weight"], base["model.layers.0.self_attn.k_proj.weight"])
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    loaded = load_quantized(str(tmp_path / "out"), "nf4", compute_dtype=torch.bfloat16)
    ids = torch.randint(0, 96, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    with pytest.raises(ValueError, match="not a 4-bit checkpoint"):
        merge_to_disk(_save_base(tmp_path / "plain"), tmp_path / "adapter", tmp_path / "x", requantize=True)
