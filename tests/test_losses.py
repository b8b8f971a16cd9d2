"""lorakit.losses against hand-computed numbers, torch's own cross entropy and full logits: the pure functions, the
model-level loss of the training loop (head on labelled tokens only) and the chunked frozen-head cross-entropy."""

import math

import pytest
import torch
import torch.nn.functional as F

from lorakit_testing import make_tiny_llama
from lorakit import losses
from lorakit.losses import (chunk_rows, dpo_loss, head_cross_entropy, masked_ce_loss, sequence_logps, sft_loss,
                            token_logps)

M = -100


def hand_case():
    """Vocab 2, one row of 3 tokens; logits at t score label t+1.

    t=0: logits [0, 0]      -> p(label 1) = 1/2
    t=1: logits [ln 3, 0]   -> p(label 0) = 3/4
    t=2: last position, predicts nothing.
    """
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [5.0, -5.0]]])
    labels = torch.tensor([[M, 1, 0]])
    return logits, labels


def test_masked_ce_hand_computed():
    logits, labels = hand_case()
    expected = (math.log(2.0) + math.log(4.0 / 3.0)) / 2
    assert masked_ce_loss(logits, labels).item() == pytest.approx(expected, abs=1e-6)
    total, count = masked_ce_loss(logits, labels, reduction="sum")
    assert total.item() == pytest.approx(2 * expected, abs=1e-6) and count.item() == 2


def test_masked_ce_matches_torch_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=g)
    labels = torch.randint(0, 11, (3, 7), generator=g)
    labels[0, :4] = M
    labels[2, 5:] = M
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=M)
    torch.testing.assert_close(masked_ce_loss(logits, labels), ref)


def test_masked_positions_carry_no_loss():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 6, 5, generator=g)
    labels = torch.randint(0, 5, (2, 6), generator=g)
    labels[0, 1:4] = M  # positions 0..2 of row 0 predict masked labels
    base = masked_ce_loss(logits, labels)
    changed = logits.clone()
    changed[0, 0:3] += 100 * torch.randn(3, 5, generator=g)  # masked next-labels
    changed[:, -1] += 100.0  # the last position never predicts anything
    torch.testing.assert_close(masked_ce_loss(changed, labels), base)
    # ...while changing a position that does predict a label changes the loss
    changed[1, 2] += 100 * torch.randn(5, generator=g)
    assert not torch.allclose(masked_ce_loss(changed, labels), base)


def test_gradient_zero_on_masked_positions():
    logits, labels = hand_case()
    logits.requires_grad_(True)
    masked_ce_loss(logits, labels).backward()
    assert logits.grad[0, 2].abs().sum() == 0  # last position
    assert logits.grad[0, 0].abs().sum() > 0


def test_no_labels_gives_zero_not_nan():
    logits = torch.randn(1, 4, 3, requires_grad=True)
    loss = masked_ce_loss(logits, torch.full((1, 4), M))
    assert loss.item() == 0.0
    loss.backward()  # still connected to the graph


def test_bf16_logits_computed_in_float32():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 5, 7, generator=g).to(torch.bfloat16)
    labels = torch.randint(0, 7, (2, 5), generator=g)
    loss = masked_ce_loss(logits, labels)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, masked_ce_loss(logits.float(), labels))


def test_shape_checks():
    with pytest.raises(ValueError, match=r"expected logits \(B, T, V\)"):
        masked_ce_loss(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="reduction"):
        masked_ce_loss(*hand_case(), reduction="none")


def test_sequence_logps_hand_computed():
    logits, labels = hand_case()
    logits = torch.cat([logits, logits])
    labels = torch.cat([labels, torch.tensor([[M, M, 0]])])  # row 1: only t=1 -> label 0
    out = sequence_logps(logits, labels)
    assert out.shape == (2,)
    torch.testing.assert_close(out, torch.tensor([math.log(0.5) + math.log(0.75), math.log(0.75)]))
    assert sequence_logps(logits[:1], torch.full((1, 3), M)).item() == 0.0


def test_sequence_logps_matches_log_softmax():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 6, 9, generator=g)
    labels = torch.randint(0, 9, (4, 6), generator=g)
    labels[1, :3] = M
    labels[3, 4:] = M
    lp = torch.log_softmax(logits[:, :-1], -1)
    tgt = labels[:, 1:]
    ref = (lp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (tgt != M)).sum(-1)
    torch.testing.assert_close(sequence_logps(logits, labels), ref)


def test_dpo_loss_hand_computed():
    pc = torch.tensor([-1.0, -4.0])
    pr = torch.tensor([-3.0, -2.0])
    rc = torch.tensor([-2.0, -3.0])
    rr = torch.tensor([-2.0, -2.0])
    loss, chosen_r, rejected_r, acc = dpo_loss(pc, pr, rc, rr, beta=0.1)
    # row 0: 0.1 * ((-1 + 2) - (-3 + 2)) = 0.2 ; row 1: 0.1 * ((-4 + 3) - (-2 + 2)) = -0.1
    expected = (-F.logsigmoid(torch.tensor(0.2)) - F.logsigmoid(torch.tensor(-0.1))) / 2
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    assert loss.item() == pytest.approx((math.log1p(math.exp(-0.2)) + math.log1p(math.exp(0.1))) / 2, abs=1e-6)
    torch.testing.assert_close(chosen_r, torch.tensor([0.1, -0.1]))
    torch.testing.assert_close(rejected_r, torch.tensor([-0.1, 0.0]))
    assert acc.item() == 0.5


