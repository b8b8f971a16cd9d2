"""Trainable parameters and training memory of full fine-tuning, LoRA and QLoRA, from ``config.json`` alone.

Nothing here loads weights: the shapes of a Llama-like decoder (Llama, Mistral, Qwen2, SmolLM, …) follow from
``hidden_size``, ``intermediate_size``, ``num_attention_heads``, ``num_key_value_heads``, ``head_dim``,
``num_hidden_layers`` and ``vocab_size``. A LoRA adapter of rank r on an (in → out) weight trains
``r · (in + out)`` parameters, a fraction ``r · (in + out) / (in · out)`` of that weight: 1.17% of a 4096 × 2048
weight at r=16, 4.69% at r=64.

Memory per method (bytes; N = base parameters, n = LoRA parameters, s = bytes of ``dtype``):

======  ===============================================  =========  ============
method  weights                                          gradients  AdamW states
======  ===============================================  =========  ============
full    N · s                                            N · s      N · 8
LoRA    N · s + n · 4 (adapters in float32)              n · 4      n · 8
QLoRA   N_lin · 4.127 / 8 + (N − N_lin) · s + n · s      n · s      n · 8
======  ===============================================  =========  ============

N_lin are the decoder's linear weights, which QLoRA stores in NF4: 4 bits per weight, one 8-bit absmax per
64-weight block and one float32 scale per 256 blocks (double quantization) = 4 + 8/64 + 32/(64·256) = 4.127 bits.
The embeddings, norms and output head stay in ``dtype`` (lorakit's ``train_sft`` keeps them in float32 for QLoRA:
estimate with ``dtype="float32"`` to match it); QLoRA adapters train in the compute dtype, as lorakit does. AdamW
holds two float32 moments per trainable parameter. Activations: see Note: activation estimate. The CUDA context,
allocator slack and temporary buffers are not counted; leave ~10-20% headroom.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "NF4_BITS",
    "LINEAR_NAMES",
    "ModelShape",
    "MethodMemory",
    "Estimate",
    "config_path",
    "read_config",
    "lora_params",
    "lora_fraction",
    "activation_bytes",
    "estimate_training",
    "format_bytes",
]

#: Bits per weight of NF4 with double quantization (blocks of 64, second-level blocks of 256).
NF4_BITS = 4 + 8 / 64 + 32 / (64 * 256)
#: The linear layers of one Llama-like decoder layer, in module order (``all-linear`` targets these).
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_GIB = 2**30


def config_path(name_or_path: str | os.PathLike) -> Path:
    """The ``config.json`` of a model directory, of the embedded model's name, or the file itself.

    Raises:
        FileNotFoundError: when none of these exists.
    """
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    from .models import _resolve  # maps the embedded model's names to its cached checkpoint

    return _resolve(name_or_path) / "config.json"


def read_config(name_or_path: str | os.PathLike) -> dict:
    """The parsed ``config.json`` (see :func:`config_path`); ValueError if it is not a JSON object."""
    path = config_path(name_or_path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a {type(data).__name__}, not a model config object")
    return data


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a Llama-like decoder, read from its ``config.json``."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_hidden_layers: int
    vocab_size: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False

    @classmethod
    def from_config(cls, config: dict, source: str = "config.json") -> "ModelShape":
        """Build from a config dict (``text_config`` is used when present, as in multimodal checkpoints).

        Raises:
            ValueError: naming the keys a Llama-like config needs and this one lacks.
        """
        config = config.get("text_config") or config
        need = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size")
        missing = [k for k in need if not isinstance(config.get(k), int)]
        if missing:
            raise ValueError(f"{source} lacks {', '.join(missing)} (model_type={config.get('model_type')!r}); "
                             "shapes are derived for Llama-like configs only")
        heads = config["num_attention_heads"]
        return cls(
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_attention_heads=heads,
            num_key_value_heads=config.get("num_key_value_heads") or heads,  # absent → multi-head attention
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            num_hidden_layers=config["num_hidden_layers"],
            vocab_size=config["vocab_size"],
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            attention_bias=bool(config.get("attention_bias", False)),
            mlp_bias=bool(config.get("mlp_bias", False)),
        )

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """``{name: (in_features, out_features)}`` for the linear layers of one decoder layer."""
        h, i = self.hidden_size, self.intermediate_size
        q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def linear_bias(self, name: str) -> int:
        """Bias parameters of one linear layer (``attention_bias`` / ``mlp_bias`` configs)."""
        attention = name in ("q_proj", "k_proj", "v_proj", "o_proj")
        return self.linear_shapes()[name][1] if (self.attention_bias if attention else self.mlp_bias) else 0


def lora_params(in_features: int, out_features: int, r: int) -> int:
    """Parameters of one adapter: A is (r, in), B is (out, r)."""
    return r * (in_features + out_features)


def lora_fraction(in_features: int, out_features: int, r: int) -> float:
    """Adapter parameters as a fraction of the weight they adapt: ``r (in + out) / (in · out)``."""
    return lora_params(in_features, out_features, r) / (in_features * out_features)


def activation_bytes(shape: ModelShape, batch: int, seq: int, dtype_bytes: int, r: int = 0, n_adapted: int = 0,
                     gradient_checkpointing: bool = False, lean: bool = False) -> int:
    """Bytes of activations kept for the backward pass of one micro-batch.

    Note: activation estimate
        Per decoder layer and token, the tensors autograd keeps (``s`` bytes each, h = hidden, q = heads·head_dim,
        k = kv_heads·head_dim, i = intermediate):

        - ``4h``: input and normalised output of the two RMSNorms;
        - ``3q + 3k``: the rotated q, k and v that attention keeps, its output and the copy fed to ``o_proj``;
        - ``4i``: gate, up, silu(gate) and their product fed to ``down_proj``;
        - ``r · n_adapted``: each adapter's ``A x``.

        Attention is assumed fused (transformers' default ``sdpa``, which keeps no (T, T) matrix); eager attention
        adds ``heads · T`` per token and layer. Around the loss, two float32 (B, T, vocab) tensors are alive: the
        upcast logits and their log-softmax. With gradient checkpointing each layer keeps only its input (``h``
        per token) and one layer's activations are rebuilt at a time. Total = layers · per-layer · B · T · s
        + 2 · B · T · h · s (final norm) + 2 · B · T · V · 4. On SmolLM2-135M (LoRA r=16, float32, B=2, T=128)
        autograd keeps 344 MiB, 392 MiB with the logits alive at the loss; this gives 415 MiB, an estimate on the
        safe side (not an allocator peak).

        ``lean`` describes lorakit's own training loop (``train_sft``/``train_dpo`` defaults):
        ``recompute_cheap_activations`` drops the two norm outputs, ``act(gate)`` and the product (``2h + 2i``
        per token and layer), and ``sft_loss`` keeps no logits, only one chunk of ``chunk_rows(V)`` tokens
        (two float32 blocks) while the head runs.
    """
    h, i = shape.hidden_size, shape.intermediate_size
    q, k = shape.num_attention_heads * shape.head_dim, shape.num_key_value_heads * shape.head_dim
    per_token_layer = 4 * h + 3 * q + 3 * k + 4 * i + r * n_adapted
    if lean:
        per_token_layer -= 2 * h + 2 * i
    tokens = batch * seq
    if gradient_checkpointing:
        layers = shape.num_hidden_layers * h * tokens * dtype_bytes + per_token_layer * tokens * dtype_bytes
    else:
        layers = shape.num_hidden_layers * per_token_layer * tokens * dtype_bytes
    if lean:
        from .losses import chunk_rows

    logit_rows = min(tokens, chunk_rows(shape.vocab_size)) if lean else tokens
    head = 2 * h * tokens * dtype_bytes + 2 * shape.vocab_size * logit_rows * 4
    return layers + head


@dataclass(frozen=True)
class LayerRow:
    """One line of the per-layer table: a weight type, its shape, how many there are, and its adapter size."""

    name: str
    shape: str
    count: int
    params: int
    lora: int  # 0 when not adapted

    @property
    def percent(self) -> float:
        return 100.0 * self.lora / self.params if self.params else 0.0


@dataclass(frozen=True)
class MethodMemory:
    """Training memory of one method, in bytes."""

    method: str
    trainable: int
    total_params: int
    weights: int
    gradients: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total_params


@dataclass(frozen=True)
class Estimate:
    """The result of :func:`estimate_training`; ``str()`` gives the tables ``lorakit estimate`` prints."""

    name: str
    shape: ModelShape
    r: int
    targets: tuple[str, ...]
    batch: int
    seq: int
    dtype: str
    gradient_checkpointing: bool
    base_params: int
    lora_params: int
    rows: list[LayerRow]
    methods: list[MethodMemory]
    budget_bytes: int | None = None
    notes: list[str] = field(default_factory=list)
    lean: bool = False

    def fits(self) -> list[str]:
        """Methods whose total is within the budget (all of them without a budget)."""
        return [m.method for m in self.methods if self.budget_bytes is None or m.total <= self.budget_bytes]

    def to_dict(self) -> dict:
        return {"model": self.name, "r": self.r, "targets": list(self.targets), "batch": self.batch, "seq": self.seq,
                "dtype": self.dtype, "gradient_checkpointing": self.gradient_checkpointing, "lean": self.lean,
                "base_params": self.base_params, "lora_params": self.lora_params,
                "layers": [dict(vars(row), percent=row.percent) for row in self.rows],
                "methods": [dict(vars(m), total=m.total, percent=m.percent) for m in self.methods],
                "budget_bytes": self.budget_bytes, "fits": self.fits()}

    def __str__(self) -> str:
        return _format(self)


def estimate_training(config: dict, r: int = 16, targets: tuple[str, ...] | list[str] | None = None,
                      batch: int = 8, seq: int = 256, dtype: str = "float32", gradient_checkpointing: bool = False,
                      budget_gb: float | None = None, name: str = "model", lean: bool = False) -> Estimate:
    """Parameters and training memory of full fine-tuning, LoRA and QLoRA for a Llama-like ``config``.

    Args:
        config: a parsed ``config.json`` (see :func:`read_config`).
        r: LoRA rank.
        targets: linear layer names that get adapters (default: all seven, i.e. ``all-linear``).
        batch, seq: micro-batch size and tokens per example, for the activation estimate.
        dtype: ``float32``, ``bfloat16`` or ``float16``: the full-precision weights and the activations.
        gradient_checkpointing: estimate activations with checkpointing on.
        lean: activations of lorakit's training loop (see Note: activation estimate); default: any trainer's.
        budget_gb: memory budget in GiB (2**30 bytes); ``Estimate.fits()`` lists the methods within it.
        name: shown in the table header.

    Raises:
        ValueError: unknown target name or dtype, r < 1, or a config that is not Llama-like.
    """
    shape = ModelShape.from_config(config, source=f"{name} config.json")
    targets = tuple(LINEAR_NAMES if targets is None else targets)
    unknown = [t for t in targets if t not in LINEAR_NAMES]
    if unknown:
        raise ValueError(f"unknown target(s) {unknown}; choose from {', '.join(LINEAR_NAMES)}")
    if dtype not in _DTYPE_BYTES:
        raise ValueError(f"dtype={dtype!r}; use one of {', '.join(_DTYPE_BYTES)}")
    if r < 1 or batch < 1 or seq < 1:
        raise ValueError(f"r, batch and seq must be at least 1, got r={r}, batch={batch}, seq={seq}")
    L, h, V = shape.num_hidden_layers, shape.hidden_size, shape.vocab_size
    rows, linear, lora = [], 0, 0
    for layer_name, (n_in, n_out) in shape.linear_shapes().items():
        adapter = lora_params(n_in, n_out, r) if layer_name in targets else 0
        rows.append(LayerRow(layer_name, f"{n_in} → {n_out}", L, L * n_in * n_out, L * adapter))
        linear += L * n_in * n_out
        lora += L * adapter
    biases = L * sum(shape.linear_bias(n) for n in LINEAR_NAMES)
    rows.append(LayerRow("embed_tokens", f"{V} × {h}", 1, V * h, 0))
    rows.append(LayerRow("norms", f"{h}", 2 * L + 1, (2 * L + 1) * h, 0))
    if biases:
        rows.append(LayerRow("biases", "-", L, biases, 0))
    head = 0 if shape.tie_word_embeddings else V * h
    rows.append(LayerRow("lm_head", "tied to embed_tokens" if head == 0 else f"{h} → {V}", 1, head, 0))
    base = linear + V * h + (2 * L + 1) * h + biases + head

    s = _DTYPE_BYTES[dtype]

    def act(n_adapted: int) -> int:
        return activation_bytes(shape, batch, seq, s, r, n_adapted, gradient_checkpointing, lean and
                                not gradient_checkpointing)

    nf4 = round(linear * NF4_BITS / 8)
    methods = [
        MethodMemory("full", base, base, base * s, base * s, base * 8, act(0)),
        MethodMemory("LoRA", lora, base + lora, base * s + lora * 4, lora * 4, lora * 8, act(len(targets))),
        MethodMemory("QLoRA", lora, base + lora, nf4 + (base - linear) * s + lora * s, lora * s, lora * 8,
                     act(len(targets))),
    ]
    budget = None if budget_gb is None else int(budget_gb * _GIB)
    return Estimate(name, shape, r, targets, batch, seq, dtype, gradient_checkpointing, base, lora, rows, methods,
                    budget, lean=lean)


# --- formatting


def format_bytes(n: int) -> str:
    """``1536`` → ``1.50 KiB``; binary units, about three significant figures."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            digits = 0 if unit == "B" or abs(n) >= 100 else 1 if abs(n) >= 10 else 2
            return f"{n:.{digits}f} {unit}"
        n /= 1024
    raise AssertionError  # unreachable


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]

    def line(cells: list[str]) -> str:  # first column left-aligned, numbers right-aligned
        return "  ".join(str(c).ljust(w) if j == 0 else str(c).rjust(w)
                         for j, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(header), *(line(r) for r in rows)])


