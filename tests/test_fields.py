import math
from typing import Any

import pytest

from lorakit.fields import ConfigError, check_range, coerce


@pytest.mark.parametrize("value, annotation, expected", [
    ("1e-3", float, 1e-3),  # YAML 1.1 reads 1e-3 (no dot) as a string
    (3, float, 3.0),
    ("2", int, 2),
    (2.0, int, 2),
    ("1e3", int, 1000),
    ("true", bool, True),
    ("off", bool, False),
    (None, str | None, None),
    ("dates", str | None, "dates"),
    ("all-linear", list[str] | str | None, "all-linear"),
    (("q_proj", "v_proj"), list[str] | str | None, ["q_proj", "v_proj"]),
    ({"v_proj": "4"}, dict[str, int], {"v_proj": 4}),
    ([1, "x"], Any, [1, "x"]),
])
def test_coerce(value, annotation, expected):
    out = coerce(value, annotation, "field")
    assert out == expected and type(out) is type(expected)


@pytest.mark.parametrize("value, annotation, message", [
    (2.5, int, "r=2.5: expected a whole number (got a fraction; use 2 or 3)"),
    (True, int, "r=True: expected a whole number"),
    (True, float, "r=True: expected a number"),
    ("abc", float, "r='abc': expected a number such as 2e-4"),
    ("maybe", bool, "r='maybe': expected true or false"),
    (None, int, "r=None: expected a whole number"),
    ([1], str | None, "r=[1]: expected a string or null"),
    (["q", 3], list[str] | str | None, "r[1]=3: expected a string"),
    (True, str, "r=True: expected a string (quote it"),
    (42, str, "r=42: expected a string (quote it if you mean the text 42)"),
])
def test_coerce_refuses_naming_the_field(value, annotation, message):
    with pytest.raises(ConfigError) as err:
        coerce(value, annotation, "r")
    assert str(err.value).startswith(message)


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, 0.0, -1.0])
def test_check_range_refuses_non_finite_and_out_of_range(value):
    with pytest.raises(ConfigError, match="lr=.* must be a finite number greater than 0; try 1e-4"):
        check_range("lr", value, low=0, low_open=True, fix="try 1e-4")
    check_range("lr", 1e-4, low=0, low_open=True)
