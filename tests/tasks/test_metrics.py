"""lorakit.tasks.metrics: the built-in metrics and a user's module:function."""

import pytest

from lorakit.tasks import get_metric


@pytest.mark.parametrize("name, prediction, target, expected", [
    ("exact", " Paris\n", "Paris", True),
    ("exact", "paris", "Paris", False),
    ("exact", '{"b": 1, "a": 2}', '{"a": 2, "b": 1}', True),
    ("contains", "The answer is Paris.", " Paris ", True),
    ("contains", "Lyon", "Paris", False),
    ("contains", "anything", " ", False),
    ("normalized", "  the ANSWER:   paris!", "The answer paris", True),
    ("normalized", "paris, france", "paris", False),
])
def test_builtin_metrics(name, prediction, target, expected):
    assert get_metric(name)(prediction, target) is expected


def test_user_metric_from_the_current_directory(tmp_path, monkeypatch):
    (tmp_path / "my_metric_mod.py").write_text("def first_word(p, t):\n    return p.split()[:1] == t.split()[:1]\n")
    monkeypatch.chdir(tmp_path)
    score = get_metric("my_metric_mod:first_word")
    assert score("Paris is big", "Paris") and not score("Lyon", "Paris")


@pytest.mark.parametrize("name, fragment", [
    ("exactly", "use one of"),
    ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
    ("json:no_such_function", "has no function 'no_such_function'"),
    ("os; rm:x", "use one of"),
])
def test_bad_metric_names(name, fragment):
    with pytest.raises(ValueError, match=fragment):
        get_metric(name)
