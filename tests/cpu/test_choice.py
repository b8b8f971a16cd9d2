"""The per-machine kernel choice: oneDNN only when measured faster by the margin, cached per machine and shapes."""

import json

import pytest
import torch

import lorakit
from lorakit.cpu.choice import choose, cpu_name, measure, model_shapes
from lorakit.cpu.matmul import onednn
from lorakit_testing import make_tiny_llama

needs_onednn = pytest.mark.skipif(not onednn().usable(torch.zeros(1)), reason="needs the oneDNN float32 path")
SHAPES = [(8, 4, 2)]


@needs_onednn
@pytest.mark.parametrize("times,kernels", [((1.0, 0.5), "onednn"), ((1.0, 0.97), "torch"), ((1.0, 1.2), "torch")])
def test_onednn_only_when_faster_by_the_margin(times, kernels, tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    choice = choose(SHAPES, margin=0.05, measure_fn=lambda *a: times)
    assert (choice.kernels, choice.source, choice.cpu) == (kernels, "measured", cpu_name())


@needs_onednn
def test_measured_once_then_read_back(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    calls = []
    first = choose(SHAPES, measure_fn=lambda *a: calls.append(a) or (1.0, 0.5))
    again = choose(SHAPES, measure_fn=lambda *a: calls.append(a) or (1.0, 2.0))
    assert len(calls) == 1 and again.kernels == first.kernels == "onednn" and again.source == "cached"
    [path] = (tmp_path / "machine").iterdir()
    assert json.loads(path.read_text())["cpu"] == cpu_name()
    other = choose([(16, 4, 1)], measure_fn=lambda *a: calls.append(a) or (1.0, 2.0))  # other shapes: measured
    assert other.kernels == "torch" and len(calls) == 2


def test_model_shapes_count_frozen_and_base_layers_not_adapters():
    model = make_tiny_llama(0)
    before = model_shapes(model)
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, target_modules=["q_proj"]))
    assert model_shapes(model) == before  # the adapters' own weights are not counted
    n_linear = sum(type(m) is torch.nn.Linear for m in make_tiny_llama(0).modules())
    assert sum(n for _, _, n in before) == n_linear


@needs_onednn
def test_measure_returns_both_timings_and_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    t_torch, t_onednn = measure([(16, 8, 1)], tokens=8, rounds=2)
    assert t_torch > 0 and t_onednn > 0
    assert torch.equal(torch.get_rng_state(), state)
