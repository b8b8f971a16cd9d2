"""adapter_names=[one per row] in forward and generate equals running each row alone with its adapter."""

import pytest
import torch

from lorakit_testing import make_tiny_llama
from lorakit import (LoraConfig, add_adapter, disable_adapter, merge_adapter, set_adapter, unmerge_adapter)


@pytest.fixture
def model():
    m = make_tiny_llama()
    add_adapter(m, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False), "a")
    add_adapter(m, LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                              modules_to_save=["lm_head"]), "b")
    with torch.no_grad():
        m.lm_head.modules_to_save["b"].weight.mul_(1.5)  # b's head differs from the base's
    return m.eval()


def _alone(model, ids, names):
    rows = []
    for i, name in enumerate(names):
        if name == "__base__":
            with disable_adapter(model):
                rows.append(model(ids[i:i + 1]).logits)
        else:
            set_adapter(model, name)
            rows.append(model(ids[i:i + 1]).logits)
    return torch.cat(rows)


@torch.no_grad()
def test_forward_rows_equal_rows_alone(model, input_ids):
    ids = torch.cat([input_ids, input_ids.flip(0), input_ids[:1]])  # 5 rows
    names = ["a", "b", "__base__", "a", "b"]
    set_adapter(model, "a")
    got = model(ids, adapter_names=names).logits
    want = _alone(model, ids, names)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    set_adapter(model, "a")
    torch.testing.assert_close(model(ids).logits[:1], want[:1], atol=1e-5, rtol=1e-5)  # layers restored after


@torch.no_grad()
def test_generate_rows_equal_rows_alone(model, input_ids):
    names = ["b", "a"]
    set_adapter(model, "a")
    got = model.generate(input_ids, adapter_names=names, max_new_tokens=6, do_sample=False, pad_token_id=0)
    for i, name in enumerate(names):
        set_adapter(model, name)
        alone = model.generate(input_ids[i:i + 1], max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(got[i:i + 1], alone)


def test_unknown_name_and_wrong_count_are_refused(model, input_ids):
    with pytest.raises(ValueError, match=r"unknown adapters \['c'\].*'__base__'"):
        model(input_ids, adapter_names=["a", "c"])
    with pytest.raises(ValueError, match="3 names for a batch of 2 rows"):
        model(input_ids, adapter_names=["a", "a", "b"])
    assert not any(getattr(m, "disabled", False) for m in model.modules())


def test_merged_adapters_refused(model, input_ids):
    set_adapter(model, "a")
    merge_adapter(model)
    with pytest.raises(ValueError, match="unmerge_adapter"):
        model(input_ids, adapter_names=["a", "b"])
    unmerge_adapter(model)


@torch.no_grad()
def test_inside_disable_adapter_every_row_is_base(model, input_ids):
    with disable_adapter(model):
        base = model(input_ids).logits
        torch.testing.assert_close(model(input_ids, adapter_names=["a", "b"]).logits, base)


@torch.no_grad()
def test_copies_and_pickles_keep_mixed_batch_generate(model, input_ids):
    import copy
    import pickle

    want = model.generate(input_ids, adapter_names=["a", "b"], max_new_tokens=3, do_sample=False, pad_token_id=0)
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert other.generate._model() is other
        got = other.generate(input_ids, adapter_names=["a", "b"], max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert torch.equal(got, want)
