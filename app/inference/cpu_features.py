"""What this CPU can do fast, as the runtimes see it: the flags it reports, less what
oneDNN (under torch and OpenVINO) is told not to use."""

from __future__ import annotations

import os

# oneDNN's ISA levels (dnnl_cpu_isa_t): each level's bits include those of the levels
# below it.
_ONEDNN_ISA_LEVELS = {
    "SSE41": 0x1,
    "AVX": 0x3,
    "AVX2": 0x7,
    "AVX2_VNNI": 0xF,
    "AVX2_VNNI_2": 0x1F,
    "AVX512_CORE": 0x27,
    "AVX512_CORE_VNNI": 0x67,
    "AVX512_CORE_BF16": 0xE7,
    "AVX10_1_512": 0x1EF,
    "AVX512_CORE_FP16": 0x1EF,
    "AVX10_1_512_AMX": 0xFEF,
    "AVX512_CORE_AMX": 0xFEF,
    "AVX10_1_512_AMX_FP16": 0x1FEF,
    "AVX512_CORE_AMX_FP16": 0x1FEF,
}
_ALL_LEVELS = 0xFFFF
_AVX2_VNNI_BIT = 0x8
_AVX512_VNNI_BIT = 0x40
_AVX512_BF16_BIT = 0x80


def onednn_isa_cap() -> str | None:
    """The ISA ceiling oneDNN (under torch and OpenVINO) was given, upper case; None
    where it picks for itself. ONEDNN_ wins over the older DNNL_ name, as in oneDNN."""
    for variable in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        value = os.environ.get(variable, "").strip().upper()
        if value:
            return None if value in ("ALL", "DEFAULT") else value
    return None


def _onednn_level() -> int:
    cap = onednn_isa_cap()
    # A name this table does not know is a level newer than it: not a cap below ours.
    return _ALL_LEVELS if cap is None else _ONEDNN_ISA_LEVELS.get(cap, _ALL_LEVELS)


def _cpu_flags(cpuinfo: str) -> set[str]:
    try:
        with open(cpuinfo, encoding="ascii", errors="ignore") as handle:
            text = handle.read()
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split()}


def cpu_has_fast_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """AMX or AVX512-BF16 run bf16 matmuls several times faster than fp32, unless
    oneDNN is capped below them (ONEDNN_MAX_CPU_ISA, as some VM hosts need): then
    neither runtime may use them, and bf16 only costs conversions (without them torch
    bf16 ran 9x slower than fp32 on an AVX2 EPYC)."""
    flags = _cpu_flags(cpuinfo)
    if not flags & {"amx_bf16", "avx512_bf16"}:
        return False
    return bool(_onednn_level() & _AVX512_BF16_BIT)


def cpu_has_int8_dot_product(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """VNNI (AVX512 or AVX-VNNI) or AMX-INT8, usable by oneDNN: what makes OpenVINO's
    static int8 fast. Without it OpenVINO int8 ran at half its own fp32 speed on an
    AVX2 EPYC, where ONNX Runtime's dynamic int8 ran 1.5-1.9x faster than fp32."""
    flags = _cpu_flags(cpuinfo)
    level = _onednn_level()
    wide = bool(flags & {"avx512_vnni", "amx_int8"}) and bool(level & _AVX512_VNNI_BIT)
    narrow = "avx_vnni" in flags and bool(level & _AVX2_VNNI_BIT)
    return wide or narrow


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, as a runtime's thread pool
    sizes itself), not torch's thread count, which whoever ran last may have changed."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
