"""lorakit's SFT step vs TRL SFTTrainer + PEFT, side by side in one process, on SmolLM2-135M-Instruct (CPU).

Both train LoRA r16 α32 all-linear on the same built-in date-task rows (batch 8, completion-only loss), with
AdamW. Steps alternate between the two so that machine noise hits both alike; one JSON line with the median step
times and the ratio, and one with the peak resident-memory growth during each side's steps (sampled every 5 ms).

Usage: python bench/bench_sft.py [--steps 6] [--threads 2] [--batch 8]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import threading
import time

import psutil
import torch

import lorakit
from lorakit.data import SFTDataset, collate_sft
from lorakit.tasks import make_split
from lorakit.train.common import sft_loss


class PeakRSS:
    """Peak resident set size above the level at entry, sampled in a background thread."""

    def __enter__(self):
        self.proc = psutil.Process()
        self.base = self.proc.memory_info().rss
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.growth = self.peak - self.base


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import datasets
    import peft
    import trl

    base, tokenizer = lorakit.load_model()
    rows, _ = make_split("dates", args.batch * (args.steps + 1), 0, seed=0)
    kw = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")

    # --- lorakit
    ours = lorakit.add_adapter(copy.deepcopy(base), lorakit.LoraConfig(**kw))
    ours.train()
    data = SFTDataset(rows, tokenizer, 256)
    our_batches = [collate_sft([data[i] for i in range(s * args.batch, (s + 1) * args.batch)],
                               tokenizer.pad_token_id) for s in range(args.steps + 1)]
    our_opt = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-4)

    def our_step(i):
        loss, n = sft_loss(ours, our_batches[i])
        (loss / n).backward()
        our_opt.step()
        our_opt.zero_grad(set_to_none=True)

    # --- TRL + PEFT (the documented recipe: SFTTrainer with peft_config)
    config = trl.SFTConfig(output_dir="/tmp/lorakit-bench-trl", per_device_train_batch_size=args.batch,
                           max_length=256, learning_rate=1e-4, report_to=[], save_strategy="no", use_cpu=True,
                           max_steps=args.steps + 1, logging_steps=1000, dataloader_num_workers=0)
    trainer = trl.SFTTrainer(model=copy.deepcopy(base), args=config, train_dataset=datasets.Dataset.from_list(rows),
                             processing_class=tokenizer, peft_config=peft.LoraConfig(task_type="CAUSAL_LM", **kw))
    trainer.create_optimizer_and_scheduler(num_training_steps=args.steps + 1)
    trl_batches = list(trainer.get_train_dataloader())
    theirs = trainer.model
    theirs.train()

    def trl_step(i):
        trainer.training_step(theirs, trl_batches[i % len(trl_batches)])
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    our_step(0), trl_step(0)  # warm-up
    times = {"ours": [], "peer": []}
    peaks = {"ours": 0, "peer": 0}
    for i in range(1, args.steps + 1):
        for name, fn in (("ours", our_step), ("peer", trl_step))[:: 1 if i % 2 else -1]:
            with PeakRSS() as mem:
                start = time.perf_counter()
                fn(i)
                times[name].append(time.perf_counter() - start)
            peaks[name] = max(peaks[name], mem.growth)
    ours_t, peer_t = statistics.median(times["ours"]), statistics.median(times["peer"])
    print(json.dumps({"name": "sft_step_vs_trl_peft", "lorakit_s": round(ours_t, 4), "peer_s": round(peer_t, 4),
                      "ratio": round(ours_t / peer_t, 3), "batch": args.batch, "steps": args.steps}))
    print(json.dumps({"name": "sft_step_peak_rss_growth_vs_trl_peft", "lorakit_mb": round(peaks["ours"] / 2**20, 1),
                      "peer_mb": round(peaks["peer"] / 2**20, 1),
                      "ratio": round(peaks["ours"] / max(peaks["peer"], 1), 3)}))


if __name__ == "__main__":
    main()
