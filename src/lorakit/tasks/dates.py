"""Date normalisation task: a date written in one of many styles -> ISO ``YYYY-MM-DD``.

Example prompt (the user message)::

    Convert this date to ISO format YYYY-MM-DD. Reply with the date only.
    Date: 05/03/2021 (day/month/year)

Answer: ``2021-03-05``. The slash style states its field order in parentheses after the date.
It is always day first: a month-first variant was tried and a 135M model, after 30 LoRA steps,
still mixed the two orders up in about a third of slash dates. Two-digit years (``'21``) always
mean 20xx, so those styles only draw 2000-2039.
"""

from __future__ import annotations

import calendar
import datetime
import random
from collections.abc import Callable

__all__ = ["INSTRUCTION", "STYLES", "format_date", "generate"]

INSTRUCTION = "Convert this date to ISO format YYYY-MM-DD. Reply with the date only."

# Spelled out rather than calendar.month_name, which follows the process locale.
_MONTHS = [
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
]  # fmt: skip
_WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_UNITS = [
    "", "first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth",
    "eleventh", "twelfth", "thirteenth", "fourteenth", "fifteenth", "sixteenth", "seventeenth",
    "eighteenth", "nineteenth", "twentieth",
]  # fmt: skip


def _ordinal_word(day: int) -> str:
    """1 -> "first", 23 -> "twenty-third", 30 -> "thirtieth"."""
    if day <= 20:
        return _UNITS[day]
    if day == 30:
        return "thirtieth"
    tens = "twenty" if day < 30 else "thirty"
    return f"{tens}-{_UNITS[day % 10]}"


def _ordinal_suffix(day: int) -> str:
    """1 -> "1st", 12 -> "12th", 22 -> "22nd"."""
    suffix = "th" if 11 <= day % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


def _mon(d: datetime.date) -> str:
    return _MONTHS[d.month - 1][:3]


def _month(d: datetime.date) -> str:
    return _MONTHS[d.month - 1]


# style name -> (formatter, needs a two-digit-year-safe date)
STYLES: dict[str, tuple[Callable[[datetime.date], str], bool]] = {
    "month_day_year": (lambda d: f"{_month(d)} {d.day}, {d.year}", False),  # March 5, 2021
    "day_mon_year": (lambda d: f"{d.day} {_mon(d)} {d.year}", False),  # 5 Mar 2021
    "day_month_year": (lambda d: f"{d.day} {_month(d)} {d.year}", False),  # 5 March 2021
    "dmy_slash": (lambda d: f"{d.day:02d}/{d.month:02d}/{d.year} (day/month/year)", False),
    "ymd_dots": (lambda d: f"{d.year}.{d.month:02d}.{d.day:02d}", False),  # 2021.03.05
    "ordinal_words": (lambda d: f"the {_ordinal_word(d.day)} of {_month(d)}, {d.year}", False),
    "mon_ordinal_short_year": (lambda d: f"{_mon(d)} {_ordinal_suffix(d.day)} '{d.year % 100:02d}", True),
    "weekday": (lambda d: f"{_WEEKDAYS[d.weekday()]}, {_month(d)} {d.day}, {d.year}", False),
    "month_ordinal_year": (lambda d: f"{_month(d)} {_ordinal_suffix(d.day)}, {d.year}", False),
}


def format_date(d: datetime.date, style: str) -> str:
    """Write ``d`` in ``style`` (a key of ``STYLES``).

    Raises:
        ValueError: unknown style, or a two-digit-year style for a year outside 2000-2099.
    """
    if style not in STYLES:
        raise ValueError(f"unknown date style {style!r}; choose from {sorted(STYLES)}")
    fmt, short_year = STYLES[style]
    if short_year and not 2000 <= d.year <= 2099:
        raise ValueError(f"style {style!r} writes two-digit years, which mean 20xx; got year {d.year}")
    return fmt(d)


def generate(rng: random.Random) -> tuple[str, str]:
    """Draw one example: ``(prompt, answer)``. Consumes a fixed number of draws from ``rng``."""
    style = rng.choice(sorted(STYLES))
    low = 2000 if STYLES[style][1] else 1970
    year = rng.randint(low, 2039)
    month = rng.randint(1, 12)
    day = rng.randint(1, calendar.monthrange(year, month)[1])
    d = datetime.date(year, month, day)
    return f"{INSTRUCTION}\nDate: {format_date(d, style)}", d.isoformat()
