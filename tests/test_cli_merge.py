"""`lorakit merge` (streamed by default) and `lorakit export`: refusals, overwrite, weights, the logits path."""

import os

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from lorakit import LoraConfig, add_adapter, save_adapter
from lorakit.atomic import TEMP_PREFIX
from lorakit.cli import main
from lorakit_testing import save_tiny_model_dir


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _tree(root):
    return sorted((str(p.relative_to(root)), p.stat().st_size if p.is_file() else -1) for p in root.rglob("*"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge-cli")
    base = save_tiny_model_dir(root / "base")
    model, _ = lorakit.load_model(base)
    add_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    save_adapter(model, root / "adapter")
    return base, root / "adapter"


def test_merge_streams_by_default_and_reports_the_probe_check(capsys, tiny, tmp_path):
    base, adapter = tiny
    code, out, err = run(capsys, "merge", "--model", base, "--adapter", adapter, "--output", tmp_path / "m")
    assert code == 0, err
    assert "merged 14 of 21 tensors (float32)" in out and "probe check of 14 merged weights" in out and "(ok)" in out
    model, _ = lorakit.load_model(base)
    lorakit.load_adapter(model, adapter)
    want = lorakit.merge_and_unload(model).state_dict()
    got = load_file(tmp_path / "m" / "model.safetensors")
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("which", ["adapter", "base"])
def test_merge_into_the_adapter_or_base_directory_is_refused(capsys, tiny, which):
    base, adapter = tiny
    target = adapter if which == "adapter" else base
    before = _tree(target)
    code, _, err = run(capsys, "merge", "--model", base, "--adapter", adapter, "--output", target, "--overwrite")
    assert code == 2 and err.count("\n") == 1
    assert f"is the {'adapter' if which == 'adapter' else 'base model'} directory" in err
    assert _tree(target) == before


def test_existing_output_is_refused_without_overwrite(capsys, tiny, tmp_path):
    base, adapter = tiny
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run(capsys, "merge", "--model", base, "--adapter", adapter, "--output", out)
    assert code == 2 and "already exists and is not empty; pass --overwrite" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    code, _, _ = run(capsys, "merge", "--model", base, "--adapter", adapter, "--output", out, "--overwrite")
    assert code == 0 and not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(TEMP_PREFIX)]


def test_weighted_adapters_and_a_weight_count_mismatch(capsys, tiny, tmp_path):
    base, adapter = tiny
    code, _, err = run(capsys, "merge", "--model", base, "--adapter", adapter, "--adapter", adapter, "--weight", "1",
                       "--output", tmp_path / "x")
    assert code == 2 and "one --weight per --adapter" in err and not (tmp_path / "x").exists()
    code, _, _ = run(capsys, "merge", "--model", base, "--adapter", adapter, "--adapter", adapter, "--weight", "0.5",
                     "--weight", "0.5", "--output", tmp_path / "half")
    assert code == 0
    run(capsys, "merge", "--model", base, "--adapter", adapter, "--output", tmp_path / "one")
    a, b = load_file(tmp_path / "half" / "model.safetensors"), load_file(tmp_path / "one" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)


def test_verify_logits_path_writes_atomically_with_one_file_mode(capsys, tiny, tmp_path):
    base, adapter = tiny
    code, out, _ = run(capsys, "merge", "--model", base, "--adapter", adapter, "--output", tmp_path / "m",
                       "--verify", "logits")
    assert code == 0 and "merged vs adapter logits" in out
    mask = os.umask(0)
    os.umask(mask)
    assert {p.stat().st_mode & 0o777 for p in (tmp_path / "m").iterdir()} == {0o666 & ~mask}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_probe_failure_exits_1_and_writes_nothing(capsys, tiny, tmp_path, monkeypatch):
    import lorakit.streamed_merge as m

    base, adapter = tiny
    monkeypatch.setattr(m, "_probe", _strict_probe(m._probe))
    code, _, err = run(capsys, "merge", "--model", base, "--adapter", adapter, "--output", tmp_path / "m")
    assert code == 1 and "fails the probe check" in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def _strict_probe(probe):
    def strict(t, result, terms, probes, ref, stats):
        result = result.clone()
        result[0, 0] += 1.0  # what a corrupt write would look like
        return probe(t, result, terms, probes, ref, stats)
    return strict
