"""lorakit.reporting: TensorBoard event files hold the logged scalars."""

import pytest

from lorakit.reporting import check_report_to, open_reporters

pytest.importorskip("tensorboard")


def read_scalars(directory):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(directory))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_scalars(tmp_path):
    rows = [{"step": 1, "loss": 2.5, "lr": 1e-3, "grad_norm": 0.75, "tokens_per_s": 1000.0, "elapsed_s": 1.0},
            {"step": 2, "loss": 2.0, "lr": 5e-4, "grad_norm": None, "tokens_per_s": 1100.0, "val_loss": 1.5,
             "score": 0.25, "note": "text is skipped"}]
    with open_reporters("tensorboard", tmp_path) as reporters:
        for row in rows:
            reporters.log(row)
    scalars = read_scalars(tmp_path / "tensorboard")
    assert sorted(scalars) == ["eval/score", "eval/val_loss", "train/grad_norm", "train/loss", "train/lr",
                               "train/tokens_per_s"]
    assert scalars["train/loss"] == [(1, 2.5), (2, 2.0)] and scalars["train/grad_norm"] == [(1, 0.75)]
    assert scalars["eval/val_loss"] == [(2, 1.5)] and scalars["eval/score"] == [(2, 0.25)]
    assert scalars["train/lr"][0][1] == pytest.approx(1e-3)


def test_report_to_values():
    assert check_report_to("none") == [] and check_report_to(["tensorboard", "tensorboard"]) == ["tensorboard"]
    with pytest.raises(ValueError, match="choose from"):
        check_report_to("wandb")
