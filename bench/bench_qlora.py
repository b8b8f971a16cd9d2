"""QLoRA: lorakit's NF4 vs bitsandbytes (+ PEFT), side by side in one process, on SmolLM2-135M-Instruct (CPU).

Comparisons (one JSON line each; ratio = lorakit / peer):
- nf4_quantize_dequantize: NF4 + double quantization of every linear weight of the model, then dequantization.
- qlora_train_step: LoRA r16 α32 all-linear on an NF4 base (compute float32), batch × seq tokens, vs PEFT on a
  transformers + bitsandbytes 4-bit model with the same settings; also peak RSS growth during the steps.
  Each side's step is what its users run: lorakit's is ``train_sft``'s (``sft_loss``: chunked head cross-entropy,
  with ``recompute_cheap_activations``), PEFT's is ``model(input_ids, labels=...).loss`` (as Trainer computes it).
  The same loss value either way; ``ours_hf_loss`` is lorakit's model stepped the transformers way, for reference.
- qlora_vs_lora_fp32: the QLoRA step vs lorakit's own float32 LoRA step (both lorakit's training step).
- qlora_inference: one forward of batch 1 × 64 tokens with the adapter unmerged: lorakit with compute_dtype
  bfloat16 (its fused 4-bit CPU kernel) vs bitsandbytes' eval-mode path (weights repacked for its AVX512-BF16
  kernel), each side's logit error against float32 reported; and both in float32 (bitsandbytes in train mode
  under no_grad). Also a forward of a single token (a decoding step's linear layers), bfloat16 compute.
- model_bytes_per_param: memory of the quantized linear weights (packed + stats) per parameter.

Usage: python bench/bench_qlora.py [--repeats 5] [--threads 2] [--batch 4] [--seq 256]
"""

from __future__ import annotations

import argparse
import copy
import json

import torch

import lorakit
from lorakit.cpu import CpuSettings
from lorakit.cpu import kernels as cpu_kernels
from lorakit.cpu.choice import cpu_name
from lorakit.quant import NF4Linear, dequantize_4bit, double_dequantize, double_quantize, quantize_4bit
from lorakit.losses import sft_loss

from common import alternate, child_memory, peak_rss, reset_peak_rss


CPU = cpu_name()


def emit(**row):
    row = {"name": row.pop("name"), "cpu": CPU, **row}
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--child", choices=["ours", "ours_hf_loss", "peer"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import bitsandbytes.functional as bnbf

    if args.child:
        return _memory_child(args)
    base, _ = lorakit.load_model()
    weights = [m.weight.detach() for n, m in base.named_modules()
               if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")]

    # --- quantize + dequantize every linear weight
    def ours_q():
        for w in weights:
            packed, absmax = quantize_4bit(w, 64, "nf4")
            q, nested, offset = double_quantize(absmax)
            dequantize_4bit(packed, double_dequantize(q, nested, offset), w.shape, 64, "nf4", torch.float32)

    def bnb_q():
        for w in weights:
            packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
            bnbf.dequantize_4bit(packed, state)

    t = alternate({"ours": ours_q, "peer": bnb_q}, args.repeats)
    emit(name="nf4_quantize_dequantize_model", lorakit_s=t["ours"], peer_s=t["peer"], ratio=t["ours"] / t["peer"])

    # --- models
    kw = KW
    ours, theirs = build_ours(), build_peer()
    fp32 = lorakit.recompute_cheap_activations(lorakit.add_adapter(copy.deepcopy(base), lorakit.LoraConfig(**kw)))
    lorakit.accelerate(fp32, SETTINGS)
    del base
    packed_bytes = sum(b.numel() * b.element_size() for m in ours.modules() if isinstance(m, NF4Linear)
                       for b in m.buffers())
    n_quant = sum(m.in_features * m.out_features for m in ours.modules() if isinstance(m, NF4Linear))
    emit(name="model_bytes_per_param", lorakit=packed_bytes / n_quant, bits=8 * packed_bytes / n_quant)

    batch = torch.randint(0, 49152, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))

    t = alternate({"ours": step_fn(ours, batch, lorakit_step=True), "peer": step_fn(theirs, batch),
                   "fp32": step_fn(fp32, batch, lorakit_step=True)}, args.repeats)
    mem = {side: child_memory(__file__, side, args) for side in ("ours", "ours_hf_loss", "peer")}
    emit(name="qlora_train_step", lorakit_s=t["ours"], peer_s=t["peer"], ratio=t["ours"] / t["peer"])
    emit(name="qlora_training_peak_rss_over_setup", lorakit_mb=mem["ours"]["over"] / 2**20,
         peer_mb=mem["peer"]["over"] / 2**20, ratio=mem["ours"]["over"] / mem["peer"]["over"],
         lorakit_peak_mb=mem["ours"]["peak"] / 2**20, peer_peak_mb=mem["peer"]["peak"] / 2**20,
         lorakit_hf_loss_no_recompute_mb=mem["ours_hf_loss"]["over"] / 2**20)
    emit(name="qlora_vs_lora_fp32_step", lorakit_s=t["ours"], peer_s=t["fp32"], ratio=t["ours"] / t["fp32"])

    # --- inference, adapter unmerged. bitsandbytes' eval-mode CPU path repacks the weights (for good) for an
    # AVX512-BF16 kernel and computes in bfloat16 whatever compute_dtype says; lorakit's bfloat16 compute (the
    # QLoRA default) takes its own fused 4-bit kernel. A bitsandbytes model never put in eval mode dequantizes and
    # multiplies in float32 under no_grad, as lorakit does with compute_dtype=float32.
    prompt = batch[:1, :64]
    ours.eval(), theirs.eval()
    exact = build_peer().train()  # LoRA dropout is 0: train mode changes nothing else
    ours_bf16 = build_ours(compute_dtype=torch.bfloat16).eval()
    err_peer, err_ours = _base_rel_err(theirs, exact, prompt), _base_rel_err(ours_bf16, exact, prompt)

    def infer(model):
        def run():
            with torch.no_grad():
                model(input_ids=prompt)
        return run

    t = alternate({"ours": infer(ours), "ours_bf16": infer(ours_bf16), "peer": infer(theirs),
                   "peer_fp32": infer(exact)}, args.repeats * 2)
    emit(name="qlora_inference_1x64", lorakit_s=t["ours_bf16"], peer_s=t["peer"], ratio=t["ours_bf16"] / t["peer"],
         note="bfloat16 compute both: lorakit's fused 4-bit kernel vs bitsandbytes' eval path",
         lorakit_logit_rel_err=err_ours, peer_logit_rel_err=err_peer, native_kernels=cpu_kernels.available())
    emit(name="qlora_inference_1x64_float32_both", lorakit_s=t["ours"], peer_s=t["peer_fp32"],
         ratio=t["ours"] / t["peer_fp32"])
    prompt = prompt[:, :1]  # one token: what each decoding step costs in the linear layers
    t = alternate({"ours_bf16": infer(ours_bf16), "peer": infer(theirs)}, args.repeats * 4)
    emit(name="qlora_forward_1x1_bf16_compute", lorakit_s=t["ours_bf16"], peer_s=t["peer"],
         ratio=t["ours_bf16"] / t["peer"])


