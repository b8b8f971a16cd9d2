"""lorakit.data.prepare: the data of a run, read, checked and split before any model is loaded."""

import json
from types import SimpleNamespace

import pytest

from lorakit.data.prepare import prepare_sft_data
from lorakit.data.prompt_format import PromptFormat


def args(**kw):
    base = dict(train_file=None, val_file=None, val_fraction=None, task=None, n_train=8, n_eval=4, seed=0,
                skip_bad_rows=False, columns=None, prompt_format="auto", system_prompt=None, metric="exact")
    base.update(kw)
    return SimpleNamespace(**base)


def write(path, n, make=lambda i: {"input": f"q{i}", "target": f"a{i}"}):
    path.write_text("".join(json.dumps(make(i)) + "\n" for i in range(n)))
    return path


def test_default_held_out_share_is_said(tmp_path):
    lines = []
    data = prepare_sft_data(args(train_file=str(write(tmp_path / "d.jsonl", 50))), log=lines.append)
    assert len(data.val_rows) == 5 and len(data.train_rows) == 45
    assert lines[0].startswith("validation: 5 of 50 rows of") and "val_fraction not set: 10%" in lines[0]
    assert data.prompt_format == PromptFormat("raw") and lines[1] == "prompts: raw text (no chat template)"
    few = prepare_sft_data(args(train_file=str(write(tmp_path / "f.jsonl", 12))), log=lines.append)
    assert few.val_rows == [] and "fewer than 20" in lines[-2]
    none = prepare_sft_data(args(train_file=str(tmp_path / "d.jsonl"), val_fraction=0.0), log=None)
    assert none.val_rows == [] and len(none.train_rows) == 50 and "val_fraction: 0" in none.notes[0]


def test_val_file_chat_format_and_metric(tmp_path):
    data = prepare_sft_data(args(train_file=str(write(tmp_path / "t.jsonl", 10)),
                                 val_file=str(write(tmp_path / "v.jsonl", 3)), prompt_format="chat",
                                 system_prompt="Be brief.", metric="contains"), log=None)
    assert len(data.val_rows) == 3 and data.metric_name == "contains" and data.metric("xx a1 yy", "a1")
    assert data.val_rows[0]["prompt"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q0"}]
    assert data.val_rows[0].where == f"{tmp_path / 'v.jsonl'} line 1"


def test_skipped_rows_are_counted_in_the_log(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"input": "a", "target": "b"}\nnot json\n{"x": 1}\n{"input": "c", "target": "d"}\n')
    lines = []
    data = prepare_sft_data(args(train_file=str(path), skip_bad_rows=True), log=lines.append)
    assert len(data.train_rows) == 2
    assert lines[0].startswith(f"skipped 2 rows of {path} (skip_bad_rows): {path} line 2: invalid JSON")


def test_task_rows(tmp_path):
    data = prepare_sft_data(args(task="dates"), log=None)
    assert len(data.train_rows) == 8 and len(data.val_rows) == 4 and data.prompt_format == PromptFormat("chat")
    assert data.task.name == "dates" and data.metric is data.task.score


@pytest.mark.parametrize("kw, fragment", [
    (dict(columns={"prompt": "q"}), "row has no column 'q'"),
    (dict(prompt_format="raw", system_prompt="x"), "system_prompt needs the chat template"),
    (dict(metric="nope"), "metric='nope'"),
])
def test_errors(tmp_path, kw, fragment):
    with pytest.raises(ValueError, match=fragment):
        prepare_sft_data(args(train_file=str(write(tmp_path / "d.jsonl", 30)), **kw), log=None)
