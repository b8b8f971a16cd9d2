"""lorakit.data.preference: prompt/chosen/rejected ids and the (2B, T) DPO batch."""

import pytest

from lorakit.data import IGNORE_INDEX, PreferenceDataset, collate_preference, encode_prompt, tokenize_preference_row


def test_string_row(chatml_tokenizer):
    tok = chatml_tokenizer
    ex = tokenize_preference_row({"prompt": "Q?", "chosen": " yes", "rejected": " no"}, tok, 64)
    assert tok.decode(ex["prompt_ids"]) == "Q?"
    assert tok.decode(ex["chosen_ids"]) == " yes<|im_end|>"
    assert tok.decode(ex["rejected_ids"]) == " no<|im_end|>"


def test_chat_row_uses_template(chatml_tokenizer):
    tok = chatml_tokenizer
    prompt = [{"role": "user", "content": "Q?"}]
    row = {"prompt": prompt, "chosen": "yes", "rejected": [{"role": "assistant", "content": "no"}]}
    ex = tokenize_preference_row(row, tok, 128)
    assert ex["prompt_ids"] == encode_prompt(prompt, tok)
    assert tok.decode(ex["chosen_ids"]) == "yes<|im_end|>"  # trailing template newline dropped
    assert tok.decode(ex["rejected_ids"]) == "no<|im_end|>"


def test_truncation_and_errors(chatml_tokenizer):
    tok = chatml_tokenizer
    row = {"prompt": "abcd", "chosen": "xyz", "rejected": "w"}
    ex = tokenize_preference_row(row, tok, 6)
    assert len(ex["prompt_ids"]) == 4 and len(ex["chosen_ids"]) == 2 and len(ex["rejected_ids"]) == 2
    with pytest.raises(ValueError, match="leaving no completion token"):
        tokenize_preference_row(row, tok, 4)
    with pytest.raises(ValueError, match="expected a preference row"):
        tokenize_preference_row({"prompt": "a", "completion": "b"}, tok, 64)
    with pytest.raises(ValueError, match=r"^row 1: "):
        PreferenceDataset([row, {"prompt": "a" * 20, "chosen": "b", "rejected": "c"}], tok, 10)
    ds = PreferenceDataset([row, {"prompt": "a" * 20, "chosen": "b", "rejected": "c"}], tok, 10, skip_bad=True)
    assert len(ds) == 1 and ds.n_skipped == 1


def test_collate_chosen_then_rejected():
    batch = [
        {"prompt_ids": [1, 2], "chosen_ids": [3, 4, 5], "rejected_ids": [6]},
        {"prompt_ids": [7], "chosen_ids": [8], "rejected_ids": [9, 10]},
    ]
    out = collate_preference(batch, pad_id=0)
    assert out["input_ids"].tolist() == [
        [1, 2, 3, 4, 5],  # chosen 0
        [7, 8, 0, 0, 0],  # chosen 1
        [1, 2, 6, 0, 0],  # rejected 0
        [7, 9, 10, 0, 0],  # rejected 1
    ]
    M = IGNORE_INDEX
    assert out["labels"].tolist() == [[M, M, 3, 4, 5], [M, 8, M, M, M], [M, M, 6, M, M], [M, 9, 10, M, M]]
    assert out["attention_mask"].tolist() == [[1] * 5, [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0]]