def test_dpo_loss_at_reference_is_log2_and_grad_sign():
    pc = torch.tensor([-5.0, -7.0], requires_grad=True)
    pr = torch.tensor([-6.0, -1.0], requires_grad=True)
    loss, *_ = dpo_loss(pc, pr, pc.detach(), pr.detach(), beta=0.5)
    assert loss.item() == pytest.approx(math.log(2.0))
    loss.backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()  # descent raises chosen, lowers rejected


def test_dpo_loss_checks():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(x, x, x, x, beta=0.0)
    with pytest.raises(ValueError, match="one shape"):
        dpo_loss(x, x, x, torch.zeros(3))


# --- head_cross_entropy: equals F.cross_entropy on full logits, in value and in gradient, chunk by chunk


def _inputs(n=37, d=24, vocab=101, dtype=torch.float32, bias=False):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, d, generator=g).to(dtype).requires_grad_()
    weight = torch.randn(vocab, d, generator=g).to(dtype)
    b = torch.randn(vocab, generator=g).to(dtype) if bias else None
    targets = torch.randint(0, vocab, (n,), generator=g)
    return hidden, weight, b, targets


def _reference(hidden, weight, bias, targets):
    logits = F.linear(hidden, weight, bias).float()
    return F.cross_entropy(logits, targets, reduction="none")


@pytest.mark.parametrize("rows", [1, 5, 16, 37, 100])
@pytest.mark.parametrize("bias", [False, True])
def test_value_and_gradient_equal_full_logits(rows, bias):
    hidden, weight, b, targets = _inputs(bias=bias)
    upstream = torch.rand(hidden.shape[0], generator=torch.Generator().manual_seed(1))  # not all ones
    ours = head_cross_entropy(hidden, weight, targets, b, rows=rows)
    (grad_ours,) = torch.autograd.grad((ours * upstream).sum(), hidden)
    ref = _reference(hidden, weight, b, targets)
    (grad_ref,) = torch.autograd.grad((ref * upstream).sum(), hidden)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_ours, grad_ref, atol=1e-5, rtol=1e-5)


def test_bfloat16_matches_reference_in_bfloat16():
    hidden, weight, _, targets = _inputs(dtype=torch.bfloat16)
    ours = head_cross_entropy(hidden, weight, targets, rows=8)
    (grad_ours,) = torch.autograd.grad(ours.sum(), hidden)
    ref = _reference(hidden, weight, None, targets)
    (grad_ref,) = torch.autograd.grad(ref.sum(), hidden)
    assert ours.dtype == torch.float32 and grad_ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(grad_ours.float(), grad_ref.float(), atol=2e-2, rtol=2e-2)


def test_no_grad_gives_losses_only(monkeypatch):
    hidden, weight, _, targets = _inputs()
    matmuls = []
    real_mm = losses.matmul
    monkeypatch.setattr(losses, "matmul", lambda *a, **k: matmuls.append(1) or real_mm(*a, **k))
    head_cross_entropy(hidden, weight, targets, rows=4)
    assert matmuls  # with grad: one gradient GEMM per chunk
    matmuls.clear()
    with torch.no_grad():
        ours = head_cross_entropy(hidden, weight, targets, rows=4)
    assert not ours.requires_grad and not matmuls  # no gradient GEMM under no_grad
    torch.testing.assert_close(ours, _reference(hidden.detach(), weight, None, targets), atol=1e-5, rtol=1e-5)


def test_trainable_head_and_bad_shapes_are_refused():
    hidden, weight, _, targets = _inputs()
    with pytest.raises(ValueError, match="frozen head"):
        head_cross_entropy(hidden, weight.requires_grad_(), targets)
    with pytest.raises(ValueError, match="expected hidden"):
        head_cross_entropy(hidden, weight.detach()[:, :5], targets)


def test_chunk_rows_keeps_a_chunk_within_budget():
    assert chunk_rows(49152) * 49152 * 4 <= 32 * 2**20 < (chunk_rows(49152) + 1) * 49152 * 4
    assert chunk_rows(10**9) == 16


# --- on a model: sft_loss / token_logps against full logits


def _batch(rows=2):
    ids = torch.randint(0, 96, (rows, 9))
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


def test_token_logps_equals_sequence_logps_on_full_logits():
    model = make_tiny_llama()
    batch = _batch(4)
    expected = sequence_logps(model(input_ids=batch["input_ids"]).logits, batch["labels"])
    torch.testing.assert_close(token_logps(model, batch), expected, atol=1e-5, rtol=0)
