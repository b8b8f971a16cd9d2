"""Optimizer step time and state memory: lorakit adamw_8bit vs bitsandbytes AdamW8bit vs torch AdamW.

Parameter set: the LoRA adapters of SmolLM2-135M with r=16 on all linear layers (q/k/v/o/gate/up/down in
30 layers -> 420 tensors, 4.88M parameters), shapes built here from the model's sizes, so no download.
All optimizers live in one process and are stepped in alternating order each round, so drift in machine
load hits them alike; we report the median over rounds. Every optimizer sees the same fixed gradients.

Prints one JSON line per comparison: ``name``, ``lorakit_s``, ``peer_s``, ``ratio`` (lorakit / peer; < 1 is
faster), plus state bytes of each side. Run with ``OMP_NUM_THREADS`` set to the cores you may use:

    OMP_NUM_THREADS=1 python bench/bench_optim.py --rounds 10
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from lorakit.optim import build_optimizer, state_nbytes

# SmolLM2-135M: hidden 576, MLP 1536, 9 query heads / 3 KV heads of 64 -> k/v out 192, 30 layers.
HIDDEN, MLP, KV, LAYERS, RANK = 576, 1536, 192, 30, 16
# (in_features, out_features) of each adapted linear in one decoder layer.
LINEARS = [(HIDDEN, HIDDEN), (HIDDEN, KV), (HIDDEN, KV), (HIDDEN, HIDDEN), (HIDDEN, MLP), (HIDDEN, MLP), (MLP, HIDDEN)]


def lora_shapes() -> list[tuple[int, int]]:
    """lora_A (r, in) and lora_B (out, r) for every adapted linear: 420 shapes."""
    return [s for _ in range(LAYERS) for fin, fout in LINEARS for s in ((RANK, fin), (fout, RANK))]


def _make(name: str, params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    if name == "bnb_adamw_8bit":
        import bitsandbytes as bnb  # optional peer, imported only when benchmarked

        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=0.0)
    return build_optimizer(name, params, lr=lr)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10, help="timed steps per optimizer")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per optimizer first")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)

    shapes = lora_shapes()
    gen = torch.Generator().manual_seed(0)
    init = [0.02 * torch.randn(s, generator=gen) for s in shapes]
    grads = [torch.randn(s, generator=gen).to(device) for s in shapes]
    names = ["adamw_8bit", "bnb_adamw_8bit", "adamw"]
    opts, params = {}, {}
    for name in names:
        params[name] = [torch.nn.Parameter(t.clone().to(device)) for t in init]
        for p, g in zip(params[name], grads):
            p.grad = g.clone()
        try:
            opts[name] = _make(name, params[name], lr=1e-4)
        except ImportError as err:  # bitsandbytes not installed: compare the rest
            print(json.dumps({"name": name, "skipped": str(err)}))
    times: dict[str, list[float]] = {name: [] for name in opts}
    for i in range(args.warmup + args.rounds):
        order = list(opts) if i % 2 == 0 else list(reversed(opts))  # alternate who goes first
        for name in order:
            _sync(device)
            t0 = time.perf_counter()
            opts[name].step()
            _sync(device)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)

    n = sum(p.numel() for p in params["adamw"])
    info = {"device": str(device), "threads": torch.get_num_threads(), "n_params": n, "n_tensors": len(shapes),
            "rounds": args.rounds}
    ours = "adamw_8bit"
    for peer in ("bnb_adamw_8bit", "adamw"):
        if peer not in opts:
            continue
        lk, pr = statistics.median(times[ours]), statistics.median(times[peer])
        lk_bytes, pr_bytes = state_nbytes(opts[ours]), state_nbytes(opts[peer])
        print(json.dumps({"name": f"{ours}_vs_{peer}", "lorakit_s": round(lk, 5), "peer_s": round(pr, 5),
                          "ratio": round(lk / pr, 3), "lorakit_state_bytes_per_param": round(lk_bytes / n, 4),
                          "peer_state_bytes_per_param": round(pr_bytes / n, 4), **info}))


if __name__ == "__main__":
    main()
