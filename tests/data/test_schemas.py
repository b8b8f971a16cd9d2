"""lorakit.data.schemas through load_rows: every layout people have loads to the same rows, in every file type."""

import csv
import json

import pytest

from lorakit.data import load_rows

QA = [("What is 2+2?", "4"), ("Capital of France?", "Paris"), ("Opposite of hot?", "cold")]
EXPECTED = [{"prompt": q, "completion": a} for q, a in QA]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("layout", [
    lambda q, a: {"prompt": q, "completion": a},
    lambda q, a: {"input": q, "target": a},
    lambda q, a: {"instruction": q, "input": "", "output": a},
    lambda q, a: {"instruction": q, "output": a},
    lambda q, a: {"question": q, "answer": a, "id": 7},
    lambda q, a: {"prompt": q, "response": a},
], ids=["prompt/completion", "input/target", "alpaca", "alpaca-no-input", "question/answer", "prompt/response"])
def test_each_layout_loads_to_the_same_rows(tmp_path, layout):
    loaded = load_rows(write_jsonl(tmp_path / "d.jsonl", [layout(q, a) for q, a in QA]))
    assert loaded.rows == EXPECTED and loaded.format == "prompt_completion"


def test_alpaca_input_follows_the_instruction_after_a_blank_line(tmp_path):
    row = {"instruction": "Translate to French.", "input": "cat", "output": "chat"}
    assert load_rows(write_jsonl(tmp_path / "a.jsonl", [row])).rows == [
        {"prompt": "Translate to French.\n\ncat", "completion": "chat"}]


def test_numbers_in_a_layout_are_read_as_text(tmp_path):
    rows = load_rows(write_jsonl(tmp_path / "n.jsonl", [{"input": "2+2", "target": 4}])).rows
    assert rows == [{"prompt": "2+2", "completion": "4"}]


def test_columns_mapping(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"query": q, "label": a, "x": 1} for q, a in QA])
    assert load_rows(path, columns={"prompt": "query", "completion": "label"}).rows == EXPECTED
    with pytest.raises(ValueError, match=r"c\.jsonl line 1: row has no column 'lable'"):
        load_rows(path, columns={"prompt": "query", "completion": "lable"})
    with pytest.raises(ValueError, match="'answer' is not one of lorakit's keys"):
        load_rows(path, columns={"prompt": "query", "answer": "label"})


def test_unknown_layout_names_the_layouts_and_columns(tmp_path):
    with pytest.raises(ValueError, match=r"u\.jsonl line 1: row has keys \['q', 'r'\].*question/answer.*columns:"):
        load_rows(write_jsonl(tmp_path / "u.jsonl", [{"q": "a", "r": "b"}]))


def test_csv_and_tsv(tmp_path):
    for name, delimiter in (("d.csv", ","), ("d.tsv", "\t")):
        with open(tmp_path / name, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, delimiter=delimiter)
            writer.writerow(["question", "answer"])
            writer.writerows(QA)
        loaded = load_rows(tmp_path / name)
        assert loaded.rows == EXPECTED
        assert [r.where for r in loaded.rows] == [f"{tmp_path / name} line {n}" for n in (2, 3, 4)]


def test_csv_errors_name_the_line(tmp_path):
    (tmp_path / "m.csv").write_text('question,answer\n"a\nb",1\nonly one cell\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"m\.csv line 4: 1 cells but the header has 2 columns"):
        load_rows(tmp_path / "m.csv")
    loaded = load_rows(tmp_path / "m.csv", skip_bad=True)  # the quoted two-line record starts on line 2
    assert loaded.rows == [{"prompt": "a\nb", "completion": "1"}] and loaded.rows[0].where.endswith("line 2")


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"input": q, "target": a} for q, a in QA]), tmp_path / "d.parquet")
    loaded = load_rows(tmp_path / "d.parquet")
    assert loaded.rows == EXPECTED and loaded.rows[2].where == f"{tmp_path / 'd.parquet'} row 3"
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ValueError, match=r"bad\.parquet: not a readable Parquet file"):
        load_rows(tmp_path / "bad.parquet")
