"""`lorakit eval --data`, `generate` and `chat` on your own rows: predictions, failures, options, prompt format."""

import io
import json

import pytest

import lorakit
from lorakit import LoraConfig, add_adapter, save_adapter
from lorakit.cli import main
from lorakit.data.prompt_format import PromptFormat, save_prompt_format
from lorakit_testing import make_byte_tokenizer, make_tiny_llama

ROWS = [{"prompt": f"say {c}:", "completion": c} for c in "abcdef"]


@pytest.fixture(scope="module")
def base_and_adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("own")
    tokenizer = make_byte_tokenizer()
    model = make_tiny_llama(vocab_size=len(tokenizer), max_position_embeddings=256, initializer_range=0.3)
    model.config.eos_token_id, model.config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    model, _ = lorakit.load_model(root / "base")
    add_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    for name, fmt in (("raw", PromptFormat("raw")), ("chat", PromptFormat("chat", "Answer with one letter."))):
        save_adapter(model, root / name)
        save_prompt_format(root / name, fmt)
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return root


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_predictions_failures_and_options(capsys, base_and_adapters, tmp_path):
    root = base_and_adapters
    code, out, err = run(capsys, "eval", "--model", root / "base", "--adapter", root / "raw", "--data",
                         root / "rows.jsonl", "--predictions", tmp_path / "p.jsonl", "--no-val-loss", "--threads", 1,
                         "--max-new-tokens", 3)
    assert code == 0, err
    assert "on 6 rows of" in out and "prompts: raw text (no chat template)" in out
    assert "validation loss" not in out and "(0/6)" in out
    assert "6 wrong; the first 3:" in out and f"{root / 'rows.jsonl'} line 1" in out and "expected   a" in out
    preds = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [p["target"] for p in preds] == list("abcdef") and [p["prompt"] for p in preds] == [r["prompt"] for r in ROWS]
    assert all(set(p) == {"prompt", "target", "prediction", "correct", "where"} for p in preds)
    # a metric that accepts anything: 100%, no failures printed; the validation loss is back
    code, out, _ = run(capsys, "eval", "--model", root / "base", "--data", root / "rows.jsonl", "--metric",
                       "contains", "--max-new-tokens", 2, "--n", 2)
    assert code == 0 and "score (contains)" in out and "validation loss" in out and "on 2 rows" in out


def test_a_raw_adapter_answers_alike_through_eval_generate_and_chat(capsys, monkeypatch, base_and_adapters, tmp_path):
    root = base_and_adapters
    common = ["--model", root / "base", "--adapter", root / "raw", "--max-new-tokens", 4]
    # batch 1: the same computation as one prompt at a time (padding changes float sums, and a random model's
    # near-tied logits can flip)
    code, out, _ = run(capsys, "eval", *common, "--data", root / "rows.jsonl", "--predictions", tmp_path / "p.jsonl",
                       "--batch-size", 1, "--no-val-loss")
    assert code == 0
    preds = [json.loads(line)["prediction"] for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    generated = []
    for row in ROWS:
        code, out, _ = run(capsys, "generate", *common, row["prompt"])
        generated.append(out.removesuffix("\n"))
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(r["prompt"] + "\n" for r in ROWS)))
    code, out, _ = run(capsys, "chat", *common)
    assert code == 0 and generated == preds and out.splitlines() == [p.strip() for p in preds]
    # --chat overrides the record
    code, out, _ = run(capsys, "generate", *common, "--chat", ROWS[0]["prompt"])
    assert code == 0


def test_recorded_chat_format_and_system_prompt(capsys, base_and_adapters):
    from lorakit.evaluate import generate_answers

    root = base_and_adapters
    code, out, _ = run(capsys, "generate", "--model", root / "base", "--adapter", root / "chat", "--max-new-tokens",
                       5, "say a:")
    model, tokenizer = lorakit.load_model(root / "base")
    lorakit.load_adapter(model, root / "chat")
    messages = [{"role": "system", "content": "Answer with one letter."}, {"role": "user", "content": "say a:"}]
    assert code == 0 and out == generate_answers(model.eval(), tokenizer, [messages], max_new_tokens=5)[0] + "\n"
    code, out, _ = run(capsys, "eval", "--model", root / "base", "--adapter", root / "chat", "--data",
                       root / "rows.jsonl", "--no-val-loss", "--max-new-tokens", 2)
    assert code == 0 and "prompts: chat template, system prompt 'Answer with one letter.'" in out


@pytest.mark.parametrize("args, fragment", [
    (["--adapter", "{raw}", "--system", "hi", "--data", "{rows}"], "trained on raw prompts"),
    (["--raw", "--system", "hi", "--data", "{rows}"], "--system needs the chat template"),
    (["--metric", "nope", "--data", "{rows}"], "metric='nope'"),
    (["--data", "{rows}", "--columns", "prompt"], "--columns 'prompt'"),
    (["--data", "{rows}", "--columns", "prompt=q,completion=a"], "row has no column 'q'"),
])
def test_eval_errors_are_one_line(capsys, base_and_adapters, args, fragment):
    root = base_and_adapters
    args = [a.format(raw=root / "raw", rows=root / "rows.jsonl") for a in args]
    code, _, err = run(capsys, "eval", "--model", root / "base", *args)
    assert code == 2 and err.count("\n") == 1 and fragment in err, err