def _base_rel_err(fast, exact, prompt) -> float:
    """max |logits(fast) - logits(exact)| / max |logits(exact)|, adapters disabled: the error of a bfloat16 path
    against bitsandbytes' float32 one on the same NF4 weights (lorakit's quantization is bit-identical)."""
    def off(model):  # PEFT's method, or lorakit's function (lorakit adds no wrapper class)
        return model.disable_adapter() if hasattr(model, "disable_adapter") else lorakit.disable_adapter(model)

    with torch.no_grad(), off(fast), off(exact):
        ref = exact(input_ids=prompt).logits
        return ((fast(input_ids=prompt).logits - ref).abs().max() / ref.abs().max()).item()


KW = dict(r=16, lora_alpha=32, target_modules="all-linear")


SETTINGS = CpuSettings(keep_freed_memory=False)  # what lorakit's loops do, less the process-wide malloc setting


def build_ours(recompute: bool = True, compute_dtype: torch.dtype = torch.float32):
    ours, _ = lorakit.load_model(quantization="nf4", compute_dtype=compute_dtype)
    lorakit.add_adapter(ours, lorakit.LoraConfig(**KW))
    lorakit.accelerate(ours, SETTINGS)  # the kernels lorakit's training loops choose on this machine
    return lorakit.recompute_cheap_activations(ours) if recompute else ours


def build_peer():
    import peft
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from lorakit.models import embedded_model_path

    bnb_model = AutoModelForCausalLM.from_pretrained(
        embedded_model_path(), dtype=torch.float32, device_map="cpu",
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32))
    return peft.get_peft_model(bnb_model, peft.LoraConfig(task_type="CAUSAL_LM", **KW))


def step_fn(model, batch, lorakit_step: bool = False):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()

    def loss():
        if lorakit_step:
            total, n = sft_loss(model, {"input_ids": batch, "labels": batch})
            return total / n
        return model(input_ids=batch, labels=batch).loss

    def step():
        loss().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def _memory_child(args) -> None:
    import psutil

    model = build_peer() if args.child == "peer" else build_ours(recompute=args.child == "ours")
    batch = torch.randint(0, 49152, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    step = step_fn(model, batch, lorakit_step=args.child == "ours")
    base_rss = psutil.Process().memory_info().rss
    reset_peak_rss()
    for _ in range(2):
        step()
    peak = peak_rss()
    print(json.dumps({"over": peak - base_rss, "peak": peak}))


if __name__ == "__main__":
    main()
