"""`lorakit.estimate`: parameter counts and memory from config.json, checked by hand and against real models."""

import pytest
import torch

from lorakit_testing import make_tiny_llama, tiny_llama_config
from lorakit import LoraConfig, add_adapter, trainable_parameters
from lorakit.estimate import (NF4_BITS, ModelShape, activation_bytes, estimate_training, format_bytes,
                              lora_fraction, lora_params, read_config)

# SmolLM2-135M-Instruct's config.json (the embedded model), copied so the test needs no model files.
SMOLLM2 = {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9,
           "num_key_value_heads": 3, "head_dim": 64, "num_hidden_layers": 30, "vocab_size": 49152,
           "tie_word_embeddings": True, "attention_bias": False, "mlp_bias": False}


def test_lora_fraction_of_one_weight():
    # r (in + out) / (in · out): 16 · 6144 / 8,388,608 and 64 · 6144 / 8,388,608
    assert lora_params(4096, 2048, 16) == 98_304
    assert lora_fraction(4096, 2048, 16) == pytest.approx(0.01171875)
    assert f"{100 * lora_fraction(4096, 2048, 16):.2f}%" == "1.17%"
    assert f"{100 * lora_fraction(2048, 4096, 64):.2f}%" == "4.69%"


def test_nf4_bits_include_double_quant_stats():
    # 4 bits + one 8-bit absmax per 64 weights + one float32 scale per 64·256 weights
    assert NF4_BITS == pytest.approx(4.126953125)
    assert f"{NF4_BITS:.3f}" == "4.127"


def test_smollm2_counts_by_hand():
    e = estimate_training(SMOLLM2, r=16)
    rows = {row.name: row for row in e.rows}
    # per layer: q 576·576, k and v 576·192, o 576·576, gate/up/down 576·1536
    assert rows["q_proj"].params == 30 * 331_776 and rows["k_proj"].params == 30 * 110_592
    assert rows["down_proj"].params == 30 * 884_736
    # LoRA r=16: q 16·1152 = 18,432; k/v 16·768 = 12,288; mlp 16·2112 = 33,792 → 162,816 per layer
    assert rows["q_proj"].lora == 30 * 18_432 and rows["v_proj"].lora == 30 * 12_288
    assert rows["up_proj"].lora == 30 * 33_792
    assert e.lora_params == 30 * 162_816 == 4_884_480
    # 30 · (3,538,944 linear + 2 · 576 norms) + 576 final norm + 49152 · 576 embeddings (head tied)
    assert e.base_params == 30 * (3_538_944 + 1_152) + 576 + 28_311_552 == 134_515_008
    assert rows["q_proj"].percent == pytest.approx(100 * 18_432 / 331_776)


def test_smollm2_memory_by_hand():
    e = estimate_training(SMOLLM2, r=16, batch=8, seq=256, dtype="float32", budget_gb=4)
    full, lora, qlora = e.methods
    n, a = 134_515_008, 4_884_480
    assert (full.weights, full.gradients, full.optimizer) == (4 * n, 4 * n, 8 * n)
    assert (lora.weights, lora.gradients, lora.optimizer) == (4 * n + 4 * a, 4 * a, 8 * a)
    linear = 30 * 3_538_944  # 106,168,320 weights in NF4 at 4.126953125 bits = 54,768,960 bytes
    assert qlora.weights == 54_768_960 + 4 * (n - linear) + 4 * a
    assert (qlora.gradients, qlora.optimizer) == (4 * a, 8 * a)
    assert lora.percent == pytest.approx(100 * a / (n + a))  # as print_trainable_parameters reports it
    assert e.fits() == ["LoRA", "QLoRA"]  # full needs 5.2 GiB at this batch; LoRA 3.8, QLoRA 3.5
    assert estimate_training(SMOLLM2, r=16, batch=1, seq=128, budget_gb=4).fits() == ["full", "LoRA", "QLoRA"]


def test_bfloat16_halves_base_weights():
    f32 = estimate_training(SMOLLM2, r=16, dtype="float32").methods
    bf16 = estimate_training(SMOLLM2, r=16, dtype="bfloat16").methods
    assert bf16[0].weights * 2 == f32[0].weights
    assert bf16[0].optimizer == f32[0].optimizer  # AdamW moments stay float32
    assert bf16[1].weights == 2 * 134_515_008 + 4 * 4_884_480  # adapters train in float32 on a float base


def test_activation_formula_by_hand():
    shape = ModelShape(hidden_size=8, intermediate_size=16, num_attention_heads=2, num_key_value_heads=1, head_dim=4,
                       num_hidden_layers=2, vocab_size=10)
    # per layer and token: 4·8 + 3·8 + 3·4 + 4·16 + 2·7 = 146; × 2 layers × 3 tokens × 4 bytes = 3504
    # final norm 2·8·3·4 = 192; logits + log-softmax 2·10·3·4 = 240
    assert activation_bytes(shape, 1, 3, 4, r=2, n_adapted=7) == 3504 + 192 + 240
    # checkpointing: each layer keeps its input (2·8·3·4) + one layer rebuilt (146·3·4)
    assert activation_bytes(shape, 1, 3, 4, r=2, n_adapted=7, gradient_checkpointing=True) == 192 + 1752 + 432


