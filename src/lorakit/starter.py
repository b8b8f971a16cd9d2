"""The ready configs that ship inside the package, and a starter config written for your own data file.

``lorakit train sft_lora`` finds ``sft_lora.yaml`` among the package's configs (``lorakit/configs/``, installed
with the wheel), so it works outside a clone; a path to a file always wins. ``lorakit init data.jsonl`` reads and
checks the data first, then writes a copy of ``sft_lora.yaml`` (or ``sft_qlora.yaml``) whose data keys point at
the file, with every other key and its comment as shipped.
"""

from __future__ import annotations

import difflib
import errno
import re
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = ["builtin_configs", "resolve_config", "starter_config", "write_starter_config"]


def _config_dir() -> Any:
    return resources.files("lorakit") / "configs"


def builtin_configs() -> list[str]:
    """Names of the configs shipped with the package (``sft_lora``, ``sft_qlora``, ...), sorted."""
    return sorted(p.name[:-5] for p in _config_dir().iterdir() if p.name.endswith(".yaml"))


def resolve_config(name_or_path: str | Path) -> Path:
    """A config file: ``name_or_path`` itself when it exists, else the built-in config of that name
    (``sft_lora`` or ``sft_lora.yaml``).

    Raises:
        FileNotFoundError: neither; the message lists the built-in names and the closest one.
    """
    path = Path(name_or_path)
    if path.is_file():
        return path
    name = path.name[:-5] if path.name.endswith(".yaml") else path.name
    builtins = builtin_configs()
    if name in builtins and len(path.parts) == 1:
        return Path(str(_config_dir() / f"{name}.yaml"))
    close = difflib.get_close_matches(name, builtins, n=1, cutoff=0.5)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise FileNotFoundError(errno.ENOENT, f"no such file or directory, nor a built-in config ({hint}built-in: "
                            f"{', '.join(builtins)})", str(name_or_path))


def _set(text: str, key: str, value: str, comment: str | None = None) -> str:
    """Replace ``key``'s value on its ``key: value   # comment`` line, keeping the comment column."""
    pattern = re.compile(rf"^{re.escape(key)}:[^#\n]*(#.*)?$", re.M)
    match = pattern.search(text)
    if match is None:
        raise ValueError(f"the template config has no key {key!r}")
    note = comment if comment is not None else (match.group(1) or "").lstrip("# ")
    head = f"{key}: {value}"
    line = f"{head.ljust(30)} # {note}" if note else head
    return text[: match.start()] + line + text[match.end():]


def _yaml_str(value: str) -> str:
    import yaml

    return yaml.safe_dump(value, default_style=None, width=10_000).strip().removesuffix("\n...")


def starter_config(data_file: str | Path, *, method: str = "lora", model: str | None = None) -> str:
    """The text of a starter config for ``data_file``: the shipped ``sft_<method>.yaml`` with ``train_file`` set,
    ``task`` null and ``output_dir`` ``runs/<file stem>``, under a header that says what was found in the file.

    Raises:
        ValueError: the data file has no usable rows (the message names file and line), or an unknown method.
        FileNotFoundError: no such data file.
    """
    from .data import load_rows
    from .data.prompt_format import choose_prompt_format

    if method not in ("lora", "qlora"):
        raise ValueError(f"method={method!r}: use lora or qlora")
    loaded = load_rows(data_file, formats=("prompt_completion", "messages", "text"))
    if not loaded.rows:
        raise ValueError(f"{data_file}: no rows")
    fmt = choose_prompt_format(loaded.rows)
    text = Path(str(_config_dir() / f"sft_{method}.yaml")).read_text(encoding="utf-8")
    body = text[text.index("\n# ---"):] if "\n# ---" in text else text
    header = (f"# Starter config for {data_file}: {len(loaded.rows)} {loaded.format} rows, prompts as "
              f"{fmt.describe()}.\n# Written by `lorakit init`. Run: lorakit train <this file> [--set key=value ...]"
              ". Every key is a field of\n# lorakit.train.SFTArgs; a validation share of the rows is held out and "
              "scored before, during (eval_every)\n# and after training.\n\n")
    body = _set(body, "task", "null", "built-in task: not used, train_file is set")
    body = _set(body, "train_file", _yaml_str(str(data_file)))
    body = _set(body, "output_dir", _yaml_str(f"runs/{Path(data_file).stem}"))
    if model is not None:
        body = _set(body, "model", _yaml_str(model))
    return header + body.lstrip("\n")


def write_starter_config(data_file: str | Path, output: str | Path, *, method: str = "lora",
                         model: str | None = None, force: bool = False) -> Path:
    """Write :func:`starter_config` to ``output`` (whole or not at all).

    Raises:
        FileExistsError: ``output`` exists and ``force`` is false.
    """
    from .atomic import atomic_write_text

    output = Path(output)
    if output.exists() and not force:
        raise FileExistsError(errno.EEXIST, "already exists; pass --force to replace it or choose another --output",
                              str(output))
    return atomic_write_text(output, starter_config(data_file, method=method, model=model))
