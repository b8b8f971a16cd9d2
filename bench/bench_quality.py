"""Does lorakit learn as well as PEFT? Held-out accuracy of both at equal steps on the three built-in tasks.

Both sides start from the same SmolLM2-135M-Instruct base and the same initial adapter (lorakit's LoRA A/B copied
into PEFT's modules, which have the same names), and train LoRA r16 α32 all-linear with identical settings: the
same rows in the same order (``lorakit.train.batch_indices``), batch 8, AdamW lr 2e-3, 3 warm-up steps then cosine
to 10%, gradient clipping at 1.0, loss on completion tokens only (mean over the step's labelled tokens). lorakit
trains as its own loop does (``sft_loss``, cheap-activation recompute, oneDNN frozen linears); PEFT runs the
model's own forward and a cross-entropy on the shifted logits. Steps alternate between the two so that machine
noise hits both alike. Both are scored by the same greedy generation and exact match on the task's 200 held-out
rows (``lorakit.evaluate.exact_match``; both with their adapters merged while generating), at every ``--eval-at``
step. The train time of each side is the sum of its step times (forward, backward, clipping, optimizer).

Usage: python bench/bench_quality.py [--steps 30] [--eval-at 30] [--threads 2] [--tasks dates,extract,reverse]
Prints one JSON line per task and a Markdown table at the end.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time

import torch
import torch.nn.functional as F

import lorakit
from lorakit.data import SFTDataset, collate_sft
from lorakit.evaluate import exact_match
from lorakit.losses import sft_loss
from lorakit.tasks import get_task, make_split
from lorakit.train.common import cosine_schedule


def _batch_indices(micro: int, n: int, batch: int, seed: int) -> list[int]:
    # The training loop's data order (lorakit.train.sft.batch_indices), reproduced here so the bench does not
    # depend on where the loop keeps it.
    per_epoch = max(1, n // batch)
    epoch, slot = divmod(micro, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return perm[slot * batch:(slot + 1) * batch].tolist()


def _lorakit_side(base, config):
    model = lorakit.add_adapter(copy.deepcopy(base), config)
    lorakit.recompute_cheap_activations(model, strict=False)
    lorakit.accelerate(model)  # as lorakit's training loops
    return model


def _peft_side(base, ours, kw):
    import peft

    model = peft.get_peft_model(base, peft.LoraConfig(task_type="CAUSAL_LM", **kw))  # wraps (and changes) base
    theirs = {n: p for n, p in model.named_parameters() if p.requires_grad}
    mine = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    assert len(theirs) == len(mine), (len(theirs), len(mine))
    with torch.no_grad():
        for name, p in mine.items():  # same names on disk and in memory; PEFT wraps them in base_model.model.
            theirs["base_model.model." + name].copy_(p)
    return model


def _peft_loss(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                           reduction="sum")


def run_task(name: str, base, tokenizer, args) -> dict:
    task = get_task(name)
    train_rows, eval_rows = make_split(task, 480, 200, seed=0)
    data = SFTDataset(train_rows, tokenizer, 256)
    kw = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
    torch.manual_seed(0)
    ours = _lorakit_side(base, lorakit.LoraConfig(**kw))
    theirs = _peft_side(base, ours, kw)
    # lora_B starts at zero, so before the first step both sides compute the base model: its accuracy is measured
    # on lorakit's side (no third copy of the weights in memory).
    base_acc, _ = exact_match(ours, tokenizer, eval_rows, task.score, batch_size=32)
    sides = {"lorakit": (ours, lambda m, b: sft_loss(m, b)[0]), "peft": (theirs, _peft_loss)}
    opts, scheds = {}, {}
    for side, (model, _) in sides.items():
        model.train()
        opts[side] = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3, weight_decay=0.0)
        scheds[side] = torch.optim.lr_scheduler.LambdaLR(opts[side], lambda s: cosine_schedule(s, 3, args.steps, 0.1))
    seconds = {side: 0.0 for side in sides}
    losses = {side: [] for side in sides}
    acc = {side: {} for side in sides}
    for step in range(1, args.steps + 1):
        batch = collate_sft([data[i] for i in _batch_indices(step - 1, len(data), 8, 0)], tokenizer.pad_token_id)
        n_tokens = int((batch["labels"][:, 1:] != -100).sum())
        order = list(sides) if step % 2 else list(sides)[::-1]
        for side in order:
            model, loss_fn = sides[side]
            start = time.perf_counter()
            loss = loss_fn(model, batch) / n_tokens
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
            opts[side].step()
            scheds[side].step()
            opts[side].zero_grad(set_to_none=True)
            seconds[side] += time.perf_counter() - start
            losses[side].append(round(loss.item(), 5))
        print(f"{name} step {step}: " + ", ".join(f"{s} {losses[s][-1]:.4f}" for s in sides), file=sys.stderr,
              flush=True)
        if step in args.eval_at:
            for side in sides:
                model = sides[side][0]
                if side == "peft":
                    model.merge_adapter()  # lorakit's generate_answers merges its own adapters the same way
                try:
                    acc[side][step], _ = exact_match(model, tokenizer, eval_rows, task.score, batch_size=32)
                finally:
                    if side == "peft":
                        model.unmerge_adapter()
                model.train()
    return {"task": name, "steps": args.steps, "base": base_acc, "accuracy": acc, "train_seconds": seconds,
            "first_losses": {s: v[:5] for s, v in losses.items()}, "last_loss": {s: v[-1] for s, v in losses.items()}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--eval-at", default="30", help="steps at which both sides are scored (comma-separated)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tasks", default="dates,extract,reverse")
    args = parser.parse_args()
    args.eval_at = sorted({int(s) for s in args.eval_at.split(",")} | {args.steps})
    torch.set_num_threads(args.threads)
    base, tokenizer = lorakit.load_model()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    results = []
    for i, name in enumerate(args.tasks.split(",")):
        if i:
            base, _ = lorakit.load_model()  # the previous task's PEFT side wrapped the base
        result = run_task(name, base, tokenizer, args)
        print(json.dumps(result), flush=True)
        results.append(result)
    print("\n| task | base | " + " | ".join(f"lorakit @{s} | PEFT @{s}" for s in args.eval_at)
          + " | train time lorakit / PEFT |")
    print("|---" * (3 + 2 * len(args.eval_at)) + "|")
    for r in results:
        cells = [f"{100 * r['accuracy'][side][s]:.1f}%" for s in args.eval_at for side in ("lorakit", "peft")]
        t = r["train_seconds"]
        print(f"| {r['task']} | {100 * r['base']:.1f}% | " + " | ".join(cells)
              + f" | {t['lorakit']:.0f} s / {t['peft']:.0f} s ({t['lorakit'] / t['peft']:.2f}×) |")


if __name__ == "__main__":
    main()
