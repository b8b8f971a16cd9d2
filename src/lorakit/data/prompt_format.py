"""One prompt format per adapter: how its rows were rendered (chat template or raw text, system prompt), recorded
in the adapter directory so that ``lorakit eval``, ``generate`` and ``chat`` prompt it the same way.

The rule: rows whose prompt is text are trained as raw text (no chat template); rows whose prompt is a list of
messages are rendered with the tokenizer's chat template. ``prompt_format: chat`` in a config wraps text prompts
in a user message (after ``system_prompt``, when one is set) so that they go through the template too.

The record is ``lorakit_prompt.json`` next to ``adapter_config.json``: ``{"format": "chat" | "raw", "system":
str | null}``. PEFT and other readers ignore it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["PROMPT_FORMAT_FILE", "PROMPT_FORMATS", "PromptFormat", "apply_prompt_format", "choose_prompt_format",
           "load_prompt_format", "render_prompt", "save_prompt_format"]

PROMPT_FORMAT_FILE = "lorakit_prompt.json"
PROMPT_FORMATS = ("auto", "chat", "raw")
"""Values of the ``prompt_format`` config key: ``auto`` follows the rows (text prompt → raw, messages → chat)."""


@dataclass(frozen=True)
class PromptFormat:
    """How prompts are rendered: ``format`` is ``"chat"`` (chat template) or ``"raw"`` (text as is);
    ``system`` is the system message a chat prompt starts with (None: none added)."""

    format: str
    system: str | None = None

    def __post_init__(self) -> None:
        if self.format not in ("chat", "raw"):
            raise ValueError(f"prompt format {self.format!r}: use 'chat' or 'raw'")
        if self.system is not None and self.format == "raw":
            raise ValueError("a system prompt needs the chat format (prompt_format: chat); raw prompts have no "
                             "system message")

    def describe(self) -> str:
        if self.format == "raw":
            return "raw text (no chat template)"
        return "chat template" + (f", system prompt {self.system!r:.60}" if self.system else "")


def _prompt_kinds(rows: Sequence[dict]) -> set[str]:
    kinds = set()
    for row in rows:
        if "messages" in row:
            kinds.add("chat")
        elif "prompt" in row:
            kinds.add("raw" if isinstance(row["prompt"], str) else "chat")
        else:
            kinds.add("raw")  # text rows
    return kinds


def choose_prompt_format(rows: Sequence[dict], requested: str = "auto", system: str | None = None) -> PromptFormat:
    """The format for ``rows``: ``requested`` (``auto``, ``chat``, ``raw``). ``auto`` follows the rows (text
    prompts → raw, messages → chat), or is chat when a ``system`` prompt is given.

    Raises:
        ValueError: an unknown ``requested``; ``auto`` on rows mixing text and message prompts; ``raw`` for rows of
            messages or with a ``system`` prompt.
    """
    if requested not in PROMPT_FORMATS:
        raise ValueError(f"prompt_format={requested!r}: use one of {list(PROMPT_FORMATS)}")
    kinds = _prompt_kinds(rows)
    if requested == "raw" and "chat" in kinds:
        raise ValueError("prompt_format: raw, but rows hold chat messages; use prompt_format: chat (or auto)")
    if requested == "raw" and system is not None:
        raise ValueError("system_prompt needs the chat template; remove it or use prompt_format: chat")
    if requested == "auto":
        if len(kinds) > 1:
            raise ValueError("rows mix text prompts (raw) and message prompts (chat template); set prompt_format: "
                             "chat to render them all with the chat template")
        requested = "chat" if (kinds == {"chat"} or system is not None) else "raw"  # a system prompt means chat
    return PromptFormat(requested, system if requested == "chat" else None)


def _with_system(messages: list[dict], system: str | None) -> list[dict]:
    if system is None or (messages and messages[0].get("role") == "system"):
        return list(messages)
    return [{"role": "system", "content": system}, *messages]


def render_prompt(prompt: str | list[dict], fmt: PromptFormat) -> str | list[dict]:
    """A prompt (text or messages) as ``fmt`` renders it: the value ``lorakit.data.encode_prompt`` takes."""
    if fmt.format == "raw":
        if not isinstance(prompt, str):
            raise ValueError("this adapter was trained on raw text prompts, but the prompt is a list of messages; "
                             "pass --chat to use the chat template")
        return prompt
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    return _with_system(prompt, fmt.system)


def apply_prompt_format(rows: Sequence[dict], fmt: PromptFormat) -> list[dict]:
    """Rows rendered as ``fmt`` says: chat wraps text prompts in a user message and adds the system prompt;
    raw leaves text prompts as they are. Rows keep their type (a ``Row`` keeps its file and line)."""
    out = []
    for row in rows:
        if fmt.format == "chat" and ("prompt" in row or "messages" in row):
            new = row.copy()  # dict.copy keeps neither subclass nor attributes; restored below
            if "messages" in row:
                new["messages"] = _with_system(row["messages"], fmt.system)
            else:
                new["prompt"] = render_prompt(row["prompt"], fmt)
            if hasattr(row, "where"):
                new = type(row)(new)
                new.where = row.where
            row = new
        out.append(row)
    return out


def save_prompt_format(directory: str | Path, fmt: PromptFormat) -> Path:
    """Write ``lorakit_prompt.json`` into an adapter (or model) directory, atomically."""
    from ..atomic import atomic_write_text

    return atomic_write_text(Path(directory) / PROMPT_FORMAT_FILE,
                             json.dumps({"format": fmt.format, "system": fmt.system}, indent=2) + "\n")


def load_prompt_format(directory: str | Path) -> PromptFormat | None:
    """The format recorded in ``directory`` (None when there is no record, e.g. a PEFT-saved adapter).

    Raises:
        ValueError: the record exists but is not what :func:`save_prompt_format` writes (names the file).
    """
    path = Path(directory) / PROMPT_FORMAT_FILE
    if not path.is_file():
        return None
    try:
        data: Any = json.loads(path.read_text(encoding="utf-8"))
        return PromptFormat(data["format"], data.get("system"))
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a lorakit prompt-format record ({err}); delete it or write "
                         '{"format": "chat" or "raw", "system": null}') from None
