"""lorakit.scoring: scores, predictions and failures; RunScorer's bookkeeping for a training loop."""

import json

import pytest

from lorakit.scoring import RunScorer, Scored, format_failures, scorable_rows, score_rows, write_predictions
from lorakit.tasks import get_metric
from lorakit_testing import make_byte_tokenizer, make_tiny_llama


@pytest.fixture(scope="module")
def model_and_tokenizer():
    tokenizer = make_byte_tokenizer()
    model = make_tiny_llama(vocab_size=len(tokenizer), max_position_embeddings=128, initializer_range=0.3)
    return model, tokenizer


ROWS = [{"prompt": "a", "completion": "x"}, {"prompt": [{"role": "user", "content": "b"}], "completion": "y"},
        {"messages": [{"role": "user", "content": "c"}, {"role": "assistant", "content": "z"}]}, {"text": "t"}]


def test_scorable_rows():
    rows = scorable_rows(ROWS)
    assert len(rows) == 3 and rows[2] == {"prompt": [{"role": "user", "content": "c"}],
                                          "completion": [{"role": "assistant", "content": "z"}]}


def test_score_rows_against_generate_answers(model_and_tokenizer, tmp_path):
    from lorakit.evaluate import generate_answers

    model, tokenizer = model_and_tokenizer
    answers = generate_answers(model, tokenizer, [r["prompt"] for r in scorable_rows(ROWS)], max_new_tokens=4)
    rows = [dict(r, completion=a) for r, a in zip(scorable_rows(ROWS), answers)]  # the model's own answers
    rows[0]["completion"] = "never said"
    scored = score_rows(model, tokenizer, rows, get_metric("exact"), max_new_tokens=4)
    assert scored.score == pytest.approx(2 / 3) and scored.n_correct == 2
    assert [p["prediction"] for p in scored.predictions] == answers
    write_predictions(tmp_path / "p.jsonl", scored)
    lines = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [x["correct"] for x in lines] == [False, True, True]
    text = format_failures(scored)
    assert text.startswith("1 wrong; the first 1:") and "expected   never said" in text
    assert format_failures(Scored(1.0, [])) == ""
    with pytest.raises(ValueError, match="no row has an answer"):
        score_rows(model, tokenizer, [{"text": "t"}], get_metric("exact"))


class Metrics:
    def __init__(self):
        self.rows = []

    def write(self, **row):
        self.rows.append(row)


def test_run_scorer(model_and_tokenizer, tmp_path):
    model, tokenizer = model_and_tokenizer
    metrics = Metrics()
    scorer = RunScorer(ROWS, get_metric("contains"), tmp_path, progress=False)
    base = scorer.base(model, tokenizer, metrics)
    row = {"step": 3}
    scorer.at_step(model, tokenizer, row)
    assert metrics.rows == [{"step": 0, "score": base}] and row["score"] == base  # the model did not change
    assert scorer.final(model, tokenizer, 3, metrics) == base and len(metrics.rows) == 1  # reused, not re-measured
    assert scorer.final(model, tokenizer, 5, metrics) == base and metrics.rows[-1] == {"step": 5, "score": base}
    scorer.close()
    silent = RunScorer(ROWS, None, tmp_path)
    assert silent.base(model, tokenizer) is None and silent.final(model, tokenizer, 1) is None
