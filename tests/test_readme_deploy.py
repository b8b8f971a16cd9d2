"""README's "Deploy" commands as written, on a tiny Llama standing in for the embedded model."""

import re
import shlex
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from lorakit import LoraConfig, add_adapter, save_adapter
from lorakit.cli import main
from lorakit_testing import make_byte_tokenizer, make_tiny_llama

ROOT = Path(__file__).resolve().parents[1]


def readme_commands(section: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", body, re.S).group(1)
    return [line.split("  #", 1)[0].strip() for line in block.splitlines() if line.strip()]


@pytest.fixture
def tiny_as_embedded(tmp_path, monkeypatch):
    tokenizer = make_byte_tokenizer(merges=[("h", "e"), ("Ġ", "t")])
    model = make_tiny_llama(vocab_size=len(tokenizer), max_position_embeddings=256)
    model.config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(tmp_path / "cache" / "SmolLM2-135M-Instruct")
    tokenizer.save_pretrained(tmp_path / "cache" / "SmolLM2-135M-Instruct")
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    for run, targets in (("sft", "all-linear"), ("dpo", ["q_proj", "v_proj"])):
        m, _ = lorakit.load_model("SmolLM2-135M-Instruct")
        add_adapter(m, LoraConfig(r=4, target_modules=targets, init_lora_weights=False))
        save_adapter(m, Path("runs") / run / "adapter")
    return tmp_path


def test_readme_deploy_commands_as_written(capsys, tiny_as_embedded):
    commands = readme_commands("Deploy")
    assert len(commands) == 6 and all(c.startswith("lorakit ") for c in commands)
    outputs = []
    for command in commands:
        code = main(shlex.split(command)[1:] + ["--debug"])
        out, err = capsys.readouterr()
        assert code == 0, (command, err[-3000:])
        outputs.append(out)
    assert "merge plan" in outputs[0] and "serve unmerged" in outputs[0]
    assert "probe check" in outputs[1] and "(ok)" in outputs[1]
    merged, mix = load_file("out/merged/model.safetensors"), load_file("out/mix/model.safetensors")
    assert merged.keys() == mix.keys() and not torch.equal(merged["model.layers.0.self_attn.q_proj.weight"],
                                                           mix["model.layers.0.self_attn.q_proj.weight"])
    for name in ("model.gguf", "adapter.gguf", "base.gguf"):
        assert (Path("out") / name).stat().st_size > 0
    assert sorted(p.name for p in Path("out").iterdir()) == ["adapter.gguf", "base.gguf", "merged", "mix", "model.gguf"]
