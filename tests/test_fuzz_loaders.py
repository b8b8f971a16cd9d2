"""Fuzz test (issue 12): random JSON adapter configs, random YAML values and damaged safetensors files thrown at
the loaders. Each must end in lorakit's documented exceptions (ValueError and its subclass ConfigError,
FileNotFoundError), never a raw library exception or a hang, and a refused load must leave the model exactly as it
was. Bounded: fixed seeds (derandomize), a modest number of examples, a deadline per example."""

import copy
import json
import math
import shutil
import warnings
from datetime import timedelta
from pathlib import Path

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from lorakit import LoraConfig, add_adapter, load_adapter, save_adapter  # noqa: E402
from lorakit_testing import make_tiny_llama  # noqa: E402

ALLOWED = (ValueError, FileNotFoundError)  # ConfigError is a ValueError
FIELDS = ["r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "layers_to_transform",
          "layers_pattern", "rank_pattern", "alpha_pattern", "use_rslora", "bias", "modules_to_save",
          "init_lora_weights", "fan_in_fan_out", "task_type", "peft_type", "use_dora", "inference_mode",
          "base_model_name_or_path", "megatron_config", "layer_replication", "lora_bias", "unknown_key"]


def _fuzz(max_examples, seconds=20):
    return settings(max_examples=max_examples, deadline=timedelta(seconds=seconds), derandomize=True,
                    database=None, suppress_health_check=list(HealthCheck), print_blob=True)


scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2 ** 70), 2 ** 70), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["q_proj", "all-linear", "(", "*", "layers", "nf4", "1e-3",
                                                           "LORA", "gaussian", "none", "pissa_niter_2", "lm_head"]))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                           max_leaves=8)


def _valid_config():
    return json.loads(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]).to_json())


@st.composite
def configs(draw):
    """A valid adapter_config.json with a few fields replaced, or (sometimes) any JSON value at all."""
    if draw(st.integers(0, 9)) == 0:
        return draw(json_values)
    data = _valid_config()
    for key in draw(st.lists(st.sampled_from(FIELDS), min_size=1, max_size=3, unique=True)):
        data[key] = draw(json_values)
    return data


@_fuzz(200, seconds=5)
@given(configs())
def test_random_json_configs_into_from_dict(data):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            config = LoraConfig.from_dict(data)
        except ALLOWED as err:
            event(f"refused: {type(err).__name__}")
            return
    event("accepted")
    assert isinstance(config.r, int) and config.r >= 1 and math.isfinite(config.lora_alpha)
    assert LoraConfig.from_dict(json.loads(config.to_json())).to_dict() == config.to_dict()  # what it writes, it reads


def _snapshot(model):
    return ([n for n, _ in model.named_modules()], {k: v.clone() for k, v in model.state_dict().items()},
            {n for n, p in model.named_parameters() if p.requires_grad}, dict(getattr(model, "lorakit_configs", {})))


