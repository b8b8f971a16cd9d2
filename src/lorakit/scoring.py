"""Score a model on your own rows: greedy answers, a metric, the per-row predictions and the failures.

``lorakit train`` (on a validation set, at ``eval_every`` and at the end) and ``lorakit eval --data`` both call
:func:`score_rows` with the same generation settings (:data:`GENERATION`), so the score printed while training is
the score ``lorakit eval`` gives for the saved adapter on the same rows.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["GENERATION", "RunScorer", "Scored", "format_failures", "scorable_rows", "score_rows", "write_predictions"]

GENERATION = {"batch_size": 32, "max_new_tokens": 32}
"""Greedy generation settings shared by training-time scoring and ``lorakit eval``."""


@dataclass
class Scored:
    """The score of a set of rows and what was predicted for each.

    Attributes:
        score: fraction of rows the metric accepted.
        predictions: per row ``{"prompt", "target", "prediction", "correct"}`` (``where`` too for file rows).
    """

    score: float
    predictions: list[dict[str, Any]] = field(default_factory=list)

    @property
    def n_correct(self) -> int:
        return sum(p["correct"] for p in self.predictions)


def scorable_rows(rows: Sequence[dict]) -> list[dict]:
    """The rows that have an answer to compare with: prompt/completion rows, and message rows ending with an
    assistant turn (the earlier turns are the prompt). Text rows have none and are left out."""
    out = []
    for row in rows:
        if "prompt" in row and "completion" in row:
            out.append(row)
        elif "messages" in row and len(row["messages"]) > 1 and row["messages"][-1]["role"] == "assistant":
            scored = {"prompt": row["messages"][:-1], "completion": row["messages"][-1:]}
            if hasattr(row, "where"):
                scored = type(row)(scored)
                scored.where = row.where
            out.append(scored)
    return out


def score_rows(model: Any, tokenizer: Any, rows: Sequence[dict], metric: Callable[[str, str], Any], *,
               batch_size: int = GENERATION["batch_size"], max_new_tokens: int = GENERATION["max_new_tokens"],
               progress: bool = False, desc: str = "score") -> Scored:
    """Greedy answers to ``rows``' prompts (as rendered already: text raw, messages with the chat template),
    scored by ``metric(prediction, target)`` against each row's completion.

    Raises:
        ValueError: no row has an answer (see :func:`scorable_rows`).
    """
    from .evaluate import generate_answers
    from .tasks import row_answer

    rows = scorable_rows(rows)
    if not rows:
        raise ValueError("no row has an answer to score (text rows, or conversations not ending with an assistant "
                         "turn); use prompt/completion rows")
    answers = generate_answers(model, tokenizer, [r["prompt"] for r in rows], batch_size=batch_size,
                               max_new_tokens=max_new_tokens, progress=progress, desc=desc)
    predictions = []
    for row, answer in zip(rows, answers):
        target = row_answer(row)
        entry = {"prompt": row["prompt"], "target": target, "prediction": answer, "correct": bool(metric(answer, target))}
        if getattr(row, "where", ""):
            entry["where"] = row.where
        predictions.append(entry)
    return Scored(sum(p["correct"] for p in predictions) / len(predictions), predictions)


def write_predictions(path: str | Path, scored: Scored) -> Path:
    """One JSON object per row (prompt, target, prediction, correct), written whole or not at all."""
    from .atomic import atomic_write_text

    text = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in scored.predictions)
    return atomic_write_text(Path(path), text)


def _short(value: Any, width: int = 70) -> str:
    text = value if isinstance(value, str) else value[-1]["content"]
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def format_failures(scored: Scored, limit: int = 3) -> str:
    """A few rows the model got wrong: where, prompt, expected and predicted answer ('' when none failed)."""
    failed = [p for p in scored.predictions if not p["correct"]]
    if not failed:
        return ""
    lines = [f"{len(failed)} wrong; the first {min(limit, len(failed))}:"]
    for p in failed[:limit]:
        lines.append(f"  {p.get('where', '')}".rstrip())
        lines.append(f"    prompt     {_short(p['prompt'])}")
        lines.append(f"    expected   {_short(p['target'])}")
        lines.append(f"    predicted  {_short(p['prediction'])}")
    return "\n".join(lines)


class RunScorer:
    """The validation score of a training run, and where its metrics rows go besides ``metrics.jsonl``.

    The loop calls :meth:`base` before the adapter is added, :meth:`at_step` at each evaluation (it adds ``score``
    to the metrics row), :meth:`log` for every metrics row it writes, :meth:`final` after training, and
    :meth:`close`. Scores use :func:`score_rows` with :data:`GENERATION`, as ``lorakit eval`` does.

    Args:
        rows: the validation rows (only those with an answer are scored: :func:`scorable_rows`).
        metric: ``score(prediction, target) -> bool``; None: no score.
        report_to: ``none`` / ``tensorboard`` (``lorakit.reporting``), under ``output_dir``.
        progress: show a bar while generating.
    """

    def __init__(self, rows: Sequence[dict], metric: Callable[[str, str], Any] | None, output_dir: str | Path,
                 report_to: Any = "none", progress: bool = False) -> None:
        from .reporting import open_reporters

        self.rows = scorable_rows(rows) if metric is not None else []
        self.metric = metric
        self.progress = progress
        self.reporters = open_reporters(report_to, output_dir)
        self.last: tuple[int, float] | None = None

    def _score(self, model: Any, tokenizer: Any, desc: str) -> float:
        return score_rows(model, tokenizer, self.rows, self.metric, progress=self.progress, desc=desc).score

    def base(self, model: Any, tokenizer: Any, metrics: Any = None) -> float | None:
        """The base model's score (logged at step 0), or None without rows to score."""
        if not self.rows:
            return None
        value = self._score(model, tokenizer, "base score")
        if metrics is not None:
            metrics.write(step=0, score=value)
        self.reporters.log({"step": 0, "score": value})
        return value

    def at_step(self, model: Any, tokenizer: Any, row: dict[str, Any]) -> None:
        """Add ``score`` to the metrics ``row`` of an evaluation step."""
        if self.rows:
            row["score"] = self._score(model, tokenizer, "score")
            self.last = (row["step"], row["score"])

    def log(self, row: dict[str, Any]) -> None:
        self.reporters.log(row)

    def final(self, model: Any, tokenizer: Any, step: int, metrics: Any = None) -> float | None:
        """The tuned score after training: the evaluation's at this very step, else measured now (and logged)."""
        if not self.rows:
            return None
        if self.last is not None and self.last[0] == step:
            return self.last[1]
        value = self._score(model, tokenizer, "tuned score")
        if metrics is not None:
            metrics.write(step=step, score=value)
        self.reporters.log({"step": step, "score": value})
        self.last = (step, value)
        return value

    def close(self) -> None:
        self.reporters.close()
