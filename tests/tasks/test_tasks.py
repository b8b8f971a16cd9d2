"""lorakit.tasks: deterministic generators, disjoint splits, correct answers, scoring, registry."""

import datetime
import json
import random
import re

import pytest

from lorakit.tasks import TASKS, get_task, list_tasks, make_split, row_answer, score_exact
from lorakit.tasks import dates, extract, reverse


def prompt_text(row):
    return row["prompt"][0]["content"]


@pytest.mark.parametrize("name", sorted(TASKS))
def test_split_deterministic_and_disjoint(name):
    train, held = make_split(name, n_train=300, n_eval=60, seed=7)
    assert (train, held) == make_split(name, n_train=300, n_eval=60, seed=7)
    assert len(train) == 300 and len(held) == 60
    train_prompts = {prompt_text(r) for r in train}
    held_prompts = {prompt_text(r) for r in held}
    assert len(train_prompts) == 300 and len(held_prompts) == 60
    assert not train_prompts & held_prompts
    assert not {row_answer(r) for r in train} & {row_answer(r) for r in held}
    assert make_split(name, 300, 60, seed=8)[1] != held


@pytest.mark.parametrize("name", sorted(TASKS))
def test_eval_set_does_not_depend_on_n_train(name):
    assert make_split(name, 10, 20, seed=0)[1] == make_split(name, 200, 20, seed=0)[1]


@pytest.mark.parametrize("name", sorted(TASKS))
def test_row_convention(name):
    (row,), _ = make_split(name, 1, 0)
    assert row["prompt"] == [{"role": "user", "content": row["prompt"][0]["content"]}]
    assert row["completion"] == [{"role": "assistant", "content": row_answer(row)}]
    assert "Reply with" in prompt_text(row) and len(row_answer(row)) < 80


def test_date_styles_on_a_known_date():
    d = datetime.date(2021, 3, 5)
    got = {style: dates.format_date(d, style) for style in dates.STYLES}
    assert got["month_day_year"] == "March 5, 2021"
    assert got["day_mon_year"] == "5 Mar 2021"
    assert got["dmy_slash"] == "05/03/2021 (day/month/year)"
    assert got["ymd_dots"] == "2021.03.05"
    assert got["ordinal_words"] == "the fifth of March, 2021"
    assert got["mon_ordinal_short_year"] == "Mar 5th '21"
    assert got["weekday"] == "Friday, March 5, 2021"
    d2 = datetime.date(2023, 11, 22)
    assert dates.format_date(d2, "ordinal_words") == "the twenty-second of November, 2023"
    assert dates.format_date(datetime.date(2011, 1, 13), "month_ordinal_year") == "January 13th, 2011"
    assert dates.format_date(datetime.date(2030, 1, 30), "ordinal_words") == "the thirtieth of January, 2030"
    with pytest.raises(ValueError, match="two-digit years"):
        dates.format_date(datetime.date(1999, 1, 1), "mon_ordinal_short_year")
    with pytest.raises(ValueError, match="unknown date style"):
        dates.format_date(d, "roman")


def test_date_answers_are_iso_and_all_styles_appear():
    rng = random.Random(0)
    seen_styles = set()
    for _ in range(400):
        prompt, answer = dates.generate(rng)
        assert prompt.startswith(dates.INSTRUCTION + "\nDate: ")
        d = datetime.date.fromisoformat(answer)
        shown = prompt.split("Date: ", 1)[1]
        matches = {s for s in dates.STYLES if dates.STYLES[s][1] is False or d.year >= 2000}
        styles = {s for s in matches if dates.format_date(d, s) == shown}
        assert styles, (shown, answer)  # the shown text is that very date in some style ("May" == "May")
        seen_styles |= styles
    assert seen_styles == set(dates.STYLES)


def test_extract_answers_are_compact_json_from_the_text():
    rng = random.Random(1)
    for _ in range(200):
        prompt, answer = extract.generate(rng)
        record = json.loads(answer)
        assert answer == json.dumps(record, separators=(",", ":"))
        keys = extract.PERSON_KEYS if "name" in record else extract.ORDER_KEYS
        assert tuple(record) == keys and f"fields {', '.join(keys)} from" in prompt
        text = prompt.split("Text: ", 1)[1]
        assert all(str(v) in text for v in record.values())


def test_reverse_answers():
    rng = random.Random(2)
    for _ in range(200):
        prompt, answer = reverse.generate(rng)
        words = prompt.split("Words: ", 1)[1].split()
        assert 3 <= len(words) <= 6 and len(set(words)) == len(words)
        assert answer.split() == words[::-1]


def test_score_exact():
    assert score_exact(" 2021-03-05\n", "2021-03-05")
    assert not score_exact("2021-03-5", "2021-03-05")
    assert score_exact('{"age": 3, "name": "A"}', '{"name":"A","age":3}')
    assert not score_exact('{"name":"A","age":"3"}', '{"name":"A","age":3}')
    assert not score_exact('{"name":"A"', '{"name":"A"}')
    for name in TASKS:  # every reference answer scores against itself
        train, _ = make_split(name, 20, 0)
        assert all(get_task(name).score(row_answer(r), row_answer(r)) for r in train)


def test_get_task_suggests_closest():
    assert get_task("dates").name == "dates"
    assert list_tasks() == ["dates", "extract", "reverse"]
    with pytest.raises(ValueError, match=re.escape("unknown task 'date'; did you mean 'dates'?")):
        get_task("date")
    with pytest.raises(ValueError, match="did you mean 'reverse'"):
        get_task("revrse")
    with pytest.raises(ValueError, match="known tasks: dates, extract, reverse"):
        get_task("zzzz")


def test_make_split_errors():
    with pytest.raises(ValueError, match=">= 0"):
        make_split("dates", -1, 5)
    with pytest.raises(ValueError, match="did you mean"):
        make_split("reverso", 1, 1)


def test_row_answer_of_text_and_message_completions():
    assert row_answer({"prompt": "2+2=", "completion": "4"}) == "4"
    assert row_answer({"prompt": [], "completion": [{"role": "assistant", "content": "4"}]}) == "4"
