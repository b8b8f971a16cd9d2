"""Merging an adapter into a base on disk: lorakit's streamed merge vs PEFT's merge_and_unload + save_pretrained.

Each side runs alone in a child process (fresh interpreter, the base's files read once beforehand so both find them
in the page cache): lorakit's child calls ``lorakit.merge_to_disk(base, adapter, out)`` (probe check on, files synced);
PEFT's child loads the base with transformers, the adapter with ``PeftModel.from_pretrained``, merges with
``merge_and_unload`` and writes with ``save_pretrained``. Time is measured inside the child from after ``import torch``
(each side's library imports count) to the last file written; peak memory is the child's peak RSS (``VmHWM``: the whole process, interpreter included).

Models: the embedded SmolLM2-135M-Instruct (float32 checkpoint, as cached) and random Llamas in bfloat16 written by this
script (hidden 2048, intermediate 5632, vocabulary 32000, 16 heads / 4 key-value heads, 1 GB shards): layers chosen
for about 0.5, 1.5 and 3 GB on disk. Adapter: r 16 on every linear layer, random A and B (float32). One JSON line per
model. Disk: the biggest base and both outputs need ~9 GB free; everything is deleted at the end.

Threads: both sides run with ``--threads`` torch threads (default 1). On a shared machine whose load exceeds its
cores, every parallel operation waits for its second thread to be scheduled (~25 ms an operation measured on the
project's loaded 2-core machine, against < 1 ms with one thread), which swamps what is being compared.

    python bench/bench_merge.py                 # SmolLM2 + 0.5 / 1.5 / 3 GB
    python bench/bench_merge.py --sizes 3       # only the 3 GB model
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HIDDEN, INTER, VOCAB, HEADS, KV = 2048, 5632, 32000, 16, 4


def _cpu() -> str:
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    return platform.processor()


def _layers_for(gb: float) -> int:
    per_layer = 2 * (2 * HIDDEN * HIDDEN + 2 * HIDDEN * HIDDEN * KV // HEADS + 3 * HIDDEN * INTER + 2 * HIDDEN)
    fixed = 2 * (2 * VOCAB * HIDDEN + HIDDEN)
    return max(1, round((gb * 1e9 - fixed) / per_layer))


def make_random_llama(directory: Path, layers: int) -> None:
    """A random bfloat16 Llama written shard by shard (never the whole model in memory)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=layers,
                         num_attention_heads=HEADS, num_key_value_heads=KV, max_position_embeddings=2048,
                         tie_word_embeddings=False, dtype="bfloat16")
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in LlamaForCausalLM(config).state_dict().items()}
    directory.mkdir(parents=True)
    config.save_pretrained(directory)
    g = torch.Generator().manual_seed(0)
    shards, current, size = [], {}, 0
    for key, shape in shapes.items():
        t = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=g) * 0.02
        current[key] = t.to(torch.bfloat16)
        size += current[key].nbytes
        if size > 1e9:
            shards.append(current)
            current, size = {}, 0
    if current:
        shards.append(current)
    weight_map, total = {}, 0
    for i, tensors in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, directory / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
        total += sum(t.nbytes for t in tensors.values())
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))


