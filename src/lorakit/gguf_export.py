"""GGUF export for llama.cpp and Ollama: a merged model (streamed), or an adapter alone as a GGUF LoRA adapter.

The file follows llama.cpp's own converter (``convert_hf_to_gguf.py`` / ``convert_lora_to_gguf.py``, read for
tensor names and metadata): architecture ``llama`` (Llama and Mistral checkpoints), tensor names from the ``gguf``
package's name map (``model.layers.0.self_attn.q_proj.weight`` → ``blk.0.attn_q.weight``), the rows of the query and
key projections permuted from transformers' rotary layout to llama.cpp's (``reshape(heads, 2, d/2, …).swapaxes(1,
2)``), 1-D tensors (norms) kept float32, a tied output head written once as ``token_embd``. The tokenizer (byte-level
BPE: tokens, token types, merges, special ids) and the chat template go in as metadata, so ``llama-cli -m`` and
``ollama create`` need nothing else.

Tensors are produced one at a time by the streamed merge (:func:`lorakit.streamed_merge.materialize`, probe check
included), converted to the output type (``f32``, ``f16``, ``bf16`` or ``q8_0``) and written, so memory stays at one
tensor whatever the model size. The file is written beside its target and renamed into place when complete.

A GGUF LoRA adapter (``general.type = adapter``) stores ``<tensor>.lora_a`` (r × in) and ``<tensor>.lora_b`` (out ×
r) and one ``adapter.lora.alpha``; llama.cpp scales each pair by ``alpha / r``. Per-module ranks, alphas and
rsLoRA are folded into ``lora_b`` so that scale is exact. The format has no place for ``modules_to_save`` copies or
trained biases: such adapters must be merged.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .atomic import TEMP_PREFIX
from .merge_plan import MergePlan, plan_merge, resolve_base
from .streamed_merge import ProbeStats, materialize

__all__ = ["export_gguf", "export_gguf_adapter", "GGUFExport", "OUTTYPES"]

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")


@dataclass(frozen=True)
class GGUFExport:
    path: Path
    outtype: str
    tensors: int
    nbytes: int
    probe: ProbeStats | None

    def __str__(self) -> str:
        text = f"wrote {self.path} ({self.outtype}, {self.tensors} tensors, {self.nbytes / 1e6:.1f} MB)"
        return text + (f"\n{self.probe}" if self.probe is not None and self.probe.checked else "")


def _gguf():
    import gguf

    return gguf


def _check_architecture(config: dict, source: Path) -> None:
    arch = (config.get("architectures") or ["?"])[0]
    if arch not in _ARCHITECTURES:
        raise ValueError(f"{source}: GGUF export supports {', '.join(_ARCHITECTURES)}, not {arch}; merge with "
                         "`lorakit merge` and convert the merged directory with llama.cpp's convert_hf_to_gguf.py")
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    kind = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if kind not in ("default", None):
        raise ValueError(f"{source}: rope scaling {kind!r} is not exported yet; merge with `lorakit merge` and convert "
                         "the merged directory with llama.cpp's convert_hf_to_gguf.py")


def _heads(config: dict) -> tuple[int, int, int]:
    n_head = config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_head
    head_dim = config.get("head_dim") or config["hidden_size"] // n_head
    return n_head, n_kv, head_dim


def _permute(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """transformers' rotary row order → llama.cpp's, for a q/k weight (out, in), bias (out,) or lora_B (out, r)."""
    shape = rows.shape
    return rows.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _gguf_name(key: str, name_map) -> str:
    name = name_map.get_name(key, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise ValueError(f"{key} has no GGUF name for the llama architecture; export supports plain Llama checkpoints")
    return name


def _qtype(outtype: str, shape: tuple[int, ...]):
    """GGML type of a tensor: 1-D (norms, biases) stay float32, as llama.cpp's converter keeps them."""
    gguf = _gguf()
    q = gguf.GGMLQuantizationType
    if outtype == "f32" or len(shape) == 1:
        return q.F32
    if outtype == "q8_0":
        block = gguf.GGML_QUANT_SIZES[q.Q8_0][0]
        return q.Q8_0 if shape[-1] % block == 0 else q.F16
    return {"f16": q.F16, "bf16": q.BF16}[outtype]


def _nbytes(qtype, shape: tuple[int, ...]) -> int:
    gguf = _gguf()
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n = 1
    for d in shape:
        n *= d
    return n // block * size


def _encode(t: torch.Tensor, qtype) -> np.ndarray:
    gguf = _gguf()
    q = gguf.GGMLQuantizationType
    t = t.detach().float().contiguous()
    if qtype == q.F32:
        return t.numpy()
    if qtype == q.F16:
        return t.to(torch.float16).numpy()
    if qtype == q.BF16:
        return t.to(torch.bfloat16).view(torch.int16).numpy()
    return gguf.quants.quantize(t.numpy(), qtype)


def _file_type(outtype: str) -> int:
    ft = _gguf().LlamaFileType
    return int({"f32": ft.ALL_F32, "f16": ft.MOSTLY_F16, "bf16": ft.MOSTLY_BF16, "q8_0": ft.MOSTLY_Q8_0}[outtype])


