"""SIGKILL a training run at random moments, many times: checkpoints always load, outputs are whole or absent, the
next start removes temp leftovers, and resuming reaches the bitwise-same adapter as a run never interrupted.

One driver process imports lorakit once and forks each training run (so 20+ kills fit in about a minute of CI);
the driver itself runs no torch computation, and the checks after each kill run in a forked child too.
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from safetensors.torch import load_file

DRIVER = textwrap.dedent('''
    import json, os, random, signal, sys, time, traceback
    from pathlib import Path

    import lorakit.train  # imported once, before any fork; no torch computation in this process

    cfg = json.loads(sys.argv[1])
    rng = random.Random(cfg["seed"])
    root = Path(cfg["root"])
    ALLOWED = {"adapter", "best", "metrics.jsonl", "loss.png", "summary.json", "run.json"}

    def in_child(fn):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                import torch
                torch.set_num_threads(1)
                fn()
            except BaseException:
                traceback.print_exc()
                code = 1
            os._exit(code)
        return pid

    def train(out, resume):
        from lorakit.train import SFTArgs, run_sft
        run_sft(SFTArgs(**cfg["args"], output_dir=str(out), resume=resume))

    def check(out):  # in a child: every visible output whole, nothing else visible
        import json
        from safetensors.torch import load_file
        from lorakit.train.checkpoints import read_checkpoint
        for p in out.iterdir() if out.exists() else []:
            if p.name.startswith("."):
                continue
            if p.name.startswith("checkpoint-"):
                read_checkpoint(p)
            elif p.name in ("adapter", "best"):
                json.loads((p / "adapter_config.json").read_text())
                load_file(p / "adapter_model.safetensors")
            elif p.name in ("run.json", "summary.json"):
                json.loads(p.read_text())
            elif p.name not in ALLOWED:
                raise AssertionError(f"unexpected {p}")

    def wait(pid):
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

    start = time.perf_counter()
    assert wait(in_child(lambda: train(root / "reference", False))) == 0
    full = time.perf_counter() - start
    kills = leftovers = episodes = 0
    deadline = time.perf_counter() + cfg["budget_s"]
    while kills < cfg["kills"] and time.perf_counter() < deadline:
        out = root / f"episode-{episodes}"
        episodes += 1
        for _ in range(cfg["kills_per_episode"]):  # killed at a random moment until a run gets to its end
            pid = in_child(lambda: train(out, True))
            time.sleep(rng.uniform(0.0, 0.9 * full))
            os.kill(pid, signal.SIGKILL)
            code = wait(pid)
            assert code in (0, -signal.SIGKILL), code
            if code == 0:
                break
            kills += 1
            leftovers += any(p.name.startswith(".") for p in out.iterdir()) if out.exists() else 0
            assert wait(in_child(lambda: check(out))) == 0, f"after a kill in {out}"
        assert wait(in_child(lambda: train(out, True))) == 0
        hidden = [p.name for p in out.iterdir() if p.name.startswith(".")]
        assert not hidden, hidden
    print(json.dumps({"kills": kills, "episodes": episodes, "with_leftovers": leftovers, "full_run_s": full}))
''')


def _rows(n=16):
    return [{"prompt": f"q{i}:", "completion": f" a{i % 4}"} for i in range(n)]


def test_sigkill_at_random_points_then_resume(tmp_path, tiny_model_dir):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    args = dict(model=str(tiny_model_dir), task=None, train_file=str(data), val_fraction=0.25, r=4, lora_alpha=8,
                lr=2e-2, warmup_steps=0, batch_size=4, max_steps=6, max_length=32, save_every=1, eval_every=3,
                lora_dropout=0.1, progress=False, eval_accuracy=False)
    cfg = {"root": str(tmp_path), "args": args, "seed": 0, "kills": 20, "kills_per_episode": 8, "budget_s": 300}
    done = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(cfg)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    stats = json.loads(done.stdout.strip().splitlines()[-1])
    print("kill test:", stats)
    assert stats["kills"] >= 20, stats
    reference = load_file(tmp_path / "reference" / "adapter" / "adapter_model.safetensors")
    for episode in range(stats["episodes"]):
        out = tmp_path / f"episode-{episode}"
        resumed = load_file(out / "adapter" / "adapter_model.safetensors")
        assert reference.keys() == resumed.keys()
        assert all(torch.equal(reference[k], resumed[k]) for k in reference), episode  # bitwise
        steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
        assert steps == list(range(1, 7)), (episode, steps)
