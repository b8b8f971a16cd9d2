"""A lorakit model trains under TRL's SFTTrainer and DPOTrainer as a plain transformers model."""

import pytest
import torch

from lorakit import LoraConfig, accelerate, add_adapter, load_model
from lorakit.cpu import CpuSettings

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _changed(before, model):
    return {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}


def _common(tmp_path):
    return dict(output_dir=str(tmp_path / "out"), max_steps=12, per_device_train_batch_size=4, learning_rate=2e-2,
                logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=0, lr_scheduler_type="constant")


@pytest.mark.parametrize("targets", ["all-linear", "q_proj,v_proj + accelerate (oneDNN routing)"])
def test_sft_trainer_trains_only_lora(tmp_path, tiny_model_dir, targets):
    model, tokenizer = load_model(tiny_model_dir)
    if targets == "all-linear":
        add_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    else:
        add_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        accelerate(model, CpuSettings(onednn="on", keep_freed_memory=False))
    rows = [{"prompt": f"q{i}:", "completion": f" a{i % 4}"} for i in range(16)]
    before = _snapshot(model)
    trainer = trl.SFTTrainer(model=model, args=trl.SFTConfig(max_length=32, **_common(tmp_path)),
                             train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer)
    trainer.train()
    changed = _changed(before, model)
    assert changed and all(".lora_A." in n or ".lora_B." in n for n in changed)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0]


def test_dpo_trainer_trains_only_lora(tmp_path, tiny_model_dir):
    model, tokenizer = load_model(tiny_model_dir)
    add_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    rows = [{"prompt": f"q{i}:", "chosen": f" yes{i % 3}", "rejected": f" no{i % 2}"} for i in range(16)]
    before = _snapshot(model)
    trainer = trl.DPOTrainer(model=model, args=trl.DPOConfig(max_length=32, beta=0.5, **_common(tmp_path)),
                             train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer)
    trainer.train()
    changed = _changed(before, model)
    assert changed and all(".lora_A." in n or ".lora_B." in n for n in changed)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0]
