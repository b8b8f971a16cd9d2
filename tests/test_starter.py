"""lorakit.starter: built-in configs resolve by name (also from an installed wheel), `lorakit init`."""

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from lorakit.cli import main
from lorakit.starter import builtin_configs, resolve_config, starter_config
from lorakit.train import SFTArgs, load_args

ROOT = Path(__file__).resolve().parents[1]


def test_builtin_names_resolve_to_the_shipped_files():
    assert builtin_configs() == ["dpo_lora", "sft_lora", "sft_olora", "sft_qlora"]
    for name in builtin_configs():
        for spelled in (name, f"{name}.yaml"):
            assert resolve_config(spelled).read_text() == (ROOT / "configs" / f"{name}.yaml").read_text()
    with pytest.raises(FileNotFoundError, match="did you mean 'sft_lora'"):
        resolve_config("sft_lroa")
    with pytest.raises(FileNotFoundError, match="nor a built-in config"):
        resolve_config("elsewhere/sft_lora.yaml")  # a path is a path, never a built-in name


def test_a_file_wins_over_a_builtin_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("sft_lora").write_text("max_steps: 3\n")
    assert resolve_config("sft_lora") == Path("sft_lora")


def test_builtin_config_resolves_from_an_installed_wheel(tmp_path):
    """Build the wheel from a copy of the sources, unpack it, and resolve 'sft_lora' with only the wheel's lorakit
    importable, from a directory that has no configs/ folder."""
    import shutil

    src = tmp_path / "src-copy"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "src", src / "src", symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "configs", src / "configs")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                           str(tmp_path / "dist"), str(src)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("lorakit-*.whl")
    with zipfile.ZipFile(wheel) as z:
        z.extractall(tmp_path / "site")
    code = ("import json, lorakit; from lorakit.starter import resolve_config; from lorakit.train import SFTArgs, "
            "load_args; p = resolve_config('sft_qlora'); a = load_args(SFTArgs, p); "
            "print(json.dumps([lorakit.__file__, str(p), a.method]))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr[-2000:]
    module, config, method = json.loads(run.stdout)
    assert module.startswith(str(tmp_path / "site")) and config.startswith(str(tmp_path / "site")) and method == "qlora"


def test_init_writes_an_annotated_config_for_the_data(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("qa.jsonl").write_text("".join(json.dumps({"question": f"{i}+1?", "answer": str(i + 1)}) + "\n"
                                        for i in range(5)))
    assert main(["init", "qa.jsonl"]) == 0
    out = capsys.readouterr().out
    assert "5 prompt_completion rows" in out and "next: lorakit train lorakit.yaml" in out
    args = load_args(SFTArgs, "lorakit.yaml")
    assert (args.train_file, args.task, args.output_dir) == ("qa.jsonl", None, "runs/qa")
    text = Path("lorakit.yaml").read_text()
    for line in text.splitlines():  # every key keeps a comment
        if line and not line.startswith("#"):
            assert " # " in line, line
    assert main(["init", "qa.jsonl"]) == 2 and "already exists; pass --force" in capsys.readouterr().err
    assert main(["init", "qa.jsonl", "--force", "--method", "qlora", "-o", "q.yaml"]) == 0
    assert load_args(SFTArgs, "q.yaml").method == "qlora"


def test_init_checks_the_data_first(capsys, tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"question": "a", "answer": "b"}\n{"oops": 1}\n')
    assert main(["init", str(tmp_path / "bad.jsonl"), "-o", str(tmp_path / "c.yaml")]) == 2
    assert "bad.jsonl line 2: row has keys ['oops']" in capsys.readouterr().err
    assert not (tmp_path / "c.yaml").exists()
    with pytest.raises(ValueError, match="no rows"):
        (tmp_path / "empty.jsonl").write_text("\n")
        starter_config(tmp_path / "empty.jsonl")
