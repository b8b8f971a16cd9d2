"""notebooks/*.ipynb run top to bottom (nbclient, a real Jupyter kernel) with small settings: their parameters cell
(tagged ``parameters``, the first code cell) is replaced by a tiny model and a couple of steps."""

import os
from pathlib import Path

import pytest

from lorakit_testing import save_tiny_model_dir

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
TINY = {
    "lora_sft.ipynb": 'TASK = "dates"\nN_TRAIN, N_EVAL = 16, 4\nSTEPS, BATCH = 2, 2\nLR = 2e-3\nRANK, ALPHA = 4, 8\n'
                      'EVAL_EVERY = 1\nMAX_NEW_TOKENS = 4\nOUTPUT = "out"\n',
    "load_adapter.ipynb": 'ADAPTER = "quick-adapter"\nQUICK_STEPS = 2\nMAX_NEW_TOKENS = 4\nPROMPTS = ["Convert 5 March 2021 to ISO."]\n',
}


def _run(name, tmp_path):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    params = next(c for c in nb.cells if c.cell_type == "code")
    assert "parameters" in params.metadata.get("tags", []), f"{name}: the first code cell holds the parameters"
    model_dir = save_tiny_model_dir(tmp_path / "tiny-base")
    params.source = f"MODEL = {str(model_dir)!r}\n" + TINY[name]
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    return nb


@pytest.mark.parametrize("name", sorted(TINY))
def test_notebook_runs(name, tmp_path, monkeypatch):
    src = str(Path(__file__).resolve().parents[1] / "src")  # the kernel imports this checkout's lorakit
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = _run(name, tmp_path)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    if name == "lora_sft.ipynb":
        assert any("image/png" in o.get("data", {}) for o in outputs)  # the loss plot, inline
        assert (tmp_path / "out" / "adapter" / "adapter_config.json").is_file()
    else:
        text = "".join(o.get("text", "") for o in outputs)
        assert "max |logit difference| lorakit vs PEFT" in text and "merged vs adapter logits" in text
