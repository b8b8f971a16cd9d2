"""What the benches share: alternating timing, and peak memory measured per side in a child process (Linux).

Timing: each comparison's functions run in rotating order, so machine noise hits every side alike; medians.
Memory: inside one process, memory one side frees is reused by the other without showing in RSS, so peaks are
measured per side in a child: the child sets up its model, resets the kernel's peak-RSS counter, runs its steps and
prints the peak above the RSS after set-up.
"""

from __future__ import annotations

import gc
import json
import statistics
import subprocess
import sys
import time

import torch

import lorakit


def alternate(fns: dict, repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each function, run in rotating order ``repeats`` times after ``warmup`` rounds of each."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    names = list(fns)
    for i in range(repeats):
        for k in names[i % len(names):] + names[: i % len(names)]:
            gc.collect()
            start = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def reset_peak_rss() -> None:
    """Set the peak RSS (VmHWM) to the current RSS (Linux ``/proc/self/clear_refs``)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss() -> int:
    """Peak resident set size since the last reset, in bytes."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def child_memory(script: str, side: str, args) -> dict:
    """Run ``script --child side`` with the same sizes and return the JSON object it prints last."""
    cmd = [sys.executable, script, "--child", side]
    for name in ("threads", "batch", "steps", "seq"):
        if hasattr(args, name):
            cmd += [f"--{name}", str(getattr(args, name))]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def same_matmul_linears(model: torch.nn.Module, head: bool = False) -> torch.nn.Module:
    """Make the frozen ``nn.Linear`` layers of ``model`` (its output head only if ``head``) compute through oneDNN
    as an accelerated lorakit model does where oneDNN is the machine's choice (``lorakit.cpu.fast_frozen_linears``),
    for a limit that differs from lorakit's step only by LoRA."""
    lorakit.cpu.fast_frozen_linears(model)
    if not head:
        lorakit.cpu.stop_fast_frozen_linears(model.get_output_embeddings())
    return model
