"""What a streamed merge will write, worked out from file headers and adapter files before any byte is written.

:func:`plan_merge` reads the base checkpoint's safetensors headers (no weights), builds the model's module tree on
the meta device from ``config.json`` (no memory), resolves each adapter's targets there with the same rules as
``load_adapter`` and checks every adapter tensor against the base tensor it updates: a missing key, a wrong shape or
an adapter tensor that matches nothing is a ``ValueError`` naming the module, the shapes and the adapter, raised
before the output directory is created. The result, a :class:`MergePlan`, lists every output tensor with its source
(bytes to copy, a tensor to read, a 4-bit weight to dequantize) and the low-rank updates to add; it is also what
``lorakit inspect --plan`` prints (tensors touched, output size, peak memory estimate).

Adapter file keys map to base keys by structure: the LoRA pair of module ``p`` (``base_model.model.p.lora_A.weight``
/ ``…lora_B.weight``) updates the checkpoint key of ``p``'s weight parameter; ``modules_to_save`` copies and trained
biases replace the checkpoint key of the parameter they stand for. A weight tied to another (``lm_head`` and the
embeddings) is found through the meta model's shared parameters.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .base import _is_conv1d, base_shape
from .config import LoraConfig
from .peft_format import PREFIX, WEIGHTS_NAME, _read_tensors, _strip_prefix
from .st_stream import DTYPE_CODES, TensorEntry, checkpoint_entries, read_header, read_tensor, torch_dtype_code
from .targets import matches, output_head_paths, select_targets

__all__ = ["plan_merge", "MergePlan", "OutTensor", "LowRank", "resolve_base"]

_QS = ".weight.quant_state.bitsandbytes__"
#: Bytes of a re-quantized weight's quant_state JSON (padded with spaces: the header is written before the data).
QUANT_STATE_BYTES = 512
_QUANT_PIECES = (".weight", ".weight.absmax", ".weight.quant_map", ".weight.nested_absmax", ".weight.nested_quant_map")
_FLOAT_CODES = ("F32", "F16", "BF16", "F64")
_DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Files of a base directory that are weights (not copied to the output); everything else at the top is copied.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")


@dataclass
class LowRank:
    """``stored += scale · left @ right`` (for a transposed ``Conv1D`` weight, left/right are Aᵀ/Bᵀ)."""

    left: torch.Tensor
    right: torch.Tensor
    scale: float
    adapter: str


@dataclass
class Update:
    """One adapter's LoRA pair for a base tensor, read from the adapter file only when the tensor is merged (so a
    large adapter is never in memory whole either)."""

    A: TensorEntry | torch.Tensor
    B: TensorEntry | torch.Tensor
    scale: float
    adapter: str
    transposed: bool = False

    def resolve(self) -> LowRank:
        A, B = load(self.A).float(), load(self.B).float()
        left, right = (A.T.contiguous(), B.T.contiguous()) if self.transposed else (B, A)
        return LowRank(left, right, self.scale, self.adapter)

    @property
    def nbytes(self) -> int:
        return 4 * (math.prod(self.A.shape) + math.prod(self.B.shape))


def load(x: TensorEntry | torch.Tensor) -> torch.Tensor:
    """A tensor, read from its file if it is a :class:`TensorEntry`."""
    return read_tensor(x) if isinstance(x, TensorEntry) else x


def _dtype(x: TensorEntry | torch.Tensor) -> torch.dtype:
    return x.torch_dtype if isinstance(x, TensorEntry) else x.dtype


@dataclass
class Decomposition:
    """An unconverted OLoRA/PiSSA adapter's initial product, recomputed from the base weight and subtracted."""

    method: str
    r: int
    scaling: float
    scale: float  # scaling × the adapter's weight
    dtype: torch.dtype
    transposed: bool
    adapter: str


