"""Read training rows from JSONL / JSON files and detect their format.

Four row formats are understood (the names are the values of ``LoadedRows.format``):

- ``"prompt_completion"``: ``{"prompt": str | messages, "completion": str | messages}``
- ``"messages"``: ``{"messages": [{"role": ..., "content": ...}, ...]}``
- ``"text"``: ``{"text": str}``
- ``"preference"``: ``{"prompt": str | messages, "chosen": str | messages, "rejected": str | messages}``

Other layouts (``input``/``target``, ``instruction``/``input``/``output``, ``question``/``answer``,
``prompt``/``response``, or any columns named by a ``columns`` mapping) are mapped onto these by
``lorakit.data.schemas``; CSV/TSV files with a header line and Parquet files are read too.

``messages`` is a non-empty list of ``{"role": str, "content": str}`` dicts. Extra keys in a
row are ignored. All rows of one file must share one format, so that a file can be handed to
exactly one trainer (SFT or DPO) without surprises halfway through an epoch.

Errors name the file, the 1-based line (JSONL) or item (JSON list), what was found and what
was expected, e.g. ``data.jsonl line 7: row has keys ['prompt', 'answer']; expected one of ...``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.data.schemas import check_columns, to_standard

__all__ = ["ROW_FORMATS", "LoadedRows", "Row", "detect_format", "load_rows", "load_splits", "train_val_split"]

# format name -> keys a row must have, checked in this order (preference before prompt_completion,
# because a preference row has a "prompt" too).
ROW_FORMATS: dict[str, tuple[str, ...]] = {
    "preference": ("prompt", "chosen", "rejected"),
    "prompt_completion": ("prompt", "completion"),
    "messages": ("messages",),
    "text": ("text",),
}


@dataclass
class LoadedRows:
    """Rows read from one file.

    Attributes:
        rows: the parsed rows, in file order (bad rows removed when ``skip_bad=True``).
        format: the format shared by all rows, a key of ``ROW_FORMATS`` (``None`` for an empty file).
        n_skipped: how many malformed rows were skipped (always 0 unless ``skip_bad=True``).
        path: the file the rows came from.
        skipped: ``"<file> line <n>: <reason>"`` for each skipped row.
    """

    rows: list[dict[str, Any]]
    format: str | None
    n_skipped: int
    path: Path
    skipped: list[str] = field(default_factory=list)


def _check_messages(value: Any, key: str) -> None:
    """Raise ``ValueError`` unless ``value`` is a non-empty list of {role: str, content: str}."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"{key!r} must be a non-empty list of messages, got {type(value).__name__}")
    for i, msg in enumerate(value):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str) or not isinstance(msg.get("content"), str):
            raise ValueError(f"{key!r}[{i}] must be a dict with string 'role' and 'content', got {msg!r:.80}")


def _check_text_or_messages(value: Any, key: str) -> None:
    if isinstance(value, str):
        return
    if isinstance(value, list):
        _check_messages(value, key)
        return
    raise ValueError(f"{key!r} must be a string or a list of messages, got {type(value).__name__}")


def detect_format(row: Any) -> str:
    """Return the format name of one row (a key of ``ROW_FORMATS``) after checking its value types.

    Raises:
        ValueError: the row is not a dict, lacks the keys of every format (the message lists the keys
            found and the key sets expected), or a value has the wrong type.
    """
    if not isinstance(row, dict):
        raise ValueError(f"row must be a JSON object, got {type(row).__name__}")
    for name, keys in ROW_FORMATS.items():
        if all(k in row for k in keys):
            break
    else:
        expected = " or ".join("{" + ", ".join(map(repr, keys)) + "}" for keys in ROW_FORMATS.values())
        raise ValueError(f"row has keys {sorted(row)}; expected one of {expected}, or one of the layouts "
                         "input/target, instruction/input/output, question/answer, prompt/response; for other "
                         "column names set columns: in the config (e.g. columns: {prompt: query, completion: label})")
    if name == "messages":
        _check_messages(row["messages"], "messages")
    elif name == "text":
        if not isinstance(row["text"], str):
            raise ValueError(f"'text' must be a string, got {type(row['text']).__name__}")
    else:
        for k in keys:
            _check_text_or_messages(row[k], k)
        if isinstance(row["prompt"], str) and any(isinstance(row[k], list) for k in keys[1:]):
            raise ValueError("a string 'prompt' needs string completions; use a list of messages for the prompt")
    return name


