"""add_weighted_adapter against real peft (same adapters, same combination → same weights and logits)."""

import math

import pytest
import torch

from lorakit_testing import make_tiny_llama
from lorakit import (LoraConfig, add_adapter, add_weighted_adapter, adapter_configs, load_adapter, lora_layers,
                     save_adapter, set_adapter)

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _peft_pair(tmp_path, ranks=(4, 4), alphas=(8, 4), targets=(TARGETS, TARGETS)):
    """A PEFT model with random adapters "a" and "b" (B nonzero), saved to tmp_path/a and tmp_path/b."""
    torch.manual_seed(0)
    pm = peft.get_peft_model(make_tiny_llama(), peft.LoraConfig(r=ranks[0], lora_alpha=alphas[0],
                             target_modules=targets[0], init_lora_weights=False), adapter_name="a")
    pm.add_adapter("b", peft.LoraConfig(r=ranks[1], lora_alpha=alphas[1], target_modules=targets[1],
                                        init_lora_weights=False))
    pm.save_pretrained(tmp_path)
    return pm.eval()


def _ours(tmp_path):
    model = make_tiny_llama()
    load_adapter(model, tmp_path / "a", "a")
    load_adapter(model, tmp_path / "b", "b")
    return model


def _seeded_random_pruning(generator):
    def random_pruning(tensor, density, rescale):
        pruned = tensor * torch.bernoulli(torch.full_like(tensor, density), generator=generator)
        return pruned / density if rescale else pruned
    return random_pruning


CASES = [("linear", (4, 4)), ("cat", (4, 6)), ("svd", (4, 6)), ("ties", (4, 4)), ("dare_linear", (4, 4)),
         ("dare_ties", (4, 4)), ("magnitude_prune", (4, 4)), ("ties_svd", (4, 6)), ("dare_ties_svd", (4, 6)),
         ("magnitude_prune_svd", (4, 6))]


@pytest.mark.parametrize("combination_type, ranks", CASES, ids=[c for c, _ in CASES])
def test_equals_peft(combination_type, ranks, tmp_path, input_ids, monkeypatch):
    import peft.utils.merge_utils as merge_utils

    theirs = _peft_pair(tmp_path, ranks=ranks)
    ours = _ours(tmp_path)
    monkeypatch.setattr(merge_utils, "random_pruning", _seeded_random_pruning(torch.Generator().manual_seed(5)))
    kwargs = dict(combination_type=combination_type, density=0.5)
    theirs.add_weighted_adapter(["a", "b"], [0.7, -0.4], "ab", **kwargs)
    add_weighted_adapter(ours, ["a", "b"], [0.7, -0.4], "ab", generator=torch.Generator().manual_seed(5), **kwargs)
    theirs.set_adapter("ab")
    set_adapter(ours, "ab")
    for path, layer in lora_layers(ours).items():
        peft_layer = theirs.base_model.model.get_submodule(path)
        torch.testing.assert_close(layer.lora_A["ab"].weight, peft_layer.lora_A["ab"].weight, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(layer.lora_B["ab"].weight, peft_layer.lora_B["ab"].weight, atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        diff = (ours(input_ids).logits - theirs(input_ids=input_ids).logits).abs().max().item()
    assert diff <= 1e-5
    config = adapter_configs(ours)["ab"]
    assert config.r == config.lora_alpha == theirs.peft_config["ab"].r


def test_saved_combination_loads_in_peft(tmp_path, input_ids):
    _peft_pair(tmp_path / "src")
    ours = _ours(tmp_path / "src")
    add_weighted_adapter(ours, ["a", "b"], [1.0, 0.5], "ab", combination_type="cat")
    set_adapter(ours, "ab")
    save_adapter(ours, tmp_path / "ab", adapter_name="ab")
    theirs = peft.PeftModel.from_pretrained(make_tiny_llama(), tmp_path / "ab").eval()
    with torch.no_grad():
        assert (ours(input_ids).logits - theirs(input_ids=input_ids).logits).abs().max() <= 1e-5


def test_cat_and_svd_reproduce_the_weighted_sum(tmp_path):
    """cat is exact, svd at full rank too: B A = Σ wᵢ sᵢ Bᵢ Aᵢ (float64 reference)."""
    _peft_pair(tmp_path, ranks=(4, 6))
    ours = _ours(tmp_path)
    add_weighted_adapter(ours, ["a", "b"], [0.7, -0.4], "cat", combination_type="cat")
    add_weighted_adapter(ours, ["a", "b"], [0.7, -0.4], "svd", combination_type="svd", svd_rank=10)
    for layer in lora_layers(ours).values():
        want = sum(w * layer.scaling[n] * layer.lora_B[n].weight.double() @ layer.lora_A[n].weight.double()
                   for n, w in (("a", 0.7), ("b", -0.4)))
        for name in ("cat", "svd"):
            got = layer.scaling[name] * layer.lora_B[name].weight.double() @ layer.lora_A[name].weight.double()
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_dare_keeps_density_and_expectation():
    model = make_tiny_llama()
    add_adapter(model, LoraConfig(r=8, target_modules=["up_proj"], init_lora_weights=False), "a")
    add_adapter(model, LoraConfig(r=8, target_modules=["up_proj"], init_lora_weights=False), "b")
    add_weighted_adapter(model, ["a", "b"], [1.0, 1.0], "d", combination_type="dare_linear", density=0.25,
                         generator=torch.Generator().manual_seed(0))
    layer = model.model.layers[0].mlp.up_proj
    A = layer.lora_A["d"].weight
    zeros = (A == 0).float().mean().item()
    assert abs(zeros - 0.75 ** 2) < 0.08  # an entry is zero when both sources' entries were dropped


def test_new_adapter_is_inactive_and_frozen(tmp_path, input_ids):
    _peft_pair(tmp_path)
    ours = _ours(tmp_path)
    set_adapter(ours, "a")
    before = ours(input_ids).logits
    add_weighted_adapter(ours, ["a", "b"], [0.5, 0.5], "ab", combination_type="linear")
    assert torch.equal(ours(input_ids).logits, before)
    layer = ours.model.layers[0].self_attn.q_proj
    assert not layer.lora_A["ab"].weight.requires_grad and layer.lora_A["a"].weight.requires_grad


def test_single_adapter_is_reweighted_linearly():
    model = make_tiny_llama()
    add_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False), "a")
    add_weighted_adapter(model, ["a"], [0.25], "quarter", combination_type="ties")  # one source: linear, no density
    layer = model.model.layers[0].self_attn.q_proj
    delta = lambda n: layer.scaling[n] * layer.lora_B[n].weight @ layer.lora_A[n].weight  # noqa: E731
    torch.testing.assert_close(delta("quarter"), 0.25 * delta("a"), atol=1e-6, rtol=1e-5)


