"""Safetensors checkpoints read and written one tensor at a time, so no file is ever held in memory whole.

A safetensors file is an 8-byte little-endian header length ``N``, ``N`` bytes of JSON (``{key: {"dtype",
"shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, padded with spaces to a multiple of 8) and the
tensor bytes, each at ``8 + N + begin``. :func:`checkpoint_entries` reads only the headers of a checkpoint's
shards (the index JSON says which); :func:`read_tensor` reads one tensor's bytes with ``readinto`` into a tensor of
its own (no memory map: pages of a mapped multi-gigabyte shard would count against the process's resident memory
as they are touched); :class:`ShardWriter` writes a file whose header is known in advance, tensor by tensor, and
copies untouched tensors from file to file in the kernel (``os.copy_file_range``) without reading them into Python.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["TensorEntry", "read_header", "checkpoint_entries", "read_tensor", "ShardWriter", "DTYPE_CODES",
           "INDEX_NAME", "torch_dtype_code"]

INDEX_NAME = "model.safetensors.index.json"
#: safetensors dtype code → torch dtype.
DTYPE_CODES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
               "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
               "BOOL": torch.bool}
_CODE_OF = {v: k for k, v in DTYPE_CODES.items()}
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit


def torch_dtype_code(dtype: torch.dtype) -> str:
    """The safetensors code of a torch dtype (``torch.bfloat16`` → ``"BF16"``)."""
    if dtype not in _CODE_OF:
        raise ValueError(f"dtype {dtype} cannot be written to safetensors here; use float32, float16 or bfloat16")
    return _CODE_OF[dtype]


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes lie: ``file``, absolute byte ``start``, ``nbytes``, and its ``dtype`` / ``shape``."""

    key: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    nbytes: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPE_CODES[self.dtype]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """``({key: TensorEntry}, metadata)`` from a safetensors file's header, in the order of the bytes.

    Raises:
        ValueError: naming the file, for a truncated file, a bad header or offsets outside the file.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ValueError(f"{path} is not a safetensors file (only {size} bytes); the file is truncated")
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER, size - 8):
            raise ValueError(f"{path}: header length {n} exceeds the file ({size} bytes); the file is corrupt")
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: the safetensors header is not valid JSON ({err}); the file is corrupt") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the safetensors header is not a JSON object; the file is corrupt")
    metadata = header.pop("__metadata__", None) or {}
    base = 8 + n
    entries = []
    for key, info in header.items():
        try:
            begin, end = (int(x) for x in info["data_offsets"])
            dtype, shape = info["dtype"], tuple(int(d) for d in info["shape"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: malformed header entry for {key!r}; the file is corrupt") from None
        if dtype not in DTYPE_CODES:
            raise ValueError(f"{path}: tensor {key!r} has dtype {dtype}, which lorakit does not read")
        entry = TensorEntry(key, path, dtype, shape, base + begin, end - begin)
        itemsize = torch.empty((), dtype=DTYPE_CODES[dtype]).element_size()
        if begin < 0 or end < begin or base + end > size or entry.numel * itemsize != end - begin:
            raise ValueError(f"{path}: tensor {key!r} points outside the file or has the wrong size; the file is "
                             "truncated or corrupt")
        entries.append(entry)
    entries.sort(key=lambda e: e.start)
    return {e.key: e for e in entries}, dict(metadata)


def checkpoint_entries(directory: str | os.PathLike) -> tuple[dict[str, TensorEntry], list[Path], dict[str, str]]:
    """Every tensor of a safetensors checkpoint directory (one file or shards + ``model.safetensors.index.json``).

    Returns:
        ``(entries, files, metadata)``: ``{key: TensorEntry}`` shard by shard in byte order, the shard files, and
        the first shard's ``__metadata__``.

    Raises:
        FileNotFoundError: no safetensors file; ValueError: an index naming missing files or keys, a key in two
            files, or a corrupt header.
    """
    directory = Path(directory)
    index = directory / INDEX_NAME
    weight_map = None
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{index} is not a valid safetensors index ({err})") from None
        files = [directory / name for name in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ValueError(f"{index} names shards that are not there: {missing[:3]}; the checkpoint is incomplete")
    else:
        files = sorted(p for p in directory.glob("*.safetensors") if not p.name.startswith("."))
    if not files:
        raise FileNotFoundError(f"{directory} holds no *.safetensors weights; save the model with save_pretrained "
                                "(safe_serialization) first, or merge with --verify logits")
    entries: dict[str, TensorEntry] = {}
    metadata: dict[str, str] = {}
    for i, file in enumerate(files):
        found, meta = read_header(file)
        if i == 0:
            metadata = meta
        for key, entry in found.items():
            if key in entries:
                raise ValueError(f"{key} is stored twice ({entries[key].file.name} and {file.name})")
            if weight_map is not None and weight_map.get(key) != file.name:
                raise ValueError(f"{index} does not list {key} in {file.name}; the index does not match the shards")
            entries[key] = entry
    if weight_map is not None:
        absent = sorted(set(weight_map) - set(entries))
        if absent:
            raise ValueError(f"{index} lists {len(absent)} tensors no shard holds (e.g. {absent[0]})")
    return entries, files, metadata


def read_tensor(entry: TensorEntry) -> torch.Tensor:
    """The tensor ``entry`` describes, read from disk into memory of its own."""
    buf = torch.empty(entry.nbytes, dtype=torch.uint8)
    if entry.nbytes:
        with open(entry.file, "rb") as fh:
            fh.seek(entry.start)
            got = fh.readinto(memoryview(buf.numpy()))
        if got != entry.nbytes:
            raise ValueError(f"{entry.file}: {entry.key} is cut short ({got} of {entry.nbytes} bytes); the file is "
                             "truncated")
    return buf.view(entry.torch_dtype).reshape(entry.shape)


class ShardWriter:
    """Write one safetensors file whose tensors (key, dtype code, shape) are known before the first byte.

    Tensors must be given in the planned order, by :meth:`write` (a tensor) or :meth:`copy` (bytes of a
    :class:`TensorEntry` with the same dtype and shape); :meth:`close` checks that all were written and syncs.
    """

    def __init__(self, path: str | os.PathLike, plan: list[tuple[str, str, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None) -> None:
        self.path = Path(path)
        header: dict = {"__metadata__": dict(metadata)} if metadata else {}
        self._sizes = []
        offset = 0
        for key, code, shape in plan:
            nbytes = torch.empty((), dtype=DTYPE_CODES[code]).element_size()
            for d in shape:
                nbytes *= d
            header[key] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._sizes.append((key, nbytes))
            offset += nbytes
        self.nbytes = offset
        text = json.dumps(header, separators=(",", ":")).encode("utf-8")
        text += b" " * (-len(text) % 8)
        self._fh = open(self.path, "wb")
        self._fh.write(struct.pack("<Q", len(text)) + text)
        self.nbytes += 8 + len(text)
        self._next = 0

    def _expect(self, key: str, nbytes: int) -> None:
        want, size = self._sizes[self._next]
        if key != want or nbytes != size:
            raise RuntimeError(f"{self.path.name}: expected {want} ({size} bytes), got {key} ({nbytes} bytes)")
        self._next += 1

    def write(self, key: str, tensor: torch.Tensor) -> None:
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        self._expect(key, data.numel())
        self._fh.write(memoryview(data.numpy()))

    def copy(self, key: str, entry: TensorEntry) -> None:
        self._expect(key, entry.nbytes)
        self._fh.flush()
        with open(entry.file, "rb") as src:
            src_fd, dst_fd = src.fileno(), self._fh.fileno()
            done, start = 0, entry.start
            while done < entry.nbytes:
                try:
                    n = os.copy_file_range(src_fd, dst_fd, entry.nbytes - done, start + done)
                except (OSError, AttributeError):  # another file system or no copy_file_range: plain chunks
                    n = 0
                if n == 0:
                    src.seek(start + done)
                    chunk = src.read(min(64 << 20, entry.nbytes - done))
                    if not chunk:
                        raise ValueError(f"{entry.file}: {entry.key} is cut short; the file is truncated")
                    self._fh.seek(0, os.SEEK_END)
                    self._fh.write(chunk)
                    self._fh.flush()
                    n = len(chunk)
                done += n
        self._fh.seek(0, os.SEEK_END)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, kind, *_) -> None:
        if kind is None:
            self.close()
        else:
            self._fh.close()

    def close(self) -> None:
        try:
            if self._next != len(self._sizes):
                raise RuntimeError(f"{self.path.name}: {len(self._sizes) - self._next} planned tensors not written")
            self._fh.flush()
            os.fsync(self._fh.fileno())
        finally:
            self._fh.close()
