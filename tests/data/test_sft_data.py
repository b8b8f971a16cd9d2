"""lorakit.data.sft: label masking (chat and raw), truncation, dataset errors, collate, packing.

The ChatML byte tokenizer (conftest.py) makes one token per character, so the trained tokens can
be checked by decoding them back to text.
"""

import pytest
import torch

from lorakit.data import IGNORE_INDEX, SFTDataset, collate_sft, encode_prompt, pack_sft, tokenize_sft_row
from lorakit.tasks import make_split


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


def trained_text(tok, ex):
    """Concatenated text of the tokens that carry loss."""
    return tok.decode([t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE_INDEX])


def test_messages_train_on_assistant_turns_only(chatml_tokenizer):
    tok = chatml_tokenizer
    row = {"messages": [user("hi"), bot("yo"), user("again"), bot("ok then")]}
    ex = tokenize_sft_row(row, tok, max_length=512)
    assert len(ex["input_ids"]) == len(ex["labels"])
    text = tok.decode(ex["input_ids"])
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi")
    # Content + end-of-turn marker of both assistant turns; not the system/user turns, the role
    # headers, nor the newline after <|im_end|>.
    assert trained_text(tok, ex) == "yo<|im_end|>ok then<|im_end|>"
    labels = ex["labels"]
    assert labels[-1] == IGNORE_INDEX and tok.decode([ex["input_ids"][-1]]) == "\n"


def test_prompt_messages_mask_earlier_assistant_turns(chatml_tokenizer):
    tok = chatml_tokenizer
    row = {"prompt": [user("a"), bot("b"), user("c")], "completion": [bot("d")]}
    assert trained_text(tok, tokenize_sft_row(row, tok, 512)) == "d<|im_end|>"
    # a string completion is the same as one assistant message
    row_str = {"prompt": [user("a"), bot("b"), user("c")], "completion": "d"}
    assert tokenize_sft_row(row_str, tok, 512) == tokenize_sft_row(row, tok, 512)


def test_encode_prompt_is_the_training_prefix(chatml_tokenizer):
    tok = chatml_tokenizer
    row = {"prompt": [user("2+2?")], "completion": "4"}
    ex = tokenize_sft_row(row, tok, 512)
    prompt_ids = encode_prompt(row["prompt"], tok)
    assert ex["input_ids"][: len(prompt_ids)] == prompt_ids
    assert tok.decode(prompt_ids).endswith("<|im_start|>assistant\n")
    assert ex["labels"][len(prompt_ids)] != IGNORE_INDEX  # first completion token is trained
    assert all(lab == IGNORE_INDEX for lab in ex["labels"][: len(prompt_ids)])


def test_string_prompt_completion_appends_eos(chatml_tokenizer):
    tok = chatml_tokenizer
    ex = tokenize_sft_row({"prompt": "Q: 2+2?", "completion": " 4"}, tok, 512)
    assert tok.decode(ex["input_ids"]) == "Q: 2+2? 4<|im_end|>"
    assert ex["input_ids"][-1] == tok.eos_token_id
    assert trained_text(tok, ex) == " 4<|im_end|>"
    assert ex["labels"][:7] == [IGNORE_INDEX] * 7


def test_text_rows_and_completion_only_false(chatml_tokenizer):
    tok = chatml_tokenizer
    ex = tokenize_sft_row({"text": "abc"}, tok, 512)
    assert ex["labels"] == ex["input_ids"] and ex["input_ids"][-1] == tok.eos_token_id
    row = {"messages": [user("hi"), bot("yo")]}
    ex = tokenize_sft_row(row, tok, 512, completion_only=False)
    assert ex["labels"] == ex["input_ids"]


def test_truncation_and_no_trainable_token(chatml_tokenizer):
    tok = chatml_tokenizer
    row = {"prompt": "abcdef", "completion": "xyz"}
    ex = tokenize_sft_row(row, tok, max_length=8)
    assert len(ex["input_ids"]) == 8 and trained_text(tok, ex) == "xy"
    with pytest.raises(ValueError, match="no trainable token left.*max_length=6"):
        tokenize_sft_row(row, tok, max_length=6)
    with pytest.raises(ValueError, match="no trainable token"):
        tokenize_sft_row({"messages": [user("only a question")]}, tok, 512)


def test_dataset_names_row_index_or_skips(chatml_tokenizer):
    rows = [{"prompt": "ab", "completion": "c"}, {"prompt": "a" * 50, "completion": "c"}, {"text": "t"}]
    with pytest.raises(ValueError, match=r"^row 1: no trainable token"):
        SFTDataset(rows, chatml_tokenizer, max_length=10)
    ds = SFTDataset(rows, chatml_tokenizer, max_length=10, skip_bad=True)
    assert len(ds) == 2 and ds.n_skipped == 1
    assert chatml_tokenizer.decode(ds[1]["input_ids"]) == "t<|im_end|>"


def test_chat_errors(chatml_tokenizer, make_tokenizer):
    row = {"messages": [user("hi"), bot("yo")]}
    with pytest.raises(ValueError, match="no chat_template"):
        tokenize_sft_row(row, make_tokenizer(chat_template=None), 512)
    # A template that only writes a header when asked for the generation prompt is not prefix-stable.
    odd = "{% for m in messages %}{{ m['content'] }};{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    with pytest.raises(ValueError, match="not prefix-stable at message 1"):
        tokenize_sft_row(row, make_tokenizer(chat_template=odd), 512)
    with pytest.raises(ValueError, match="preference row .*lorakit train --dpo"):
        tokenize_sft_row({"prompt": "p", "chosen": "a", "rejected": "b"}, chatml_tokenizer, 512)
    with pytest.raises(ValueError, match="max_length"):
        tokenize_sft_row(row, chatml_tokenizer, 0)