def _assert_unchanged(model, before):
    tree, state, trainable, configs_before = before
    assert [n for n, _ in model.named_modules()] == tree
    after = model.state_dict()
    assert sorted(after) == sorted(state) and all(torch.equal(after[k], v) for k, v in state.items())
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    assert dict(getattr(model, "lorakit_configs", {})) == configs_before


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A tiny base with a first adapter already loaded (a refused second load must not disturb it), and the
    directory of an adapter for it."""
    root = tmp_path_factory.mktemp("fuzz")
    model = make_tiny_llama()
    add_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    save_adapter(model, root / "good")
    return model, root


def _try_load(model, directory):
    before = _snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            load_adapter(model, directory, adapter_name="fuzzed")
        except ALLOWED as err:
            event(f"refused: {type(err).__name__}")
            _assert_unchanged(model, before)
            return False
    event("loaded")
    from lorakit import delete_adapter, set_adapter

    delete_adapter(model, "fuzzed")
    set_adapter(model, "default")
    return True


@_fuzz(40)
@given(configs())
def test_random_json_configs_into_load_adapter(adapter, data):
    model, root = adapter
    directory = root / "config-case"
    shutil.rmtree(directory, ignore_errors=True)
    shutil.copytree(root / "good", directory)
    (directory / "adapter_config.json").write_text(json.dumps(data))
    _try_load(model, directory)
    _try_inspect(directory)


@st.composite
def damaged(draw, data: bytes):
    """``data`` truncated, or with a few bits flipped (half of them in the JSON header, where they do the most)."""
    if draw(st.booleans()):
        return data[: draw(st.integers(0, len(data) - 1))]
    out = bytearray(data)
    header = 8 + int.from_bytes(data[:8], "little")
    for _ in range(draw(st.integers(1, 4))):
        where = draw(st.integers(0, header - 1) if draw(st.booleans()) else st.integers(0, len(data) - 1))
        out[where] ^= 1 << draw(st.integers(0, 7))
    return bytes(out)


def _weights(root):
    return (root / "good" / "adapter_model.safetensors").read_bytes()


@_fuzz(60)
@given(st.data())
def test_damaged_safetensors_into_load_adapter(adapter, data):
    model, root = adapter
    blob = data.draw(damaged(_weights(root)))
    directory = root / "weights-case"
    shutil.rmtree(directory, ignore_errors=True)
    shutil.copytree(root / "good", directory)
    (directory / "adapter_model.safetensors").write_bytes(blob)
    _try_load(model, directory)
    _try_inspect(directory)


def _try_inspect(directory):
    from lorakit.inspect import inspect_adapter

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            inspect_adapter(directory)
        except ALLOWED:
            pass


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    from lorakit.quant import quantize_model_

    root = tmp_path_factory.mktemp("fuzz4bit")
    model = make_tiny_llama(intermediate_size=64)
    quantize_model_(model, "nf4", compute_dtype=torch.float32)
    model.save_pretrained(root / "good")
    return root


@_fuzz(25)
@given(st.data())
def test_damaged_4bit_checkpoint_into_load_model(quantized, data):
    import lorakit

    good = quantized / "good"
    blob = data.draw(damaged((good / "model.safetensors").read_bytes()))
    directory = quantized / "case"
    shutil.rmtree(directory, ignore_errors=True)
    shutil.copytree(good, directory)
    (directory / "model.safetensors").write_bytes(blob)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            lorakit.load_model(directory)
            event("loaded")
        except ALLOWED as err:
            event(f"refused: {type(err).__name__}")


yaml_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10 ** 6, 10 ** 6), st.floats(allow_nan=True),
                         st.sampled_from(["1e-3", "2.0e-4", ".inf", "-.inf", ".nan", "true", "no", "~", "''", "[]",
                                          "{}", "[1, 2]", "{a: 1}", "0x1F", "1_000", "2026-11-30", "!!binary aGk=",
                                          "&a 1", "*a", "'q_proj'", "\"\\xff\"", "- x", "a: b", ": :", "?"]),
                         st.text(max_size=10))


@st.composite
def yaml_texts(draw):
    from dataclasses import fields

    from lorakit.train import SFTArgs

    names = [f.name for f in fields(SFTArgs)] + ["lr", "maxsteps", "1", "? x"]
    lines = []
    for key in draw(st.lists(st.sampled_from(names), max_size=5)):
        value = draw(yaml_scalars)
        text = value if isinstance(value, str) else json.dumps(value) if value is not None else "null"
        lines.append(f"{key}: {text}")
    if draw(st.integers(0, 9)) == 0:
        lines.append(draw(st.text(max_size=20)))
    return "\n".join(lines) + "\n"


@_fuzz(150, seconds=5)
@given(yaml_texts())
def test_random_yaml_values_into_load_args(tmp_path_factory, text):
    from lorakit.train import SFTArgs
    from lorakit.train.args import load_args

    path = tmp_path_factory.mktemp("yaml") / "config.yaml"
    path.write_bytes(text.encode("utf-8", errors="surrogatepass"))  # lone surrogates make non-UTF-8 files too
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            args = load_args(SFTArgs, path)
        except ALLOWED as err:
            event(f"refused: {type(err).__name__}")
            return
    event("accepted")
    assert isinstance(args.max_steps, int) and math.isfinite(args.lr)
