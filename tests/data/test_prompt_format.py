"""lorakit.data.prompt_format: choosing, applying, recording and reading an adapter's prompt format."""

import json

import pytest

from lorakit.data import encode_prompt, tokenize_sft_row
from lorakit.data.prompt_format import (PromptFormat, apply_prompt_format, choose_prompt_format, load_prompt_format,
                                        render_prompt, save_prompt_format)

RAW = [{"prompt": "2+2=", "completion": "4"}]
CHAT = [{"prompt": [{"role": "user", "content": "2+2="}], "completion": "4"}]


def test_auto_follows_the_rows():
    assert choose_prompt_format(RAW) == PromptFormat("raw")
    assert choose_prompt_format(CHAT) == PromptFormat("chat")
    assert choose_prompt_format([{"messages": [{"role": "user", "content": "x"}]}]) == PromptFormat("chat")
    assert choose_prompt_format(RAW, system="Be brief.") == PromptFormat("chat", "Be brief.")
    with pytest.raises(ValueError, match="mix text prompts"):
        choose_prompt_format(RAW + CHAT)
    with pytest.raises(ValueError, match="rows hold chat messages"):
        choose_prompt_format(CHAT, "raw")
    with pytest.raises(ValueError, match="prompt_format='json'"):
        choose_prompt_format(RAW, "json")


def test_chat_renders_text_prompts_as_a_user_turn(chatml_tokenizer):
    fmt = choose_prompt_format(RAW, "chat", system="Be exact.")
    rows = apply_prompt_format(RAW, fmt)
    assert rows == [{"prompt": [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "2+2="}],
                     "completion": "4"}]
    assert RAW == [{"prompt": "2+2=", "completion": "4"}]  # the input rows are left alone
    # trained and prompted alike: the generation prompt is the prefix of the training row before the answer
    ex = tokenize_sft_row(rows[0], chatml_tokenizer, 512)
    prompt_ids = encode_prompt(render_prompt("2+2=", fmt), chatml_tokenizer)
    assert ex["input_ids"][: len(prompt_ids)] == prompt_ids and ex["labels"][len(prompt_ids)] != -100


def test_raw_leaves_text_and_refuses_messages():
    fmt = PromptFormat("raw")
    assert apply_prompt_format(RAW, fmt) == RAW and render_prompt("x", fmt) == "x"
    with pytest.raises(ValueError, match="pass --chat"):
        render_prompt([{"role": "user", "content": "x"}], fmt)
    with pytest.raises(ValueError, match="system prompt needs the chat format"):
        PromptFormat("raw", "sys")


def test_record_round_trip(tmp_path):
    assert load_prompt_format(tmp_path) is None
    save_prompt_format(tmp_path, PromptFormat("chat", "Be brief."))
    assert json.loads((tmp_path / "lorakit_prompt.json").read_text()) == {"format": "chat", "system": "Be brief."}
    assert load_prompt_format(tmp_path) == PromptFormat("chat", "Be brief.")
    (tmp_path / "lorakit_prompt.json").write_text('{"format": "html"}')
    with pytest.raises(ValueError, match="lorakit_prompt.json: not a lorakit prompt-format record"):
        load_prompt_format(tmp_path)
