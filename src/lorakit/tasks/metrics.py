"""Scoring a generated answer against the reference: built-in metrics and a user's own ``module:function``.

A metric is ``score(prediction: str, target: str) -> bool``; the score of a set of rows is the fraction of rows
scored true. Built in:

- ``exact`` (default): equal after stripping surrounding whitespace; a JSON object/array target is compared as
  parsed JSON (``lorakit.tasks.score_exact``).
- ``contains``: the stripped target occurs in the prediction.
- ``normalized``: equal after lower-casing, removing punctuation and collapsing whitespace.
- ``package.module:function``: imported by name when the config or command line names it (the current directory
  is searched too, so a ``my_metric.py`` next to the data works). Nothing named inside a data or adapter file is
  ever imported.
"""

from __future__ import annotations

import importlib
import os
import re
import string
import sys
from collections.abc import Callable

from .registry import score_exact

__all__ = ["METRICS", "get_metric", "score_contains", "score_normalized"]

_PUNCT = str.maketrans("", "", string.punctuation)


def score_contains(prediction: str, target: str) -> bool:
    """The stripped target occurs in the prediction (an empty target never counts)."""
    target = target.strip()
    return bool(target) and target in prediction


def _normalize(text: str) -> str:
    return " ".join(text.lower().translate(_PUNCT).split())


def score_normalized(prediction: str, target: str) -> bool:
    """Equal after lower-casing, removing ASCII punctuation and collapsing whitespace."""
    return _normalize(prediction) == _normalize(target)


METRICS: dict[str, Callable[[str, str], bool]] = {
    "exact": score_exact,
    "contains": score_contains,
    "normalized": score_normalized,
}

_DOTTED = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def get_metric(name: str) -> Callable[[str, str], bool]:
    """The metric called ``name``: a key of ``METRICS`` or ``module:function``.

    Raises:
        ValueError: an unknown name, a module that does not import, or a name that is not callable; the message
            says which and what to write.
    """
    if not isinstance(name, str):
        raise ValueError(f"metric={name!r}: expected a name such as 'exact' or 'my_module:my_function'")
    if name in METRICS:
        return METRICS[name]
    if not _DOTTED.match(name):
        raise ValueError(f"metric={name!r}: use one of {sorted(METRICS)} or 'module:function' (a Python function "
                         "score(prediction, target) -> bool)")
    module_name, function_name = name.split(":")
    added = os.getcwd() not in sys.path
    if added:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"metric={name!r}: cannot import module {module_name!r} ({err}); put {module_name}.py in "
                         "the current directory or install it") from None
    finally:
        if added:
            sys.path.remove(os.getcwd())
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ValueError(f"metric={name!r}: module {module_name!r} has no function {function_name!r}")
    return function
