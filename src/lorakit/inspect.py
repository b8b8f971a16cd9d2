"""What an adapter directory holds, and whether it fits a base model, without loading any model weights.

:func:`inspect_adapter` reads ``adapter_config.json`` and the safetensors header (names, shapes, dtypes; tensor
data is never read). :func:`check_fit` compares the LoRA shapes with those a Llama-like base's ``config.json``
implies: ``lora_A`` of a module is (r, in) and ``lora_B`` is (out, r), with (in, out) from
:meth:`lorakit.estimate.ModelShape.linear_shapes`. This answers "was this trained for that base?" in milliseconds,
before a multi-gigabyte load would fail with the same message.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

from .config import LoraConfig
from .estimate import ModelShape, config_path, format_bytes
from .peft_format import BIN_NAME, CONFIG_NAME, PREFIX, WEIGHTS_NAME, read_torch_tensors

__all__ = ["inspect_adapter", "check_fit", "format_inspection"]

_A, _B = ".lora_A.weight", ".lora_B.weight"
# safetensors header dtype codes → torch names
_DTYPES = {"F64": "float64", "F32": "float32", "BF16": "bfloat16", "F16": "float16", "I64": "int64", "I32": "int32",
           "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def _tensor_meta(directory: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{file key: (shape, dtype)}`` from the safetensors header (or a legacy ``adapter_model.bin``)."""
    st, binary = directory / WEIGHTS_NAME, directory / BIN_NAME
    if st.is_file():
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(st, framework="pt") as f:
                slices = {k: f.get_slice(k) for k in f.keys()}
                return {k: (tuple(s.get_shape()), _DTYPES.get(s.get_dtype(), s.get_dtype())) for k, s in slices.items()}
        except (SafetensorError, OSError, ValueError, OverflowError) as err:
            raise ValueError(f"{st} cannot be read ({err}); the file is corrupt or truncated") from None
    if binary.is_file():
        tensors = read_torch_tensors(binary)
        return {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in tensors.items()}
    raise FileNotFoundError(f"{directory} holds no {WEIGHTS_NAME} (or adapter_model.bin)")


def _layer_index(module_path: str) -> int | None:
    """The first all-digit component of a module path (``model.layers.3.mlp.up_proj`` → 3)."""
    return next((int(part) for part in module_path.split(".") if part.isdigit()), None)


