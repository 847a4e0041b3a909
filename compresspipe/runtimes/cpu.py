"""CPU targets for int8 files: which weight precision is correct on which CPUs, and what this machine has.

ONNX Runtime's x86 int8 kernels multiply uint8 activations by int8 weights. On CPUs with AVX2 but no VNNI
they use VPMADDUBSW, which adds each pair of products in int16 and saturates: 255 * 127 * 2 = 64770 does
not fit in 32767. VNNI CPUs (AVX512-VNNI, AVX-VNNI, AMX) accumulate in int32 and never saturate; ARM's
kernels widen before they add. With weights limited to 7 bits (|w| <= 64) no pair can exceed
255 * 64 * 2 = 32640, so the file is correct on every CPU: that is the `portable` target.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

# deploy.cpu -> the bits int8 weights may use so every CPU of that target computes exactly
WEIGHT_BITS: dict[str, int] = {"portable": 7, "x86-avx2": 7, "x86-vnni": 8, "arm64": 8}
# the widest |weight| for a target: symmetric int8 with 7 bits is [-64, 64] in ONNX Runtime (reduce_range)
WEIGHT_LIMIT: dict[int, int] = {7: 64, 8: 127}
INT16_MAX = 32767
ACTIVATION_MAX = 255  # uint8 activations
# flags worth recording about a machine that verified an int8 file
ISA_FLAGS = ("sse4_1", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni",
             "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16", "asimd", "asimddp", "i8mm", "sve")
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


@functools.cache
def host_isa() -> tuple[str, ...]:
    """Instruction-set flags of this CPU that matter for int8 kernels (from /proc/cpuinfo; empty if unknown)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ()
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return tuple(f for f in ISA_FLAGS if f in flags)


@functools.cache
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "CPU part") and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def host_target() -> str:
    """The deploy.cpu target this machine belongs to (portable when it cannot tell)."""
    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        return "arm64"
    if machine in ("x86_64", "amd64"):
        isa = host_isa()
        if any(f in isa for f in VNNI_FLAGS):
            return "x86-vnni"
        if "avx2" in isa:
            return "x86-avx2"
    return "portable"


def resolve(cpu: str) -> str:
    """A recipe's deploy.cpu with `auto` replaced by this machine's target."""
    return host_target() if cpu == "auto" else cpu


def weight_bits(cpu: str) -> int:
    return WEIGHT_BITS[resolve(cpu)]


def saturation_bound(weight_abs_max: int) -> int:
    """The largest |sum of two uint8 x int8 products| the AVX2 kernels may form with these weights."""
    return 2 * ACTIVATION_MAX * weight_abs_max


def correct_on(weight_abs_max: int) -> str:
    """Which CPUs compute a file with this weight range exactly, in words."""
    if saturation_bound(weight_abs_max) <= INT16_MAX:
        return "every CPU (7-bit weights: ONNX Runtime's int16 pair sums cannot saturate)"
    return ("CPUs with VNNI (AVX512-VNNI, AVX-VNNI, AMX) and ARM; on AVX2-only x86 CPUs ONNX Runtime's u8s8 "
            "kernels may saturate (8-bit weights) and lose accuracy; use deploy.cpu: portable for a file that is "
            "correct everywhere")


def machine_record() -> dict[str, object]:
    """What the manifest says about the machine that verified a file."""
    return {"machine": platform.machine(), "cpu": cpu_model(), "isa": list(host_isa()), "target": host_target()}
