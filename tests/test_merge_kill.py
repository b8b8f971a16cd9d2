"""SIGKILL `lorakit merge` at random points: the output is whole (old or new) or absent, never half-written.

Each run is a forked child of the test process executing ``lorakit.cli.main(["merge", ...])`` (no interpreter
start-up per run, so 30 kills take seconds); the delay before the kill is drawn uniformly over the length of an
uninterrupted run, so kills land while the plan is made, while shards are written, while they are synced and around
the final rename.
"""

import os
import random
import signal
import time

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from lorakit import LoraConfig, add_adapter, save_adapter
from lorakit.atomic import TEMP_PREFIX, remove_leftovers
from lorakit.cli import main
from lorakit_testing import make_byte_tokenizer, make_tiny_llama

KILLS_FRESH, KILLS_OVERWRITE, KILLS_EXPORT = 20, 10, 6


def _fork_merge(argv: list[str]) -> int:
    pid = os.fork()
    if pid == 0:  # child: one thread (OpenMP is not fork-safe), quiet, exit without cleanup handlers
        try:
            torch.set_num_threads(1)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1), os.dup2(devnull, 2)
            code = main(argv)
        except BaseException:
            code = 3
        os._exit(code)
    return pid


def _run(argv, delay=None):
    pid = _fork_merge(argv)
    if delay is not None:
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    return status


def _state(out, expected):
    """'absent', or the name of the expected output the directory holds whole (else an assertion fails)."""
    if not out.exists():
        return "absent"
    names = sorted(p.name for p in out.iterdir())
    for label, (files, tensors) in expected.items():
        if names != files:
            continue
        got = {}
        for shard in out.glob("*.safetensors"):
            got.update(load_file(shard))
        if got.keys() == tensors.keys() and all(torch.equal(got[k], v) for k, v in tensors.items()):
            return label
    raise AssertionError(f"{out} holds a partial or mixed output: {names}")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    tok = make_byte_tokenizer(merges=[("h", "e")])
    model = make_tiny_llama(0, vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=2)
    model.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    adapters = []
    for seed in (1, 2):
        m, _ = lorakit.load_model(root / "base")
        torch.manual_seed(seed)
        add_adapter(m, LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False))
        save_adapter(m, root / f"adapter{seed}")
        adapters.append(root / f"adapter{seed}")
    expected = {}
    for i, adapter in enumerate(adapters):
        ref = root / f"ref{i}"
        argv = ["merge", "--model", str(root / "base"), "--adapter", str(adapter), "--output", str(ref),
                "--max-shard-size", "300KB"]
        start = time.perf_counter()
        assert _run(argv) == 0
        seconds = time.perf_counter() - start
        tensors = {}
        for shard in ref.glob("*.safetensors"):
            tensors.update(load_file(shard))
        expected[f"new{i}"] = (sorted(p.name for p in ref.iterdir()), tensors)
    assert len(expected["new0"][0]) > 4  # several shards + index + config + tokenizer files
    return root, adapters, expected, seconds


def test_killed_merge_leaves_whole_output_or_none(setup, tmp_path):
    root, adapters, expected, seconds = setup
    rng = random.Random(0)
    seen = {}
    for i in range(KILLS_FRESH):
        out = tmp_path / f"out{i}"
        argv = ["merge", "--model", str(root / "base"), "--adapter", str(adapters[0]), "--output", str(out),
                "--max-shard-size", "300KB"]
        _run(argv, delay=rng.uniform(0, 1.2 * seconds))
        state = _state(out, {"new": expected["new0"]})
        seen[state] = seen.get(state, 0) + 1
        remove_leftovers(tmp_path)
        assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(TEMP_PREFIX)]
    assert set(seen) <= {"absent", "new"}
    print(f"fresh output, {KILLS_FRESH} kills over {seconds:.2f} s runs: {seen}")


def test_killed_overwrite_keeps_the_old_output_or_the_new_one(setup, tmp_path):
    root, adapters, expected, seconds = setup
    rng = random.Random(1)
    out = tmp_path / "out"
    argv_old = ["merge", "--model", str(root / "base"), "--adapter", str(adapters[0]), "--output", str(out),
                "--max-shard-size", "300KB", "--overwrite"]
    argv_new = [*argv_old[:4], str(adapters[1]), *argv_old[5:]]
    seen = {}
    state = None
    for _ in range(KILLS_OVERWRITE):
        if state != "old":
            assert _run(argv_old) == 0
        _run(argv_new, delay=rng.uniform(0, 1.2 * seconds))
        state = _state(out, {"old": expected["new0"], "new": expected["new1"]})
        seen[state] = seen.get(state, 0) + 1
        remove_leftovers(tmp_path)
        assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(TEMP_PREFIX)]
    assert "absent" not in seen
    print(f"--overwrite, {KILLS_OVERWRITE} kills: {seen}")


def test_killed_gguf_export_leaves_the_whole_file_or_none(setup, tmp_path):
    root, adapters, _, _ = setup
    argv = ["export", "--format", "gguf", "--model", str(root / "base"), "--adapter", str(adapters[0]), "--outtype",
            "q8_0", "--output"]
    start = time.perf_counter()
    assert _run([*argv, str(tmp_path / "ref.gguf")]) == 0
    seconds = time.perf_counter() - start
    reference = (tmp_path / "ref.gguf").read_bytes()
    rng = random.Random(2)
    seen = {}
    for i in range(KILLS_EXPORT):
        out = tmp_path / f"m{i}.gguf"
        _run([*argv, str(out)], delay=rng.uniform(0, 1.2 * seconds))
        state = "absent" if not out.exists() else "whole" if out.read_bytes() == reference else "PARTIAL"
        seen[state] = seen.get(state, 0) + 1
        remove_leftovers(tmp_path)
        assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(TEMP_PREFIX)]
    assert set(seen) <= {"absent", "whole"}, seen
    print(f"export, {KILLS_EXPORT} kills over {seconds:.2f} s runs: {seen}")