def inspect_adapter(directory: str | os.PathLike) -> dict:
    """Describe an adapter directory.

    Returns:
        A JSON-serialisable dict: ``path``, ``base_model``, ``r``, ``lora_alpha``, ``use_rslora``,
        ``target_modules``, ``init_lora_weights``, ``modules_to_save``, ``modules`` (``{module path: {"r",
        "in", "out"}}`` from the tensor shapes), ``module_types`` (``{last path component: count}``), ``layers``
        (sorted layer indices), ``other_tensors`` (keys that are not LoRA A/B, e.g. ``modules_to_save`` copies),
        ``incomplete`` (modules with only one of A/B), ``n_tensors``, ``n_parameters``, ``dtypes``,
        ``size_bytes`` (files at the top of the directory) and ``other_adapters`` (``{name: path}`` for adapters
        in subdirectories, PEFT's layout for several adapters).

    Raises:
        FileNotFoundError: no ``adapter_config.json`` or weights file.
        ValueError: an unreadable config or weights file.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a directory; pass the folder holding {CONFIG_NAME}")
    config = LoraConfig.load(directory)
    meta = _tensor_meta(directory)
    modules: dict[str, dict[str, int]] = {}
    halves: dict[str, set[str]] = {}
    other = []
    for key, (shape, _) in meta.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        suffix = _A if name.endswith(_A) else _B if name.endswith(_B) else None
        if suffix is None:
            other.append(key)
            continue
        path = name[: -len(suffix)]
        entry = modules.setdefault(path, {})
        halves.setdefault(path, set()).add(suffix)
        if suffix == _A:  # A is (r, in)
            entry["r"], entry["in"] = shape[0], shape[1]
        else:  # B is (out, r)
            entry["out"], entry["r_B"] = shape[0], shape[1]
    for entry in modules.values():
        if entry.get("r_B") == entry.get("r"):
            entry.pop("r_B", None)
    # names starting with a dot are temporary folders of a save in progress or killed (see lorakit.atomic)
    subdirs = sorted(p for p in directory.iterdir()
                     if not p.name.startswith(".") and p.is_dir() and (p / CONFIG_NAME).is_file())
    return {
        "path": str(directory),
        "base_model": config.base_model_name_or_path,
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "use_rslora": config.use_rslora,
        "rank_pattern": dict(config.rank_pattern),
        "target_modules": config.target_modules,
        "init_lora_weights": config.init_lora_weights,
        "modules_to_save": config.modules_to_save,
        "modules": dict(sorted(modules.items())),
        "module_types": dict(sorted(Counter(p.rsplit(".", 1)[-1] for p in modules).items())),
        "layers": sorted({i for i in map(_layer_index, modules) if i is not None}),
        "other_tensors": sorted(other),
        "incomplete": sorted(p for p, h in halves.items() if len(h) < 2),
        "n_tensors": len(meta),
        "n_parameters": sum(_numel(shape) for shape, _ in meta.values()),
        "dtypes": sorted({dtype for _, dtype in meta.values()}),
        "size_bytes": sum(p.stat().st_size for p in directory.iterdir()
                          if p.is_file() and not p.name.startswith(".")),  # not a save's temporary files
        "other_adapters": {p.name: str(p) for p in subdirs},
    }


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def check_fit(directory: str | os.PathLike, base_config: str | os.PathLike) -> list[str]:
    """Problems that would stop the adapter in ``directory`` from loading into the base; empty when it fits.

    Args:
        directory: an adapter directory.
        base_config: the base's ``config.json``, its model directory, or the embedded model's name.

    Returns:
        One line per kind of problem, naming the first module it affects and how many: A/B shapes that differ
        from the base's, layer indices the base does not have, a rank that disagrees with the adapter's own
        config, or a module type with no known shape.

    Raises:
        FileNotFoundError / ValueError: unreadable adapter or config, or a config that is not Llama-like.
    """
    info = inspect_adapter(directory)
    cfg_file = config_path(base_config)
    try:
        config = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{cfg_file} is not valid JSON ({err})") from None
    shape = ModelShape.from_config(config, source=str(cfg_file))
    expected = dict(shape.linear_shapes(), lm_head=(shape.hidden_size, shape.vocab_size))
    adapter_cfg = LoraConfig.load(directory)
    # Problems are grouped by message, so a 7B adapter on a 1B base reads as a few lines, not hundreds.
    found: dict[str, list[str]] = {}
    outside: list[tuple[int, str]] = []
    for path in info["incomplete"]:
        found.setdefault("only one of lora_A / lora_B is stored", []).append(path)
    for path, entry in info["modules"].items():
        kind = path.rsplit(".", 1)[-1]
        layer = _layer_index(path)
        if layer is not None and layer >= shape.num_hidden_layers:
            outside.append((layer, path))
        if "r_B" in entry:
            found.setdefault(f"lora_A has rank {entry['r']} but lora_B has rank {entry['r_B']}", []).append(path)
        if "r" in entry and entry["r"] != adapter_cfg.rank_for(path):
            found.setdefault(f"tensors have rank {entry['r']}, adapter_config.json says "
                             f"{adapter_cfg.rank_for(path)}", []).append(path)
        if kind not in expected:
            found.setdefault(f"no shape rule for {kind!r} in a Llama-like config; load the model to check",
                             []).append(path)
            continue
        n_in, n_out = expected[kind]
        got = (entry.get("in", n_in), entry.get("out", n_out))
        if got != (n_in, n_out):
            found.setdefault(f"adapter is {got[0]} → {got[1]}, base {kind} is {n_in} → {n_out}", []).append(path)
    problems = []
    if outside:
        layers = sorted({i for i, _ in outside})
        problems.append(f"{len(outside)} modules are in layers {layers[0]}-{layers[-1]}, but the base has "
                        f"{shape.num_hidden_layers} layers (e.g. {min(outside)[1]})")
    for message, paths in found.items():
        where = paths[0] if len(paths) == 1 else f"{len(paths)} modules ({paths[0]}, …)"
        problems.append(f"{where}: {message}")
    return problems


def format_inspection(info: dict, problems: list[str] | None = None, base: str | None = None,
                      max_problems: int = 10) -> str:
    """The text ``lorakit inspect`` prints for :func:`inspect_adapter`'s dict (and :func:`check_fit`'s list)."""
    ranks = sorted({m["r"] for m in info["modules"].values() if "r" in m})
    rank = f"{info['r']}" + (f" (per module: {', '.join(map(str, ranks))})" if ranks and ranks != [info["r"]] else "")
    scaling = "alpha/sqrt(r), rsLoRA" if info["use_rslora"] else "alpha/r"
    layers = info["layers"]
    span = f"{len(layers)} layers ({layers[0]}-{layers[-1]})" if layers else "no numbered layers"
    types = ", ".join(f"{k} ×{v}" for k, v in info["module_types"].items())
    lines = [
        f"adapter        {info['path']}",
        f"base model     {info['base_model'] or '(not recorded)'}",
        f"rank r         {rank}",
        f"lora_alpha     {info['lora_alpha']:g} (scaling {scaling})",
        f"targets        {info['target_modules']!r}: {len(info['modules'])} modules in {span}",
        f"               {types or '(none)'}",
        f"init           {info['init_lora_weights']!r}",
        f"tensors        {info['n_tensors']} ({info['n_parameters']:,} parameters, {', '.join(info['dtypes'])})",
        f"size on disk   {format_bytes(info['size_bytes'])}",
    ]
    if info["modules_to_save"] or info["other_tensors"]:
        lines.append(f"also saved     {len(info['other_tensors'])} other tensors "
                     f"(modules_to_save={info['modules_to_save']!r})")
    if info["other_adapters"]:
        lines.append(f"other adapters {', '.join(info['other_adapters'])} (subdirectories)")
    if base is not None:
        if not problems:
            lines.append(f"fits {base}: yes ({len(info['modules'])} modules match its config.json)")
        else:
            lines.append(f"fits {base}: NO, {len(problems)} problem(s):")
            lines += [f"  {p}" for p in problems[:max_problems]]
            if len(problems) > max_problems:
                lines.append(f"  … and {len(problems) - max_problems} more")
    return "\n".join(lines)