@pytest.mark.parametrize("overrides", [{}, dict(tie_word_embeddings=True), dict(attention_bias=True, mlp_bias=True)])
def test_counts_match_a_real_model(overrides):
    model = make_tiny_llama(**overrides)
    config = tiny_llama_config(**overrides).to_dict()
    e = estimate_training(config, r=4)
    assert e.base_params == trainable_parameters(model).total
    add_adapter(model, LoraConfig(r=4, target_modules="all-linear"))
    assert e.lora_params == trainable_parameters(model).trainable


def test_targets_subset_match_a_real_model():
    model = make_tiny_llama()
    add_adapter(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    e = estimate_training(tiny_llama_config().to_dict(), r=8, targets=["q_proj", "v_proj"])
    assert e.lora_params == trainable_parameters(model).trainable


def test_activation_estimate_is_not_below_autograd():
    """The estimate covers what autograd keeps for a LoRA step on the tiny model (sdpa attention), within 2×."""
    model = make_tiny_llama(max_position_embeddings=128)
    add_adapter(model, LoraConfig(r=4, target_modules="all-linear"))
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, 96, (2, 64))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids).loss
    measured = sum(v for k, v in kept.items() if k not in params)
    shape = ModelShape.from_config(tiny_llama_config().to_dict())
    estimated = activation_bytes(shape, 2, 64, 4, r=4, n_adapted=7)
    assert measured <= estimated <= 2 * measured


def test_read_config_from_directory_and_file(tmp_path):
    tiny_llama_config().save_pretrained(tmp_path)
    assert read_config(tmp_path)["hidden_size"] == 32
    assert read_config(tmp_path / "config.json")["num_hidden_layers"] == 2
    with pytest.raises(FileNotFoundError, match="neither a local model directory"):
        read_config(tmp_path / "missing")


def test_errors_name_the_fix():
    with pytest.raises(ValueError, match="unknown target.*qproj"):
        estimate_training(SMOLLM2, targets=["qproj"])
    with pytest.raises(ValueError, match="lacks hidden_size.*Llama-like"):
        estimate_training({"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50257})
    with pytest.raises(ValueError, match="dtype"):
        estimate_training(SMOLLM2, dtype="fp8")


def test_table_text():
    text = str(estimate_training(SMOLLM2, r=16, budget_gb=4, name="SmolLM2-135M-Instruct"))
    assert "134,515,008" in text and "4,884,480" in text and "fits in 4.00 GiB: LoRA, QLoRA" in text
    assert format_bytes(1536) == "1.50 KiB" and format_bytes(3 * 2**30) == "3.00 GiB"


def test_lean_activation_formula_by_hand():
    shape = ModelShape(hidden_size=8, intermediate_size=16, num_attention_heads=2, num_key_value_heads=1, head_dim=4,
                       num_hidden_layers=2, vocab_size=10)
    # per layer and token: 146 - (2·8 + 2·16) = 98; × 2 × 3 × 4 = 2352; final norm 192; logits of min(3, chunk) rows
    assert activation_bytes(shape, 1, 3, 4, r=2, n_adapted=7, lean=True) == 2352 + 192 + 240
    big = ModelShape(hidden_size=8, intermediate_size=16, num_attention_heads=2, num_key_value_heads=1, head_dim=4,
                     num_hidden_layers=2, vocab_size=2**20)  # a chunk of 16 tokens (the minimum) < 64
    assert activation_bytes(big, 1, 64, 4, lean=True) - activation_bytes(big, 1, 64, 4, lean=False) == (
        -2 * 64 * 4 * 48 - 2 * 2**20 * (64 - 16) * 4)


def test_lean_estimate_is_not_below_what_lorakit_keeps():
    """With recompute on and lorakit's loss, the lean estimate still covers what autograd keeps, within 2×."""
    from lorakit import recompute_cheap_activations
    from lorakit.losses import sft_loss

    model = make_tiny_llama(max_position_embeddings=128)
    add_adapter(model, LoraConfig(r=4, target_modules="all-linear"))
    recompute_cheap_activations(model)
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    ids = torch.randint(0, 96, (2, 64))
    kept: dict[int, int] = {}
    import lorakit.recompute as rc

    real_pack = rc._LayerRecipes.pack

    def pack(self, t):  # what the recompute hooks keep inside the layers
        out = real_pack(self, t)
        if out is t:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return out

    rc._LayerRecipes.pack = pack
    try:
        sft_loss(model, {"input_ids": ids, "labels": ids})
    finally:
        rc._LayerRecipes.pack = real_pack
    measured = sum(v for k, v in kept.items() if k not in params)
    shape = ModelShape.from_config(tiny_llama_config().to_dict())
    estimated = activation_bytes(shape, 2, 64, 4, r=4, n_adapted=7, lean=True)
    assert measured <= estimated <= 2.5 * measured
