"""README's python blocks run as written, top to bottom in one namespace (as a reader pastes them into one session).

One substitution keeps it fast (README says so): ``lorakit.load_model`` given the embedded model's name loads a tiny
random Llama with a byte-level ChatML tokenizer instead (everything else, quantization included, is the real call).
Files go to a temporary working directory.
"""

import re
from pathlib import Path

import pytest

import lorakit
import lorakit.models
from lorakit_testing import save_tiny_model_dir

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line number, code) of every ```python fenced block."""
    return [(text[: m.start()].count("\n") + 2, m.group(1)) for m in re.finditer(r"^```python\n(.*?)^```", text,
                                                                               re.S | re.M)]


def test_readme_has_python_blocks():
    assert len(python_blocks(README.read_text())) >= 5


def test_readme_python_blocks_run_top_to_bottom(tmp_path, monkeypatch):
    pytest.importorskip("trl")
    tiny = save_tiny_model_dir(tmp_path / "tiny-base")
    real = lorakit.models.load_model
    embedded = {lorakit.EMBEDDED_NAME, lorakit.models.EMBEDDED_SOURCE}

    def load_model(name_or_path=lorakit.EMBEDDED_NAME, *args, **kwargs):
        return real(tiny if str(name_or_path) in embedded else name_or_path, *args, **kwargs)

    monkeypatch.setattr(lorakit, "load_model", load_model)
    monkeypatch.setattr(lorakit.models, "load_model", load_model)
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__readme__"}
    for line, code in python_blocks(README.read_text()):
        try:
            exec(compile(code, f"README.md:{line}", "exec"), namespace)
        except Exception as err:  # name the block that failed
            raise AssertionError(f"README.md python block at line {line} failed: {type(err).__name__}: {err}") from err
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "out" / "nf4" / "adapter" / "adapter_config.json").is_file()