def _format(e: Estimate) -> str:
    s = e.shape
    tied = ", tied head" if s.tie_word_embeddings else ""
    out = [f"{e.name}: {s.num_hidden_layers} layers, hidden {s.hidden_size}, intermediate {s.intermediate_size}, "
           f"heads {s.num_attention_heads} (kv {s.num_key_value_heads}, head_dim {s.head_dim}), "
           f"vocab {s.vocab_size}{tied}", ""]
    rows = [[r.name, r.shape, f"×{r.count}", f"{r.params:,}", f"{r.lora:,}" if r.lora else "-",
             f"{r.percent:.2f}%" if r.lora else "-"] for r in e.rows]
    rows.append(["total", "", "", f"{e.base_params:,}", f"{e.lora_params:,}",
                 f"{100 * e.lora_params / e.base_params:.2f}%"])
    out.append(_table(["weight", "shape (in → out)", "count", "parameters", f"LoRA r={e.r}", "% of weight"], rows))
    ckpt = ", gradient checkpointing" if e.gradient_checkpointing else ""
    ckpt += ", lorakit's loop (recomputed norms/SwiGLU, chunked head loss)" if e.lean and not ckpt else ""
    out += ["", f"training memory: batch {e.batch} × {e.seq} tokens, {e.dtype} weights and activations{ckpt}"]
    header = ["method", "trainable", "% of all", "weights", "gradients", "AdamW", "activations", "total"]
    if e.budget_bytes is not None:
        header.append(f"fits {format_bytes(e.budget_bytes)}")
    mrows = []
    for m in e.methods:
        row = [m.method, f"{m.trainable:,}", f"{m.percent:.2f}%", format_bytes(m.weights), format_bytes(m.gradients),
               format_bytes(m.optimizer), format_bytes(m.activations), format_bytes(m.total)]
        if e.budget_bytes is not None:
            row.append("yes" if m.total <= e.budget_bytes else "no")
        mrows.append(row)
    out.append(_table(header, mrows))
    out.append(f"(LoRA/QLoRA on {', '.join(e.targets)}; QLoRA linear weights in NF4 at {NF4_BITS:.3f} bits; "
               "AdamW keeps 2 float32 moments per trainable parameter)")
    if e.budget_bytes is not None:
        fit = e.fits()
        out.append(f"fits in {format_bytes(e.budget_bytes)}: {', '.join(fit)}" if fit else
                   f"nothing fits in {format_bytes(e.budget_bytes)}: lower --batch or --seq, or add "
                   "--gradient-checkpointing")
    return "\n".join(out)
