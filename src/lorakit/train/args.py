"""Training arguments: flat, typed dataclasses whose fields are the keys of a YAML config file.

``SFTArgs.from_yaml("configs/sft_lora.yaml", overrides=["lr=1e-4"])`` reads a file and applies ``key=value``
overrides; an unknown key is an error that suggests the closest field.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import LoraConfig
from ..fields import ConfigError, check_range, coerce, coerce_fields

__all__ = ["SFTArgs", "DPOArgs", "load_args", "parse_overrides"]


@dataclass
class SFTArgs:
    """Supervised fine-tuning with LoRA, QLoRA or all weights trainable."""

    # --- model
    model: str = "SmolLM2-135M-Instruct"
    """Base model: a local transformers checkpoint directory or the embedded default."""
    method: str = "lora"
    """``lora``, ``qlora`` (4-bit NF4 base + double quantization) or ``full`` (every weight trains)."""
    dtype: str = "float32"
    """Compute dtype of the base: ``float32`` or ``bfloat16``."""
    # --- adapter
    r: int = 16
    """LoRA rank."""
    lora_alpha: float = 32
    """LoRA alpha (scaling = alpha / r)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA branch."""
    target_modules: Any = "all-linear"
    """Modules that get adapters (list of names, a regex, or ``all-linear``)."""
    init_lora_weights: Any = True
    """``true``, ``gaussian``, ``olora`` or ``pissa``."""
    use_rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r)."""
    # --- data
    task: str | None = "dates"
    """A built-in task (``dates``, ``extract``, ``reverse``); ignored when ``train_file`` is set. The recipe
    (``run_sft``) needs one of the two; ``train_sft`` takes rows and needs neither."""
    train_file: str | None = None
    """A JSONL/JSON file of prompt/completion, messages or text rows."""
    val_file: str | None = None
    """A separate validation file; otherwise ``val_fraction`` of the training file is held out."""
    val_fraction: float | None = None
    """Fraction of ``train_file`` held out for validation when there is no ``val_file``; unset: 10% (at most 200
    rows, none below 20 rows), said in the log; 0 holds nothing out."""
    n_train: int = 480
    """Training examples drawn from a built-in task."""
    n_eval: int = 200
    """Held-out examples for a built-in task (exact-match accuracy and validation loss)."""
    max_length: int = 256
    """Tokens per example (longer ones are truncated)."""
    completion_only: bool = True
    """Loss on completion / assistant tokens only."""
    packing: bool = False
    """Pack short examples into rows of ``max_length`` tokens."""
    skip_bad_rows: bool = False
    """Skip malformed rows instead of stopping at the first one (the log says how many and which)."""
    columns: dict[str, str] | None = None
    """Your file's columns for lorakit's keys, e.g. ``{prompt: query, completion: label}``; ``input``/``target``,
    ``instruction``/``input``/``output``, ``question``/``answer`` and ``prompt``/``response`` need none."""
    prompt_format: str = "auto"
    """``auto`` (text prompts raw, message prompts through the chat template), ``chat`` or ``raw``; recorded in the
    adapter directory for ``lorakit eval`` / ``generate`` / ``chat``."""
    system_prompt: str | None = None
    """System message put before chat-formatted prompts (with ``auto``, text prompts then use the chat template)."""
    # --- optimisation
    lr: float = 2e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Cosine schedule floor, as a fraction of ``lr``."""
    warmup_steps: int = 3
    """Linear warm-up steps."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    optimizer: str = "adamw"
    """``adamw``, ``adamw_8bit``, ``paged_adamw_8bit`` or ``paged_adamw_32bit``."""
    batch_size: int = 8
    """Examples per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    max_steps: int = 30
    """Optimizer steps."""
    max_grad_norm: float = 1.0
    """Gradient clipping (0 disables)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, ~30% more time)."""
    recompute_activations: bool = True
    """Recompute the cheap activations (norm outputs, SwiGLU product) in backward: ~40% less activation memory
    at a few elementwise passes per layer, same gradients (``lorakit.recompute_cheap_activations``)."""
    seed: int = 0
    """Seed for data order, adapter init and dropout."""
    threads: int = 0
    """CPU threads (0 keeps torch's default)."""
    # --- evaluation, checkpoints, output
    eval_every: int = 0
    """Validation loss every N steps (0: only at the end)."""
    eval_accuracy: bool = True
    """Score the held-out rows (task or validation set) before training, every ``eval_every`` steps and after."""
    metric: str = "exact"
    """The score: ``exact`` (after strip), ``contains``, ``normalized`` (case, spaces, punctuation) or your
    ``module:function(prediction, target) -> bool``."""
    report_to: str | list[str] = "none"
    """``none`` or ``tensorboard`` (event files in ``output_dir/tensorboard``; pip install 'lorakit[tensorboard]')."""
    val_loss_rows: int = 0
    """Validation rows used for the validation loss (0: all); accuracy always uses every held-out row."""
    early_stopping_patience: int = 0
    """Stop after this many evaluations without a better validation loss (0: never)."""
    save_every: int = 0
    """Checkpoint every N steps (0: only at the end)."""
    output_dir: str = "runs/sft"
    """Where the adapter, checkpoints, metrics.jsonl and loss.png go."""
    resume: bool = False
    """Continue the run in ``output_dir`` from its latest checkpoint."""
    overwrite: bool = False
    """Start a fresh run in an ``output_dir`` that holds a previous run, removing that run's outputs (without it,
    a fresh run needs an empty or new ``output_dir``)."""
    nonfinite: str = "stop"
    """On a non-finite loss or gradient: ``stop`` (no optimizer step, no adapter written, an error naming the last
    good checkpoint) or ``skip`` (drop that step's update and go on)."""
    progress: bool = True
    """Show progress bars."""

    def __post_init__(self) -> None:
        for key, value in coerce_fields(type(self), {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}).items():
            setattr(self, key, value)
        if self.method not in ("lora", "qlora", "full"):
            raise ConfigError(f"method={self.method!r}; use 'lora', 'qlora' or 'full'")
        if self.nonfinite not in ("stop", "skip"):
            raise ConfigError(f"nonfinite={self.nonfinite!r}; use 'stop' or 'skip'")
        if self.resume and self.overwrite:
            raise ConfigError("resume: true and overwrite: true contradict each other; set one")
        if self.dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"dtype={self.dtype!r}; use 'float32' or 'bfloat16'")
        if self.val_file and self.val_fraction:
            raise ConfigError("set val_file or val_fraction, not both")
        for name in ("r", "batch_size", "grad_accum", "max_steps", "max_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)!r} must be at least 1")
        for name in ("n_train", "n_eval", "warmup_steps", "eval_every", "val_loss_rows", "early_stopping_patience",
                     "save_every", "threads", "seed"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)!r} must be 0 or more")
        check_range("lr", self.lr, low=0, low_open=True, high=1, fix="a LoRA run usually takes 1e-4 to 2e-3 (Adam steps each weight by about lr: above 1 training diverges)")
        check_range("lora_alpha", self.lora_alpha, low=0, low_open=True, fix="a common choice is 2 × r")
        check_range("lora_dropout", self.lora_dropout, low=0, high=1, high_open=True)
        check_range("min_lr_ratio", self.min_lr_ratio, low=0, high=1)
        check_range("weight_decay", self.weight_decay, low=0)
        if self.val_fraction is not None:
            check_range("val_fraction", self.val_fraction, low=0, high=1, high_open=True)
        _check_own_data_fields(self)
        check_range("max_grad_norm", self.max_grad_norm, low=0, fix="0 disables clipping")
        if not str(self.output_dir).strip():
            raise ConfigError("output_dir='' is empty; name a directory such as runs/sft")

    def lora_config(self) -> LoraConfig:
        """The adapter these arguments describe (``r``, ``lora_alpha``, ``lora_dropout``, ``target_modules``, ...)."""
        return LoraConfig(r=self.r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                          target_modules=self.target_modules, init_lora_weights=self.init_lora_weights,
                          use_rslora=self.use_rslora)


