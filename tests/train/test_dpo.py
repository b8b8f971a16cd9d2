"""The DPO loop: the reference is the base (adapter disabled), the loss falls, precomputed reference agrees."""

import json

import pytest
import torch

from lorakit_testing import make_byte_tokenizer, make_tiny_llama
from lorakit import LoraConfig, add_adapter
from lorakit.train import DPOArgs, run_dpo, train_dpo
from lorakit.losses import token_logps
from lorakit.train.dpo import reference_logps


def _rows(n=16):
    return [{"prompt": f"q{i}:", "chosen": f" yes{i % 3}", "rejected": f" no{i % 2}"} for i in range(n)]


def _args(tmp_path, model_dir, **kw):
    tmp_path.mkdir(parents=True, exist_ok=True)
    train = tmp_path / "pref.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    base = dict(model=str(model_dir), train_file=str(train), val_fraction=0.25, r=4, lora_alpha=8, lr=2e-2,
                warmup_steps=0, batch_size=4, max_steps=10, max_length=32, output_dir=str(tmp_path / "run"),
                progress=False, beta=0.5)
    base.update(kw)
    return DPOArgs(**base)


def _batch():
    ids = torch.randint(0, 96, (4, 8))
    labels = ids.clone()
    labels[:, :3] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def test_reference_pass_equals_base_model():
    base = make_tiny_llama()
    batch = _batch()
    with torch.no_grad():
        expected = token_logps(base, batch)
    add_adapter(base, LoraConfig(target_modules="all-linear", init_lora_weights=False))
    with torch.no_grad():
        assert not torch.allclose(token_logps(base, batch), expected)
    torch.testing.assert_close(reference_logps(base, batch), expected, atol=0, rtol=0)


@pytest.mark.parametrize("precompute", [False, True])
def test_dpo_loss_falls(tmp_path, tiny_model_dir, precompute):
    result = run_dpo(_args(tmp_path, tiny_model_dir, precompute_reference=precompute))
    rows = [json.loads(x) for x in result.metrics_path.read_text().splitlines() if '"loss"' in x]
    assert rows[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at step 0: -log sigmoid(0)
    assert rows[-1]["loss"] < 0.5 * rows[0]["loss"]
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()


def test_dpo_from_existing_adapter_uses_it_as_reference(tmp_path, tiny_model_dir):
    from lorakit import load_model, save_adapter

    model, _ = load_model(tiny_model_dir)
    add_adapter(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    save_adapter(model, tmp_path / "start")
    result = run_dpo(_args(tmp_path, tiny_model_dir, reference_adapter=str(tmp_path / "start"), max_steps=3))
    first = json.loads(result.metrics_path.read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(0.6931, abs=1e-3)  # the reference is the starting adapter, not the base


def test_dpo_needs_a_file(tmp_path):
    with pytest.raises(ValueError, match="train_file"):
        run_dpo(DPOArgs(output_dir=str(tmp_path)))


def test_train_dpo_takes_the_model_it_is_given(tmp_path):
    tokenizer = make_byte_tokenizer()
    model = make_tiny_llama(vocab_size=len(tokenizer))
    args = DPOArgs(r=4, lora_alpha=8, lr=2e-2, warmup_steps=0, batch_size=4, max_steps=3, max_length=32,
                   output_dir=str(tmp_path), progress=False, beta=0.5)
    result = train_dpo(model, tokenizer, _rows(), args)
    first = json.loads(result.metrics_path.read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference (the adapter starts at zero)
    assert json.loads((result.adapter_dir / "adapter_config.json").read_text())["r"] == 4
