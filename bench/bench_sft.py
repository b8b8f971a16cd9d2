"""lorakit's SFT step vs TRL SFTTrainer + PEFT, side by side in one process, on SmolLM2-135M-Instruct (CPU).

Both train LoRA r16 α32 all-linear on the same built-in date-task rows (batch 8, completion-only loss), with
AdamW. Steps alternate between the two so that machine noise hits both alike; one JSON line with the median step
times and the ratio. Memory cannot be compared inside one process (memory freed by one side is reused by the
other without showing in RSS), so each side also runs alone in a child process, and the second line compares
their peak RSS (``ru_maxrss``) above the RSS after set-up (model loaded, adapter added, data ready).

Usage: python bench/bench_sft.py [--steps 6] [--threads 2] [--batch 8]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import psutil
import torch

import lorakit
from common import child_memory, peak_rss, reset_peak_rss
from lorakit.data import SFTDataset, collate_sft
from lorakit.tasks import make_split
from lorakit.losses import sft_loss


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--child", choices=["ours", "peer"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import datasets
    import peft
    import trl

    base, tokenizer = lorakit.load_model()
    rows, _ = make_split("dates", args.batch * (args.steps + 1), 0, seed=0)
    kw = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")

    def setup_ours():
        ours = lorakit.add_adapter(copy.deepcopy(base), lorakit.LoraConfig(**kw))
        lorakit.recompute_cheap_activations(ours)  # as train_sft does by default
        ours.train()
        data = SFTDataset(rows, tokenizer, 256)
        batches = [collate_sft([data[i] for i in range(s * args.batch, (s + 1) * args.batch)],
                               tokenizer.pad_token_id) for s in range(args.steps + 1)]
        opt = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-4)

        def step(i):
            loss, n = sft_loss(ours, batches[i])
            (loss / n).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    def setup_peer():
        # the documented recipe: SFTTrainer with peft_config
        config = trl.SFTConfig(output_dir="/tmp/lorakit-bench-trl", per_device_train_batch_size=args.batch,
                               max_length=256, learning_rate=1e-4, report_to=[], save_strategy="no", use_cpu=True,
                               max_steps=args.steps + 1, logging_steps=1000, dataloader_num_workers=0)
        trainer = trl.SFTTrainer(model=copy.deepcopy(base), args=config,
                                 train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer,
                                 peft_config=peft.LoraConfig(task_type="CAUSAL_LM", **kw))
        trainer.create_optimizer_and_scheduler(num_training_steps=args.steps + 1)
        trainer.current_gradient_accumulation_steps = 1  # normally set inside trainer.train()
        batches = list(trainer.get_train_dataloader())
        model = trainer.model
        model.train()

        def step(i):
            trainer.training_step(model, batches[i % len(batches)])
            trainer.optimizer.step()
            trainer.optimizer.zero_grad(set_to_none=True)
        return step

    if args.child:
        step = setup_ours() if args.child == "ours" else setup_peer()
        base_rss = psutil.Process().memory_info().rss
        reset_peak_rss()
        for i in range(3):
            step(i)
        peak = peak_rss()
        print(json.dumps({"peak_over_setup": peak - base_rss, "peak": peak}))
        return

    our_step, trl_step = setup_ours(), setup_peer()
    our_step(0), trl_step(0)  # warm-up
    times = {"ours": [], "peer": []}
    for i in range(1, args.steps + 1):
        for name, fn in (("ours", our_step), ("peer", trl_step))[:: 1 if i % 2 else -1]:
            start = time.perf_counter()
            fn(i)
            times[name].append(time.perf_counter() - start)
    ours_t, peer_t = statistics.median(times["ours"]), statistics.median(times["peer"])
    print(json.dumps({"name": "sft_step_vs_trl_peft", "lorakit_s": round(ours_t, 4), "peer_s": round(peer_t, 4),
                      "ratio": round(ours_t / peer_t, 3), "batch": args.batch, "steps": args.steps}))
    mem = {side: child_memory(__file__, side, args) for side in ("ours", "peer")}
    print(json.dumps({"name": "sft_training_peak_rss_over_setup_vs_trl_peft",
                      "lorakit_mb": round(mem["ours"]["peak_over_setup"] / 2**20, 1),
                      "peer_mb": round(mem["peer"]["peak_over_setup"] / 2**20, 1),
                      "ratio": round(mem["ours"]["peak_over_setup"] / mem["peer"]["peak_over_setup"], 3),
                      "lorakit_peak_mb": round(mem["ours"]["peak"] / 2**20, 1),
                      "peer_peak_mb": round(mem["peer"]["peak"] / 2**20, 1)}))


if __name__ == "__main__":
    main()