@dataclass
class DPOArgs(SFTArgs):
    """Preference tuning (sigmoid DPO); the reference model is the same model with its adapter disabled."""

    beta: float = 0.1
    """DPO temperature: larger keeps the policy closer to the reference."""
    reference_adapter: str | None = None
    """Start from this adapter directory; its frozen copy is the reference (instead of the bare base)."""
    precompute_reference: bool = False
    """Compute reference log-probs once before training (saves a forward per step)."""
    task: str | None = None
    lr: float = 5e-4
    output_dir: str = "runs/dpo"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("beta", self.beta, low=0, low_open=True, fix="DPO papers use 0.1 to 0.5")


def _check_own_data_fields(args: SFTArgs) -> None:
    """``columns``, ``prompt_format``, ``metric`` and ``report_to`` checked when the config is built (a user metric
    module is imported here: naming it in a config is the request to run it)."""
    from ..data.prompt_format import PROMPT_FORMATS
    from ..data.schemas import check_columns
    from ..reporting import check_report_to
    from ..tasks import get_metric

    if args.prompt_format not in PROMPT_FORMATS:
        raise ConfigError(f"prompt_format={args.prompt_format!r}; use one of {list(PROMPT_FORMATS)}")
    if args.prompt_format == "raw" and args.system_prompt is not None:
        raise ConfigError("system_prompt needs the chat template; remove it or set prompt_format: chat")
    try:
        if args.columns is not None:
            check_columns(args.columns)
        get_metric(args.metric)
        check_report_to(args.report_to)
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _coerce(value: str, annotation: Any, name: str) -> Any:
    """A ``--set key=value`` string as the field's type: read with YAML's rules (numbers, booleans, lists, null),
    then coerced to the annotation, so ``lr=1e-3`` is a float although YAML 1.1 reads ``1e-3`` as text."""
    import yaml

    if annotation is str:
        return value
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        parsed = value
    return coerce(parsed, annotation, name)


