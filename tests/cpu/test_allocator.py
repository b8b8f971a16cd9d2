"""keep_freed_memory: after it, memory freed at the end of a step-like burst is reused by the next one, not faulted in
again page by page."""

import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import resource, sys, torch
    from lorakit.cpu.allocator import keep_freed_memory
    if sys.argv[1] == "keep" and sys.argv[2] == "accelerate":  # the settings from the environment decide
        import lorakit
        ok = lorakit.accelerate(torch.nn.Linear(2, 2)).freed_memory_kept
    else:
        ok = keep_freed_memory() if sys.argv[1] == "keep" else None
    def faults_of_a_step():  # like a step's activations: 32 tensors of 6 MiB written, then all freed
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        kept = [torch.ones(6 * 2**20 // 4) for _ in range(32)]
        del kept
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    first = faults_of_a_step()
    print(ok, faults_of_a_step() / first)
""")


def _run(mode, env=None, via_accelerate=False):
    import os

    out = subprocess.run([sys.executable, "-c", SCRIPT, mode, "accelerate" if via_accelerate else "direct"], capture_output=True, text=True, check=True,
                         env={**os.environ, **(env or {})}).stdout.split()
    return out[0], float(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_second_step_reuses_pages_once_kept():
    _, default_share = _run("default")  # faults of step 2 / faults of step 1
    ok, kept_share = _run("keep")
    assert default_share > 0.5  # glibc handed the memory back: every page is faulted in again
    assert ok == "True" and kept_share < 0.1


def test_accelerate_leaves_malloc_alone_when_the_settings_say_so():
    ok, _ = _run("keep", {"LORAKIT_KEEP_FREED_MEMORY": "0"}, via_accelerate=True)
    assert ok == "False"
