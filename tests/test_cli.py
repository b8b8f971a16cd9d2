"""The `lorakit` command end to end on a tiny Llama + byte tokenizer saved to a temporary directory."""

import dataclasses
import io
import json
from pathlib import Path

import pytest
import torch
import yaml

import lorakit
import lorakit.train
from lorakit_testing import make_tiny_llama
from lorakit import LoraConfig, add_adapter, save_adapter
from lorakit.cli import main

ROOT = Path(__file__).resolve().parents[1]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_tokenizer():
    """Byte-level BPE without merges (one token per byte) + ChatML special tokens; no files needed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>",
                                 additional_special_tokens=["<|im_start|>"])
    hf.chat_template = CHATML
    return hf


def save_tiny(directory: Path, **overrides) -> Path:
    tokenizer = byte_tokenizer()
    model = make_tiny_llama(vocab_size=len(tokenizer), max_position_embeddings=512, **overrides)
    model.config.eos_token_id, model.config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """``(model_dir, adapter_dir)``: a tiny base and a non-trivial all-linear adapter for it."""
    root = tmp_path_factory.mktemp("cli")
    base = save_tiny(root / "base")
    model, _ = lorakit.load_model(base)
    add_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    save_adapter(model, root / "adapter")
    return base, root / "adapter"


@pytest.fixture(scope="module")
def other_base(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("other") / "base", hidden_size=48)


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# --- inspect / estimate


def test_inspect(capsys, tiny, other_base):
    base, adapter = tiny
    code, out, _ = run(capsys, "inspect", adapter, "--model", base)
    assert code == 0
    assert "rank r         4" in out and "28 (3,712 parameters, float32)" in out and "fits" in out and ": yes" in out
    assert f"base model     {base}" in out
    code, out, _ = run(capsys, "inspect", adapter, "--model", other_base)
    assert code == 1 and "NO" in out and "base q_proj is 48 → 48" in out
    code, out, _ = run(capsys, "inspect", adapter, "--json")
    assert code == 0 and json.loads(out)["n_parameters"] == 3712


def test_estimate(capsys, tmp_path):
    config = {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9,
              "num_key_value_heads": 3, "head_dim": 64, "num_hidden_layers": 30, "vocab_size": 49152,
              "tie_word_embeddings": True}
    (tmp_path / "config.json").write_text(json.dumps(config))
    code, out, _ = run(capsys, "estimate", "--model", tmp_path, "--r", 16, "--budget-gb", 4)
    assert code == 0
    assert "134,515,008" in out and "4,884,480" in out and "fits in 4.00 GiB: LoRA, QLoRA" in out
    code, out, _ = run(capsys, "estimate", "--model", tmp_path / "config.json", "--r", 64, "--json",
                       "--targets", "q_proj,v_proj", "--batch", 1, "--seq", 64)
    assert code == 0 and json.loads(out)["lora_params"] == 30 * 64 * (1152 + 768)


# --- generate / chat / eval


def test_generate(capsys, tiny):
    base, adapter = tiny
    code, out, _ = run(capsys, "generate", "--model", base, "--max-new-tokens", 4, "Hello")
    assert code == 0 and out.endswith("\n")
    code, out2, _ = run(capsys, "generate", "--model", base, "--adapter", adapter, "--max-new-tokens", 4, "Hello")
    assert code == 0
    code, out3, _ = run(capsys, "generate", "--model", base, "--adapter", adapter, "--adapter", adapter,
                        "--adapter-name", "a", "--adapter-name", "b", "--active", "none", "--max-new-tokens", 4,
                        "Hello")
    assert code == 0 and out3 == out  # no active adapter: the base's reply


def test_generate_matches_library(capsys, tiny):
    from lorakit.evaluate import generate_answers

    base, adapter = tiny
    code, out, _ = run(capsys, "generate", "--model", base, "--adapter", adapter, "--max-new-tokens", 6, "2+2=")
    model, tokenizer = lorakit.load_model(base)
    lorakit.load_adapter(model, adapter)
    expected = generate_answers(model.eval(), tokenizer, [[{"role": "user", "content": "2+2="}]], max_new_tokens=6)
    assert code == 0 and out == expected[0] + "\n"


def test_chat_reads_stdin_until_eof(capsys, monkeypatch, tiny):
    base, _ = tiny
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n/reset\nhow are you\n"))
    code, out, _ = run(capsys, "chat", "--model", base, "--max-new-tokens", 3)
    assert code == 0 and out.count("\n") == 2  # one reply per user line; /reset prints nothing


def test_eval_task(capsys, tiny):
    base, adapter = tiny
    code, out, _ = run(capsys, "eval", "--model", base, "--adapter", adapter, "--task", "dates", "--n", 3,
                       "--max-new-tokens", 4)
    assert code == 0
    assert "on 3 rows of task 'dates'" in out and "exact-match accuracy  0.0% (0/3)" in out
    assert float(out.split("validation loss")[1]) > 0


def test_eval_file(capsys, tiny, tmp_path):
    base, _ = tiny
    rows = [{"prompt": [{"role": "user", "content": "say a"}], "completion": "a"},
            {"prompt": [{"role": "user", "content": "say b"}], "completion": "b"}]
    (tmp_path / "rows.jsonl").write_text("\n".join(map(json.dumps, rows)))
    code, out, _ = run(capsys, "eval", "--model", base, "--data", tmp_path / "rows.jsonl", "--max-new-tokens", 2)
    assert code == 0 and "(0/2)" in out and "validation loss" in out
    (tmp_path / "text.jsonl").write_text(json.dumps({"text": "abc"}))
    code, out, _ = run(capsys, "eval", "--model", base, "--data", tmp_path / "text.jsonl")
    assert code == 0 and "exact-match" not in out and "validation loss" in out


# --- merge


def test_merge_writes_a_model_equal_to_base_plus_adapter(capsys, tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    base, adapter = tiny
    code, out, _ = run(capsys, "merge", "--model", base, "--adapter", adapter, "--output", tmp_path / "merged")
    assert code == 0 and "ok" in out
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    model, _ = lorakit.load_model(base)
    lorakit.load_adapter(model, adapter)
    ids = torch.randint(0, 200, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, model.eval()(ids).logits, atol=1e-4, rtol=0)


def test_merge_saves_the_requested_dtype(capsys, tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    base, adapter = tiny
    code, out, _ = run(capsys, "merge", "--model", base, "--adapter", adapter, "--output", tmp_path / "m",
                       "--dtype", "bfloat16")
    assert code == 0 and "(bfloat16)" in out
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype="auto")
    assert next(merged.parameters()).dtype == torch.bfloat16


def test_merge_refuses_to_write_a_bad_merge(capsys, monkeypatch, tiny, tmp_path):
    base, adapter = tiny
    real = lorakit.merge_and_unload

    def broken(model, **kwargs):
        merged = real(model, **kwargs)
        with torch.no_grad():
            merged.model.layers[0].self_attn.q_proj.weight.add_(0.5)
        return merged

    monkeypatch.setattr(lorakit, "merge_and_unload", broken)
    code, out, err = run(capsys, "merge", "--model", base, "--adapter", adapter, "--output", tmp_path / "m",
                         "--verify", "logits")
    assert code == 1 and not (tmp_path / "m").exists()
    assert err.count("\n") == 1 and "nothing written" in err and "TOO LARGE" in out


@pytest.mark.parametrize("n", ["-1", "0", "two"])
def test_eval_n_must_be_at_least_one(capsys, n):
    code, _, err = run(capsys, "eval", "--n", n)
    assert code == 2 and err.count("\n") == 1 and "argument --n" in err  # was: the last row dropped for --n -1


# --- train / demo


@pytest.mark.parametrize("config, r", [("sft_lora", 16), ("sft_qlora", 16), ("sft_olora", 32)])
def test_train_sft(capsys, tiny, tmp_path, config, r):
    base, _ = tiny
    # README's command: `--set max_steps=50 lr=1e-3` (YAML 1.1 reads 1e-3 as text; it failed after the base evaluation)
    code, out, _ = run(capsys, "train", ROOT / f"configs/{config}.yaml", "--set", f"model={base}", "max_steps=2",
                       "lr=1e-3", "n_train=16", "n_eval=4", "batch_size=4", f"output_dir={tmp_path}", "progress=false")
    assert code == 0, out
    assert "base accuracy" in out and "tuned accuracy" in out and "trainable" in out
    assert (tmp_path / "metrics.jsonl").is_file()
    code, out, _ = run(capsys, "inspect", tmp_path / "adapter", "--model", base, "--json")
    assert code == 0 and json.loads(out)["r"] == r  # OLoRA saves the equivalent rank-2r plain LoRA


def test_train_dpo(capsys, tiny, tmp_path):
    base, _ = tiny
    code, out, _ = run(capsys, "train", ROOT / "configs/dpo_lora.yaml", "--dpo", "--set", f"model={base}",
                       f"train_file={ROOT / 'examples/preference_tiny.jsonl'}", "max_steps=2", "batch_size=4",
                       f"output_dir={tmp_path}", "progress=false")
    assert code == 0, out
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


def test_demo(capsys, tiny, tmp_path):
    base, _ = tiny
    code, out, _ = run(capsys, "demo", "--steps", 2, "--output-dir", tmp_path, "--set", f"model={base}",
                       "n_train=16", "n_eval=4", "batch_size=4", "progress=false")
    assert code == 0, out
    for label in ("base accuracy", "tuned accuracy", "time", "trainable", "adapter", "plot"):
        assert f"\n{label} " in "\n" + out
    assert "2 steps" in out and (tmp_path / "adapter").is_dir()


# --- configs and example data


@pytest.mark.parametrize("name", ["sft_lora", "sft_qlora", "sft_olora", "dpo_lora"])
def test_config_keys_are_the_args_fields(name):
    from lorakit.train.args import DPOArgs, SFTArgs, load_args

    cls = DPOArgs if name.startswith("dpo") else SFTArgs
    path = ROOT / "configs" / f"{name}.yaml"
    assert sorted(yaml.safe_load(path.read_text())) == sorted(f.name for f in dataclasses.fields(cls))
    for line in path.read_text().splitlines():  # one comment per key
        if line and not line.startswith("#"):
            assert " # " in line, line
    args = load_args(cls, path)
    assert {"sft_qlora": args.method == "qlora", "sft_olora": args.init_lora_weights == "olora"}.get(name, True)


def test_preference_example_rows():
    import datetime

    from lorakit.data import load_rows

    loaded = load_rows(ROOT / "examples/preference_tiny.jsonl")
    assert loaded.format == "preference" and len(loaded.rows) == 40
    for row in loaded.rows:
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        assert datetime.date.fromisoformat(chosen).isoformat() == chosen and rejected != chosen


# --- errors: one line, exit status 2, a suggestion, no traceback


def _config_with_typo(tmp_path):
    (tmp_path / "typo.yaml").write_text("max_stesp: 2\n")
    return tmp_path / "typo.yaml"


@pytest.mark.parametrize("case, expected", [
    (lambda t, p: ["trian"], "did you mean 'train'?"),
    (lambda t, p: ["estimate", "--budjet-gb", "4"], "did you mean '--budget-gb'?"),
    (lambda t, p: ["estimate", "--dtype", "bf16"], "invalid choice: 'bf16'"),
    (lambda t, p: ["merge", "--model", t[0]], "required: --adapter, --output"),
    (lambda t, p: ["train", _config_with_typo(p)], "did you mean 'max_steps'?"),
    (lambda t, p: ["train", p / "missing.yaml"], "missing.yaml: no such file or directory"),
    (lambda t, p: ["train", "--set", "max_steps"], "'max_steps' is not key=value"),
    (lambda t, p: ["eval", "--model", t[0], "--task", "datse"], "did you mean 'dates'?"),
    (lambda t, p: ["eval", "--model", p / "nowhere"], "neither a local model directory"),
    (lambda t, p: ["generate", "--model", t[2], "--adapter", t[1], "hi"], "does not fit"),
    (lambda t, p: ["inspect", p / "nothing"], "is not a directory"),
    (lambda t, p: ["merge", "--model", t[0], "--adapter", p, "--output", p / "o"], "adapter_config.json not found"),
])
def test_user_errors_are_one_line(capsys, tiny, other_base, tmp_path, case, expected):
    code, out, err = run(capsys, *case((*tiny, other_base), tmp_path))
    assert code == 2
    assert err.startswith("lorakit: error: ") and err.count("\n") == 1, err
    assert expected in err and "Traceback" not in err


def test_debug_shows_the_traceback(capsys, tmp_path):
    with pytest.raises(FileNotFoundError):
        main(["train", str(tmp_path / "missing.yaml"), "--debug"])
    with pytest.raises(FileNotFoundError):
        main(["--debug", "train", str(tmp_path / "missing.yaml")])


def test_help_and_version(capsys):
    assert main(["--help"]) == 0 and "estimate" in capsys.readouterr().out
    assert main(["merge", "--help"]) == 0 and "--tolerance" in capsys.readouterr().out
    assert main(["--version"]) == 0 and lorakit.__version__ in capsys.readouterr().out
    assert main([]) == 0 and "COMMAND" in capsys.readouterr().out


def test_python_dash_m(tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "lorakit", "trian"], capture_output=True, text=True)
    assert done.returncode == 2 and "did you mean 'train'?" in done.stderr and not done.stdout


# --- issue 12: bad adapters, configs and names end in one line too


def _adapter_copy(tiny, tmp_path, change):
    import shutil

    directory = tmp_path / "adapter"
    shutil.copytree(tiny[1], directory)
    change(directory)
    return directory


def _set_config(directory, text):
    (directory / "adapter_config.json").write_text(text)


def _config_field(directory, **fields):
    import json

    data = json.loads((directory / "adapter_config.json").read_text())
    _set_config(directory, json.dumps({**data, **fields}))


def _nan_weights(directory):
    from safetensors.torch import load_file, save_file

    tensors = load_file(directory / "adapter_model.safetensors")
    key = sorted(tensors)[0]
    tensors[key] = tensors[key] * float("nan")
    save_file(tensors, directory / "adapter_model.safetensors")


@pytest.mark.parametrize("change, command, expected", [
    (lambda d: _set_config(d, "[1, 2]"), "inspect", "an adapter config is a JSON object"),
    (lambda d: _set_config(d, "null"), "generate", "an adapter config is a JSON object"),
    (lambda d: _config_field(d, r=2.5), "inspect", "r=2.5: expected a whole number"),
    (lambda d: _config_field(d, lora_alpha="x"), "generate", "lora_alpha='x'"),
    (lambda d: _config_field(d, target_modules=["q_proj", 3]), "generate", "target_modules[1]=3"),
    (lambda d: _config_field(d, target_modules="(q"), "generate", "not a valid regular expression"),
    (lambda d: _config_field(d, target_modules=["q_proj"], layers_to_transform=[9]), "generate",
     "layers_to_transform=[9] names no layer"),
    (_nan_weights, "generate", "NaN/inf values"),
])
def test_bad_adapters_are_one_line(capsys, tiny, tmp_path, change, command, expected):
    adapter = _adapter_copy(tiny, tmp_path, change)
    argv = ["inspect", adapter] if command == "inspect" else ["generate", "--model", tiny[0], "--adapter", adapter,
                                                              "--max-new-tokens", 1, "hi"]
    code, out, err = run(capsys, *argv)
    assert code == 2 and err.startswith("lorakit: error: ") and err.count("\n") == 1, err
    assert expected in err and "Traceback" not in err


@pytest.mark.parametrize("extra, expected", [
    (["--active", "default,default"], "named more than once"),
    (["--adapter-name", "a/b"], "one path segment"),
])
def test_bad_adapter_names_are_one_line(capsys, tiny, extra, expected):
    code, out, err = run(capsys, "generate", "--model", tiny[0], "--adapter", tiny[1], *extra, "--max-new-tokens", 1,
                         "hi")
    assert code == 2 and err.startswith("lorakit: error: ") and err.count("\n") == 1, err
    assert expected in err


def test_adapter_directories_with_dots_get_safe_default_names(capsys, tiny, tmp_path):
    import shutil

    shutil.copytree(tiny[1], tmp_path / "v1.5")
    code, out, err = run(capsys, "generate", "--model", tiny[0], "--adapter", tiny[1], "--adapter", tmp_path / "v1.5",
                         "--active", "v1_5", "--max-new-tokens", 1, "hi")
    assert code == 0, err


def test_a_model_without_tokenizer_is_one_line(capsys, tmp_path):
    make_tiny_llama().save_pretrained(tmp_path / "base")
    capsys.readouterr()  # save_pretrained's progress bar
    code, out, err = run(capsys, "generate", "--model", tmp_path / "base", "--max-new-tokens", 1, "hi")
    assert code == 2 and err.startswith("lorakit: error: ") and err.count("\n") == 1, err
    assert "holds no tokenizer" in err
