"""Swap a model's ``nn.Linear`` layers for quantized ones, in memory or while streaming a checkpoint from disk.

``quantize_model_`` converts a model that is already loaded. ``load_quantized`` builds a transformers causal LM
from its config with parameters on the meta device, replaces the targeted linears by empty quantized modules,
then reads the ``*.safetensors`` shards tensor by tensor and quantizes each linear weight as it arrives, so the
full-precision model never sits in memory at once (peak ≈ quantized model + the largest single tensor).
Both also accept pre-quantized bitsandbytes 4-bit / 8-bit tensors (see ``nf4_linear`` for the key layout).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from lorakit.quant.int8_linear import Int8Linear
from lorakit.quant.nf4_linear import NF4Linear

__all__ = ["dequantize_model_", "record_quantization_config", "QUANTIZATIONS", "quantize_model_", "load_quantized"]

QUANTIZATIONS = ("nf4", "fp4", "int8")


def _check_quantization(quantization: str) -> None:
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}; QLoRA uses 'nf4'.")


def _targets(model: nn.Module, skip_modules: Sequence[str]) -> list[str]:
    """Paths of the ``nn.Linear`` modules to quantize: all but those whose full path or last segment is skipped.

    Raises:
        ValueError: if a target shares its weight with another module (tied embeddings): quantizing it would
            silently untie them, and a later ``tie_weights()`` would overwrite the quantized layer.
    """
    skip = set(skip_modules)
    owners: dict[int, list[str]] = {}
    for path, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            owners.setdefault(id(param), []).append(f"{path}.{name}" if path else name)
    paths = []
    for path, module in model.named_modules():
        if not isinstance(module, nn.Linear) or path in skip or path.rsplit(".", 1)[-1] in skip:
            continue
        tied = [p for p in owners.get(id(module.weight), []) if p != f"{path}.weight"]
        if tied:
            raise ValueError(
                f"{path}.weight is tied to {tied[0]}; add {path.rsplit('.', 1)[-1]!r} to skip_modules "
                "(tied embeddings stay in full precision)."
            )
        paths.append(path)
    return paths


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def _empty_quantized(linear: nn.Linear, quantization: str, double_quant: bool, compute_dtype, blocksize) -> nn.Module:
    if quantization == "int8":
        return Int8Linear(linear.in_features, linear.out_features, linear.bias is not None, compute_dtype, "meta")
    return NF4Linear(
        linear.in_features, linear.out_features, linear.bias is not None,
        quantization, blocksize, double_quant, compute_dtype, "meta",
    )  # fmt: skip


@torch.no_grad()
def quantize_model_(
    model: nn.Module,
    quantization: str = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype = torch.bfloat16,
    skip_modules: Sequence[str] = ("lm_head",),
    blocksize: int = 64,
) -> nn.Module:
    """Replace every targeted ``nn.Linear`` of ``model`` in place by ``NF4Linear`` / ``Int8Linear``.

    Layers are converted one at a time and the original is dropped right away, so the extra memory is one
    layer's worth (the fp weight is freed unless something else still references it).

    Args:
        model (nn.Module): any model; it is modified in place and returned.
        quantization (str): ``"nf4"``, ``"fp4"`` or ``"int8"``. Default ``"nf4"``.
        double_quant (bool): 8-bit quantize the 4-bit block scales (ignored for int8). Default True.
        compute_dtype (torch.dtype): dtype the quantized layers compute in. Default ``torch.bfloat16``.
        skip_modules (Sequence[str]): module paths, or last path segments, left in full precision.
            Default ``("lm_head",)``.
        blocksize (int): 4-bit blocksize (ignored for int8). Default 64.

    Returns:
        nn.Module: ``model``.

    Raises:
        ValueError: for an unknown quantization, a bad blocksize, or a tied target (see ``_targets``).

    Example:
        >>> model = quantize_model_(model, "nf4", compute_dtype=torch.bfloat16)
    """
    _check_quantization(quantization)
    for path in _targets(model, skip_modules):
        linear = model.get_submodule(path)
        if quantization == "int8":
            new = Int8Linear.from_linear(linear, compute_dtype)
        else:
            new = NF4Linear.from_linear(linear, quantization, blocksize, double_quant, compute_dtype)
        new.train(linear.training)
        _set_submodule(model, path, new)
        del linear, new  # the fp32 weight goes with the last reference
    record_quantization_config(model)
    return model


def record_quantization_config(model: nn.Module) -> dict | None:
    """Write transformers' ``quantization_config`` (bitsandbytes form) into ``model.config`` from its layers.

    With it, ``model.save_pretrained(dir)`` writes a checkpoint that ``AutoModelForCausalLM.from_pretrained(dir)``
    loads with transformers + bitsandbytes (the state-dict keys already are bitsandbytes'). Skipped modules are the
    linear layers left in full precision. Returns the dict written (None for a model without quantized layers or
    without a transformers config).
    """
    config = getattr(model, "config", None)
    layers = {p: m for p, m in model.named_modules() if isinstance(m, (NF4Linear, Int8Linear))}
    if config is None or not layers:
        return None
    first = next(iter(layers.values()))
    skipped = sorted({p.rsplit(".", 1)[-1] for p, m in model.named_modules() if type(m) is nn.Linear})
    if isinstance(first, Int8Linear):
        data = {"quant_method": "bitsandbytes", "load_in_8bit": True, "load_in_4bit": False,
                "llm_int8_threshold": 6.0, "llm_int8_has_fp16_weight": False}
    else:
        data = {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
                "bnb_4bit_quant_type": first.quant_type, "bnb_4bit_use_double_quant": first.double_quant,
                "bnb_4bit_compute_dtype": str(first.compute_dtype).removeprefix("torch."),
                "bnb_4bit_quant_storage": "uint8"}
    data["llm_int8_skip_modules"] = skipped or None
    config.quantization_config = data
    return data


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Create every ``nn.Parameter`` on the meta device but buffers on CPU.

    ``with torch.device("meta")`` would also put non-persistent buffers (e.g. RoPE ``inv_freq``, computed in
    ``__init__`` and absent from checkpoints) on meta, and nothing would restore them. Not thread-safe:
    ``nn.Module.register_parameter`` is patched for the duration.
    """
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def _shards(checkpoint_dir: str) -> list[str]:
    index = os.path.join(checkpoint_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(checkpoint_dir, n) for n in names]
    files = sorted(glob.glob(os.path.join(checkpoint_dir, "*.safetensors")))
    if not files:
        raise ValueError(f"no *.safetensors files in {checkpoint_dir!r}; save the model with save_pretrained first.")
    return files


def _set_tensor(model: nn.Module, key: str, value: torch.Tensor) -> None:
    """Replace parameter or buffer ``key`` (a meta placeholder or a real tensor) by ``value``."""
    path, _, name = key.rpartition(".")
    module = model.get_submodule(path) if path else model
    old = module._parameters.get(name, module._buffers.get(name))
    if old is not None and old.shape != value.shape:
        raise ValueError(f"checkpoint tensor {key} has shape {tuple(value.shape)}, the model built from config.json "
                         f"needs {tuple(old.shape)}; the checkpoint is corrupt or belongs to another model")
    if name in module._parameters:
        module._parameters[name] = nn.Parameter(value, requires_grad=old.requires_grad)
    elif name in module._buffers:
        module._buffers[name] = value
    else:
        raise KeyError(key)


@torch.no_grad()
def load_quantized(
    checkpoint_dir: str,
    quantization: str = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype = torch.bfloat16,
    skip_modules: Sequence[str] = ("lm_head",),
    dtype: torch.dtype = torch.float32,
    blocksize: int = 64,
) -> nn.Module:
    """Load a transformers causal LM from ``checkpoint_dir`` with its linears quantized while streaming.

    Steps: config -> ``AutoModelForCausalLM.from_config`` with parameters on meta -> swap targets for empty
    quantized modules -> for each tensor of each ``*.safetensors`` shard (``safetensors.safe_open``): a target's
    ``weight`` is quantized on arrival (or, for a bitsandbytes checkpoint, its packed tensors are gathered and
    loaded through ``load_state_dict``); every other tensor is cast to ``dtype`` and set -> ``model.tie_weights()``.
    The result equals ``quantize_model_`` applied to ``from_pretrained(checkpoint_dir, dtype=dtype)``. For a
    pre-quantized checkpoint the stored quant_type / blocksize / double quantization win over the arguments.

    Args:
        checkpoint_dir (str): a directory written by ``save_pretrained`` (config.json + safetensors).
        quantization (str): ``"nf4"``, ``"fp4"`` or ``"int8"``. Default ``"nf4"``.
        double_quant (bool): 8-bit quantize the 4-bit block scales. Default True.
        compute_dtype (torch.dtype): dtype the quantized layers compute in. Default ``torch.bfloat16``.
        skip_modules (Sequence[str]): module paths or last segments kept in full precision. Default ``("lm_head",)``.
        dtype (torch.dtype): dtype of all non-quantized parameters and the model's default. Default float32.
        blocksize (int): 4-bit blocksize. Default 64.

    Returns:
        nn.Module: the model on CPU, in eval mode as transformers leaves it after loading.

    Raises:
        ValueError: for a bad quantization, no safetensors files, checkpoint tensors the model lacks, or
            model tensors the checkpoint lacks.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    _check_quantization(quantization)
    config = AutoConfig.from_pretrained(checkpoint_dir)
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config  # pre-quantized tensors are read below, not by transformers
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    targets = _targets(model, skip_modules)
    for path in targets:
        empty = _empty_quantized(model.get_submodule(path), quantization, double_quant, compute_dtype, blocksize)
        _set_submodule(model, path, empty)
    target_set = set(targets)
    expected = {k for k in model.state_dict(keep_vars=True) if _owner(k, target_set) is None}
    pieces: dict[str, dict[str, torch.Tensor]] = {p: {} for p in targets}  # per target: bias, pre-quantized parts
    quantized_from_float: set[str] = set()
    unexpected: list[str] = []
    for shard in _shards(checkpoint_dir):
        for key, tensor in _shard_tensors(shard, lambda k: _owner(k, target_set) is not None or k in expected,
                                          unexpected):
            owner = _owner(key, target_set)
            if owner is None:
                _set_tensor(model, key, tensor.to(dtype) if tensor.is_floating_point() else tensor)
            elif key == f"{owner}.weight" and tensor.is_floating_point() and tensor.dim() == 2:
                # quantize on arrival, from the same values quantize_model_ would see in a model loaded in dtype
                model.get_submodule(owner).set_weight_(tensor.to(dtype))
                quantized_from_float.add(owner)
            else:  # bias, or a piece of a pre-quantized (bitsandbytes) weight
                pieces[owner][key[len(owner) + 1 :]] = tensor
            del tensor  # the full-precision tensor is freed before the next one is read
    for path, parts in pieces.items():
        if "bias" in parts:
            parts["bias"] = parts["bias"].to(dtype)
        if path in quantized_from_float:
            if "bias" in parts:
                _set_tensor(model, f"{path}.bias", parts.pop("bias"))
            unexpected += [f"{path}.{k}" for k in parts]
        elif "weight" in parts:
            try:
                model.get_submodule(path).load_state_dict(parts, strict=True)
            except RuntimeError as e:
                raise ValueError(f"{checkpoint_dir}: cannot load the pre-quantized tensors of {path!r} "
                                 f"({' '.join(str(e).split())}); is the checkpoint corrupt?") from None
    model.tie_weights()
    record_quantization_config(model)
    state = model.state_dict(keep_vars=True)
    missing = sorted(k for k, v in state.items() if v is not None and v.device.type == "meta")
    if unexpected or missing:
        raise ValueError(
            f"checkpoint {str(checkpoint_dir)!r} does not match the model built from its config: unexpected tensors "
            f"{sorted(unexpected)[:5]} ({len(unexpected)} in all), missing {missing[:5]} ({len(missing)} in all); "
            "was it written by save_pretrained of this architecture?"
        )
    return model.eval()


def _shard_tensors(shard: str, wanted, unexpected: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """``(key, tensor)`` for the keys of ``shard`` that ``wanted(key)`` accepts, one tensor at a time; the others
    are added to ``unexpected``.

    Raises:
        ValueError: naming the shard, for a truncated or corrupt file (safetensors' own error has no file name).
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(shard, framework="pt", device="cpu") as f:
            for key in f.keys():
                if not wanted(key):
                    unexpected.append(key)
                    continue
                yield key, f.get_tensor(key)
    except (SafetensorError, OSError, OverflowError) as err:
        raise ValueError(f"{shard} cannot be read ({err}); the checkpoint is corrupt or truncated, save or copy it "
                         "again") from None


def _owner(key: str, targets: set[str]) -> str | None:
    """The target module path a checkpoint key belongs to (``a.b.weight.absmax`` -> ``a.b``), else None."""
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        if ".".join(parts[:i]) in targets:
            return ".".join(parts[:i])
    return None


def dequantize_model_(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Replace every quantized linear (including those inside LoRA layers) by an ``nn.Linear`` in ``dtype``, and
    put the model's other floating weights (embeddings, norms, output head) in ``dtype`` too.

    The recommended way to deploy a QLoRA adapter: dequantize the base, then merge in ``dtype``, so the merged
    weights are not rounded to 4 bits a second time (merging into the 4-bit base re-quantizes and changes outputs).
    Works on lorakit's NF4/int8 layers and on bitsandbytes' ``Linear4bit`` / ``Linear8bitLt`` (a model quantized
    by transformers; its quantizer is removed, so ``save_pretrained`` writes a plain checkpoint). The whole base
    ends in one dtype, so the model runs as loaded (a bfloat16 linear after float32 norms would not); LoRA
    weights keep theirs (merging computes in float32 anyway).

    Returns:
        ``model``, modified in place.
    """
    from lorakit.base import dense_weight, is_quantized
    from lorakit.layer import LoraLinear

    for path, module in list(model.named_modules()):
        if not path or not is_quantized(module):
            continue
        weight = dense_weight(module)
        dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, dtype=dtype,
                          device=weight.device)
        with torch.no_grad():
            dense.weight.copy_(weight.to(dtype))
            if module.bias is not None:
                dense.bias.copy_(module.bias.to(dtype))
        dense.requires_grad_(False)
        _set_submodule(model, path, dense)
    adapters = {id(p) for m in model.modules() if isinstance(m, LoraLinear)
                for p in (*m.lora_A.parameters(), *m.lora_B.parameters())}
    for param in model.parameters():
        if param.is_floating_point() and id(param) not in adapters and param.dtype != dtype:
            param.data = param.data.to(dtype)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # a transformers + bitsandbytes model: plain again (as transformers' dequantize)
        quantizer.remove_quantization_config(model)
    for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
        if getattr(model, flag, False):
            setattr(model, flag, False)
    config = getattr(model, "config", None)
    if config is not None:
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the checkpoint is a plain one again
        if hasattr(config, "dtype"):
            config.dtype = dtype
    return model
