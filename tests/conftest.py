from __future__ import annotations

import os

import pytest

# Plugins installed in the developer's environment must not change what the tests see.
os.environ.setdefault("COMPRESSPIPE_NO_PLUGINS", "1")


@pytest.fixture(autouse=True)
def _in_tmp_cwd(tmp_path, monkeypatch):
    """Tests leave no files behind: default run folders (runs/...) and the sensitivity cache land in tmp_path."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COMPRESSPIPE_CACHE", str(tmp_path / ".cache"))


# `make test-avx2` runs the int8 tests under `qemu-x86_64 -cpu Haswell`: ONNX Runtime reads the emulated CPUID (AVX2,
# no VNNI), but qemu-user shows the host's /proc/cpuinfo, where compresspipe reads the instruction sets. Tell it the
# truth, as an AVX2-only machine would. (Subprocesses that tests start run natively: qemu-user does not follow exec.)
EMULATED_ISA = {"Haswell": ("sse4_1", "avx", "avx2", "fma", "f16c")}


@pytest.fixture(autouse=True)
def _emulated_cpu_isa(monkeypatch):
    emulated = os.environ.get("COMPRESSPIPE_EMULATED_CPU")
    if emulated in EMULATED_ISA:
        from compresspipe.runtimes import cpu

        getattr(cpu.host_target, "cache_clear", lambda: None)()
        monkeypatch.setattr(cpu, "host_isa", lambda: EMULATED_ISA[emulated])
