"""The SFT loop on a tiny model: it trains a model the user built, the loss falls, resume is bit-exact, checkpointing
keeps LoRA's gradients."""

import json

import pytest
import torch

from lorakit_testing import make_byte_tokenizer, make_tiny_llama
from lorakit import LoraConfig, add_adapter
from lorakit.train import SFTArgs, run_sft, train_sft
from lorakit.losses import sft_loss
from lorakit.train.common import batch_indices, cosine_schedule


def _rows(n=16):
    return [{"prompt": f"q{i}:", "completion": f" a{i % 4}"} for i in range(n)]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _args(tmp_path, model_dir, **kw):
    tmp_path.mkdir(parents=True, exist_ok=True)
    train = _write(tmp_path / "train.jsonl", _rows())
    base = dict(model=str(model_dir), task=None, train_file=str(train), val_fraction=0.25, r=4, lora_alpha=8,
                lr=2e-2, warmup_steps=0, batch_size=4, max_steps=12, max_length=32, output_dir=str(tmp_path / "run"),
                progress=False, eval_accuracy=False)
    base.update(kw)
    return SFTArgs(**base)


def test_trains_the_model_the_user_built_and_placed(tmp_path):
    """No loader, no config file: a model built in-process, with the user's own adapter, is trained where it is."""
    tokenizer = make_byte_tokenizer()
    model = make_tiny_llama(vocab_size=len(tokenizer), intermediate_size=64, initializer_range=0.3).to("cpu")
    add_adapter(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    threads = torch.get_num_threads()
    args = SFTArgs(lr=5e-2, warmup_steps=0, batch_size=4, max_steps=12, max_length=32, output_dir=str(tmp_path),
                   progress=False)
    result = train_sft(model, tokenizer, _rows(), args, val_data=_rows(4))

    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".lora_B." in n or ".lora_A." in n for n in changed)  # its adapter trained, nothing else
    assert {n.split(".lora_")[0].rsplit(".", 1)[1] for n in changed} == {"q_proj", "v_proj"}  # no second adapter
    assert json.loads((result.adapter_dir / "adapter_config.json").read_text())["r"] == 2
    losses = [json.loads(x)["loss"] for x in result.metrics_path.read_text().splitlines() if '"loss"' in x]
    assert len(losses) == 12 and losses[-1] < 0.7 * losses[0]
    assert result.final_val_loss is not None and result.base_accuracy is None  # no score given: no accuracy
    assert torch.get_num_threads() == threads  # process settings belong to the recipe
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_a_model_without_adapter_gets_the_one_args_describe(tmp_path):
    tokenizer = make_byte_tokenizer()
    model = make_tiny_llama(vocab_size=len(tokenizer))
    args = SFTArgs(r=4, lora_alpha=8, target_modules=["down_proj"], batch_size=4, max_steps=2, max_length=32,
                   output_dir=str(tmp_path), progress=False)
    result = train_sft(model, tokenizer, _rows(), args)
    saved = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert saved["r"] == 4 and saved["target_modules"] == ["down_proj"]


