"""The column layouts people's data comes in, mapped onto lorakit's ``{"prompt", "completion"}`` rows.

Besides lorakit's own formats (see ``lorakit.data.io``), these layouts are read as string prompt/completion rows:

===========================================  ==============================================================
row keys                                      becomes
===========================================  ==============================================================
``input``, ``target``                         prompt = input, completion = target (public benchmark files)
``instruction``, ``output`` (+ ``input``)     prompt = instruction, plus a blank line and input when input is
                                              not empty (Alpaca), completion = output
``question``, ``answer``                      prompt = question, completion = answer
``prompt``, ``response``                      prompt = prompt, completion = response
===========================================  ==============================================================

Anything else is described by a ``columns`` mapping (the ``columns:`` key of a config): lorakit's key → the file's
column, e.g. ``{"prompt": "query", "completion": "label"}``. Numbers in these columns (a ``target`` of ``4``) are
read as their text (``"4"``). A row that already has lorakit's keys is left as it is.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["ALIASES", "COLUMN_KEYS", "check_columns", "to_standard"]

# layout name -> (required keys, optional keys); checked in this order.
ALIASES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "instruction/input/output": (("instruction", "output"), ("input",)),
    "input/target": (("input", "target"), ()),
    "question/answer": (("question", "answer"), ()),
    "prompt/response": (("prompt", "response"), ()),
}

COLUMN_KEYS = ("prompt", "completion", "messages", "text", "chosen", "rejected")
"""lorakit's keys a ``columns`` mapping may fill."""

_OWN = (("prompt", "chosen", "rejected"), ("prompt", "completion"), ("messages",), ("text",))


def check_columns(columns: Any) -> dict[str, str]:
    """``columns`` as a ``{lorakit key: file column}`` dict of strings, or a ``ValueError`` naming the fix."""
    if not isinstance(columns, Mapping) or not columns:
        raise ValueError(f"columns={columns!r}: expected a mapping of lorakit's keys to your file's columns, "
                         "e.g. {prompt: question_text, completion: label}")
    out = {}
    for key, source in columns.items():
        if key not in COLUMN_KEYS:
            raise ValueError(f"columns: {key!r} is not one of lorakit's keys {list(COLUMN_KEYS)}; write "
                             "lorakit_key: your_column")
        if not isinstance(source, str) or not source:
            raise ValueError(f"columns: {key}={source!r}: expected the name of a column of your file")
        out[key] = source
    return out


def _text(value: Any, key: str) -> Any:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if value is None:
        raise ValueError(f"{key!r} is empty (null)")
    return value


def to_standard(row: Any, columns: Mapping[str, str] | None = None) -> Any:
    """``row`` in one of lorakit's formats: picked out by ``columns``, or mapped from a known layout.

    Rows that are not dicts, already use lorakit's keys, or match no layout are returned unchanged, so that
    ``lorakit.data.detect_format`` reports what is wrong with them.

    Raises:
        ValueError: ``columns`` names a column the row lacks, or a layout's value is null.
    """
    if not isinstance(row, dict):
        return row
    if columns:
        missing = [source for source in columns.values() if source not in row]
        if missing:
            raise ValueError(f"row has no column {missing[0]!r} (named in columns:); its keys are {sorted(row)}")
        return {key: _text(row[source], source) for key, source in columns.items()}
    if any(all(k in row for k in keys) for keys in _OWN):
        return row
    for name, (required, optional) in ALIASES.items():
        if all(k in row for k in required):
            values = {k: _text(row[k], k) for k in (*required, *(o for o in optional if o in row))}
            if name == "instruction/input/output":
                extra = values.get("input") or ""
                if not isinstance(extra, str):
                    raise ValueError(f"'input' must be a string, got {type(extra).__name__}")
                prompt = values["instruction"] + (f"\n\n{extra}" if isinstance(values["instruction"], str)
                                                  and extra.strip() else "")
                return {"prompt": prompt, "completion": values["output"]}
            return {"prompt": values[required[0]], "completion": values[required[1]]}
    return row
