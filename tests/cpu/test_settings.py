"""CpuSettings: every switch from the environment, read once, bad values named."""

import dataclasses

import pytest

from lorakit.cpu import CpuSettings
from lorakit.cpu.settings import current, from_env


def test_defaults_and_every_variable():
    assert from_env({}) == CpuSettings()
    env = {"LORAKIT_ONEDNN": "0", "LORAKIT_FUSED_LORA": "0", "LORAKIT_CPU_KERNELS": "0",
           "LORAKIT_KEEP_FREED_MEMORY": "0", "LORAKIT_REUSE_GRAD_MEMORY": "0", "LORAKIT_THREADS": "3"}
    assert from_env(env) == CpuSettings(onednn="off", fused_lora=False, native_kernels=False,
                                        keep_freed_memory=False, reuse_grad_memory=False, threads=3)
    assert from_env({"LORAKIT_ONEDNN": "1"}).onednn == "on" and from_env({"LORAKIT_ONEDNN": "auto"}).onednn == "auto"


@pytest.mark.parametrize("env,match", [({"LORAKIT_ONEDNN": "fast"}, "LORAKIT_ONEDNN='fast'"),
                                       ({"LORAKIT_THREADS": "two"}, "LORAKIT_THREADS='two'"),
                                       ({"LORAKIT_THREADS": "0"}, "threads=0")])
def test_bad_values_name_the_variable(env, match):
    with pytest.raises(ValueError, match=match):
        from_env(env)


def test_read_once_and_frozen(monkeypatch):
    first = current()
    monkeypatch.setenv("LORAKIT_ONEDNN", "0" if first.onednn != "off" else "1")
    assert current() is first  # a later change of the environment changes nothing
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.onednn = "on"