def _model_metadata(writer, config: dict, name: str, outtype: str) -> None:
    n_head, n_kv, head_dim = _heads(config)
    writer.add_type("model")
    writer.add_name(name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    rope = config.get("rope_parameters") or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(config["vocab_size"])
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config["hidden_size"] // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_file_type(_file_type(outtype))
    writer.add_quantization_version(_gguf().GGML_QUANT_VERSION)


def _tokenizer_metadata(writer, base_dir: Path, vocab_size: int, pre: str | None) -> None:
    """Byte-level BPE vocabulary, token types, merges, special ids, add_bos and the chat template."""
    import json

    from transformers import AutoTokenizer

    gguf = _gguf()
    spec = base_dir / "tokenizer.json"
    if not spec.is_file():
        raise FileNotFoundError(f"{base_dir} has no tokenizer.json; GGUF export needs the base's (byte-level BPE) "
                                "tokenizer in the model directory")
    model = json.loads(spec.read_text()).get("model", {})
    if model.get("type") != "BPE":
        raise ValueError(f"{spec}: a {model.get('type')} tokenizer; GGUF export writes byte-level BPE tokenizers "
                         "only. Convert the merged directory with llama.cpp's convert_hf_to_gguf.py")
    if not model.get("merges"):
        raise ValueError(f"{spec}: a BPE tokenizer without merges cannot be written to GGUF (the format needs them)")
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    kinds = gguf.TokenType
    for i in range(max(vocab_size, len(by_id))):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(kinds.UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            types.append(kinds.CONTROL if added[i].special else kinds.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(kinds.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre or "default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(base_dir, load_merges=True, n_vocab=len(tokens))
    special.add_to_gguf(writer, quiet=True)


def _temp_path(target: Path) -> Path:
    return target.parent / f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}-{target.name}"


def _check_target(path: Path, overwrite: bool) -> None:
    if path.is_dir():
        raise ValueError(f"--output {path} is a directory; give the path of the .gguf file to write")
    if path.exists() and not overwrite:
        raise ValueError(f"--output {path} already exists; pass --overwrite (overwrite=True) to replace it")


def _write(path: Path, arch: str, metadata, tensors: list, overwrite: bool) -> int:
    """``tensors``: ``(name, shape, qtype, produce)`` with ``produce()`` → the tensor (float); written in order."""
    gguf = _gguf()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    writer = gguf.GGUFWriter(tmp, arch)
    try:
        metadata(writer)
        for name, shape, qtype, _ in tensors:
            writer.add_tensor_info(name, shape, np.dtype(np.float32), _nbytes(qtype, shape), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        fout = writer.fout[0]
        for name, shape, qtype, produce in tensors:
            data = _encode(produce(), qtype)
            writer.write_padding(fout, fout.tell())
            data.tofile(fout)
            writer.write_padding(fout, data.nbytes)
            del data
        fout.flush()
        os.fsync(fout.fileno())
        writer.close()
        os.chmod(tmp, 0o666 & ~_umask())
        if path.exists() and not overwrite:
            raise ValueError(f"--output {path} appeared while exporting; nothing replaced")
        os.replace(tmp, path)
        return path.stat().st_size
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def export_gguf(base: str | os.PathLike, output: str | os.PathLike, adapters=(), outtype: str = "f16", *,
                verify: bool = True, overwrite: bool = False, tokenizer_pre: str | None = None) -> GGUFExport:
    """Write base (+ adapters, merged on the way) as one GGUF file for llama.cpp / Ollama.

    Args:
        base: base model directory (safetensors, float or 4-bit) or the embedded model's name.
        output: the ``.gguf`` file to write.
        adapters: adapter directories or ``(directory, weight)`` pairs to merge (none: the base as it is).
        outtype: ``"f32"``, ``"f16"``, ``"bf16"`` or ``"q8_0"`` for the 2-D weights (norms stay float32).
        verify: probe-check every merged weight (see :mod:`lorakit.streamed_merge`).
        overwrite: replace an existing file.
        tokenizer_pre: llama.cpp's pre-tokenizer name (``tokenizer.ggml.pre``); default ``"smollm"`` for the
            embedded model, else ``"default"``.

    Raises:
        ValueError / FileNotFoundError: an unsupported architecture or tokenizer, an adapter that does not fit, an
            existing output without ``overwrite``; nothing is written then.
    """
    if outtype not in OUTTYPES:
        raise ValueError(f"outtype={outtype!r}; use one of {', '.join(OUTTYPES)}")
    path = Path(output)
    _check_target(path, overwrite)
    plan: MergePlan = plan_merge(base, adapters, dtype=torch.float32, allow_no_adapter=True)
    _check_architecture(plan.config, plan.base_dir)
    gguf = _gguf()
    config = plan.config
    n_head, n_kv, _ = _heads(config)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    stats = ProbeStats() if verify else None
    generator = torch.Generator().manual_seed(0)
    tensors = []
    for t in plan.tensors:
        name = _gguf_name(t.key, name_map)
        heads = n_head if ".attn_q." in name else n_kv if ".attn_k." in name else None

        def produce(t=t, heads=heads):
            data = materialize(t, torch.float32, stats, generator)
            data = _read_raw(t) if data is None else data
            return _permute(data, heads) if heads else data

        tensors.append((name, t.shape, _qtype(outtype, t.shape), produce))
    if tokenizer_pre is None and _is_embedded(plan.base_dir):
        tokenizer_pre = "smollm"  # the name llama.cpp gave the embedded model's pre-tokenizer (its GGUF file says so)

    def metadata(writer):
        _model_metadata(writer, config, plan.base_dir.name, outtype)
        _tokenizer_metadata(writer, plan.base_dir, config["vocab_size"], tokenizer_pre)

    nbytes = _write(path, "llama", metadata, tensors, overwrite)
    return GGUFExport(path, outtype, len(tensors), nbytes, stats)


def _is_embedded(base_dir: Path) -> bool:
    from .models import EMBEDDED_NAME
    from .paths import cache_dir

    return base_dir.resolve() == (cache_dir() / EMBEDDED_NAME).resolve()


def _read_raw(t) -> torch.Tensor:
    from .st_stream import read_tensor

    return read_tensor(t.source).float()


def export_gguf_adapter(adapter: str | os.PathLike, output: str | os.PathLike, base: str | os.PathLike | None = None,
                        outtype: str = "f32", *, overwrite: bool = False) -> GGUFExport:
    """Write one adapter as a GGUF LoRA adapter (``llama-cli --lora``, Ollama's ``ADAPTER``).

    Args:
        adapter: the adapter directory.
        output: the ``.gguf`` file to write.
        base: the base model directory or embedded name (only its ``config.json`` is read); default: the adapter's
            ``base_model_name_or_path``.
        outtype: type of the LoRA tensors (``f32`` default, as llama.cpp's converter).

    Raises:
        ValueError: for adapters the format cannot hold (``modules_to_save``, trained biases, unconverted
            OLoRA/PiSSA, targets without a llama.cpp name) or an existing output without ``overwrite``.
    """
    import json

    from .config import LoraConfig
    from .peft_format import PREFIX, _read_tensors, _strip_prefix

    if outtype not in OUTTYPES:
        raise ValueError(f"outtype={outtype!r}; use one of {', '.join(OUTTYPES)}")
    path = Path(output)
    _check_target(path, overwrite)
    cfg = LoraConfig.load(adapter)
    if cfg.modules_to_save or cfg.bias != "none":
        raise ValueError(f"{adapter}: modules_to_save={cfg.modules_to_save!r} / bias={cfg.bias!r} cannot be stored in a "
                         "GGUF LoRA adapter; export the merged model instead (lorakit export --format gguf --adapter)")
    if cfg.init_lora_weights in ("olora", "pissa"):
        raise ValueError(f"{adapter}: an unconverted {cfg.init_lora_weights} adapter applies to a rewritten base; save "
                         "it with save_adapter(convert_to_lora=True) or export the merged model")
    base_dir = resolve_base(base or cfg.base_model_name_or_path or "")
    config = json.loads((base_dir / "config.json").read_text())
    _check_architecture(config, base_dir)
    gguf = _gguf()
    n_head, n_kv, _ = _heads(config)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    tensors = _strip_prefix(_read_tensors(Path(adapter)))
    pairs = []
    for key in tensors:
        if not key.endswith(".lora_A.weight"):
            if not key.endswith(".lora_B.weight"):
                raise ValueError(f"{adapter}: {key} is not a LoRA tensor; GGUF LoRA adapters hold lora_A/lora_B only")
            continue
        module = key[len(PREFIX): -len(".lora_A.weight")]
        b_key = f"{PREFIX}{module}.lora_B.weight"
        if b_key not in tensors:
            raise ValueError(f"{adapter}: {b_key} is missing; the adapter file is incomplete")
        if module == "lm_head" and config.get("tie_word_embeddings", False):
            raise ValueError(f"{adapter}: LoRA on lm_head of a model with tied embeddings cannot be applied by "
                             "llama.cpp; export the merged model")
        name = _gguf_name(f"{module}.weight", name_map)
        A, B = tensors[key].float(), tensors[b_key].float()
        r = A.shape[0]
        B = B * (cfg.scaling_for(module) * r / cfg.lora_alpha)  # llama.cpp applies alpha / r
        heads = n_head if ".attn_q." in name else n_kv if ".attn_k." in name else None
        if heads:
            B = _permute(B, heads)
        pairs.append((f"{name}.lora_a", tuple(A.shape), _qtype(outtype, tuple(A.shape)), lambda A=A: A))
        pairs.append((f"{name}.lora_b", tuple(B.shape), _qtype(outtype, tuple(B.shape)), lambda B=B: B))

    def metadata(writer):
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(cfg.lora_alpha))
        writer.add_name(Path(adapter).name)

    nbytes = _write(path, "llama", metadata, pairs, overwrite)
    return GGUFExport(path, outtype, len(pairs), nbytes, None)
