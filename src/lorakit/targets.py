"""Which modules of a model get an adapter: pure functions over module paths.

The rules are PEFT's, so a config means the same thing in both libraries:

- a list matches a module whose path equals an entry or ends with ``"." + entry``;
- a string is a regular expression that must match the whole path (``re.fullmatch``);
- ``"all-linear"`` is every linear layer except the output head (the module returned by
  ``get_output_embeddings()``, or one named ``lm_head``);
- ``exclude_modules`` uses the same rules and always wins;
- ``layers_to_transform`` keeps only paths inside those layer indices (``<layers_pattern>.<i>.``).
"""

from __future__ import annotations

import re
from torch import nn

from .base import is_supported_base
from .config import LoraConfig
from .fields import ConfigError

__all__ = ["resolve_targets", "select_targets", "output_head_paths", "matches", "is_linear_like", "DEFAULT_TARGETS",
           "minimal_target_list", "expanded_target_modules"]

#: PEFT's default for Llama-style models when ``target_modules`` is None.
DEFAULT_TARGETS = ["q_proj", "v_proj"]

#: From this many targets on, a saved list is shortened to the suffixes that tell them apart (as PEFT does).
MIN_TARGETS_TO_SHORTEN = 20

_LAYER_INDEX = re.compile(r".*?\.[^.]*\.(\d+)\.")


def is_linear_like(module: nn.Module) -> bool:
    """True for modules the LoRA layer can wrap (see :func:`lorakit.base.is_supported_base`)."""
    return is_supported_base(module)


def matches(spec: list[str] | str | None, path: str) -> bool:
    """Whether ``path`` is selected by a target/exclude spec (list: exact or suffix; str: full-match regex)."""
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, path) is not None
    return any(path == name or path.endswith("." + name) for name in spec)


def _layer_of(path: str, cfg: LoraConfig) -> int | None:
    patterns = cfg.layers_pattern
    if patterns:
        patterns = [patterns] if isinstance(patterns, str) else list(patterns)
        found = [re.match(rf".*\.{p}\.(\d+)\.", path) for p in patterns]
        found = [m for m in found if m]
        return int(found[0].group(1)) if found else None
    m = _LAYER_INDEX.match(path)
    return int(m.group(1)) if m else None


def _in_layers(path: str, cfg: LoraConfig) -> bool:
    if cfg.layers_to_transform is None:
        return True
    wanted = [cfg.layers_to_transform] if isinstance(cfg.layers_to_transform, int) else list(cfg.layers_to_transform)
    return _layer_of(path, cfg) in wanted


def output_head_paths(model: nn.Module) -> set[str]:
    """Paths of the output head(s): the module ``get_output_embeddings()`` returns, and any ``lm_head``."""
    heads = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    for path, module in model.named_modules():
        if path.split(".")[-1] == "lm_head" or (out is not None and module is out):
            heads.add(path)
    return heads


def resolve_targets(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """The module paths of ``model`` that ``cfg`` selects for an adapter, in ``named_modules`` order.

    Raises:
        ValueError: if nothing matches (naming the spec and the model's linear layer names), or a module the list
            names explicitly is not a layer LoRA can wrap.
    """
    return select_targets(list(model.named_modules()), cfg, output_head_paths(model), type(model).__name__)


def select_targets(named: list[tuple[str, nn.Module]], cfg: LoraConfig, heads: set[str], model_name: str = "model"
                   ) -> list[str]:
    """:func:`resolve_targets` over an explicit ``(path, module)`` list (``heads``: paths ``all-linear`` skips)."""
    spec = DEFAULT_TARGETS if cfg.target_modules is None else cfg.target_modules
    all_linear = spec == "all-linear" or spec == ["all-linear"]
    chosen = []
    other_layers: set[int] = set()  # layers of modules the spec names but layers_to_transform leaves out
    for path, module in named:
        if not path:
            continue
        if all_linear:
            hit = is_linear_like(module) and path not in heads
        else:
            hit = matches(spec, path)
        if not hit or matches(cfg.exclude_modules, path):
            continue
        if not _in_layers(path, cfg):
            index = _layer_of(path, cfg)
            if index is not None:
                other_layers.add(index)
            continue
        if not is_linear_like(module):
            if isinstance(spec, str):
                continue
            raise ValueError(
                f"target {path!r} is a {type(module).__name__}; lorakit adapts linear layers only "
                "(nn.Linear, Conv1D, NF4Linear, Int8Linear); name the linear layers inside it instead"
            )
        chosen.append(path)
    if not chosen and other_layers:
        raise ConfigError(
            f"layers_to_transform={cfg.layers_to_transform!r} names no layer of {model_name} that holds "
            f"target_modules={spec!r}: its layers are numbered {min(other_layers)}-{max(other_layers)}; "
            "pick indices in that range"
        )
    if not chosen:
        names = sorted({p.split(".")[-1] for p, m in named if p and is_linear_like(m)})
        raise ValueError(
            f"target_modules={spec!r} matches no layer of {model_name}; its linear layers are named "
            f"{names[:20]}; pick from those or use 'all-linear'"
        )
    return chosen


def minimal_target_list(targets: list[str], others: list[str]) -> list[str]:
    """The shortest ``.``-suffixes that select every path of ``targets`` and none of ``others``, sorted.

    Each target contributes its shortest suffix that is not also a suffix of another module (``q_proj`` for every
    ``model.layers.<i>.self_attn.q_proj`` of a Llama), unless a suffix already chosen covers it.
    """
    def suffixes(path: str) -> list[str]:
        parts = path.split(".")
        return [".".join(parts[i:]) for i in range(len(parts) - 1, -1, -1)]  # shortest first

    taken = {s for path in others for s in suffixes(path)}
    chosen: set[str] = set()
    for path in sorted(targets, key=suffixes):
        if any(path == c or path.endswith("." + c) for c in chosen):
            continue
        chosen.add(next((s for s in suffixes(path) if s not in taken), path))
    return sorted(chosen)


def expanded_target_modules(model: nn.Module, adapter_name: str) -> list[str]:
    """``target_modules`` as an explicit list for the layers that hold ``adapter_name`` (what PEFT saves for
    ``"all-linear"``): the module paths, shortened to their distinguishing suffixes from
    :data:`MIN_TARGETS_TO_SHORTEN` paths on.

    Raises:
        ValueError: if no layer holds the adapter.
    """
    from .layer import LoraLinear
    from .modules_to_save import ModulesToSave

    wrappers = [(p, m) for p, m in model.named_modules() if isinstance(m, (LoraLinear, ModulesToSave))]
    inside = tuple(p + "." for p, _ in wrappers)
    targets = [p for p, m in wrappers if isinstance(m, LoraLinear) and adapter_name in m.lora_A]
    if not targets:
        raise ValueError(f"no LoRA layer of {type(model).__name__} holds adapter {adapter_name!r}")
    if len(targets) < MIN_TARGETS_TO_SHORTEN:
        return sorted(targets)
    wanted = set(targets)
    others = [p for p, _ in model.named_modules() if p and p not in wanted and not p.startswith(inside)]
    short = minimal_target_list(targets, others)
    exact = all(matches(short, p) for p in targets) and not any(matches(short, p) for p in others)
    return short if exact else sorted(targets)  # a path that is a suffix of another module's: keep full paths
