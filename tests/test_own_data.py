"""Your own data end to end: README's "Your own data" commands as written, the score printed while training equals
`lorakit eval`'s on the same adapter and rows, a bad row fails before any model loads, TensorBoard scalars."""

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest

import lorakit.train
from lorakit.cli import main
from lorakit_testing import make_byte_tokenizer, make_tiny_llama

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny_as_embedded(tmp_path, monkeypatch):
    """A tiny Llama saved where lorakit looks for the embedded SmolLM2, so commands without --model use it."""
    tokenizer = make_byte_tokenizer()
    model = make_tiny_llama(vocab_size=len(tokenizer), max_position_embeddings=256, initializer_range=0.3)
    model.config.eos_token_id, model.config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    target = tmp_path / "cache" / "SmolLM2-135M-Instruct"
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    work = tmp_path / "work"
    (work / "examples").mkdir(parents=True)
    for name in ("sort_train.jsonl", "sort_test.jsonl"):
        shutil.copy(ROOT / "examples" / name, work / "examples" / name)
    monkeypatch.chdir(work)
    return work


def readme_commands(section: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", body, re.S).group(1)
    return [line.split("  #", 1)[0].strip() for line in block.splitlines() if line.strip()]


def test_readme_own_data_commands_as_written(capsys, tiny_as_embedded):
    commands = readme_commands("Your own data")
    assert len(commands) == 3 and all(c.startswith("lorakit ") for c in commands)
    outputs = []
    for command in commands:
        code = main(shlex.split(command)[1:] + ["--debug"])
        out, err = capsys.readouterr()
        assert code == 0, (command, err[-3000:])
        outputs.append(out)
    init, train, evaluate = outputs
    assert "320 prompt_completion rows" in init
    assert "validation: 32 of 320 rows" in train and "prompts: raw text" in train
    for label in ("base accuracy", "tuned accuracy", "best val loss", "trainable", "adapter"):
        assert f"\n{label} " in "\n" + train, train
    assert "on 60 rows of examples/sort_test.jsonl" in evaluate and "exact-match accuracy" in evaluate
    predictions = [json.loads(line) for line in Path("predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 60 and {"prompt", "target", "prediction", "correct"} <= set(predictions[0])
    assert json.loads(Path("runs/sort_train/adapter/lorakit_prompt.json").read_text()) == {"format": "raw",
                                                                                            "system": None}


def _percent(label: str, out: str) -> str:
    return re.search(rf"^{label}\s+(\S+%)", out, re.M).group(1)


@pytest.mark.parametrize("prompt_format", ["raw", "chat"])
def test_score_while_training_equals_lorakit_eval(capsys, tiny_as_embedded, prompt_format):
    tb = pytest.importorskip("tensorboard")  # noqa: F841
    rows = [json.loads(line) for line in Path("examples/sort_train.jsonl").read_text().splitlines()]
    Path("val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:24]))
    Path("train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[24:120]))
    code = main(["train", "sft_lora", "--set", "train_file=train.jsonl", "val_file=val.jsonl", "max_steps=6",
                 "eval_every=3", "batch_size=4", "lr=1e-2", "output_dir=run", "progress=false", "report_to=tensorboard",
                 f"prompt_format={prompt_format}", "--debug"])
    out = capsys.readouterr().out
    assert code == 0, out
    tuned = _percent("tuned accuracy", out)
    code = main(["eval", "--adapter", "run/adapter", "--data", "val.jsonl", "--no-val-loss"])
    evaluated = capsys.readouterr().out
    assert code == 0 and _percent("exact-match accuracy", evaluated) == tuned
    metrics = [json.loads(line) for line in Path("run/metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "score" in m] == [0, 3, 6]  # 0: the base model
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator("run/tensorboard")
    acc.Reload()
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "eval/val_loss",
            "eval/score"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("eval/score")] == [0, 3, 6]  # step 0: the base model


def test_a_bad_row_fails_before_the_model_loads(capsys, tiny_as_embedded, monkeypatch):
    import importlib

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    for module, name in (("lorakit.models", "load_model"), ("lorakit.train.common", "load_model"),
                         ("lorakit.train.recipe", "load_model"), ("lorakit.train.recipe", "load_base")):
        try:
            monkeypatch.setattr(importlib.import_module(module), name, no_model, raising=False)
        except ImportError:
            pass
    Path("bad.jsonl").write_text('{"input": "a", "target": "b"}\n{"input": "a", "targte": "b"}\n')
    code = main(["train", "sft_lora", "--set", "train_file=bad.jsonl", "progress=false"])
    err = capsys.readouterr().err
    assert code == 2 and "bad.jsonl line 2: row has keys ['input', 'targte']" in err
    Path("pref.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    code = main(["train", "sft_lora", "--set", "train_file=pref.jsonl", "progress=false"])
    assert code == 2 and "lorakit train --dpo" in capsys.readouterr().err
