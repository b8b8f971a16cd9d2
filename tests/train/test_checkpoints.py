"""Checkpoints are data only, tied to their run, whole or absent; resuming names every problem with a file.

Each test drives ``lorakit train`` (as a user would) on a tiny model; the "bad" cases were reproduced against the
code before this change first (noted per test).
"""

import json
import os
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file

from lorakit.cli import main
from lorakit.train.checkpoints import CheckpointError, read_checkpoint


def _rows(n=16):
    return [{"prompt": f"q{i}:", "completion": f" a{i % 4}"} for i in range(n)]


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    return path


def train(capsys, model_dir, data, out, *sets):
    """``lorakit train`` with a tiny-model config; returns (exit code, stdout, stderr)."""
    base = [f"model={model_dir}", "task=null", f"train_file={data}", "r=4", "lora_alpha=8", "lr=2e-2",
            "warmup_steps=0", "batch_size=4", "max_steps=4", "max_length=32", f"output_dir={out}", "progress=false",
            "eval_accuracy=false", "lora_dropout=0.1"]
    code = main(["train", "--set", *base, *sets])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error(err):
    """stderr ends in exactly one ``lorakit: error: ...`` line (progress bars of the model loader may precede it)."""
    lines = [line for line in err.splitlines() if "lorakit:" in line]
    return len(lines) == 1 and lines[0].startswith("lorakit: error: ") and err.rstrip().endswith(lines[0])


