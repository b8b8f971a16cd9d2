"""`lorakit combine`: adapters on disk → one combined adapter on disk, equal to the library call."""

import pytest
import torch

from lorakit import (LoraConfig, add_adapter, add_weighted_adapter, load_adapter, load_model, save_adapter,
                     set_adapter)
from lorakit.cli import main


@pytest.fixture
def two_adapters(tiny_model_dir, tmp_path):
    dirs = []
    for i, r in enumerate((4, 8)):
        model, _ = load_model(tiny_model_dir)
        add_adapter(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "up_proj"],
                                      init_lora_weights=False))
        dirs.append(save_adapter(model, tmp_path / f"adapter{i}"))
    return dirs


def test_combine_equals_library(capsys, tiny_model_dir, two_adapters, tmp_path, input_ids):
    out = tmp_path / "combined"
    assert main(["combine", *map(str, two_adapters), "--weights", "0.6", "0.4", "--type", "cat",
                 "--model", str(tiny_model_dir), "--output", str(out)]) == 0
    assert "into rank 12" in capsys.readouterr().out
    ours, _ = load_model(tiny_model_dir)
    load_adapter(ours, out)
    want, _ = load_model(tiny_model_dir)
    load_adapter(want, two_adapters[0], "x")
    load_adapter(want, two_adapters[1], "y")
    add_weighted_adapter(want, ["x", "y"], [0.6, 0.4], "xy", combination_type="cat")
    set_adapter(want, "xy")
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids).logits, want(input_ids).logits)


@pytest.mark.parametrize("extra, message", [
    (["--weights", "1"], "--weights has 1 values for 2 adapters"),
    (["--type", "average"], "--type 'average'"),
    (["--type", "ties"], "needs density"),
    (["--type", "linear"], "one rank"),
])
def test_bad_input_is_one_line(capsys, tiny_model_dir, two_adapters, tmp_path, extra, message):
    out = tmp_path / "combined"
    assert main(["combine", *map(str, two_adapters), "--model", str(tiny_model_dir), "--output", str(out),
                 *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists()


def test_refuses_a_non_empty_output(capsys, tiny_model_dir, two_adapters):
    assert main(["combine", *map(str, two_adapters), "--model", str(tiny_model_dir), "--output",
                 str(two_adapters[0])]) == 2
    assert "not empty" in capsys.readouterr().err
