"""`LoraConfig`: the adapter's hyper-parameters, with PEFT's field names, defaults and JSON form.

The dataclass serialises to ``adapter_config.json`` exactly as PEFT writes it (sorted keys, ``peft_type: "LORA"``,
``inference_mode: true``), so a directory written by lorakit loads in PEFT and the other way round. Unknown keys in a
loaded file warn and are dropped, so adapters written by newer PEFT versions still load.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .fields import ConfigError, check_range, coerce

__all__ = ["LoraConfig", "INIT_METHODS"]

#: The values ``init_lora_weights`` accepts. ``True`` is PEFT's default (Kaiming-uniform A, zero B).
INIT_METHODS = (True, False, "gaussian", "olora", "pissa")

# Fields PEFT writes that lorakit does not implement; kept (and written back) when they hold their neutral value,
# rejected with a clear message when they do not, so an adapter is never silently loaded with different semantics.
_NEUTRAL_PEFT_FIELDS: dict[str, Any] = {
    "use_dora": False,
    "layer_replication": None,
    "megatron_config": None,
    "megatron_core": "megatron.core",
    "loftq_config": {},
    "eva_config": None,
    "corda_config": None,
    "trainable_token_indices": None,
    "lora_bias": False,
    "target_parameters": None,
    "alora_invocation_tokens": None,
    "use_qalora": False,
    "qalora_group_size": 16,
    "ensure_weight_tying": False,
}
# Newer PEFT variants: read (and dropped) when switched off, never written, since older PEFT versions reject them.
_OFF_WHEN_EMPTY = ("arrow_config", "kasa_config", "lora_ga_config", "monteclora_config", "use_bdlora",
                   "velora_config", "mica_config")


@dataclass
class LoraConfig:
    """Hyper-parameters of one LoRA adapter (paper: https://arxiv.org/abs/2106.09685).

    Each wrapped linear computes ``h = W0 x + scaling * B A dropout(x)`` with ``A`` of shape (r, in) and ``B`` of
    shape (out, r); ``scaling = lora_alpha / r`` (or ``lora_alpha / sqrt(r)`` with ``use_rslora``).

    Every field is checked when the config is built (or read from a file): its type (numbers written as strings
    become numbers; ``r=2.5`` or ``lora_alpha="x"`` are refused), its range (``r >= 1``, ``0 <= lora_dropout < 1``,
    finite alphas, layer indices >= 0) and that every regex compiles.

    Raises:
        ConfigError: (a ``ValueError``) for a field of the wrong type or range, naming the field, the value and
            the fix.
        ValueError: for combinations of fields that cannot work together (each message names the fix).
    """

    r: int = 8
    """Rank of the update. Overridden per module by ``rank_pattern``."""
    lora_alpha: float = 8
    """Numerator of the scaling factor. Overridden per module by ``alpha_pattern``."""
    lora_dropout: float = 0.0
    """Dropout probability on the LoRA branch's input (the base path never sees it)."""
    target_modules: list[str] | str | None = None
    """Which modules get adapters: a list (exact path or ``.name`` suffix), a string (``re.fullmatch`` on the path),
    ``"all-linear"`` (every linear layer except the output head) or None (``["q_proj", "v_proj"]``)."""
    exclude_modules: list[str] | str | None = None
    """Modules never wrapped, with the same matching rules as ``target_modules``; exclusion wins."""
    layers_to_transform: list[int] | int | None = None
    """Only wrap modules inside these layer indices (needs ``target_modules`` as a list)."""
    layers_pattern: list[str] | str | None = None
    """Name of the ``ModuleList`` holding the layers (e.g. ``"layers"``); needs ``layers_to_transform``."""
    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Per-module rank, keyed by a regex matched as ``(.*\\.)?(key)$`` against the module path."""
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    """Per-module alpha, same matching as ``rank_pattern``."""
    use_rslora: bool = False
    """Rank-stabilised scaling ``lora_alpha / sqrt(r)`` (https://arxiv.org/abs/2312.03732)."""
    bias: str = "none"
    """Which biases train and are saved: ``"none"``, ``"all"`` or ``"lora_only"`` (biases of wrapped layers)."""
    modules_to_save: list[str] | None = None
    """Extra modules trained in full and saved with the adapter (e.g. ``["lm_head"]``), matched by name suffix."""
    init_lora_weights: bool | str = True
    """``True`` (Kaiming-uniform A, zero B), ``False`` (random B too; tests only), ``"gaussian"``, ``"olora"`` or
    ``"pissa"`` (the last two rewrite the base weight; see :func:`lorakit.save_adapter`'s ``convert_to_lora``)."""
    fan_in_fan_out: bool = False
    """Set for layers that store their weight as (in, out), such as GPT-2's ``Conv1D``."""
    task_type: str | None = "CAUSAL_LM"
    """PEFT's task type; written to the file so PEFT picks ``PeftModelForCausalLM``."""
    base_model_name_or_path: str | None = None
    """Filled in from the model's ``config._name_or_path`` when saving."""
    revision: str | None = None
    """Base model revision, kept for PEFT compatibility."""
    inference_mode: bool = False
    """Written as ``true`` on save, as PEFT does."""
    extra_peft_fields: dict[str, Any] = field(default_factory=dict, repr=False)
    """PEFT fields lorakit keeps unchanged (their neutral values) so a round trip writes them back."""

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules, key=str)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules, key=str)
        self._check_fields()
        if isinstance(self.target_modules, str) and (self.layers_to_transform is not None or self.layers_pattern):
            raise ValueError(
                f"target_modules={self.target_modules!r} is a regex, which cannot be combined with "
                "layers_to_transform/layers_pattern; put the layer indices in the regex or pass target_modules as a list"
            )
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError(
                f"layers_pattern={self.layers_pattern!r} needs layers_to_transform (the layer indices to adapt)"
            )
        if self.init_lora_weights not in INIT_METHODS:
            raise ValueError(
                f"init_lora_weights={self.init_lora_weights!r} is not supported; use one of {list(INIT_METHODS)}"
            )
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"bias={self.bias!r} must be one of 'none', 'all', 'lora_only'")
        if self.use_rslora and (self.rank_pattern or self.alpha_pattern) and self.init_lora_weights in ("olora", "pissa"):
            warnings.warn(
                "use_rslora with rank_pattern/alpha_pattern and OLoRA/PiSSA cannot be converted back to a plain LoRA "
                "adapter on save; save the adapter for the modified base instead",
                stacklevel=2,
            )

    def _check_fields(self) -> None:
        """Coerce every field to its type and check its range (see the class docstring)."""
        for name in ("rank_pattern", "alpha_pattern"):
            if getattr(self, name) is None:  # older PEFT versions write null for an empty pattern
                setattr(self, name, {})
        for name, annotation in _FIELD_TYPES.items():
            setattr(self, name, coerce(getattr(self, name), annotation, name))
        check_range("r", self.r, low=1, fix="the rank is a whole number such as 8 or 16")
        check_range("lora_alpha", self.lora_alpha, fix="lora_alpha is a number such as 16 (scaling = lora_alpha / r)")
        check_range("lora_dropout", self.lora_dropout, low=0, high=1, high_open=True,
                    fix="a dropout probability such as 0.05")
        for key, value in self.rank_pattern.items():
            check_range(f"rank_pattern[{key!r}]", value, low=1, fix="ranks are whole numbers such as 8")
        for key, value in self.alpha_pattern.items():
            check_range(f"alpha_pattern[{key!r}]", value, fix="alphas are numbers such as 16")
        layers = self.layers_to_transform
        for i in [layers] if isinstance(layers, int) else layers or []:
            check_range("layers_to_transform", i, low=0, fix="layer indices count from 0")
        for name in ("target_modules", "exclude_modules"):
            spec = getattr(self, name)
            if isinstance(spec, str) and spec != "all-linear":
                _check_regex(name, spec, spec)
        patterns = self.layers_pattern
        for pattern in [patterns] if isinstance(patterns, str) else patterns or []:
            _check_regex("layers_pattern", pattern, pattern)
        for name in ("rank_pattern", "alpha_pattern"):
            for key in getattr(self, name):
                _check_regex(f"{name} key", key, rf"(.*\.)?({key})$")

    # --- per-module values

    def rank_for(self, module_path: str) -> int:
        """The rank of the module at ``module_path`` (``rank_pattern`` first, then ``r``)."""
        return int(_match_pattern(self.rank_pattern, module_path, self.r))

    def alpha_for(self, module_path: str) -> float:
        """The alpha of the module at ``module_path`` (``alpha_pattern`` first, then ``lora_alpha``)."""
        return _match_pattern(self.alpha_pattern, module_path, self.lora_alpha)

    def scaling_for(self, module_path: str) -> float:
        """``alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA) for the module at ``module_path``."""
        r, alpha = self.rank_for(module_path), self.alpha_for(module_path)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    # --- JSON

    def to_dict(self) -> dict[str, Any]:
        """The ``adapter_config.json`` content: PEFT's fields, ``peft_type`` and ``inference_mode=True``."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra_peft_fields"}
        d = {**_NEUTRAL_PEFT_FIELDS, **self.extra_peft_fields, **d}
        d["peft_type"] = "LORA"
        d["inference_mode"] = True
        d["auto_mapping"] = None
        return json.loads(json.dumps(d))  # deep copy, tuples → lists

    def to_json(self) -> str:
        """``to_dict`` as PEFT formats it (indent 2, sorted keys)."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "LoraConfig":
        """Build from a PEFT ``adapter_config.json`` dict. Unknown keys warn and are dropped.

        Raises:
            ConfigError: for a value of the wrong type or range, or a config that is not a JSON object; the
                message starts with ``source``.
            ValueError: if ``peft_type`` is not LORA, or a feature lorakit does not implement is switched on.
        """
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: an adapter config is a JSON object of fields ({{\"r\": 8, ...}}), "
                              f"not {type(d).__name__} {_short(d)}; re-save the adapter")
        d = dict(d)
        peft_type = d.pop("peft_type", "LORA")
        peft_type = getattr(peft_type, "value", peft_type)  # peft's in-memory dicts hold its PeftType enum
        if str(peft_type).upper() != "LORA":
            raise ValueError(f"{source}: peft_type={peft_type!r}; lorakit reads LoRA adapters only")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra_peft_fields"}
        kwargs = {k: d.pop(k) for k in list(d) if k in names}
        extra = {}
        for key, neutral in _NEUTRAL_PEFT_FIELDS.items():
            if key in d:
                value = d.pop(key)
                if value not in (neutral, None, {}, []) and value != neutral:
                    raise ValueError(
                        f"{source}: {key}={value!r} is not supported by lorakit; only {key}={neutral!r} adapters load"
                    )
                extra[key] = neutral
        for key in _OFF_WHEN_EMPTY:
            if d.get(key) not in (None, False, {}, []):
                raise ValueError(f"{source}: {key}={d[key]!r} is not supported by lorakit; only plain LoRA adapters load")
            d.pop(key, None)
        for ignored in ("auto_mapping", "peft_version", "runtime_config"):
            d.pop(ignored, None)
        if d:
            warnings.warn(f"{source}: ignoring unknown adapter config keys {sorted(d)}", stacklevel=2)
        if isinstance(kwargs.get("init_lora_weights"), str) and kwargs["init_lora_weights"].startswith("pissa_niter"):
            kwargs["init_lora_weights"] = "pissa"
        try:
            return cls(**kwargs, extra_peft_fields=extra)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None

    def save(self, directory: str | Path) -> Path:
        """Write ``adapter_config.json`` into ``directory`` and return its path."""
        path = Path(directory) / "adapter_config.json"
        path.write_text(self.to_json() + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> "LoraConfig":
        """Read ``adapter_config.json`` from ``directory``.

        Raises:
            FileNotFoundError: naming the missing file.
            ValueError: if the file is not valid JSON.
        """
        path = Path(directory) / "adapter_config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: an adapter directory holds adapter_config.json and "
                                    "adapter_model.safetensors")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err}); re-save the adapter") from None
        return cls.from_dict(data, source=str(path))


