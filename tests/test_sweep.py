"""lorakit sweep: one config at several ranks and in full, on a tiny model; the table's numbers are the runs'."""

import json
import math

import pytest

import lorakit.train
from lorakit.cli import main
from lorakit.sweep import format_table, sweep

@pytest.fixture
def tiny_model_dir(tmp_path):
    """The shared tiny Llama with 256 positions: the date prompts (~150 tokens) do not fit its usual 64, which
    training now refuses (max_length beyond the model's positions)."""
    from lorakit_testing import make_byte_tokenizer, make_tiny_llama

    tokenizer = make_byte_tokenizer()
    model = make_tiny_llama(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, initializer_range=0.3,
                            max_position_embeddings=256)
    model.save_pretrained(tmp_path / "tiny-base")
    tokenizer.save_pretrained(tmp_path / "tiny-base")
    return tmp_path / "tiny-base"


TINY = dict(task="dates", n_train=16, n_eval=2, max_steps=2, batch_size=2, max_length=160, warmup_steps=0,
            eval_every=0, progress=False, r=4, lora_alpha=8)


def test_sweep_in_process(tiny_model_dir, tmp_path):
    args = lorakit.train.SFTArgs(model=str(tiny_model_dir), output_dir=str(tmp_path / "runs"), **TINY)
    rows = sweep(args, [2, 4], full_baseline=True, output_dir=tmp_path / "sw", isolate=False)
    assert [r.label for r in rows] == ["r=2", "r=4", "full"]
    r2, r4, full = rows
    assert r4.trainable == 2 * r2.trainable and full.trainable == full.total  # LoRA params are linear in r
    assert all(math.isfinite(r.best_val_loss) and r.accuracy is not None for r in rows)
    assert (tmp_path / "sw" / "r2" / "adapter" / "adapter_config.json").is_file()
    assert json.loads((tmp_path / "sw" / "r4" / "adapter" / "adapter_config.json").read_text())["lora_alpha"] == 8
    saved = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert [s["label"] for s in saved] == ["r=2", "r=4", "full"]
    assert (tmp_path / "sw" / "sweep.png").stat().st_size > 1000
    table = format_table(rows)
    assert table.count("\n| ") == 3 and f"{r4.trainable:,}" in table


def test_sweep_command(capsys, tiny_model_dir, tmp_path):
    sets = [f"{k}={v}" for k, v in TINY.items()] + [f"model={tiny_model_dir}", f"output_dir={tmp_path / 'runs'}",
                                                   "eval_accuracy=false"]
    assert main(["sweep", "--ranks", "2", "--full-baseline", "--set", *sets]) == 0  # one child process per run
    out = capsys.readouterr().out
    assert "| r=2 |" in out and "| full |" in out and " MB |" in out
    assert (tmp_path / "runs-sweep" / "sweep.md").read_text().startswith("| run |")


@pytest.mark.parametrize("argv, message", [(["--ranks", "4,x"], "--ranks '4,x'"),
                                           (["--ranks", "0"], "every rank must be a positive integer"),
                                           (["--set", "method=full"], "method is 'full'")])
def test_sweep_bad_input(capsys, argv, message):
    assert main(["sweep", *argv]) == 2
    assert message in capsys.readouterr().err


def test_a_killed_run_is_named_not_waited_for(tiny_model_dir, tmp_path, monkeypatch):
    import lorakit.sweep as sw

    args = lorakit.train.SFTArgs(model=str(tiny_model_dir), output_dir=str(tmp_path / "runs"), **TINY)
    monkeypatch.setattr(sw, "_run", _die)  # the child process exits as if killed
    with pytest.raises(RuntimeError, match=r"sweep run r=2 .* died before finishing"):
        sw._run_isolated(args, "r=2")


def _die(args, label):
    import os

    os._exit(9)
