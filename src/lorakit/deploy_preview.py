"""What deploying an adapter will do, without doing it: a merge / GGUF export preview, and which engines serve it unmerged.

:func:`deploy_preview` plans the streamed merge (:func:`lorakit.merge_plan.plan_merge`: headers and adapter files
only, so the adapter's fit is checked too) and reports the tensors it touches, the output size and shards, the dtype
(or GGUF type) and an estimate of peak memory. :func:`serving_support` reads ``adapter_config.json`` and the tensor
names and says, engine by engine, whether the adapter can be served without merging and why not: the limits are the
engines' own (vLLM's PEFT loader, llama.cpp's GGUF LoRA adapters, which Ollama's ``ADAPTER`` also takes).
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import torch

from .config import LoraConfig

__all__ = ["deploy_preview", "serving_support", "format_preview", "INTERPRETER_BYTES"]

#: Resident memory of a Python process with torch and transformers' model classes imported, before any tensor:
#: measured 0.36-0.38 GB on the project's machine (the floor of a streamed merge's peak).
INTERPRETER_BYTES = 380 * 2**20
_VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def serving_support(adapter_dir: str | os.PathLike) -> list[dict]:
    """``[{"engine", "unmerged": bool, "why": str}]`` for transformers + PEFT, vLLM, llama.cpp and Ollama."""
    from .inspect import inspect_adapter

    cfg = LoraConfig.load(adapter_dir)
    info = inspect_adapter(adapter_dir)
    extra = cfg.modules_to_save or info["other_tensors"]
    biases = cfg.bias != "none"
    unconverted = cfg.init_lora_weights in ("olora", "pissa")
    r = max([m.get("r", cfg.r) for m in info["modules"].values()] or [cfg.r])
    rows = [{"engine": "transformers + PEFT", "unmerged": not unconverted,
             "why": ("an unconverted OLoRA/PiSSA adapter needs the rewritten base; re-save it with convert_to_lora"
                     if unconverted else "the PEFT on-disk format: PeftModel.from_pretrained(base, dir)")}]
    vllm = []
    if unconverted:
        vllm.append("unconverted OLoRA/PiSSA (applies to a rewritten base)")
    if extra:
        vllm.append(f"modules_to_save={cfg.modules_to_save!r} (vLLM's PEFT loader only takes modules_to_save=None)")
    if biases:
        vllm.append(f"bias={cfg.bias!r} (vLLM does not load trained LoRA biases by default)")
    flag = ""
    if r > 16:
        fit = next((x for x in _VLLM_RANKS if x >= r), None)
        flag = f"; rank {r} needs --max-lora-rank {fit} (the default is 16)" if fit else ""
        if fit is None:
            vllm.append(f"rank {r} exceeds vLLM's largest --max-lora-rank (512)")
    rows.append({"engine": "vLLM", "unmerged": not vllm,
                 "why": "; ".join(vllm) + "; merge it" if vllm else f"vllm serve BASE --enable-lora --lora-modules "
                 f"name={Path(adapter_dir)}{flag}"})
    cpp = []
    if unconverted:
        cpp.append("unconverted OLoRA/PiSSA")
    if extra:
        cpp.append("modules_to_save copies (a GGUF LoRA adapter holds lora_a/lora_b pairs only)")
    if biases:
        cpp.append(f"bias={cfg.bias!r} (no place for biases in a GGUF LoRA adapter)")
    if "lm_head" in info["module_types"]:
        cpp.append("LoRA on lm_head (not applied by llama.cpp when the head is tied to the embeddings)")
    why = ("; ".join(cpp) + "; export the merged model instead (lorakit export --format gguf --adapter DIR)"
           if cpp else "lorakit export --format gguf --adapter-only, then llama-cli -m base.gguf --lora adapter.gguf")
    rows.append({"engine": "llama.cpp", "unmerged": not cpp, "why": why})
    rows.append({"engine": "Ollama", "unmerged": not cpp,
                 "why": "as llama.cpp: " + "; ".join(cpp) if cpp else
                 "the same GGUF LoRA adapter: FROM base.gguf and ADAPTER adapter.gguf in a Modelfile"})
    return rows


def deploy_preview(adapters, base: str | os.PathLike, dtype: str | None = None, outtype: str | None = None) -> dict:
    """What ``lorakit merge`` (or, with ``outtype``, ``lorakit export --format gguf``) would write; nothing is written.

    Returns:
        A JSON-serialisable dict: ``base``, ``format``, ``dtype``, ``tensors``, ``touched`` (count), ``touched_by_type``
        (``{q_proj: 30, …}``), ``replaced`` (keys replaced by modules_to_save copies or biases), ``output_bytes``,
        ``shards``, ``peak_bytes`` (estimate: interpreter + the largest tensor being merged + the adapters).

    Raises:
        ValueError / FileNotFoundError: the same refusals as the merge itself (an adapter that does not fit ...).
    """
    from .merge_plan import plan_merge

    plan = plan_merge(base, adapters, dtype=torch.float32 if outtype else dtype)
    touched = plan.touched
    by_type = Counter(t.key.rsplit(".", 2)[-2] for t in touched if t.updates)
    if outtype:
        from .gguf_export import _nbytes, _qtype

        size = sum(_nbytes(_qtype(outtype, t.shape), t.shape) for t in plan.tensors)
        shards, fmt = 1, f"gguf {outtype}"
    else:
        size, shards, fmt = plan.nbytes, len(plan.shards), "safetensors"
    return {
        "base": str(plan.base_dir),
        "format": fmt,
        "dtype": outtype or str(plan.dtype).removeprefix("torch."),
        "quantized_base": plan.quantized_base,
        "tensors": len(plan.tensors),
        "touched": len(touched),
        "touched_by_type": dict(sorted(by_type.items())),
        "replaced": [t.key for t in touched if t.replacement is not None],
        "output_bytes": size,
        "shards": shards,
        "peak_bytes": INTERPRETER_BYTES + plan.peak_bytes(),
    }


def format_preview(preview: dict | None, serving: list[dict]) -> str:
    """The lines ``lorakit inspect`` prints for :func:`deploy_preview` and :func:`serving_support`."""
    from .estimate import format_bytes

    lines = []
    if preview is not None:
        types = ", ".join(f"{k} ×{v}" for k, v in preview["touched_by_type"].items()) or "-"
        what = preview["format"] if preview["format"].startswith("gguf") else f"safetensors, {preview['dtype']}"
        lines += [
            f"{'export' if preview['format'].startswith('gguf') else 'merge'} plan".ljust(15)
            + f"{preview['base']} → {what}" + (" (4-bit base dequantized)" if preview["quantized_base"] else ""),
            f"  touches      {preview['touched']} of {preview['tensors']} tensors ({types})"
            + (f"; replaces {', '.join(preview['replaced'])}" if preview["replaced"] else ""),
            f"  output       {format_bytes(preview['output_bytes'])} in {preview['shards']} file(s)",
            f"  peak memory  about {format_bytes(preview['peak_bytes'])} (interpreter ~{format_bytes(INTERPRETER_BYTES)}"
            " + the largest merged tensor + the adapters; the base is never loaded whole)",
        ]
    lines.append("serve unmerged")
    width = max(len(r["engine"]) for r in serving)
    for row in serving:
        lines.append(f"  {row['engine'].ljust(width)}  {'yes' if row['unmerged'] else 'no '}  {row['why']}")
    return "\n".join(lines)