# The declared types of the fields, as :func:`lorakit.fields.coerce` checks them. Alphas keep an int as an int, so a
# file written back holds ``"lora_alpha": 16`` as PEFT writes it.
_FIELD_TYPES: dict[str, Any] = {
    "r": int,
    "lora_alpha": int | float,
    "lora_dropout": float,
    "target_modules": list[str] | str | None,
    "exclude_modules": list[str] | str | None,
    "layers_to_transform": list[int] | int | None,
    "layers_pattern": list[str] | str | None,
    "rank_pattern": dict[str, int],
    "alpha_pattern": dict[str, int | float],
    "use_rslora": bool,
    "bias": str,
    "modules_to_save": list[str] | None,
    "init_lora_weights": bool | str,
    "fan_in_fan_out": bool,
    "task_type": str | None,
    "base_model_name_or_path": str | None,
    "revision": str | None,
    "inference_mode": bool,
    "extra_peft_fields": dict[str, Any],
}


def _check_regex(name: str, shown: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as err:
        raise ConfigError(f"{name}={shown!r} is not a valid regular expression ({err}); fix the pattern, or pass "
                          "a list of module names to match names instead") from None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _match_pattern(pattern: dict[str, Any], module_path: str, default: Any) -> Any:
    """PEFT's pattern lookup: the first key ``k`` such that ``(.*\\.)?(k)$`` matches ``module_path``."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module_path):
            return value
    return default
