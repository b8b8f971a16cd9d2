"""The SFT loop on a tiny model: the loss falls, resume is bit-exact, checkpointing keeps LoRA's gradients."""

import json

import pytest
import torch

from lorakit_testing import make_tiny_llama
from lorakit import LoraConfig, add_adapter
from lorakit.train import SFTArgs, train_sft
from lorakit.train.common import cosine_schedule, sft_loss
from lorakit.train.losses import masked_ce_loss
from lorakit.train.sft import batch_indices


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


def test_loss_falls_and_files_written(tmp_path, tiny_model_dir):
    result = train_sft(_args(tmp_path, tiny_model_dir, eval_every=4))
    rows = [json.loads(line) for line in result.metrics_path.read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 12 and losses[-1] < 0.5 * losses[0]
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
    assert result.plot_path.is_file() and result.plot_path.stat().st_size > 1000
    assert result.best_val_loss is not None and (tmp_path / "run" / "best" / "adapter_config.json").is_file()
    assert 0 < result.trainable.percent < 100


def test_resume_is_bitwise_identical(tmp_path, tiny_model_dir, monkeypatch):
    full = train_sft(_args(tmp_path / "a", tiny_model_dir, max_steps=6, lora_dropout=0.1))
    import lorakit.train.sft as sft_module

    real_save = sft_module.save_checkpoint

    def save_then_die(*a, **k):  # the process is killed right after the step-3 checkpoint
        real_save(*a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(sft_module, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_sft(_args(tmp_path / "b", tiny_model_dir, max_steps=6, save_every=3, lora_dropout=0.1))
    monkeypatch.setattr(sft_module, "save_checkpoint", real_save)
    resumed = train_sft(_args(tmp_path / "b", tiny_model_dir, max_steps=6, save_every=3, lora_dropout=0.1,
                              resume=True))
    from safetensors.torch import load_file

    a = load_file(full.adapter_dir / "adapter_model.safetensors")
    b = load_file(resumed.adapter_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_full_finetune_baseline(tmp_path, tiny_model_dir):
    result = train_sft(_args(tmp_path, tiny_model_dir, method="full", max_steps=4, lr=1e-3))
    assert result.trainable.percent == 100
    assert (tmp_path / "run" / "model" / "config.json").is_file()


def _batch():
    ids = torch.randint(0, 96, (2, 9))
    labels = ids.clone()
    labels[:, :4] = -100
    labels[1, 7:] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def test_sft_loss_equals_full_logits_masked_ce():
    model = make_tiny_llama()
    batch = _batch()
    loss_sum, n = sft_loss(model, batch)
    logits = model(input_ids=batch["input_ids"]).logits
    expected = masked_ce_loss(logits, batch["labels"])
    torch.testing.assert_close(loss_sum / n, expected, atol=1e-5, rtol=0)
    assert n == int((batch["labels"][:, 1:] != -100).sum())


def test_sft_loss_without_decoder_uses_full_logits():
    class Plain(torch.nn.Module):  # a causal LM that offers no get_decoder / get_output_embeddings
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, **kw):
            return self.inner(**kw)

    inner = make_tiny_llama()
    batch = _batch()
    loss_sum, n = sft_loss(Plain(inner), batch)
    expected = masked_ce_loss(inner(input_ids=batch["input_ids"]).logits, batch["labels"])
    torch.testing.assert_close(loss_sum / n, expected, atol=1e-5, rtol=0)


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
    result = train_sft(_args(tmp_path, tiny_model_dir, dtype="bfloat16"))
    rows = [json.loads(line) for line in result.metrics_path.read_text().splitlines() if '"loss"' in line]
    assert rows[-1]["loss"] < 0.7 * rows[0]["loss"]
    from safetensors.torch import load_file

    assert load_file(result.adapter_dir / "adapter_model.safetensors")  # saved and readable


def test_qlora_method_trains(tmp_path, tiny_model_dir):
    result = train_sft(_args(tmp_path, tiny_model_dir, method="qlora", max_steps=6))
    assert (result.adapter_dir / "adapter_config.json").is_file()
    rows = [json.loads(line) for line in result.metrics_path.read_text().splitlines() if '"loss"' in line]
    assert rows[-1]["loss"] < rows[0]["loss"]