def parse_overrides(cls: type, overrides: list[str]) -> dict[str, Any]:
    """``["lr=1e-4", "max_steps=10"]`` → ``{"lr": 1e-4, "max_steps": 10}``, checked against ``cls``'s fields."""
    hints = typing.get_type_hints(cls)
    out = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not key=value (e.g. lr=1e-4)")
        _check_key(cls, key.strip())
        try:
            out[key.strip()] = _coerce(value, hints.get(key.strip(), Any), key.strip())
        except ConfigError as err:
            raise ConfigError(f"--set {err}") from None
    return out


def _check_key(cls: type, key: str) -> None:
    names = [f.name for f in dataclasses.fields(cls)]
    if key not in names:
        close = difflib.get_close_matches(key, names, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(names)}"
        raise ConfigError(f"unknown key {key!r} for {cls.__name__}{hint}")


def load_args(cls: type, path: str | Path | None = None, overrides: list[str] | None = None) -> Any:
    """Build ``cls`` from a YAML file (keys = field names) plus ``key=value`` overrides.

    Raises:
        ConfigError: (a ValueError) for an unknown key (with the closest field), a value of the wrong type or
            range (naming field, value and fix), a duplicate key, or a file that is not a YAML mapping.
    """
    import yaml

    data: dict[str, Any] = {}
    if path is not None:
        loaded = _read_yaml(Path(path))
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: a config file is a mapping of field: value, got {type(loaded).__name__}")
        data = dict(loaded or {})
        for key in data:
            try:
                _check_key(cls, str(key))
            except ConfigError as err:
                raise ConfigError(f"{path}: {err}") from None
        data = coerce_fields(cls, data, source=str(path))
    data.update(parse_overrides(cls, overrides or []))
    try:
        return cls(**data)
    except ConfigError as err:
        where = f"{path}" + (f" with --set {' '.join(overrides)}" if overrides else "") if path is not None else ""
        raise ConfigError(f"{where}: {err}" if where else str(err)) from None


def _read_yaml(path: Path) -> Any:
    """``path``'s YAML, refusing a key written twice (PyYAML would silently keep the last one)."""
    import yaml

    class _StrictLoader(yaml.SafeLoader):
        pass

    def mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = loader.construct_object(key_node)
            if not isinstance(key, (str, int, float, bool)) and key is not None:  # "? [a]: 1" makes a list a key
                raise ConfigError(f"{path}: line {key_node.start_mark.line + 1}: the key {key!r} is not a field "
                                  "name; write field: value")
            if key in seen:
                raise ConfigError(f"{path}: key {key!r} appears twice (lines {seen[key]} and "
                                  f"{key_node.start_mark.line + 1}); keep one")
            seen[key] = key_node.start_mark.line + 1
        return loader.construct_mapping(node)

    _StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
