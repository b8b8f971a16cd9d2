"""Batched, left-padded, adapter-merged generation gives the same answers as one prompt at a time."""

import torch

from lorakit import LoraConfig, add_adapter, load_model
from lorakit.data import encode_prompt
from lorakit.evaluate import exact_match, generate_answers, validation_loss


def _prompts():
    return [[{"role": "user", "content": "x" * n}] for n in (1, 7, 3, 12)]


def test_batched_generation_equals_one_by_one(tiny_model_dir):
    model, tok = load_model(tiny_model_dir)
    add_adapter(model, LoraConfig(target_modules="all-linear", init_lora_weights=False))
    w = model.model.layers[0].self_attn.q_proj.base_layer.weight.clone()
    batched = generate_answers(model, tok, _prompts(), batch_size=4, max_new_tokens=6)
    torch.testing.assert_close(model.model.layers[0].self_attn.q_proj.base_layer.weight, w, atol=1e-6, rtol=0)
    for prompt, answer in zip(_prompts(), batched):
        ids = torch.tensor([encode_prompt(prompt, tok)])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id)
        assert answer == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def test_exact_match_counts_hits(tiny_model_dir):
    model, tok = load_model(tiny_model_dir)
    answers = generate_answers(model, tok, _prompts(), max_new_tokens=4)
    rows = [{"prompt": p, "completion": [{"role": "assistant", "content": a if i % 2 else a + "?"}]}
            for i, (p, a) in enumerate(zip(_prompts(), answers))]
    accuracy, got = exact_match(model, tok, rows, max_new_tokens=4)
    assert got == answers and accuracy == 0.5


def test_validation_loss_is_mean_token_ce(tiny_model_dir):
    from lorakit.data import SFTDataset, collate_sft
    from lorakit.losses import masked_ce_loss

    model, tok = load_model(tiny_model_dir)
    rows = [{"prompt": "ab", "completion": "cd"}, {"prompt": "abc", "completion": "d"}]
    batch = collate_sft(list(SFTDataset(rows, tok, 16)), tok.pad_token_id)
    with torch.no_grad():
        expected = masked_ce_loss(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                  batch["labels"])  # mean over all labelled tokens of both rows
    for batch_size in (1, 2):
        loss = validation_loss(model, tok, rows, max_length=16, batch_size=batch_size)
        assert abs(loss - expected.item()) < 1e-5
