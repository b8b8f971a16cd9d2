"""Deploy path: merged model saved in its dtype with its tokenizer, verified against the adapter model."""

import copy

import pytest
import torch

from lorakit_testing import make_tiny_llama
from lorakit import LoraConfig, add_adapter, merge_and_unload, save_merged, verify_merge


def _tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")))


def test_verify_merge_reports_small_diff(tiny_llama, input_ids):
    add_adapter(tiny_llama, LoraConfig(target_modules="all-linear", init_lora_weights=False))
    merged = merge_and_unload(copy.deepcopy(tiny_llama))
    report = verify_merge(tiny_llama, merged, input_ids)
    assert report.ok and report.max_abs_diff < 1e-5


def test_verify_merge_catches_a_wrong_merge(tiny_llama, input_ids):
    add_adapter(tiny_llama, LoraConfig(target_modules="all-linear", init_lora_weights=False))
    merged = merge_and_unload(copy.deepcopy(tiny_llama))
    with torch.no_grad():
        merged.model.layers[0].self_attn.q_proj.weight.add_(0.5)
    report = verify_merge(tiny_llama, merged, {"input_ids": input_ids})
    assert not report.ok and "TOO LARGE" in str(report)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_merged_saved_in_trained_dtype(dtype, tmp_path, input_ids):
    from transformers import AutoModelForCausalLM

    model = make_tiny_llama().to(dtype)
    add_adapter(model, LoraConfig(target_modules="all-linear", init_lora_weights=False))
    merged = merge_and_unload(model)
    assert all(p.dtype == dtype for p in merged.parameters())
    save_merged(merged, tmp_path, tokenizer=_tokenizer())
    size = sum(p.stat().st_size for p in tmp_path.glob("*.safetensors"))
    n_params = sum(p.numel() for p in merged.parameters())
    assert size < n_params * 2 + 64_000  # 2 bytes a parameter: no float32 doubling
    back = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert next(back.parameters()).dtype == dtype
    assert (tmp_path / "tokenizer.json").is_file()
    saved = back.state_dict()
    assert all(torch.equal(saved[k], v) for k, v in merged.state_dict().items())


def test_save_merged_refuses_unmerged(tiny_llama, tmp_path):
    add_adapter(tiny_llama, LoraConfig())
    with pytest.raises(ValueError, match="merge_and_unload"):
        save_merged(tiny_llama, tmp_path)