def test_loss_falls_and_files_written(tmp_path, tiny_model_dir):
    result = run_sft(_args(tmp_path, tiny_model_dir, eval_every=4))
    rows = [json.loads(line) for line in result.metrics_path.read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 12 and losses[-1] < 0.5 * losses[0]
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
    assert result.plot_path.is_file() and result.plot_path.stat().st_size > 1000
    assert result.best_val_loss is not None and (tmp_path / "run" / "best" / "adapter_config.json").is_file()
    assert 0 < result.trainable.percent < 100


def test_resume_is_bitwise_identical(tmp_path, tiny_model_dir, monkeypatch):
    full = run_sft(_args(tmp_path / "a", tiny_model_dir, max_steps=6, lora_dropout=0.1))
    import lorakit.train.sft as sft_module

    real_save = sft_module.save_checkpoint

    def save_then_die(*a, **k):  # the process is killed right after the step-3 checkpoint
        real_save(*a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(sft_module, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_sft(_args(tmp_path / "b", tiny_model_dir, max_steps=6, save_every=3, lora_dropout=0.1))
    monkeypatch.setattr(sft_module, "save_checkpoint", real_save)
    resumed = run_sft(_args(tmp_path / "b", tiny_model_dir, max_steps=6, save_every=3, lora_dropout=0.1,
                              resume=True))
    from safetensors.torch import load_file

    a = load_file(full.adapter_dir / "adapter_model.safetensors")
    b = load_file(resumed.adapter_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_full_finetune_baseline(tmp_path, tiny_model_dir):
    result = run_sft(_args(tmp_path, tiny_model_dir, method="full", max_steps=4, lr=1e-3))
    assert result.trainable.percent == 100
    assert (tmp_path / "run" / "model" / "config.json").is_file()


def _batch():
    ids = torch.randint(0, 96, (2, 9))
    labels = ids.clone()
    labels[:, :4] = -100
    labels[1, 7:] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def test_gradient_checkpointing_gives_the_same_lora_grads():
    grads = []
    for checkpointing in (False, True):
        model = make_tiny_llama()
        add_adapter(model, LoraConfig(target_modules="all-linear", init_lora_weights=False))
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        torch.manual_seed(0)
        loss, n = sft_loss(model, _batch())
        (loss / n).backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 28
    for k in grads[0]:
        assert grads[0][k].abs().sum() > 0
        torch.testing.assert_close(grads[0][k], grads[1][k], atol=1e-6, rtol=1e-5)


def test_batch_order_is_a_pure_function():
    assert batch_indices(5, 20, 4, 0) == batch_indices(5, 20, 4, 0)
    epoch0 = sum((batch_indices(i, 20, 4, 0) for i in range(5)), [])
    assert sorted(epoch0) == list(range(20))
    assert batch_indices(5, 20, 4, 0) != batch_indices(0, 20, 4, 0)


def test_cosine_schedule_shape():
    values = [cosine_schedule(s, 2, 10, 0.1) for s in range(11)]
    assert values[0] < values[1] < values[2] == pytest.approx(1.0)
    assert values[10] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(values[2:], values[3:]))


def test_unknown_arg_suggests(tmp_path):
    from lorakit.train import load_args

    with pytest.raises(ValueError, match="did you mean 'max_steps'"):
        load_args(SFTArgs, None, ["max_step=3"])


def test_bfloat16_training_runs_and_learns(tmp_path, tiny_model_dir):
    result = run_sft(_args(tmp_path, tiny_model_dir, dtype="bfloat16"))
    rows = [json.loads(line) for line in result.metrics_path.read_text().splitlines() if '"loss"' in line]
    assert rows[-1]["loss"] < 0.7 * rows[0]["loss"]
    from safetensors.torch import load_file

    assert load_file(result.adapter_dir / "adapter_model.safetensors")  # saved and readable


def test_qlora_method_trains(tmp_path, tiny_model_dir):
    result = run_sft(_args(tmp_path, tiny_model_dir, method="qlora", max_steps=6))
    assert (result.adapter_dir / "adapter_config.json").is_file()
    rows = [json.loads(line) for line in result.metrics_path.read_text().splitlines() if '"loss"' in line]
    assert rows[-1]["loss"] < rows[0]["loss"]


def test_examples_longer_than_the_models_positions_name_max_length(tmp_path):
    tokenizer = make_byte_tokenizer()
    model = make_tiny_llama(vocab_size=len(tokenizer))  # max_position_embeddings=64
    rows = [{"prompt": "q" * 100, "completion": " a" * 20} for _ in range(4)]
    args = SFTArgs(batch_size=4, max_steps=1, max_length=256, output_dir=str(tmp_path / "run"), progress=False)
    with pytest.raises(ValueError, match=r"max_length=256: examples of up to 1\d\d tokens are longer than the "
                                         r"model's 64 positions .*set max_length to 64 or less"):
        train_sft(model, tokenizer, rows, args)
