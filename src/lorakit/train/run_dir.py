"""The output directory of a training run: refused when it belongs to another run, tied to its run by an id.

``output_dir/run.json`` holds the id of the run that owns the directory; every checkpoint the run writes carries the
same id, so a resumed run continues its own checkpoints and never another run's. A fresh run needs an empty (or
absent) directory, or ``overwrite: true``, which removes the previous run's outputs (only lorakit's own names);
``resume: true`` continues the run ``run.json`` names.
"""

from __future__ import annotations

import json
import secrets
import shutil
import time
from pathlib import Path

from ..atomic import atomic_write_text, discard, remove_leftovers
from ..fields import ConfigError

__all__ = ["prepare_output_dir", "read_run_id", "remove_run_outputs", "RUN_FILE", "OUTPUT_NAMES"]

RUN_FILE = "run.json"
#: What a training run writes into ``output_dir`` (besides ``checkpoint-<step>/``); ``overwrite`` removes these.
OUTPUT_NAMES = ("adapter", "model", "best", "metrics.jsonl", "loss.png", "summary.json", "tensorboard", RUN_FILE)
_OLD_TEMP_PREFIX = ".checkpoint-"  # what lorakit before run ids named its checkpoint temp dirs


def _visible(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if not p.name.startswith("."))


def _is_output(name: str) -> bool:
    return name in OUTPUT_NAMES or name.startswith("checkpoint-")


def read_run_id(out: Path) -> str | None:
    """The id in ``out/run.json`` (None when there is no such file).

    Raises:
        ConfigError: ``run.json`` exists but is not what lorakit writes (the message names the file).
    """
    path = out / RUN_FILE
    if not path.exists():
        return None
    try:
        run_id = json.loads(path.read_text(encoding="utf-8"))["run_id"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{path}: not a lorakit run file ({type(err).__name__}: {err}); set overwrite: true to "
                          f"start a new run in {out}, or choose another output_dir") from None
    if not isinstance(run_id, str) or not run_id:
        raise ConfigError(f"{path}: run_id={run_id!r} is not a run id; set overwrite: true to start a new run")
    return run_id


def remove_run_outputs(out: Path) -> list[str]:
    """Delete the outputs of a previous run in ``out`` (only :data:`OUTPUT_NAMES` and ``checkpoint-*``); each goes
    to a hidden name first, so a kill in between never leaves half of one under its own name."""
    removed = []
    for name in _visible(out):
        if not _is_output(name):
            continue
        discard(out / name)
        removed.append(name)
    return removed


def prepare_output_dir(output_dir: str | Path, resume: bool, overwrite: bool, *, create: bool = True) -> str:
    """Check ``output_dir`` for a run and return the run's id (a new one for a fresh run, ``run.json``'s on resume).

    Removes leftovers of killed writers (hidden temp directories) first. With ``create`` (the loops) a fresh run's
    directory is created, emptied of the previous run's outputs when ``overwrite``, and its ``run.json`` written;
    without (the recipe's early check, before the model loads) nothing is changed.

    Raises:
        ConfigError: ``output_dir`` is a file; ``resume`` and ``overwrite`` are both set; a fresh run in a non-empty
            directory without ``overwrite``; ``resume`` in a directory that holds outputs but no run of this
            lorakit to continue.
    """
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir={str(output_dir)!r} is a file; name a directory (it is created if missing)")
    if resume and overwrite:
        raise ConfigError("resume: true and overwrite: true contradict each other; set one")
    run_id = read_run_id(out) if out.is_dir() else None
    used = _visible(out) if out.is_dir() else []
    if resume and run_id is not None:
        if create:
            _remove_leftovers(out)
        return run_id
    if resume and any(_is_output(n) for n in used):
        old = [n for n in used if n.startswith("checkpoint-")]
        what = (f"{old[-1]} has no run id (written by an older lorakit, or copied here)" if old
                else "it holds no checkpoint to continue (set save_every to write checkpoints)")
        raise ConfigError(f"resume: true but {out} cannot be resumed: {what}; set overwrite: true to start again "
                          f"there, or choose another output_dir")
    if used and not resume and not overwrite:
        shown = ", ".join(used[:4]) + (", ..." if len(used) > 4 else "")
        raise ConfigError(f"output_dir {out} is not empty ({shown}); set resume: true to continue its run, "
                          f"overwrite: true to replace it, or choose another output_dir")
    if not create:
        return ""
    out.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(out)
    if overwrite:
        remove_run_outputs(out)
    run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(4)}"
    atomic_write_text(out / RUN_FILE, json.dumps({"run_id": run_id}) + "\n")
    return run_id


def _remove_leftovers(out: Path) -> None:
    remove_leftovers(out)
    for old in out.glob(f"{_OLD_TEMP_PREFIX}*"):  # an older lorakit's temp checkpoints (no pid to check)
        shutil.rmtree(old, ignore_errors=True)