class Row(dict):
    """A row read from a file: a plain dict that also knows where it came from (``row.where``, e.g.
    ``"data.jsonl line 7"``), so that errors found later (while tokenizing) still name the file and line."""

    where: str = ""

    def __reduce__(self):  # pickles and deep-copies keep the location
        return (_make_row, (dict(self), self.where))


def _make_row(data: dict, where: str) -> Row:
    row = Row(data)
    row.where = where
    return row


def _decode(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        column = e.start - data.rfind(b"\n", 0, e.start)
        raise ValueError(f"{path} line {line}: not UTF-8 text (byte 0x{data[e.start]:02x} at column {column}); "
                         "save the file as UTF-8") from None


def _parse(path: Path) -> Iterable[tuple[str, Any]]:
    """Yield ``(location, parsed_or_exception)`` for each row of a JSONL, JSON, CSV or Parquet file."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        yield from _parse_parquet(path)
        return
    text = _decode(path, path.read_bytes())
    if suffix in (".csv", ".tsv"):
        yield from _parse_csv(path, text, "\t" if suffix == ".tsv" else ",")
        return
    stripped = text.lstrip()
    if suffix != ".jsonl" and stripped.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            # A broken JSON list cannot be partially recovered, so this is fatal even with skip_bad.
            raise ValueError(f"{path} line {e.lineno}: invalid JSON ({e.msg})") from None
        for i, item in enumerate(items, start=1):
            yield f"{path} item {i}", item
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield f"{path} line {lineno}", json.loads(line)
        except json.JSONDecodeError as e:
            yield f"{path} line {lineno}", ValueError(f"invalid JSON ({e.msg} at column {e.colno})")


def _parse_csv(path: Path, text: str, delimiter: str) -> Iterable[tuple[str, Any]]:
    """CSV/TSV with a header line; each record's location is the line it starts on. Empty cells are ''."""
    import csv
    import io

    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as e:
        raise ValueError(f"{path} line 1: not a CSV header ({e})") from None
    if len(set(header)) != len(header) or not all(h.strip() for h in header):
        raise ValueError(f"{path} line 1: the header {header} has an empty or repeated column name")
    start = reader.line_num + 1
    while True:
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            yield f"{path} line {start}", ValueError(f"not valid CSV ({e})")
            return
        where = f"{path} line {start}"
        start = reader.line_num + 1
        if not record or all(not cell.strip() for cell in record):
            continue
        if len(record) != len(header):
            yield where, ValueError(f"{len(record)} cells but the header has {len(header)} columns")
            continue
        yield where, dict(zip(header, record))


def _parse_parquet(path: Path) -> Iterable[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{path}: reading Parquet needs the datasets extra: pip install 'lorakit[data]' "
                         "(or convert the file to JSONL)") from None
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises its own error types for a damaged file
        raise ValueError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from None
    for i, row in enumerate(rows, start=1):
        yield f"{path} row {i}", row


def _not_accepted(name: str, formats: Sequence[str]) -> str:
    if name == "preference":
        return ("is a preference row (prompt/chosen/rejected); SFT trains on prompt/completion, messages or text "
                "rows: train preference data with `lorakit train --dpo` (DPOArgs / train_dpo)")
    if tuple(formats) == ("preference",):
        return (f"is a {name} row, but preference tuning (DPO) needs prompt/chosen/rejected rows; train it "
                "without --dpo (SFT)")
    return f"row format {name!r} is not accepted here; expected {list(formats)}"


def load_rows(path: str | Path, *, skip_bad: bool = False, formats: Sequence[str] | None = None,
              columns: Mapping[str, str] | None = None) -> LoadedRows:
    """Read a JSONL file (one row per line), a JSON file holding a list of rows, a CSV/TSV file with a header
    line, or a Parquet file (needs ``pyarrow``: ``pip install 'lorakit[data]'``).

    A file whose name ends in ``.jsonl``, or whose content does not start with ``[``, is read as JSONL; blank
    lines are ignored. Rows in the layouts of ``lorakit.data.schemas`` (``input``/``target``, Alpaca's
    ``instruction``/``input``/``output``, ``question``/``answer``, ``prompt``/``response``) become string
    prompt/completion rows; ``columns`` maps lorakit's keys to other column names.

    Args:
        path: the file.
        skip_bad (bool): skip malformed rows instead of raising; ``LoadedRows.skipped`` says which and why.
            Default ``False``.
        formats: allowed row formats (keys of ``ROW_FORMATS``); ``None`` allows all. A DPO loader
            passes ``("preference",)``.
        columns: ``{lorakit key: column}``, e.g. ``{"prompt": "query", "completion": "label"}``.

    Returns:
        ``LoadedRows`` with the rows (``Row`` dicts that know their file and line), their shared format and the
        skipped rows.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: (unless ``skip_bad``) a line is not valid JSON, a row has the wrong keys or
            value types, a row's format differs from the first row's, or is not in ``formats`` (a preference
            row given to SFT points to ``--dpo``). The message names the file and line. A JSON list that does
            not parse, a file that is not UTF-8 and an unreadable Parquet file always raise.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    if formats is not None:
        unknown = sorted(set(formats) - set(ROW_FORMATS))
        if unknown:
            raise ValueError(f"unknown row formats {unknown}; choose from {sorted(ROW_FORMATS)}")
    columns = check_columns(columns) if columns is not None else None
    rows: list[dict[str, Any]] = []
    fmt: str | None = None
    first_where = ""
    skipped: list[str] = []
    for where, item in _parse(path):
        try:
            if isinstance(item, Exception):
                raise item
            item = to_standard(item, columns)
            name = detect_format(item)
            if formats is not None and name not in formats:
                raise ValueError(_not_accepted(name, formats))
            if fmt is not None and name != fmt:
                raise ValueError(f"row format {name!r} differs from {fmt!r} of the first row ({first_where})")
        except ValueError as e:
            if skip_bad:
                skipped.append(f"{where}: {e}")
                continue
            raise ValueError(f"{where}: {e}") from None
        if fmt is None:
            fmt, first_where = name, where
        rows.append(_make_row(item, where))
    return LoadedRows(rows=rows, format=fmt, n_skipped=len(skipped), path=path, skipped=skipped)


def train_val_split(rows: Sequence[Any], val_fraction: float, seed: int = 0) -> tuple[list[Any], list[Any]]:
    """Split rows into (train, val) by a seeded shuffle; the same inputs always give the same split.

    ``round(len(rows) * val_fraction)`` rows (at least 1 when ``val_fraction > 0``) go to val; both
    lists keep the original row order.

    Raises:
        ValueError: ``val_fraction`` is outside ``[0, 1)``, or the split would leave train empty.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = max(1, round(len(rows) * val_fraction)) if val_fraction > 0 else 0
    if n_val >= len(rows) and n_val > 0:
        raise ValueError(
            f"val_fraction={val_fraction} on {len(rows)} rows leaves no training rows; "
            "use a smaller fraction or a separate validation file"
        )
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    val_idx = set(order[:n_val])
    train = [r for i, r in enumerate(rows) if i not in val_idx]
    val = [r for i, r in enumerate(rows) if i in val_idx]
    return train, val


def load_splits(
    train_path: str | Path,
    val_path: str | Path | None = None,
    *,
    val_fraction: float | None = 0.0,
    seed: int = 0,
    skip_bad: bool = False,
    formats: Sequence[str] | None = None,
    columns: Mapping[str, str] | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Return ``(train_rows, val_rows)``: from a separate validation file, or split off the train file.

    Raises:
        ValueError: both ``val_path`` and ``val_fraction > 0`` are given, the two files have
            different row formats, or any error of ``load_rows`` / ``train_val_split``.
    """
    val_fraction = val_fraction or 0.0  # None (SFTArgs' "not set") holds nothing out here
    if val_path is not None and val_fraction > 0:
        raise ValueError("give either val_path or val_fraction > 0, not both")
    train = load_rows(train_path, skip_bad=skip_bad, formats=formats, columns=columns)
    if val_path is None:
        return train_val_split(train.rows, val_fraction, seed)
    val = load_rows(val_path, skip_bad=skip_bad, formats=formats, columns=columns)
    if train.format and val.format and train.format != val.format:
        raise ValueError(f"{val.path} has rows of format {val.format!r} but {train.path} has {train.format!r}")
    return train.rows, val.rows
