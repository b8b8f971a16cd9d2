"""lorakit vs PEFT, side by side in one process, on SmolLM2-135M-Instruct (fp32, CPU).

Each comparison alternates lorakit and PEFT runs (and the limit) and reports medians, so machine noise hits both
alike. One JSON line per comparison: name, cpu (the CPU's model name), lorakit_s, peer_s, ratio (lorakit / peer)
and, for training steps, vs_limit (lorakit / limit), where the limit is the same model with every weight frozen
and only input gradients on (forward + backward through the activations, no LoRA), through stock PyTorch: no LoRA
training step can be cheaper. The main rows use transformers' loss on every side; ``..._training_loss`` repeats
dropout 0 with lorakit's training step (``sft_loss`` + ``recompute_cheap_activations``) against a limit computing
that same loss.

lorakit's side is what its training loops run: ``lorakit.accelerate(model)``, which picks the float32 product
kernels for this machine by measurement (torch's or oneDNN's, ``lorakit/cpu/choice.py``) and, where oneDNN wins,
routes the frozen linears through it too. The chosen kernels are in each row (``kernels``). Where they are
oneDNN's, each training row also reports ``vs_limit_same_matmul``: the limit with its frozen linears (all but the
output head, as for lorakit; all of them in the q_proj/v_proj row) on the same kernels, so that ratio is the cost
of LoRA alone. ``accelerate`` runs with ``keep_freed_memory=False`` unless ``--keep-freed-memory`` sets it for the
whole process (every side), since a process-wide malloc setting cannot be compared inside one process.

Usage: python bench/bench_core.py [--repeats 5] [--threads 2] [--batch 4] [--seq 256] [--keep-freed-memory]
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import tempfile
import time

import torch

import lorakit
from common import alternate, same_matmul_linears
from lorakit.cpu import CpuSettings
from lorakit.cpu.allocator import keep_freed_memory
from lorakit.cpu.choice import cpu_name
from lorakit.optim import build_optimizer
from lorakit.losses import sft_loss


def timed(fn) -> float:
    gc.collect()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


CPU = cpu_name()
KERNELS = {"name": None}


def report(name: str, ours: float, peer: float, limit: float | None = None, peer_vs_limit: bool = True,
           limit_same: float | None = None) -> None:
    row = {"name": name, "cpu": CPU, "lorakit_s": round(ours, 4), "peer_s": round(peer, 4),
           "ratio": round(ours / peer, 3)}
    if limit is not None:
        row["kernels"] = KERNELS["name"]
    if limit is not None:
        row.update(limit_s=round(limit, 4), vs_limit=round(ours / limit, 3))
        if peer_vs_limit:
            row.update(peer_vs_limit=round(peer / limit, 3))
    if limit_same is not None:
        row.update(limit_same_matmul_s=round(limit_same, 4), vs_limit_same_matmul=round(ours / limit_same, 3))
    print(json.dumps(row), flush=True)


def train_step(model, batch, opt):
    def step():
        out = model(input_ids=batch, labels=batch)
        out.loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
    return step


def lorakit_step(model, batch, opt):
    def step():
        total, n = sft_loss(model, {"input_ids": batch, "labels": batch})
        (total / n).backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
    return step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--only", default="", help="comma-separated comparison names")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="glibc keeps freed memory for the whole process (every side), as lorakit.accelerate sets "
                             "it in lorakit's training loops; by default glibc's allocator keeps its defaults")
    args = parser.parse_args()
    if args.keep_freed_memory and not keep_freed_memory():
        raise SystemExit("keep_freed_memory() is not available here (glibc Linux only)")
    torch.set_num_threads(args.threads)
    settings = CpuSettings(keep_freed_memory=False)  # the process-wide part is the --keep-freed-memory flag's

    def accelerate(model):
        KERNELS["name"] = lorakit.accelerate(model, settings).kernels
        return model

    import peft

    base, _ = lorakit.load_model()
    base.train()
    base.requires_grad_(False)
    batch = torch.randint(0, base.config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    only = set(filter(None, args.only.split(",")))
    want = lambda name: not only or name in only  # noqa: E731

    # --- the limit: frozen model, input gradients only
    limit_model = copy.deepcopy(base)
    limit_model.enable_input_require_grads()
    limit_step = train_step(limit_model, batch, None)
    accelerate(copy.deepcopy(base))  # the machine's kernel choice (measured once, then cached)
    onednn = KERNELS["name"] == "onednn"
    same_model = same_matmul_linears(copy.deepcopy(limit_model)) if onednn else None

    def with_same(sides: dict, same) -> dict:  # the same-matmul limit only where it differs from the limit
        return {**sides, "limit_same": same} if onednn else sides

    for dropout in (0.0, 0.05):
        name = f"train_step_r16_all_linear_dropout{dropout}"
        if not want(name):
            continue
        kw = dict(r=16, lora_alpha=32, lora_dropout=dropout, target_modules="all-linear")
        ours = accelerate(lorakit.add_adapter(copy.deepcopy(base), lorakit.LoraConfig(**kw)))
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(task_type="CAUSAL_LM", **kw))
        o1 = build_optimizer("adamw", [p for p in ours.parameters() if p.requires_grad], lr=1e-4)
        o2 = build_optimizer("adamw", [p for p in theirs.parameters() if p.requires_grad], lr=1e-4)
        t = alternate(with_same({"limit": limit_step, "ours": train_step(ours, batch, o1),
                                 "peer": train_step(theirs, batch, o2)},
                                onednn and train_step(same_model, batch, None)),
                      args.repeats, warmup=3)  # steady state: the first steps of fresh copies fault their memory in
        report(name, t["ours"], t["peer"], t["limit"], limit_same=t.get("limit_same"))
        if dropout == 0.0 and want(name + "_training_loss"):
            # lorakit's own training step (sft_loss: chunked head cross-entropy; recompute_cheap_activations) vs the
            # limit computing the same loss; the peer keeps transformers' loss, as PEFT users run it
            lorakit.recompute_cheap_activations(ours)
            t = alternate(with_same({"limit": lorakit_step(limit_model, batch, None),
                                     "ours": lorakit_step(ours, batch, o1), "peer": train_step(theirs, batch, o2)},
                                    onednn and lorakit_step(same_model, batch, None)),
                          args.repeats, warmup=3)
            report(name + "_training_loss", t["ours"], t["peer"], t["limit"], peer_vs_limit=False,
                   limit_same=t.get("limit_same"))
        del ours, theirs, o1, o2

    name = "train_step_r16_q_v_accelerated"
    if want(name):
        # PEFT's default targets for Llama (q_proj, v_proj): most of the model stays frozen nn.Linear layers, which
        # accelerate routes through oneDNN (head included) where that is this machine's choice; the same-matmul
        # limit then covers every linear, head included
        kw = dict(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"])
        ours = accelerate(lorakit.add_adapter(copy.deepcopy(base), lorakit.LoraConfig(**kw)))
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(task_type="CAUSAL_LM", **kw))
        o1 = build_optimizer("adamw", [p for p in ours.parameters() if p.requires_grad], lr=1e-4)
        o2 = build_optimizer("adamw", [p for p in theirs.parameters() if p.requires_grad], lr=1e-4)
        same_all = same_matmul_linears(copy.deepcopy(limit_model), head=True) if onednn else None
        t = alternate(with_same({"limit": limit_step, "ours": train_step(ours, batch, o1),
                                 "peer": train_step(theirs, batch, o2)}, onednn and train_step(same_all, batch, None)),
                      args.repeats, warmup=3)
        report(name, t["ours"], t["peer"], t["limit"], limit_same=t.get("limit_same"))
        del ours, theirs, o1, o2, same_all

    kw = dict(r=16, lora_alpha=32, target_modules="all-linear")
    if want("add_adapter"):
        ours_t = statistics.median(
            timed_on(copy.deepcopy(base), lambda m: lorakit.add_adapter(m, lorakit.LoraConfig(**kw)))
            for _ in range(args.repeats))
        peer_t = statistics.median(
            timed_on(copy.deepcopy(base), lambda m: peft.get_peft_model(m, peft.LoraConfig(**kw)))
            for _ in range(args.repeats))
        report("add_adapter", ours_t, peer_t)

    if want("merge_and_unload"):
        def ours_merge():
            m = lorakit.add_adapter(copy.deepcopy(base), lorakit.LoraConfig(init_lora_weights=False, **kw))
            return timed(lambda: lorakit.merge_and_unload(m))

        def peer_merge():
            m = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **kw))
            return timed(lambda: m.merge_and_unload())

        ours_t = statistics.median(ours_merge() for _ in range(args.repeats))
        peer_t = statistics.median(peer_merge() for _ in range(args.repeats))
        report("merge_and_unload", ours_t, peer_t)

    if want("save_load"):
        ours = lorakit.add_adapter(copy.deepcopy(base), lorakit.LoraConfig(**kw))
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(task_type="CAUSAL_LM", **kw))
        fresh_ours, fresh_peer = copy.deepcopy(base), copy.deepcopy(base)
        with tempfile.TemporaryDirectory() as d:
            def ours_rt():
                lorakit.save_adapter(ours, f"{d}/ours")
                lorakit.unload(fresh_ours)
                lorakit.load_adapter(fresh_ours, f"{d}/ours")

            def peer_rt():
                theirs.save_pretrained(f"{d}/peer")
                peft.PeftModel.from_pretrained(copy.copy(fresh_peer), f"{d}/peer").unload()

            t = alternate({"ours": ours_rt, "peer": peer_rt}, args.repeats)
        report("save_and_load_adapter", t["ours"], t["peer"])


def timed_on(model, fn) -> float:
    """Seconds of ``fn(model)`` alone (the model copy is made before the clock starts)."""
    return timed(lambda: fn(model))


if __name__ == "__main__":
    main()