@dataclass
class OutTensor:
    """One tensor of the output: where it comes from and what is added to it."""

    key: str
    shape: tuple[int, ...]
    code: str  # output safetensors dtype
    source: TensorEntry | None = None
    quant: dict[str, TensorEntry] | None = None  # 4-bit pieces (suffix → entry) when the base weight is packed
    updates: list[Update] = field(default_factory=list)
    decompositions: list[Decomposition] = field(default_factory=list)
    dequant_dtype: torch.dtype | None = None  # a 4-bit weight is dequantized in (rounded to) this dtype
    replacement: TensorEntry | torch.Tensor | None = None  # a modules_to_save copy or a trained bias
    replaced_by: str | None = None
    requant: dict | None = None  # the base's quant_state: write this 4-bit weight re-quantized with its settings

    @property
    def touched(self) -> bool:
        return bool(self.updates or self.decompositions or self.replacement is not None)

    @property
    def raw_copy(self) -> bool:
        """Untouched and stored in the output dtype already: its bytes are copied as they are."""
        return not self.touched and self.quant is None and self.source is not None and self.source.dtype == self.code

    def entries(self) -> list[tuple[str, str, tuple[int, ...]]]:
        """``(key, dtype code, shape)`` of what this tensor writes: itself, or the pieces of a 4-bit weight."""
        if self.requant is None:
            return [(self.key, self.code, self.shape)]
        if not self.touched:  # an untouched 4-bit weight: its pieces, byte for byte
            return [(e.key, e.dtype, e.shape) for e in sorted(self.quant.values(), key=lambda e: e.key)]
        state, n = self.requant, math.prod(self.shape)
        blocks = -(-n // int(state["blocksize"]))
        nested = "nested_offset" in state
        out = [(self.key, "U8", ((n + 1) // 2, 1)), (f"{self.key}.absmax", "U8" if nested else "F32", (blocks,)),
               (f"{self.key}.quant_map", "F32", (16,))]
        if nested:
            out += [(f"{self.key}.nested_absmax", "F32", (-(-blocks // 256),)),
                    (f"{self.key}.nested_quant_map", "F32", (256,))]
        return out + [(f"{self.key}.quant_state.bitsandbytes__{state['quant_type']}", "U8", (QUANT_STATE_BYTES,))]

    @property
    def nbytes(self) -> int:
        return sum(math.prod(shape) * DTYPE_CODES[code].itemsize for _, code, shape in self.entries())


@dataclass
class MergePlan:
    base_dir: Path
    adapters: list[tuple[Path, float, LoraConfig]]
    tensors: list[OutTensor]
    shards: list[tuple[str, list[OutTensor]]]
    dtype: torch.dtype
    config: dict
    extra_files: list[Path]
    metadata: dict[str, str]
    quantized_base: bool

    @property
    def touched(self) -> list[OutTensor]:
        return [t for t in self.tensors if t.touched]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def peak_bytes(self) -> int:
        """Memory the merge needs besides the interpreter: the largest tensor being merged, with its updates."""
        work = 0
        for t in self.tensors:
            if t.raw_copy:
                continue
            numel = math.prod(t.shape)
            src = t.source.nbytes if t.source is not None else 0
            if t.quant is not None:
                src = sum(e.nbytes for e in t.quant.values()) + 4 * numel
            factors = sum(u.nbytes for u in t.updates)
            if t.replacement is not None:
                factors += 2 * math.prod(t.replacement.shape) * _dtype(t.replacement).itemsize
            work = max(work, src + 4 * numel + t.nbytes + factors + (8 * numel if t.decompositions else 0))
        return work


def resolve_base(base: str | os.PathLike) -> Path:
    """A base model directory, or the embedded model's name (its cached checkpoint)."""
    from .models import _resolve

    return _resolve(base)


def _read_config(base_dir: Path) -> dict:
    path = base_dir / "config.json"
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from None


def _meta_model(base_dir: Path) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(base_dir)
    if getattr(cfg, "quantization_config", None) is not None:
        del cfg.quantization_config  # the tree of a quantized checkpoint is the float model's
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg)


def _quantized_pieces(entries: dict[str, TensorEntry]) -> dict[str, dict[str, TensorEntry]]:
    """``{module path: {suffix: entry}}`` for bitsandbytes-layout 4-bit weights (lorakit's NF4 keys are the same)."""
    found = {}
    for key in entries:
        for qt in ("nf4", "fp4"):
            if key.endswith(_QS + qt):
                path = key[: -len(_QS + qt)]
                pieces = {s: entries[path + s] for s in _QUANT_PIECES if path + s in entries}
                pieces["quant_state"] = entries[key]
                found[path] = pieces
    for key, entry in entries.items():
        if key.endswith(".SCB") and entries.get(key[:-4] + ".weight", entry).dtype == "I8":
            raise ValueError(f"{key}: the base is an 8-bit (LLM.int8) checkpoint; streamed merges read 4-bit and float "
                             "bases. Load it with lorakit.load_model, dequantize_model_ and merge in memory")
    return found


def quant_state(pieces: dict[str, TensorEntry]) -> dict:
    blob = read_tensor(pieces["quant_state"])
    return json.loads(bytes(blob.tolist()).decode("utf-8"))


def _compute_dtype(config: dict, quant: dict) -> torch.dtype:
    """The dtype a 4-bit base computes in (its training dtype): ``bnb_4bit_compute_dtype``, else the stored one."""
    named = (config.get("quantization_config") or {}).get("bnb_4bit_compute_dtype")
    if named not in _DTYPE_NAMES:
        named = quant_state(next(iter(quant.values()))).get("dtype")
    return _DTYPE_NAMES.get(named, torch.bfloat16)


def _default_dtype(config: dict, entries: dict[str, TensorEntry], quant: dict) -> torch.dtype:
    if quant:
        return _compute_dtype(config, quant)
    named = config.get("dtype") or config.get("torch_dtype")
    if named in _DTYPE_NAMES:
        return _DTYPE_NAMES[named]
    codes = [e.dtype for e in entries.values() if e.dtype in _FLOAT_CODES]
    return DTYPE_CODES[max(set(codes), key=codes.count)] if codes else torch.float32


def _checkpoint_keys(model: nn.Module, present: set[str]) -> dict[str, str]:
    """Parameter name (every alias of a tied parameter) → the key the checkpoint stores it under."""
    by_id: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(param), []).append(name)
    keys = {}
    for names in by_id.values():
        stored = next((n for n in names if n in present), names[0])
        keys.update({n: stored for n in names})
    return keys


def _adapter_arg(adapters, allow_none: bool = False) -> list[tuple[Path, float]]:
    if isinstance(adapters, (str, os.PathLike)):
        adapters = [adapters]
    out = []
    for item in adapters:
        path, weight = (item if isinstance(item, tuple) else (item, 1.0))
        if not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ValueError(f"adapter weight {weight!r} for {path} must be a finite number")
        out.append((Path(path), float(weight)))
    if not out and not allow_none:
        raise ValueError("no adapter given; pass one or more adapter directories")
    return out


def plan_merge(base: str | os.PathLike, adapters, dtype: torch.dtype | str | None = None,
               max_shard_size: int | None = None, allow_no_adapter: bool = False, requantize: bool = False
               ) -> MergePlan:
    """Check the adapters against the base and plan the streamed merge; reads headers and adapter files only.

    Args:
        base: base model directory (safetensors, one file or shards; float or 4-bit) or the embedded model's name.
        adapters: an adapter directory, or a list of directories or ``(directory, weight)`` pairs; a weight
            multiplies that adapter's update (``W + Σ weight·scaling·B A``).
        dtype: output dtype (default: the base's ``config.json`` dtype; for a 4-bit base its stored dtype).
        max_shard_size: bytes per output shard; default: the base's own shard layout.
        requantize: for a 4-bit base, write the merged weights 4-bit again (the base's quantization settings,
            bitsandbytes layout; untouched 4-bit weights are copied byte for byte). Lossy: the merged weight is
            rounded to 4 bits.

    Raises:
        ValueError / FileNotFoundError: for a base or adapter that cannot be read, or an adapter that does not fit
            the base (naming module, shapes and adapter).
    """
    base_dir = resolve_base(base)
    config = _read_config(base_dir)
    entries, files, metadata = checkpoint_entries(base_dir)
    quant = _quantized_pieces(entries)
    if requantize and not quant:
        raise ValueError(f"requantize: {base_dir} is not a 4-bit checkpoint; re-quantizing applies to 4-bit bases")
    if isinstance(dtype, str):
        if dtype not in _DTYPE_NAMES:
            raise ValueError(f"dtype={dtype!r}; use one of {sorted(_DTYPE_NAMES)}")
        dtype = _DTYPE_NAMES[dtype]
    pieces_of = {e.key for pieces in quant.values() for e in pieces.values()}
    plain = {k: e for k, e in entries.items() if k not in pieces_of}
    # re-quantized: the float tensors stay as stored; dequantized: the compute dtype
    dtype = dtype or _default_dtype(config, plain, {} if requantize else quant)
    code = torch_dtype_code(dtype)
    try:
        model = _meta_model(base_dir)
    except (ValueError, KeyError, OSError) as err:
        raise ValueError(f"{base_dir}/config.json does not describe a transformers causal LM ({err})") from None

    # Output tensors in the base's order; a 4-bit weight's pieces become one dense tensor.
    piece_keys = {e.key: p for p, pieces in quant.items() for e in pieces.values()}
    out: dict[str, OutTensor] = {}
    shard_of: dict[str, str] = {}
    for key, entry in entries.items():
        owner = piece_keys.get(key)
        if owner is None:
            is_float = entry.dtype in _FLOAT_CODES
            out[key] = OutTensor(key, entry.shape, code if is_float else entry.dtype, source=entry)
        elif key == owner + ".weight":
            state = quant_state(quant[owner])
            out[key] = OutTensor(key, tuple(state["shape"]), "F32" if requantize else code, quant=quant[owner],
                                 dequant_dtype=_compute_dtype(config, quant), requant=state if requantize else None)
        else:
            continue
        shard_of[key] = entry.file.name
    keys = _checkpoint_keys(model, set(out))
    modules = dict(model.named_modules())
    heads = output_head_paths(model)
    adapter_list = []
    untie = False
    for path, weight in _adapter_arg(adapters, allow_no_adapter):
        cfg = LoraConfig.load(path)
        tensors = _adapter_tensors(path)
        used = _plan_adapter(path, weight, cfg, tensors, model, modules, heads, keys, out)
        extra = sorted(set(tensors) - used)
        if extra:
            raise ValueError(f"{path}: {len(extra)} adapter tensors match nothing in {type(model).__name__} "
                             f"(e.g. {extra[0]}); was it trained for another base? nothing was written")
        adapter_list.append((path, weight, cfg))
    for t in out.values():
        if t.replacement is not None and t.key not in entries and t.quant is None:
            untie = True  # a tied head replaced by a modules_to_save copy is written on its own
    if untie:
        config = dict(config, tie_word_embeddings=False)
    if not requantize:
        config = {k: v for k, v in config.items() if k != "quantization_config"}
        config["dtype" if "torch_dtype" not in config else "torch_dtype"] = str(dtype).removeprefix("torch.")
    tensors = list(out.values())
    shards = _shards(tensors, shard_of, files, max_shard_size)
    extra_files = sorted(p for p in base_dir.iterdir() if p.is_file() and not p.name.startswith(".")
                         and p.name not in ("config.json", "model.safetensors.index.json")
                         and not p.name.endswith(_WEIGHT_SUFFIXES))
    return MergePlan(base_dir, adapter_list, tensors, shards, dtype, config, extra_files, metadata, bool(quant))


def _plan_adapter(path: Path, weight: float, cfg: LoraConfig, tensors: dict[str, torch.Tensor], model: nn.Module,
                  modules: dict[str, nn.Module], heads: set[str], keys: dict[str, str],
                  out: dict[str, OutTensor]) -> set[str]:
    """Add one adapter's updates and replacements to ``out``; returns the adapter keys used."""
    try:
        targets = select_targets(list(modules.items()), cfg, heads, type(model).__name__)
    except ValueError as err:
        raise ValueError(f"{path}: this adapter does not fit {type(model).__name__}: {err}") from None
    used: set[str] = set()
    problems = []
    plans = []
    for module_path in targets:
        module = modules[module_path]
        n_in, n_out = base_shape(module)
        r = cfg.rank_for(module_path)
        a_key, b_key = f"{PREFIX}{module_path}.lora_A.weight", f"{PREFIX}{module_path}.lora_B.weight"
        for key, want in ((a_key, (r, n_in)), (b_key, (n_out, r))):
            got = tensors.get(key)
            if got is None:
                problems.append(f"missing {key}")
            elif tuple(got.shape) != want:
                problems.append(f"{key}: file has {tuple(got.shape)}, base {module_path} needs {want}")
        target = out.get(keys.get(f"{module_path}.weight", ""))
        if target is None:
            problems.append(f"{module_path}.weight is not in the base checkpoint")
        elif target.shape not in ((n_out, n_in), (n_in, n_out)):
            problems.append(f"{target.key}: checkpoint has {target.shape}, the config says ({n_out}, {n_in})")
        plans.append((module_path, module, a_key, b_key, target))
    if problems:
        raise ValueError(f"{path} does not fit {type(model).__name__} (was it trained for another base, "
                         f"{cfg.base_model_name_or_path!r}?): " + "; ".join(problems[:5])
                         + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "") + "; nothing was written")
    for module_path, module, a_key, b_key, target in plans:
        A, B = tensors[a_key], tensors[b_key]
        for key, x in ((a_key, A), (b_key, B)):
            floating = _dtype(x).is_floating_point
            if not floating or not math.isfinite(float(load(x).sum(dtype=torch.float32))):  # read, checked, dropped
                raise ValueError(f"{path}: {key} is {'not a float tensor' if not floating else 'not finite'}"
                                 "; the adapter is corrupt, nothing was written")
        used.update((a_key, b_key))
        if target.replacement is not None:
            raise ValueError(f"{target.key} is replaced by {target.replaced_by} and updated by {path}; merge them "
                             "separately")
        scale = cfg.scaling_for(module_path) * weight
        transposed = _is_conv1d(module)
        target.updates.append(Update(A, B, scale, str(path), transposed))
        if cfg.init_lora_weights in ("olora", "pissa"):
            target.decompositions.append(Decomposition(cfg.init_lora_weights, cfg.rank_for(module_path),
                                                       cfg.scaling_for(module_path), scale, _dtype(A), transposed,
                                                       str(path)))
    # Trained biases and modules_to_save copies replace the parameter they stand for.
    replacements = {}
    if cfg.bias != "none":
        for module_path, module in modules.items():
            if getattr(module, "bias", None) is None or not isinstance(module.bias, nn.Parameter):
                continue
            for key in (f"{PREFIX}{module_path}.base_layer.bias", f"{PREFIX}{module_path}.bias"):
                if key in tensors:
                    replacements[key] = f"{module_path}.bias"
    if cfg.modules_to_save:
        taken: list[str] = []
        for module_path, module in modules.items():
            if (not module_path or any(module_path.startswith(p + ".") for p in taken)
                    or not matches(cfg.modules_to_save, module_path) or module_path in targets):
                continue
            taken.append(module_path)
            for name, _ in module.named_parameters():
                replacements[f"{PREFIX}{module_path}.{name}"] = f"{module_path}.{name}"
    for file_key, param in replacements.items():
        tensor = tensors.get(file_key)
        if tensor is None:
            raise ValueError(f"{path}: missing {file_key} (modules_to_save / bias={cfg.bias!r}); the adapter file is "
                             "incomplete, nothing was written")
        if not _dtype(tensor).is_floating_point or not math.isfinite(float(load(tensor).sum(dtype=torch.float32))):
            raise ValueError(f"{path}: {file_key} is not a finite float tensor; the adapter is corrupt, nothing was "
                             "written")
        if weight != 1.0:
            raise ValueError(f"{path} replaces {param} (modules_to_save or a trained bias), which a weight of "
                             f"{weight:g} cannot scale; merge it with weight 1")
        stored = keys.get(param, param)
        target = out.get(stored)
        if target is None or target.shape != tuple(tensor.shape):
            have = None if target is None else target.shape
            raise ValueError(f"{path}: {file_key} has shape {tuple(tensor.shape)}, the base's {stored} is {have}; "
                             "nothing was written")
        if stored != param:  # a tied parameter: the copy is written under its own name, the original stays
            target = out.setdefault(param, OutTensor(param, target.shape, target.code))
        if target.replacement is not None or target.updates:
            raise ValueError(f"{param} is changed by two adapters ({target.replaced_by or target.updates[0].adapter} "
                             f"and {path}); merge them separately")
        target.replacement, target.replaced_by = tensor, str(path)
        used.add(file_key)
    return used


def _adapter_tensors(path: Path) -> dict[str, TensorEntry | torch.Tensor]:
    """The adapter's tensors under PEFT keys: header entries of ``adapter_model.safetensors`` (read when used), or
    the tensors of a legacy ``adapter_model.bin`` (weights only)."""
    st = path / WEIGHTS_NAME
    if st.is_file():
        entries, _ = read_header(st)
        return _strip_prefix(entries)
    return _strip_prefix(_read_tensors(path))


def _shards(tensors: list[OutTensor], shard_of: dict[str, str], files: list[Path], max_shard_size: int | None
            ) -> list[tuple[str, list[OutTensor]]]:
    """The base's shard layout (and names), or a new one of at most ``max_shard_size`` bytes a shard."""
    if max_shard_size is None:
        groups: dict[str, list[OutTensor]] = {f.name: [] for f in files}
        for t in tensors:
            groups[shard_of.get(t.key, files[-1].name)].append(t)
        named = [(name, ts) for name, ts in groups.items() if ts]
        if len(named) == 1:
            return [("model.safetensors", named[0][1])]
        return named
    if max_shard_size <= 0:
        raise ValueError(f"max_shard_size={max_shard_size} must be a positive number of bytes")
    groups_list: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if groups_list[-1] and size + t.nbytes > max_shard_size:
            groups_list.append([])
            size = 0
        groups_list[-1].append(t)
        size += t.nbytes
    n = len(groups_list)
    if n == 1:
        return [("model.safetensors", groups_list[0])]
    return [(f"model-{i + 1:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(groups_list)]