def test_task_rows_tokenize(chatml_tokenizer):
    train, _ = make_split("dates", n_train=5, n_eval=0, seed=0)
    ds = SFTDataset(train, chatml_tokenizer, max_length=512)
    for row, ex in zip(train, ds.examples):
        assert trained_text(chatml_tokenizer, ex) == row["completion"][0]["content"] + "<|im_end|>"


def test_collate_pads_right_and_masks_padding():
    batch = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    out = collate_sft(batch, pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["input_ids"].dtype == torch.long and "position_ids" not in out
    with pytest.raises(ValueError, match="pad_id is None"):
        collate_sft(batch, pad_id=None)
    with pytest.raises(ValueError, match="empty batch"):
        collate_sft([], pad_id=0)


def test_pack_respects_boundaries():
    examples = [
        {"input_ids": [1, 2, 3], "labels": [1, 2, 3]},
        {"input_ids": [4, 5], "labels": [-100, 5]},
        {"input_ids": [6, 7, 8, 9], "labels": [6, 7, 8, 9]},
        {"input_ids": [10], "labels": [10]},
    ]
    packed = pack_sft(examples, max_length=5)
    # first-fit, longest first: [6,7,8,9]+[10], [1,2,3]+[4,5]
    assert [row["input_ids"] for row in packed] == [[6, 7, 8, 9, 10], [1, 2, 3, 4, 5]]
    assert [row["position_ids"] for row in packed] == [[0, 1, 2, 3, 0], [0, 1, 2, 0, 1]]
    # the first token of every example carries no label, so no loss crosses a boundary
    assert [row["labels"] for row in packed] == [[-100, 7, 8, 9, -100], [-100, 2, 3, -100, 5]]
    assert all(len(row["input_ids"]) <= 5 for row in packed)
    with pytest.raises(ValueError, match="example 2 has 4 tokens"):
        pack_sft(examples, max_length=3)


def test_collate_packed_rows_gives_position_ids():
    packed = pack_sft([{"input_ids": [1, 2], "labels": [1, 2]}, {"input_ids": [3], "labels": [3]}], max_length=2)
    out = collate_sft(packed, pad_id=0)
    assert "attention_mask" not in out  # see collate_sft docstring: transformers then uses position_ids
    assert out["input_ids"].tolist() == [[1, 2], [3, 0]]
    assert out["position_ids"].tolist() == [[0, 1], [0, 0]]  # padding restarts at 0: its own sequence
    assert out["labels"].tolist() == [[-100, 2], [-100, -100]]
    with pytest.raises(ValueError, match="mixes packed"):
        collate_sft([packed[0], {"input_ids": [1], "labels": [1]}], pad_id=0)


def test_dataset_pack_keeps_all_trained_tokens(chatml_tokenizer):
    rows = [{"prompt": "q" * i, "completion": "a" * (5 - i)} for i in range(1, 5)]
    plain = SFTDataset(rows, chatml_tokenizer, max_length=16)
    packed = SFTDataset(rows, chatml_tokenizer, max_length=16, pack=True)
    assert len(packed) < len(plain)
    n_trained = sum(lab != IGNORE_INDEX for ex in plain.examples for lab in ex["labels"])
    assert sum(lab != IGNORE_INDEX for ex in packed.examples for lab in ex["labels"]) == n_trained


class NoOffsets:
    """A tokenizer view without character offsets, like a slow (Python) tokenizer."""

    is_fast = False

    def __init__(self, tok):
        self._tok = tok
        self.chat_template, self.eos_token_id = tok.chat_template, tok.eos_token_id

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": self._tok(text, add_special_tokens=add_special_tokens)["input_ids"]}

    def apply_chat_template(self, *args, **kwargs):
        return self._tok.apply_chat_template(*args, **kwargs)


def test_tokenizer_without_offsets_gives_same_labels(chatml_tokenizer):
    row = {"messages": [user("hi"), bot("yo"), user("again"), bot("ok then")]}
    assert tokenize_sft_row(row, NoOffsets(chatml_tokenizer), 512) == tokenize_sft_row(row, chatml_tokenizer, 512)


def test_dataset_names_the_file_line_of_a_row_without_trainable_token(chatml_tokenizer, tmp_path):
    import json

    from lorakit.data import load_rows

    path = tmp_path / "d.jsonl"
    path.write_text("\n".join([json.dumps({"prompt": "ab", "completion": "c"}), "",
                               json.dumps({"prompt": "a" * 50, "completion": "c"})]) + "\n")
    rows = load_rows(path).rows
    with pytest.raises(ValueError, match=rf"^{path} line 3: no trainable token"):  # line 3, not row 1
        SFTDataset(rows, chatml_tokenizer, max_length=10)
    ds = SFTDataset(rows, chatml_tokenizer, max_length=10, skip_bad=True)
    assert ds.n_skipped == 1 and ds.skipped[0].startswith(f"{path} line 3: no trainable token")
