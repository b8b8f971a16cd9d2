"""Kill test (issue 12 item 4): SIGKILL a process while `save_adapter` overwrites an existing adapter, at random
points, many times. After every kill the directory holds the old adapter or the new one, whole (it loads and gives
exactly one of the two adapters' logits), and `remove_leftovers` leaves nothing else behind.

One helper process imports lorakit once and forks a child per save (fork is cheap; torch runs single-threaded
there), so 24 kills take a few seconds."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import lorakit
from lorakit import load_adapter, unload
from lorakit.atomic import remove_leftovers
from lorakit_testing import make_tiny_llama

KILLS = 24

_HELPER = textwrap.dedent('''
    import os, random, shutil, signal, sys, time
    t0 = time.perf_counter()
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, sys.argv[3])
    from lorakit_testing import make_tiny_llama
    from lorakit import LoraConfig, add_adapter, save_adapter

    work, kills = Path(sys.argv[1]), int(sys.argv[2])

    def adapter(alpha, seed):  # same rank and shapes: only the config tells old and new weights apart
        model = make_tiny_llama()
        torch.manual_seed(seed)
        add_adapter(model, LoraConfig(target_modules="all-linear", lora_alpha=alpha, init_lora_weights=False))
        return model

    old, new = adapter(8, 1), adapter(32, 2)
    save_adapter(old, work / "ref" / "old")
    save_adapter(new, work / "ref" / "new")
    target = work / "out" / "adapter"
    started = time.perf_counter()  # how long a forked save takes, from fork to exit
    pid = os.fork()
    if pid == 0:
        try:
            save_adapter(new, work / "probe")
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    duration = time.perf_counter() - started
    rng = random.Random(0)
    for i in range(kills):
        save_adapter(old, target)
        pid = os.fork()
        if pid == 0:
            try:
                save_adapter(new, target)
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0, duration))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        duration *= 1.15 if os.WIFSIGNALED(status) else 0.8  # keep the kill window around a save's length
        shutil.copytree(work / "out", work / "after" / str(i), symlinks=True)
        print(i, "killed" if os.WIFSIGNALED(status) else "finished", flush=True)
    print(f"a forked save takes {duration * 1e3:.1f} ms; whole helper {time.perf_counter() - t0:.1f} s", flush=True)
''')


def _logits(base, directory, input_ids):
    with torch.no_grad():
        logits = load_adapter(base, directory).eval()(input_ids).logits
    unload(base)
    return logits


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_killed_save_leaves_old_or_new_adapter_whole(tmp_path, input_ids):
    tests = Path(__file__).parent
    src = Path(lorakit.__file__).parents[1]  # the lorakit this test imported
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", _HELPER, str(tmp_path), str(KILLS), str(tests)], env=env,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    base = make_tiny_llama()
    old, new = _logits(base, tmp_path / "ref" / "old", input_ids), _logits(base, tmp_path / "ref" / "new", input_ids)
    assert not torch.allclose(old, new)
    seen = {"old": 0, "new": 0, "leftovers": 0}
    for i in range(KILLS):
        out = tmp_path / "after" / str(i)
        adapter = out / "adapter"
        logits = _logits(base, adapter, input_ids)
        which = "old" if torch.equal(logits, old) else "new" if torch.equal(logits, new) else "neither"
        seen[which] = seen.get(which, 0) + 1
        assert not any(p.name.startswith(".") for p in adapter.iterdir()), sorted(adapter.iterdir())
        seen["leftovers"] += bool(remove_leftovers(out))
        assert [p.name for p in out.iterdir()] == ["adapter"]
    print(seen, done.stdout.splitlines()[-1])
    assert seen.get("neither", 0) == 0 and seen["old"] + seen["new"] == KILLS
