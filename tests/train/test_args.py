import pytest

from lorakit.fields import ConfigError
from lorakit.train.args import DPOArgs, SFTArgs, load_args


def test_yaml_and_overrides_give_floats_for_exponent_numbers(tmp_path):
    # YAML 1.1 reads `1e-4` (no dot) as a string: training failed with "'<=' not supported" after the base evaluation
    (tmp_path / "c.yaml").write_text("lr: 1e-4\nweight_decay: 1e-2\nmax_steps: 5\n")
    args = load_args(SFTArgs, tmp_path / "c.yaml")
    assert args.lr == 1e-4 and type(args.lr) is float and args.weight_decay == 0.01
    args = load_args(SFTArgs, tmp_path / "c.yaml", ["max_steps=50", "lr=1e-3"])
    assert (args.lr, args.max_steps) == (1e-3, 50) and type(args.lr) is float


@pytest.mark.parametrize("text, message", [
    ("r: 2.5\n", "c.yaml: r=2.5: expected a whole number (got a fraction; use 2 or 3)"),
    ("batch_size: true\n", "c.yaml: batch_size=True: expected a whole number"),
    ("lr: .inf\n", "c.yaml: lr=inf must be a finite number greater than 0"),
    ("lr: 1e10\n", "c.yaml: lr=10000000000.0 must be a finite number greater than 0 and at most 1"),  # collapsed the adapter
    ("lr: 1e10x\n", "c.yaml: lr='1e10x': expected a number"),
    ("max_grad_norm: -1\n", "c.yaml: max_grad_norm=-1.0 must be a finite number at least 0"),
    ("lora_alpha: .nan\n", "c.yaml: lora_alpha=nan must be a finite number greater than 0"),
    ("threads: -3\n", "c.yaml: threads=-3 must be 0 or more"),
    ("warmup_steps: -1\n", "c.yaml: warmup_steps=-1 must be 0 or more"),
    ("min_lr_ratio: 1.5\n", "c.yaml: min_lr_ratio=1.5 must be a finite number at least 0 and at most 1"),
    ("r: 0\n", "c.yaml: r=0 must be at least 1"),
    ("output_dir: ''\n", "c.yaml: output_dir='' is empty"),
    ("lr: 1\nlr: 2\n", "c.yaml: key 'lr' appears twice (lines 1 and 2); keep one"),
    ("- lr\n", "c.yaml: a config file is a mapping of field: value, got list"),
    ("lr: [\n", "c.yaml: not valid YAML"),
])
def test_bad_values_name_file_field_and_fix(tmp_path, text, message):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError) as err:
        load_args(SFTArgs, tmp_path / "c.yaml")
    assert str(err.value).startswith(str(tmp_path / message.split(": ", 1)[0]) + ": " + message.split(": ", 1)[1])


def test_overrides_name_the_flag():
    with pytest.raises(ConfigError, match=r"^--set r='abc': expected a whole number"):
        load_args(SFTArgs, None, ["r=abc"])
    with pytest.raises(ConfigError, match="beta=0.0 must be a finite number greater than 0"):
        load_args(DPOArgs, None, ["beta=0", "train_file=x.jsonl"])


def test_non_utf8_config_is_named(tmp_path):
    (tmp_path / "c.yaml").write_bytes(b"model: caf\xe9\n")
    with pytest.raises(ConfigError, match="c.yaml: not UTF-8 text"):
        load_args(SFTArgs, tmp_path / "c.yaml")
