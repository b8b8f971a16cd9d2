"""Everything a training run does with its data before the model loads: read and check the files, hold out a
validation set, pick the prompt format and the metric, and say what was done.

``prepare_sft_data(args)`` takes ``SFTArgs`` (or anything with the same attributes) and returns
:class:`PreparedData`. With ``train_file`` and neither ``val_file`` nor ``val_fraction``, a small share of the rows
is held out (:data:`DEFAULT_VAL_SHARE` of them, at most :data:`DEFAULT_VAL_MAX`; none below
:data:`DEFAULT_VAL_MIN_ROWS` rows), and the log line says so; ``val_fraction: 0`` turns it off.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .io import load_rows, train_val_split
from .prompt_format import PromptFormat, apply_prompt_format, choose_prompt_format

__all__ = ["DEFAULT_VAL_MAX", "DEFAULT_VAL_MIN_ROWS", "DEFAULT_VAL_SHARE", "PreparedData", "SFT_FORMATS",
           "describe_skipped", "prepare_sft_data"]

SFT_FORMATS = ("prompt_completion", "messages", "text")
DEFAULT_VAL_SHARE = 0.1
DEFAULT_VAL_MAX = 200
DEFAULT_VAL_MIN_ROWS = 20


@dataclass
class PreparedData:
    """A run's rows, ready to tokenize.

    Attributes:
        train_rows, val_rows: rows in the prompt format (file rows keep their file and line).
        prompt_format: how prompts are rendered; recorded in the adapter directory.
        metric: ``score(prediction, target) -> bool`` for the validation score.
        metric_name: what ``metric`` is called (``exact``, ``contains``, ``module:function``, ...).
        task: the built-in task, or None for a file.
        notes: lines for the log (held-out share, skipped rows, prompt format).
    """

    train_rows: list[dict[str, Any]]
    val_rows: list[dict[str, Any]]
    prompt_format: PromptFormat
    metric: Callable[[str, str], bool]
    metric_name: str
    task: Any = None
    notes: list[str] = field(default_factory=list)


def describe_skipped(what: str, skipped: Sequence[str], limit: int = 3) -> str:
    """``"skipped 4 rows of data.jsonl (skip_bad_rows): data.jsonl line 3: ...; ..."`` ('' when none)."""
    if not skipped:
        return ""
    shown = "; ".join(skipped[:limit]) + ("; ..." if len(skipped) > limit else "")
    return f"skipped {len(skipped)} row{'s' * (len(skipped) != 1)} of {what} (skip_bad_rows): {shown}"


def _metric(args: Any, task: Any) -> tuple[Callable[[str, str], bool], str]:
    from ..tasks import get_metric

    name = getattr(args, "metric", "exact") or "exact"
    if task is not None and name == "exact":
        return task.score, "exact"
    return get_metric(name), name


def prepare_sft_data(args: Any, log: Callable[[str], None] | None = print) -> PreparedData:
    """Read, check and split the data ``args`` names; no model or tokenizer needed.

    Raises:
        ValueError: any data error (naming file and line), a bad ``columns`` / ``prompt_format`` / ``metric``, or
            a validation file whose row format differs from the training file's.
    """
    from ..tasks import get_task, make_split

    notes: list[str] = []
    if not args.train_file:
        task = get_task(args.task)
        train, val = make_split(task, args.n_train, args.n_eval, seed=args.seed)
        fmt = choose_prompt_format(train, getattr(args, "prompt_format", "auto") or "auto",
                                   getattr(args, "system_prompt", None))
        metric, name = _metric(args, task)
        prepared = PreparedData(apply_prompt_format(train, fmt), apply_prompt_format(val, fmt), fmt, metric, name,
                                task, notes)
        return prepared
    columns = getattr(args, "columns", None)
    loaded = load_rows(args.train_file, skip_bad=args.skip_bad_rows, formats=SFT_FORMATS, columns=columns)
    notes.append(describe_skipped(str(args.train_file), loaded.skipped))
    if not loaded.rows:
        raise ValueError(f"{args.train_file}: no training rows" + (" left after skipping bad ones"
                                                                  if loaded.skipped else ""))
    fraction = getattr(args, "val_fraction", None)
    if args.val_file:
        val_loaded = load_rows(args.val_file, skip_bad=args.skip_bad_rows, formats=SFT_FORMATS, columns=columns)
        notes.append(describe_skipped(str(args.val_file), val_loaded.skipped))
        if val_loaded.format and loaded.format and val_loaded.format != loaded.format:
            raise ValueError(f"{args.val_file} has {val_loaded.format} rows but {args.train_file} has "
                             f"{loaded.format} rows; use one layout for both")
        train, val = loaded.rows, val_loaded.rows
        notes.append(f"validation: {len(val)} rows of {args.val_file}")
    elif fraction is None:
        n = len(loaded.rows)
        n_val = min(DEFAULT_VAL_MAX, max(1, round(DEFAULT_VAL_SHARE * n))) if n >= DEFAULT_VAL_MIN_ROWS else 0
        train, val = train_val_split(loaded.rows, n_val / n, seed=args.seed) if n_val else (loaded.rows, [])
        notes.append(f"validation: {n_val} of {n} rows of {args.train_file} held out (val_fraction not set: "
                     f"{DEFAULT_VAL_SHARE:.0%}, at most {DEFAULT_VAL_MAX}; val_fraction: 0 trains on every row)"
                     if n_val else
                     f"validation: none ({args.train_file} has {n} rows, fewer than {DEFAULT_VAL_MIN_ROWS}; "
                     "set val_file or val_fraction to score the run)")
    else:
        train, val = train_val_split(loaded.rows, fraction, seed=args.seed)
        notes.append(f"validation: {len(val)} of {len(loaded.rows)} rows of {args.train_file} held out "
                     f"(val_fraction {fraction:g})" if val else "validation: none (val_fraction: 0)")
    fmt = choose_prompt_format(list(train) + list(val), getattr(args, "prompt_format", "auto") or "auto",
                               getattr(args, "system_prompt", None))
    notes.append(f"prompts: {fmt.describe()}")
    metric, name = _metric(args, None)
    prepared = PreparedData(apply_prompt_format(train, fmt), apply_prompt_format(val, fmt), fmt, metric, name, None,
                            [n for n in notes if n])
    if log is not None:
        for line in prepared.notes:
            log(line)
    return prepared