def make_adapter(base: Path, directory: Path, r: int = 16) -> None:
    """An all-linear r-16 adapter with random A and B for ``base`` (shapes from its config, no weights read)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    import lorakit

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base))
    names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for path, module in model.named_modules():
        if path.rsplit(".", 1)[-1] in names:
            prefix = f"base_model.model.{path}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(r, module.in_features, generator=g) * 0.01
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(module.out_features, r, generator=g) * 0.01
    directory.mkdir(parents=True)
    save_file(tensors, directory / "adapter_model.safetensors", metadata={"format": "pt"})
    lorakit.LoraConfig(r=r, lora_alpha=2 * r, target_modules=names, base_model_name_or_path=str(base)).save(directory)


def child(side: str, base: str, adapter: str, out: str, threads: str) -> None:
    import torch

    torch.set_num_threads(int(threads))
    start = time.perf_counter()  # each side's own imports count: lorakit's include transformers' model classes
    if side == "lorakit":
        import lorakit

        lorakit.merge_to_disk(base, adapter, out)
    else:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        config = json.loads((Path(base) / "config.json").read_text())
        dtype = getattr(torch, config.get("dtype") or config.get("torch_dtype") or "float32")
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        model.save_pretrained(out)
    seconds = time.perf_counter() - start
    peak = _vm_hwm()
    print(json.dumps({"seconds": seconds, "peak_rss": peak}))


def _vm_hwm() -> int:
    """This process's own peak RSS (``VmHWM``; ``ru_maxrss`` would include the parent's peak before the fork)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def _warm(base: Path) -> None:
    for path in base.glob("*.safetensors"):
        with open(path, "rb") as fh:
            while fh.read(64 << 20):
                pass


def run_side(side: str, base: Path, adapter: Path, work: Path, threads: int) -> dict:
    out = work / f"out-{side}"
    _warm(base)
    proc = subprocess.run([sys.executable, __file__, "--child", side, str(base), str(adapter), str(out), str(threads)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{side} child failed:\n{proc.stderr[-3000:]}")
    shutil.rmtree(out, ignore_errors=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare(name: str, base: Path, adapter: Path, work: Path, repeats: int, threads: int) -> dict:
    runs = {"lorakit": [], "peft": []}
    for i in range(repeats):
        for side in (["lorakit", "peft"] if i % 2 == 0 else ["peft", "lorakit"]):
            runs[side].append(run_side(side, base, adapter, work, threads))
    best = {s: min(r, key=lambda x: x["seconds"]) for s, r in runs.items()}
    peak = {s: max(x["peak_rss"] for x in r) for s, r in runs.items()}
    size = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    line = {"name": name, "base_gb": round(size / 1e9, 2), "repeats": repeats,
            "lorakit_s": round(best["lorakit"]["seconds"], 2), "peer_s": round(best["peft"]["seconds"], 2),
            "ratio": round(best["lorakit"]["seconds"] / best["peft"]["seconds"], 3),
            "lorakit_peak_rss_mb": round(peak["lorakit"] / 2**20), "peer_peak_rss_mb": round(peak["peft"] / 2**20),
            "rss_ratio": round(peak["lorakit"] / peak["peft"], 3), "threads": threads, "cpu": _cpu(),
            "load_avg_1min": os.getloadavg()[0]}
    print(json.dumps(line), flush=True)
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", nargs=5, metavar=("SIDE", "BASE", "ADAPTER", "OUT", "THREADS"), help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of both sides (default 1: see below)")
    parser.add_argument("--sizes", type=float, nargs="*", default=[0.5, 1.5, 3.0], help="random Llama sizes in GB")
    parser.add_argument("--no-smollm", action="store_true", help="skip the embedded SmolLM2")
    parser.add_argument("--repeats", type=int, default=1, help="runs per side (alternating order); default 1")
    parser.add_argument("--workdir", default=None, help="where the bases and outputs go (default: a temp dir)")
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    work = Path(tempfile.mkdtemp(prefix="bench-merge-", dir=args.workdir))
    try:
        if not args.no_smollm:
            from lorakit.models import embedded_model_path

            smol = embedded_model_path()
            make_adapter(smol, work / "adapter-smollm")
            compare("merge_smollm2_135m", smol, work / "adapter-smollm", work, args.repeats, args.threads)
        for gb in args.sizes:
            base, adapter = work / f"llama-{gb}gb", work / f"adapter-{gb}gb"
            make_random_llama(base, _layers_for(gb))
            make_adapter(base, adapter)
            compare(f"merge_random_llama_{gb}gb", base, adapter, work, args.repeats, args.threads)
            shutil.rmtree(base), shutil.rmtree(adapter)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