def adapter(out):
    return load_file(out / "adapter" / "adapter_model.safetensors")


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def loss_steps(out):
    return [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


class Payload:
    """Unpickling this touches ``marker``: the proof that a pickle ran code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# --- item 2: data only (old code: torch.load(weights_only=False) ran the payload on resume)


def test_a_pickled_trainer_file_is_never_loaded(capsys, tiny_model_dir, data, tmp_path):
    out, marker = tmp_path / "run", tmp_path / "PWNED"
    assert train(capsys, tiny_model_dir, data, out, "save_every=2")[0] == 0
    for ckpt in out.glob("checkpoint-*"):  # every checkpoint now holds only a malicious pickle
        for name in ("trainer.json", "trainer.safetensors"):
            (ckpt / name).unlink(missing_ok=True)
        torch.save({"optimizer": Payload(marker)}, ckpt / "trainer.pt")
    code, _, err = train(capsys, tiny_model_dir, data, out, "save_every=2", "max_steps=6", "resume=true")
    assert not marker.exists()
    assert code == 2 and one_error(err)
    assert "trainer.pt" in err and "pickle" in err and "overwrite: true" in err and "weights_only" not in err


def test_a_pickle_beside_a_checkpoint_is_ignored(capsys, tiny_model_dir, data, tmp_path):
    out, marker = tmp_path / "run", tmp_path / "PWNED"
    assert train(capsys, tiny_model_dir, data, out, "save_every=2")[0] == 0
    torch.save({"optimizer": Payload(marker)}, out / "checkpoint-4" / "trainer.pt")
    code, _, err = train(capsys, tiny_model_dir, data, out, "save_every=2", "max_steps=6", "resume=true")
    assert code == 0, err
    assert not marker.exists()


def test_checkpoint_files_are_safetensors_and_json(capsys, tiny_model_dir, data, tmp_path):
    out = tmp_path / "run"
    assert train(capsys, tiny_model_dir, data, out, "save_every=2")[0] == 0
    names = sorted(str(p.relative_to(out / "checkpoint-4")) for p in (out / "checkpoint-4").rglob("*") if p.is_file())
    assert names == ["state.json", "trainer.json", "trainer.safetensors", "weights/trainable.safetensors"]
    ckpt = read_checkpoint(out / "checkpoint-4")
    assert ckpt.state.step == 4 and ckpt.state.run_id == json.loads((out / "run.json").read_text())["run_id"]
    assert sorted(os.listdir(out)) == ["adapter", "checkpoint-2", "checkpoint-4", "loss.png", "metrics.jsonl",
                                       "run.json", "summary.json"]


# --- item 5: a fresh run in a used output_dir (old code: ran, rotated its checkpoints, resumed the old run's)


def test_a_fresh_run_in_a_used_output_dir_is_refused(capsys, tiny_model_dir, data, tmp_path):
    out = tmp_path / "run"
    assert train(capsys, tiny_model_dir, data, out, "save_every=2", "max_steps=6")[0] == 0
    before = adapter(out)
    code, _, err = train(capsys, tiny_model_dir, data, out, "save_every=2", "lr=1e-2")
    assert code == 2 and one_error(err)
    assert "is not empty" in err and "resume: true" in err and "overwrite: true" in err
    assert same(adapter(out), before) and sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4",
                                                                                                "checkpoint-6"]


def test_overwrite_starts_a_new_run_that_resumes_its_own_checkpoints(capsys, tiny_model_dir, data, tmp_path):
    out = tmp_path / "run"
    assert train(capsys, tiny_model_dir, data, out, "save_every=2", "max_steps=6")[0] == 0
    old_run, old_adapter = json.loads((out / "run.json").read_text())["run_id"], adapter(out)
    # the new run ends at its step-2 checkpoint; the old run's checkpoint-6 must not be what it resumes
    assert train(capsys, tiny_model_dir, data, out, "save_every=2", "max_steps=2", "overwrite=true", "lr=1e-2")[0] == 0
    new_run = json.loads((out / "run.json").read_text())["run_id"]
    assert new_run != old_run and sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    code, _, err = train(capsys, tiny_model_dir, data, out, "save_every=2", "max_steps=4", "resume=true", "lr=1e-2")
    assert code == 0, err
    assert loss_steps(out) == [1, 2, 3, 4] and not same(adapter(out), old_adapter)
    assert {read_checkpoint(p).state.run_id for p in out.glob("checkpoint-*")} == {new_run}


def test_another_runs_checkpoint_is_never_resumed(capsys, tiny_model_dir, data, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert train(capsys, tiny_model_dir, data, a, "save_every=2", "max_steps=6")[0] == 0
    assert train(capsys, tiny_model_dir, data, b, "save_every=2", "max_steps=2")[0] == 0
    shutil.copytree(a / "checkpoint-6", b / "checkpoint-6")  # newer, but of run a
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, _, err = train(capsys, tiny_model_dir, data, b, "save_every=2", "max_steps=4", "resume=true")
    assert code == 0, err
    assert any("checkpoint-6" in str(w.message) and "another run" in str(w.message) for w in caught)
    assert loss_steps(b) == [1, 2, 3, 4]  # continued from b's own step 2


# --- output_dir values


def test_output_dir_that_is_a_file(capsys, tiny_model_dir, data, tmp_path):
    (tmp_path / "file").write_text("mine")
    code, _, err = train(capsys, tiny_model_dir, data, tmp_path / "file")
    assert code == 2 and one_error(err) and "is a file" in err
    assert (tmp_path / "file").read_text() == "mine"


def test_resume_and_overwrite_together_are_refused(capsys, tiny_model_dir, data, tmp_path):
    code, _, err = train(capsys, tiny_model_dir, data, tmp_path / "run", "resume=true", "overwrite=true")
    assert code == 2 and "contradict" in err


def test_resume_in_an_empty_dir_starts_the_run(capsys, tiny_model_dir, data, tmp_path):
    code, _, err = train(capsys, tiny_model_dir, data, tmp_path / "run", "resume=true")
    assert code == 0, err


# --- resume: the poor list


def test_changed_r_names_the_setting(capsys, tiny_model_dir, data, tmp_path):
    out = tmp_path / "run"
    assert train(capsys, tiny_model_dir, data, out, "save_every=2", "max_steps=2")[0] == 0
    code, _, err = train(capsys, tiny_model_dir, data, out, "save_every=2", "resume=true", "r=8")
    assert code == 2 and one_error(err)
    assert "checkpoint-2" in err and "r was 4" in err and "now 8" in err and "shape" in err


def test_changed_lr_and_optimizer_warn(capsys, tiny_model_dir, data, tmp_path):
    out = tmp_path / "run"
    assert train(capsys, tiny_model_dir, data, out, "save_every=2", "max_steps=2")[0] == 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, _, err = train(capsys, tiny_model_dir, data, out, "save_every=2", "resume=true", "lr=1e-3",
                             "optimizer=adamw_8bit")
    assert code == 0, err
    text = " ".join(str(w.message) for w in caught)
    assert "lr changed from 0.02 to 0.001" in text and "checkpoint's learning rate" in text
    assert "optimizer changed from 'adamw' to 'adamw_8bit'" in text


def test_max_steps_below_the_checkpoint(capsys, tiny_model_dir, data, tmp_path):
    out = tmp_path / "run"
    assert train(capsys, tiny_model_dir, data, out, "save_every=2")[0] == 0
    before = adapter(out)
    code, _, err = train(capsys, tiny_model_dir, data, out, "resume=true", "max_steps=2")
    assert code == 2 and "step 4" in err and "max_steps=2" in err and "checkpoint-4" in err
    assert same(adapter(out), before)


def test_truncated_newest_checkpoint_falls_back_with_a_warning(capsys, tiny_model_dir, data, tmp_path):
    out = tmp_path / "run"
    assert train(capsys, tiny_model_dir, data, out, "save_every=2", "max_steps=6")[0] == 0
    uninterrupted = adapter(out)
    weights = out / "checkpoint-6" / "weights" / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, _, err = train(capsys, tiny_model_dir, data, out, "save_every=2", "max_steps=6", "resume=true")
    assert code == 0, err
    text = " ".join(str(w.message) for w in caught)
    assert "checkpoint-6/weights/trainable.safetensors" in text and "resuming from checkpoint-4" in text
    assert same(adapter(out), uninterrupted)  # steps 5 and 6 done again, to the same adapter


def test_corrupt_state_json_is_named(capsys, tiny_model_dir, data, tmp_path):
    out = tmp_path / "run"
    assert train(capsys, tiny_model_dir, data, out, "save_every=2", "max_steps=2")[0] == 0
    (out / "checkpoint-2" / "state.json").write_text('{"step": 2, "mic')
    code, _, err = train(capsys, tiny_model_dir, data, out, "save_every=2", "resume=true")
    assert code == 2 and one_error(err) and "checkpoint-2/state.json" in err and "not valid JSON" in err


def test_no_duplicate_metric_rows_after_resume(capsys, tiny_model_dir, data, tmp_path):
    out = tmp_path / "run"
    # steps 1-5 logged, the last checkpoint at step 4: step 5 is done again by the resumed run
    assert train(capsys, tiny_model_dir, data, out, "save_every=4", "max_steps=5")[0] == 0
    assert train(capsys, tiny_model_dir, data, out, "save_every=4", "max_steps=6", "resume=true")[0] == 0
    assert loss_steps(out) == [1, 2, 3, 4, 5, 6]


def test_read_checkpoint_names_a_missing_file(capsys, tiny_model_dir, data, tmp_path):
    out = tmp_path / "run"
    assert train(capsys, tiny_model_dir, data, out, "save_every=2", "max_steps=2")[0] == 0
    (out / "checkpoint-2" / "trainer.json").unlink()
    with pytest.raises(CheckpointError, match="checkpoint-2/trainer.json: missing"):
        read_checkpoint(out / "checkpoint-2")


# --- item 3: non-finite loss or gradients (old code: trained to the end, wrote a NaN adapter and best/, exit 0)


@pytest.fixture
def inf_model_dir(tmp_path):
    from lorakit_testing import save_tiny_model_dir
    from transformers import AutoModelForCausalLM

    path = save_tiny_model_dir(tmp_path / "inf-base")
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        model.model.norm.weight[0] = float("inf")  # a base whose loss is inf/NaN
    model.save_pretrained(path)
    return path


def test_a_base_with_inf_loss_stops_and_writes_nothing(capsys, inf_model_dir, data, tmp_path):
    out = tmp_path / "run"
    code, _, err = train(capsys, inf_model_dir, data, out, "save_every=1", "eval_every=1", "val_fraction=0.25")
    assert code == 2 and one_error(err)
    assert "step 1:" in err and "not written" not in err and "no adapter was written" in err
    assert "there is no checkpoint" in err
    assert not (out / "adapter").exists() and not (out / "best").exists() and not list(out.glob("checkpoint-*"))


def _poisoned_model(from_call, to_call=None):
    """A tiny model built in-process whose final norm outputs NaN from forward call ``from_call`` (to ``to_call``)."""
    from lorakit_testing import make_byte_tokenizer, make_tiny_llama

    tokenizer = make_byte_tokenizer()
    model = make_tiny_llama(vocab_size=len(tokenizer))
    calls = [0]

    def poison(module, inputs, output):
        calls[0] += 1
        if calls[0] >= from_call and (to_call is None or calls[0] <= to_call):
            return output * float("nan")

    model.model.norm.register_forward_hook(poison)
    return model, tokenizer


def test_nan_at_step_3_stops_keeping_the_last_good_checkpoint(tmp_path):
    from lorakit.train import SFTArgs, train_sft
    from lorakit.train.common import NonFiniteError

    model, tokenizer = _poisoned_model(from_call=3)  # one forward per step: step 3 is the first bad one
    args = SFTArgs(r=4, lora_alpha=8, batch_size=4, max_steps=6, max_length=32, save_every=1,
                   output_dir=str(tmp_path / "run"), progress=False)
    with pytest.raises(NonFiniteError, match=r"step 3: loss nan.*last good checkpoint is checkpoint-2"):
        train_sft(model, tokenizer, _rows(), args)
    out = tmp_path / "run"
    assert not (out / "adapter").exists() and sorted(p.name for p in out.glob("checkpoint-*")) == [
        "checkpoint-1", "checkpoint-2"]
    assert all(t.isfinite().all() for t in read_checkpoint(out / "checkpoint-2").weights.values())


def test_nonfinite_skip_skips_only_the_bad_step(tmp_path):
    from lorakit.train import SFTArgs, train_sft

    model, tokenizer = _poisoned_model(from_call=3, to_call=3)
    args = SFTArgs(r=4, lora_alpha=8, batch_size=4, max_steps=5, max_length=32, nonfinite="skip",
                   output_dir=str(tmp_path / "run"), progress=False)
    result = train_sft(model, tokenizer, _rows(), args)
    rows = [json.loads(x) for x in result.metrics_path.read_text().splitlines() if '"loss"' in x]
    assert [r.get("skipped", False) for r in rows] == [False, False, True, False, False]
    assert all(t.isfinite().all() for t in adapter(tmp_path / "run").values())


def test_nonfinite_skip_on_a_base_with_inf_loss(capsys, inf_model_dir, data, tmp_path):
    out = tmp_path / "run"
    code, _, err = train(capsys, inf_model_dir, data, out, "nonfinite=skip", "max_steps=3", "lora_dropout=0")
    assert code == 0, err
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert [r.get("skipped") for r in rows] == [True, True, True]
    saved = adapter(out)
    assert all(t.isfinite().all() for t in saved.values())
    assert all(not t.any() for k, t in saved.items() if "lora_B" in k)  # never updated: B is still zero
