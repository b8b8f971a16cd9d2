"""``import lorakit`` changes nothing in the process: no malloc setting, no global torch mode, no thread count; the
CPU backend is registered but has read no settings and chosen no kernels until ``accelerate``."""

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import json, resource, sys, torch
    def state():
        return dict(threads=torch.get_num_threads(), grad=torch.is_grad_enabled(),
                    dtype=str(torch.get_default_dtype()), modes=len(torch.overrides._get_current_function_mode_stack()),
                    deterministic=torch.are_deterministic_algorithms_enabled(),
                    precision=torch.get_float32_matmul_precision(), autocast=torch.is_autocast_enabled("cpu"),
                    mkldnn=torch.backends.mkldnn.enabled, anomaly=torch.is_anomaly_enabled(),
                    inference=torch.is_inference_mode_enabled())
    def fault_share():  # malloc's defaults hand freed large blocks back: the second burst faults its pages in again
        def burst():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            kept = [torch.ones(6 * 2**20 // 4) for _ in range(32)]
            del kept
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        first = burst()
        return burst() / first
    before = state()
    import lorakit
    from lorakit.cpu import CPU
    print(json.dumps(dict(before=before, after=state(), share=fault_share(), settings_read=CPU._settings is not None,
                          kernels=CPU.kernels.name, env_modules=sorted(m for m in sys.modules if m.startswith("lorakit.cpu")))))
""")


def test_importing_lorakit_changes_no_process_state():
    import json

    out = json.loads(subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                                    check=True).stdout.splitlines()[-1])
    assert out["before"] == out["after"]
    assert out["share"] > 0.5  # malloc keeps its defaults (keep_freed_memory would make this ~0)
    assert not out["settings_read"] and out["kernels"] == "torch"
    assert "lorakit.cpu.backend" in out["env_modules"]  # registered, not acted on
