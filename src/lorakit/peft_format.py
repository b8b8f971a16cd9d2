"""Adapters on disk in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

File keys are built from structure, never found by substring: a LoRA layer at module path ``p`` holding adapter
``n`` writes ``base_model.model.<p>.lora_A.weight`` and ``….lora_B.weight``; a ``modules_to_save`` copy at ``p``
writes ``base_model.model.<p>.<param>``; trained biases write ``base_model.model.<param path>``. Loading builds
the same map from the model and copies tensors by exact key, so module or adapter names that contain ``lora``,
``weight`` or another adapter's name cannot corrupt a checkpoint (PEFT issues #2772, #3584, #2699).

Layout of a directory holding several adapters (as PEFT writes it): ``default`` at the top, any other adapter
``X`` in the subdirectory ``X/``.
"""

from __future__ import annotations

import copy
import os
import pickle
import shutil
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .atomic import TEMP_PREFIX, atomic_dir, remove_leftovers
from .base import base_shape
from .config import LoraConfig
from .init import doubled_alpha, to_plain_lora
from .inject import (_modules_to_save_paths, _target_view, adapter_configs, add_adapter, check_adapter_name,
                     lora_layers, rollback_on_error)
from .layer import LoraLinear
from .modules_to_save import ModulesToSave
from .targets import expanded_target_modules, output_head_paths, select_targets

__all__ = ["save_adapter", "load_adapter", "adapter_state_dict", "from_pretrained", "PREFIX"]

PREFIX = "base_model.model."
WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
BIN_NAME = "adapter_model.bin"
#: Temporary folders an older lorakit left inside an adapter directory when it was killed mid-save.
OLD_TEMP_PREFIX = ".lorakit-"


def adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The tensors of one adapter under their PEFT file keys (tensors are the live parameters, not copies)."""
    config = adapter_configs(model).get(adapter_name)
    if config is None:
        raise ValueError(f"unknown adapter {adapter_name!r}; this model has {sorted(adapter_configs(model))}")
    tensors: dict[str, torch.Tensor] = {}
    for path, module in model.named_modules():
        if isinstance(module, LoraLinear) and adapter_name in module.lora_A:
            tensors[f"{PREFIX}{path}.lora_A.weight"] = module.lora_A[adapter_name].weight
            tensors[f"{PREFIX}{path}.lora_B.weight"] = module.lora_B[adapter_name].weight
            bias = getattr(module.base_layer, "bias", None)
            if config.bias == "lora_only" and bias is not None:
                tensors[f"{PREFIX}{path}.base_layer.bias"] = bias
        elif isinstance(module, ModulesToSave) and adapter_name in module.modules_to_save:
            for name, param in module.modules_to_save[adapter_name].named_parameters():
                tensors[f"{PREFIX}{path}.{name}"] = param
    if config.bias == "all":
        inside = tuple(p + "." for p, m in model.named_modules() if isinstance(m, ModulesToSave))
        for name, param in model.named_parameters():
            if name.rsplit(".", 1)[-1] == "bias" and not name.startswith(inside):
                tensors[f"{PREFIX}{name}"] = param
    return tensors


def _converted(model: nn.Module, name: str, config: LoraConfig) -> tuple[dict[str, torch.Tensor], LoraConfig]:
    """OLoRA/PiSSA adapter → plain rank-2r LoRA for the original base (see :mod:`lorakit.init`)."""
    tensors = dict(adapter_state_dict(model, name))
    for path, layer in lora_layers(model).items():
        if name not in layer.lora_A:
            continue
        if name not in layer.initial_weights:
            raise ValueError(f"{path}: no initial weights recorded for {name!r}; convert_to_lora needs the adapter "
                             "to be initialised in this process")
        init_A, init_B = layer.initial_weights[name]
        A, B = to_plain_lora(layer.lora_A[name].weight.detach(), layer.lora_B[name].weight.detach(), init_A, init_B)
        tensors[f"{PREFIX}{path}.lora_A.weight"], tensors[f"{PREFIX}{path}.lora_B.weight"] = A, B
    new = copy.deepcopy(config)
    new.r, new.lora_alpha = config.r * 2, doubled_alpha(config.lora_alpha, config.use_rslora)
    new.rank_pattern = {k: v * 2 for k, v in config.rank_pattern.items()}
    new.alpha_pattern = {k: doubled_alpha(v, config.use_rslora) for k, v in config.alpha_pattern.items()}
    new.init_lora_weights = True
    return tensors, new


def save_adapter(model: nn.Module, directory: str | os.PathLike, adapter_name: str | None = None,
                 convert_to_lora: bool = True) -> Path:
    """Write adapters in PEFT's format; returns the directory.

    The new directory is written beside the old one and swapped into place in one step (:mod:`lorakit.atomic`):
    a process killed at any moment leaves either the old adapter or the new one, never new weights with an old
    config. Other files already in the directory (a README, a tokenizer) are kept; temporary folders of killed
    saves are removed.

    Args:
        model: a model with adapters.
        directory: target directory (created, or replaced as a whole).
        adapter_name: save only this adapter, at the top of ``directory``. Default: every adapter, in PEFT's
            layout (``default`` at the top, others in subdirectories).
        convert_to_lora: for OLoRA/PiSSA adapters, save the equivalent rank-2r LoRA that applies to the
            original base (default). With False the adapter is saved for the rewritten base.

    Raises:
        ValueError: for an unknown adapter name, a model without adapters, or an adapter with NaN/inf values
            (nothing is written then; the directory keeps what it held).
    """
    configs = adapter_configs(model)
    if not configs:
        raise ValueError(f"{type(model).__name__} has no adapters to save; add_adapter or load_adapter first")
    names = [adapter_name] if adapter_name else list(configs)
    base_name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    outputs: dict[str, tuple[LoraConfig, dict[str, torch.Tensor]]] = {}
    for name in names:
        if name not in configs:
            raise ValueError(f"unknown adapter {name!r}; this model has {sorted(configs)}")
        check_adapter_name(name)
        config = copy.deepcopy(configs[name])
        if convert_to_lora and config.init_lora_weights in ("olora", "pissa"):
            tensors, config = _converted(model, name, config)
        else:
            tensors = adapter_state_dict(model, name)
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        _refuse_non_finite(tensors, f"adapter {name!r}", "not saved; the directory keeps what it held")
        config.base_model_name_or_path = config.base_model_name_or_path or base_name
        if config.target_modules in ("all-linear", ["all-linear"]):  # written as the layers it chose, as PEFT does
            config.target_modules = expanded_target_modules(model, name)
        outputs["" if (adapter_name or name == "default") else name] = (config, tensors)
    _write_atomically(Path(directory), outputs)
    return Path(directory)


def _refuse_non_finite(tensors: dict[str, torch.Tensor], what: str, outcome: str) -> None:
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
        raise ValueError(f"{what} has NaN/inf values in {bad[0]}{more}: {outcome}. The training diverged; lower "
                         "the learning rate or use an earlier checkpoint")


def _write_atomically(directory: Path, outputs: dict[str, tuple[LoraConfig, dict[str, torch.Tensor]]]) -> None:
    """Write every ``{subdir: (config, tensors)}`` into a sibling of ``directory`` and swap it into place."""
    target = directory.resolve()
    remove_leftovers(target.parent)
    try:
        cwd = os.getcwd()
    except OSError:
        cwd = None
    replaced = {os.path.join(sub, name) for sub in outputs for name in (WEIGHTS_NAME, CONFIG_NAME, BIN_NAME)}
    with atomic_dir(target) as tmp:
        if target.is_dir():
            _carry_over(target, tmp, replaced)
        for sub, (config, tensors) in outputs.items():
            folder = tmp / sub
            folder.mkdir(parents=True, exist_ok=True)
            save_file(tensors, folder / WEIGHTS_NAME, metadata={"format": "pt"})
            config.save(folder)
    if cwd is not None and (cwd == str(target) or cwd.startswith(str(target) + os.sep)):
        try:  # the swap moved this process's working directory away with the old copy: follow the new one
            os.chdir(cwd)
        except OSError:
            pass


def _carry_over(old: Path, new: Path, replaced: set[str], relative: str = "") -> None:
    """Hard-link (or copy) the files of ``old`` into ``new``, except ``replaced`` and temporary leftovers."""
    for entry in sorted(os.scandir(old), key=lambda e: e.name):
        rel = os.path.join(relative, entry.name) if relative else entry.name
        if entry.name.startswith((OLD_TEMP_PREFIX, TEMP_PREFIX)) or rel in replaced:
            continue
        source, dest = Path(entry.path), new / entry.name
        if entry.is_symlink():
            os.symlink(os.readlink(source), dest)
        elif entry.is_dir():
            dest.mkdir()
            _carry_over(source, dest, replaced, rel)
        else:
            try:
                os.link(source, dest)  # the old file is never written again, so sharing it is safe
            except OSError:
                shutil.copy2(source, dest)


# --- loading


# What reading a damaged safetensors or torch file raises, besides SafetensorError.
_READ_ERRORS = (SafetensorError, OSError, RuntimeError, ValueError, EOFError, OverflowError, KeyError, TypeError,
                IndexError, UnicodeDecodeError)


def _read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    st, binary = directory / WEIGHTS_NAME, directory / BIN_NAME
    if st.is_file():
        try:
            return load_file(st)
        except _READ_ERRORS as err:
            raise ValueError(f"{st} cannot be read ({_first_line(err)}); the file is corrupt or truncated, save the "
                             "adapter again") from None
    if binary.is_file():
        return read_torch_tensors(binary)
    raise FileNotFoundError(f"{directory} holds no {WEIGHTS_NAME} (or {BIN_NAME})")


def read_torch_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A ``torch.save``'d dict of tensors, read with ``weights_only=True``: nothing in the file is executed.

    Raises:
        ValueError: for a file holding anything else (a pickled object that could run code is refused with
            lorakit's own message), or a corrupt one.
    """
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(f"{path} holds Python objects besides tensors; lorakit refuses to unpickle them, since "
                         "loading them could run code from the file. Use the adapter's adapter_model.safetensors, "
                         "or re-save it from a source you trust") from None
    except _READ_ERRORS as err:
        raise ValueError(f"{path} cannot be read ({_first_line(err)}); the file is corrupt or truncated, save the "
                         "adapter again") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                             for k, v in data.items()):
        raise ValueError(f"{path} is not a dict of named tensors ({type(data).__name__}); save the adapter again")
    return data


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _strip_prefix(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # PEFT writes "base_model.model." + path; transformers' own adapter saves may omit it.
    return {(k if k.startswith(PREFIX) else PREFIX + k): v for k, v in tensors.items()}


def _check_shapes(model: nn.Module, config: LoraConfig, tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Compare the file's LoRA tensors with the model's layers before anything is changed."""
    existing = lora_layers(model)
    view = _target_view(model, existing)
    modules = dict(view)
    try:
        targets = select_targets(view, config, output_head_paths(model), type(model).__name__)
    except ValueError as err:
        raise ValueError(f"{source}: this adapter does not fit {type(model).__name__}: {err}") from None
    problems = []
    expected = {}
    for path in targets:
        n_in, n_out = base_shape(modules[path])
        r = config.rank_for(path)
        expected[f"{PREFIX}{path}.lora_A.weight"] = (r, n_in)
        expected[f"{PREFIX}{path}.lora_B.weight"] = (n_out, r)
    try:
        copies = _modules_to_save_paths(model, config)
    except ValueError as err:
        raise ValueError(f"{source}: this adapter does not fit {type(model).__name__}: {err}") from None
    for path in copies:
        module = model.get_submodule(path)
        module = getattr(module, "original_module", module)
        for name, param in module.named_parameters():
            expected[f"{PREFIX}{path}.{name}"] = tuple(param.shape)
    for key, want in expected.items():
        got = tensors.get(key)
        if got is None:
            problems.append(f"missing {key}")
        elif tuple(got.shape) != want:
            problems.append(f"{key}: file has {tuple(got.shape)}, model needs {want}")
    if problems:
        raise ValueError(
            f"{source} does not fit this {type(model).__name__} (was it trained for another base, "
            f"{config.base_model_name_or_path!r}?): " + "; ".join(problems[:5])
            + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        )


def _check_values(tensors: dict[str, torch.Tensor], keys, source: Path) -> None:
    """Refuse integer or non-finite tensors among ``keys`` before any of them is copied into the model."""
    for key in keys:
        tensor = tensors[key]
        if not tensor.is_floating_point():
            raise ValueError(f"{source}: {key} has dtype {str(tensor.dtype).removeprefix('torch.')}, but adapter "
                             "weights are floating point (float32, bfloat16 or float16); the file was written "
                             "wrongly, save the adapter again")
    _refuse_non_finite({k: tensors[k] for k in keys}, str(source), "not loaded; the model was left unchanged")


def load_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default",
                 dtype: torch.dtype | None = None) -> nn.Module:
    """Load a PEFT-format adapter (written by lorakit or PEFT) into ``model`` as ``adapter_name``.

    Shapes, dtypes and finiteness are checked before anything is copied, and a load that fails at any point
    takes out what it injected, so a wrong adapter leaves the model as it was and a retry under the same name
    works. The first adapter of a model becomes active; later ones are loaded inactive (``set_adapter`` to switch).

    Args:
        model: the base model (or a model that already holds other adapters).
        path: an adapter directory.
        adapter_name: the name to load it under.
        dtype: adapter weight dtype (default: float32, or the compute dtype of a quantized base).

    Raises:
        FileNotFoundError / ValueError: for a missing, corrupt or mismatched adapter, naming the file, the keys and
            shapes concerned and the fix.
    """
    check_adapter_name(adapter_name)
    if adapter_name in adapter_configs(model):
        raise ValueError(f"adapter {adapter_name!r} already exists; delete_adapter(model, {adapter_name!r}) first or "
                         "pick another adapter_name")
    directory = Path(path)
    config = LoraConfig.load(directory)
    if config.init_lora_weights in ("olora", "pissa"):
        warnings.warn(f"{directory} is an unconverted {config.init_lora_weights} adapter: it applies to the base as "
                      "rewritten by that initialisation, not to the original weights; save it with convert_to_lora",
                      stacklevel=2)
    tensors = _strip_prefix(_read_tensors(directory))
    _check_shapes(model, config, tensors, directory)
    load_config = copy.deepcopy(config)
    load_config.init_lora_weights = True  # weights come from the file; never rewrite the base on load
    with rollback_on_error(model, adapter_name):
        add_adapter(model, load_config, adapter_name, dtype=dtype)
        adapter_configs(model)[adapter_name] = config
        wanted = adapter_state_dict(model, adapter_name)
        for key, param in wanted.items():
            if key not in tensors:
                raise ValueError(f"{directory}: missing tensor {key}; the adapter file is incomplete")
            if tensors[key].shape != param.shape:
                raise ValueError(f"{directory}: {key} has shape {tuple(tensors[key].shape)}, model needs "
                                 f"{tuple(param.shape)}")
        _check_values(tensors, list(wanted), directory)
        with torch.no_grad():
            for key, param in wanted.items():
                param.copy_(tensors[key].to(param.dtype))
    unexpected = sorted(set(tensors) - set(wanted))
    if unexpected:
        warnings.warn(f"{directory}: {len(unexpected)} tensors match no module and were ignored, e.g. {unexpected[:3]}",
                      stacklevel=2)
    return model


def from_pretrained(adapter_path: str | os.PathLike, model: nn.Module | None = None, adapter_name: str = "default",
                    **load_model_kwargs) -> nn.Module:
    """Base model + adapter in one call, like ``PeftModel.from_pretrained``.

    Args:
        adapter_path: an adapter directory.
        model: the base model; default: load ``base_model_name_or_path`` from the adapter config with
            :func:`lorakit.load_model` (a local path or the embedded default).
        adapter_name: name of the loaded adapter.
        **load_model_kwargs: passed to :func:`lorakit.load_model` (e.g. ``quantization="nf4"``).
    """
    if model is None:
        from .models import load_model

        base = LoraConfig.load(adapter_path).base_model_name_or_path
        if not base:
            raise ValueError(f"{adapter_path}/{CONFIG_NAME} names no base_model_name_or_path; pass model= explicitly")
        model, _ = load_model(base, **load_model_kwargs)
    return load_adapter(model, adapter_path, adapter_name)
