"""Registry of built-in tasks, deterministic train/held-out splits, and exact-match scoring.

Row convention (the one every task uses): conversational prompt/completion, which
``lorakit.data.SFTDataset`` renders with the tokenizer's chat template and trains on the assistant
turn only::

    {"prompt": [{"role": "user", "content": "<instruction>\\n<input>"}],
     "completion": [{"role": "assistant", "content": "<answer>"}]}

At evaluation, generate from ``lorakit.data.encode_prompt(row["prompt"], tokenizer)`` and compare
the decoded text with ``row_answer(row)`` using ``task.score``.
"""

from __future__ import annotations

import difflib
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lorakit.tasks import dates, extract, reverse

__all__ = ["TASKS", "Task", "get_task", "list_tasks", "make_split", "row_answer", "score_exact"]


def score_exact(prediction: str, target: str) -> bool:
    """Exact match after stripping surrounding whitespace.

    When ``target`` is a JSON object or array, both sides are parsed and compared as objects
    (so spacing and key order do not matter); a prediction that does not parse scores False.
    """
    prediction, target = prediction.strip(), target.strip()
    if target[:1] in ("{", "["):
        try:
            return json.loads(prediction) == json.loads(target)
        except json.JSONDecodeError:
            return False
    return prediction == target


@dataclass(frozen=True)
class Task:
    """A built-in task.

    Attributes:
        name: registry key.
        description: one line for ``--help`` / listings.
        generate: draws one ``(prompt_text, answer)`` from a ``random.Random``; deterministic given
            the generator state.
        score: ``score(prediction, target) -> bool``.
    """

    name: str
    description: str
    generate: Callable[[random.Random], tuple[str, str]]
    score: Callable[[str, str], bool] = score_exact

    def row(self, prompt: str, answer: str) -> dict[str, Any]:
        """Wrap a ``(prompt, answer)`` pair in the row convention of this module."""
        return {
            "prompt": [{"role": "user", "content": prompt}],
            "completion": [{"role": "assistant", "content": answer}],
        }


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("dates", "normalise dates written in many styles to ISO YYYY-MM-DD", dates.generate),
        Task("extract", "extract person/order fields from a sentence into compact JSON", extract.generate),
        Task("reverse", "reverse the order of 3-6 words", reverse.generate),
    )
}


def list_tasks() -> list[str]:
    """Names of the built-in tasks, sorted."""
    return sorted(TASKS)


def get_task(name: str) -> Task:
    """Look up a task by name.

    Raises:
        ValueError: unknown name; the message suggests the closest known name.
    """
    if name in TASKS:
        return TASKS[name]
    close = difflib.get_close_matches(name, TASKS, n=1, cutoff=0.4)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ValueError(f"unknown task {name!r}; {hint}known tasks: {', '.join(list_tasks())}")


def row_answer(row: dict[str, Any]) -> str:
    """The reference answer of a row: its completion text, or the content of its last completion message."""
    completion = row["completion"]
    return completion if isinstance(completion, str) else completion[-1]["content"]


def _draw(task: Task, stream: str, n: int, taken: set[str]) -> list[dict[str, Any]]:
    """Draw ``n`` rows whose prompt and answer are not in ``taken`` (which is updated)."""
    rng = random.Random(stream)  # str seeds are hashed deterministically (not by PYTHONHASHSEED)
    rows = []
    attempts = 0
    while len(rows) < n:
        attempts += 1
        if attempts > 100 * n + 1000:
            raise ValueError(f"task {task.name!r} could not produce {n} distinct examples; ask for fewer")
        prompt, answer = task.generate(rng)
        if prompt in taken or answer in taken:
            continue
        taken.update((prompt, answer))
        rows.append(task.row(prompt, answer))
    return rows


def make_split(task: str | Task, n_train: int, n_eval: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Deterministic ``(train_rows, eval_rows)`` for a task.

    No prompt and no answer occurs twice across both lists, so the held-out set measures
    generalisation. The eval rows depend only on ``(task, n_eval, seed)``, so changing ``n_train``
    keeps the same held-out set. Rows follow the convention in the module docstring.

    Raises:
        ValueError: unknown task name, negative counts, or more examples than the task can make.
    """
    task = get_task(task) if isinstance(task, str) else task
    if n_train < 0 or n_eval < 0:
        raise ValueError(f"n_train and n_eval must be >= 0, got {n_train} and {n_eval}")
    taken: set[str] = set()
    eval_rows = _draw(task, f"{task.name}:{seed}:eval", n_eval, taken)
    train_rows = _draw(task, f"{task.name}:{seed}:train", n_train, taken)
    return train_rows, eval_rows
