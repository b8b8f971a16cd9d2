"""lorakit.data.io: reading JSONL/JSON rows, format detection, error messages, splits."""

import json

import pytest

from lorakit.data import detect_format, load_rows, load_splits, train_val_split

PC = {"prompt": "Q", "completion": "A"}


def write_jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "row, fmt",
    [
        (PC, "prompt_completion"),
        ({"prompt": [{"role": "user", "content": "Q"}], "completion": "A"}, "prompt_completion"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "messages"),
        ({"text": "hello", "id": 3}, "text"),
        ({"prompt": "Q", "chosen": "A", "rejected": "B"}, "preference"),
    ],
)
def test_detect_format(row, fmt):
    assert detect_format(row) == fmt


@pytest.mark.parametrize(
    "row, fragment",
    [
        ({"messages": []}, "non-empty list"),
        ({"messages": [{"role": "user"}]}, "'messages'[0]"),
        ({"text": 3}, "'text' must be a string"),
        ({"prompt": 1, "completion": "A"}, "'prompt' must be a string or a list"),
        ({"prompt": "Q", "completion": [{"role": "assistant", "content": "A"}]}, "string 'prompt'"),
        (["not", "a", "dict"], "JSON object"),
    ],
)
def test_detect_format_rejects_bad_values(row, fragment):
    with pytest.raises(ValueError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        detect_format(row)


def test_load_jsonl_skips_blank_lines(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps(PC), "", json.dumps({"prompt": "x", "completion": "y"})])
    loaded = load_rows(path)
    assert loaded.rows == [PC, {"prompt": "x", "completion": "y"}]
    assert loaded.format == "prompt_completion" and loaded.n_skipped == 0


def test_malformed_line_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [json.dumps(PC), json.dumps(PC), '{"prompt": "Q", "completion": '])
    with pytest.raises(ValueError, match=r"bad\.jsonl line 3: invalid JSON"):
        load_rows(path)


def test_missing_keys_name_found_and_expected(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps(PC), json.dumps({"prompt": "Q", "answer": "A"})])
    with pytest.raises(ValueError) as info:
        load_rows(path)
    msg = str(info.value)
    assert "d.jsonl line 2" in msg
    assert "['answer', 'prompt']" in msg  # keys found
    assert "'completion'" in msg and "'messages'" in msg and "'chosen'" in msg  # keys expected


def test_skip_bad_counts_and_skips(tmp_path):
    lines = [json.dumps(PC), "not json", json.dumps({"oops": 1}), json.dumps({"text": "t"}), json.dumps(PC)]
    loaded = load_rows(write_jsonl(tmp_path / "d.jsonl", lines), skip_bad=True)
    assert loaded.rows == [PC, PC]
    assert loaded.n_skipped == 3  # bad JSON, unknown keys, format differing from the first row


def test_mixed_formats_rejected(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps(PC), json.dumps({"text": "t"})])
    with pytest.raises(ValueError, match=r"line 2: row format 'text' differs from 'prompt_completion'.*line 1"):
        load_rows(path)


def test_formats_restriction(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps(PC)])
    with pytest.raises(ValueError, match=r"d\.jsonl line 1: is a prompt_completion row, but preference tuning"):
        load_rows(path, formats=("preference",))
    with pytest.raises(ValueError, match="not accepted here"):
        load_rows(path, formats=("text",))
    with pytest.raises(ValueError, match="unknown row formats"):
        load_rows(path, formats=("prefs",))


def test_json_list_file(tmp_path):
    rows = [{"prompt": "Q", "chosen": "A", "rejected": "B"}] * 2
    path = tmp_path / "d.json"
    path.write_text(json.dumps(rows, indent=1))
    loaded = load_rows(path)
    assert loaded.rows == rows and loaded.format == "preference"
    path.write_text(json.dumps([rows[0], {"prompt": "Q"}]))
    with pytest.raises(ValueError, match=r"d\.json item 2: row has keys \['prompt'\]"):
        load_rows(path)
    path.write_text('[{"text": "a"},\n {"text": ]')
    with pytest.raises(ValueError, match=r"d\.json line 2: invalid JSON"):
        load_rows(path, skip_bad=True)  # a broken JSON list cannot be skipped around


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_rows(tmp_path / "nope.jsonl")