def test_all_linear_sources_combine_to_the_expanded_list():
    model = make_tiny_llama()
    add_adapter(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False), "a")
    add_adapter(model, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False), "b")
    add_weighted_adapter(model, ["a", "b"], [1.0, 1.0], "ab", combination_type="cat")
    targets = adapter_configs(model)["ab"].target_modules
    assert isinstance(targets, list) and "model.layers.0.mlp.up_proj" in targets
    assert sum("ab" in layer.lora_A for layer in lora_layers(model).values()) == 14


@pytest.mark.parametrize("kwargs, match", [
    (dict(adapters=["a", "zz"], weights=[1, 1]), "unknown adapter 'zz'"),
    (dict(adapters=["a", "b"], weights=[1]), "1 weights for 2 adapters"),
    (dict(adapters=["a", "b"], weights=[1, 1], combination_type="mean"), "combination_type='mean'"),
    (dict(adapters=["a", "b"], weights=[1, 1], combination_type="ties"), "needs density in"),
    (dict(adapters=["a", "b"], weights=[1, 1], combination_type="ties", density=1.5), "needs density in"),
    (dict(adapters=["a", "c"], weights=[1, 1], combination_type="linear"), "one rank"),
    (dict(adapters=["a", "b"], weights=[1, 1], adapter_name="a"), "already exists"),
    (dict(adapters=["a", "b"], weights=[1, math.nan]), "finite"),
])
def test_bad_arguments_name_the_fix(kwargs, match):
    model = make_tiny_llama()
    for name, r in (("a", 4), ("b", 4), ("c", 8)):
        add_adapter(model, LoraConfig(r=r, target_modules=["q_proj"]), name)
    kwargs.setdefault("adapter_name", "new")
    with pytest.raises(ValueError, match=match):
        add_weighted_adapter(model, **kwargs)
    assert "new" not in adapter_configs(model)


def test_modules_to_save_refused():
    model = make_tiny_llama()
    add_adapter(model, LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]), "a")
    add_adapter(model, LoraConfig(r=4, target_modules=["q_proj"]), "b")
    with pytest.raises(ValueError, match="modules_to_save"):
        add_weighted_adapter(model, ["a", "b"], [1, 1], "ab", combination_type="linear")