def test_train_val_split_deterministic_and_disjoint():
    rows = [{"text": str(i)} for i in range(50)]
    train, val = train_val_split(rows, 0.2, seed=3)
    assert (train, val) == train_val_split(rows, 0.2, seed=3)
    assert len(val) == 10 and len(train) == 40
    assert sorted(r["text"] for r in train + val) == sorted(r["text"] for r in rows)
    assert val != train_val_split(rows, 0.2, seed=4)[1]
    assert train_val_split(rows, 0.0) == (rows, [])
    with pytest.raises(ValueError, match="val_fraction"):
        train_val_split(rows, 1.0)
    with pytest.raises(ValueError, match="no training rows"):
        train_val_split(rows[:1], 0.5)


def test_load_splits_with_separate_val_file(tmp_path):
    train_path = write_jsonl(tmp_path / "train.jsonl", [json.dumps(PC)] * 3)
    val_path = write_jsonl(tmp_path / "val.jsonl", [json.dumps({"prompt": "v", "completion": "w"})])
    train, val = load_splits(train_path, val_path)
    assert len(train) == 3 and val == [{"prompt": "v", "completion": "w"}]
    with pytest.raises(ValueError, match="not both"):
        load_splits(train_path, val_path, val_fraction=0.1)
    other = write_jsonl(tmp_path / "other.jsonl", [json.dumps({"text": "t"})])
    with pytest.raises(ValueError, match="format 'text'"):
        load_splits(train_path, other)
    train, val = load_splits(train_path, val_fraction=0.34, seed=0)
    assert len(train) == 2 and len(val) == 1


def test_preference_rows_given_to_sft_point_to_dpo(tmp_path):
    pref = {"prompt": "Q", "chosen": "A", "rejected": "B"}
    path = write_jsonl(tmp_path / "p.jsonl", [json.dumps(pref)])
    with pytest.raises(ValueError, match=r"p\.jsonl line 1: is a preference row .*lorakit train --dpo"):
        load_rows(path, formats=("prompt_completion", "messages", "text"))


def test_non_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(PC).encode() + b"\n" + '{"prompt": "caf\u00e9", "completion": "x"}'.encode("latin-1") + b"\n")
    with pytest.raises(ValueError, match=r"latin1\.jsonl line 2: not UTF-8 text \(byte 0xe9 at column 16\)"):
        load_rows(path)
    with pytest.raises(ValueError, match="line 2: not UTF-8"):  # never skippable: the rest of the file is suspect
        load_rows(path, skip_bad=True)


def test_skipped_rows_are_listed_with_their_lines(tmp_path):
    lines = [json.dumps(PC), "not json", json.dumps(PC), json.dumps({"oops": 1})]
    loaded = load_rows(write_jsonl(tmp_path / "d.jsonl", lines), skip_bad=True)
    assert loaded.n_skipped == 2
    assert loaded.skipped[0].startswith(f"{tmp_path / 'd.jsonl'} line 2: invalid JSON")
    assert loaded.skipped[1].startswith(f"{tmp_path / 'd.jsonl'} line 4: row has keys ['oops']")
    assert [r.where for r in loaded.rows] == [f"{tmp_path / 'd.jsonl'} line {n}" for n in (1, 3)]


def test_rows_keep_their_location_through_pickle_and_copy(tmp_path):
    import copy
    import pickle

    row = load_rows(write_jsonl(tmp_path / "d.jsonl", [json.dumps(PC)])).rows[0]
    assert row == PC and json.loads(json.dumps(row)) == PC
    for clone in (pickle.loads(pickle.dumps(row)), copy.deepcopy(row), copy.copy(row)):
        assert clone == PC and clone.where == row.where
