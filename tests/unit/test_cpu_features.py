"""What `auto` reads of the CPU (bf16 and int8 dot products, only where the CPU has them
and oneDNN may use them), and the warning when a precision named outright runs slowly."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from app.config import Backend, Precision
from app.inference.cpu_features import cpu_has_fast_bf16, cpu_has_int8_dot_product, onednn_isa_cap
from app.inference.model import warn_of_slow_choices

AMX = "flags\t\t: fpu avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8\n"
BF16_ONLY = "flags\t\t: fpu avx2 avx512f avx512_vnni avx512_bf16\n"
NEITHER = "flags\t\t: fpu avx2 avx512f avx512_vnni\n"


@pytest.fixture(autouse=True)
def no_isa_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)


def cpuinfo(tmp_path: Path, flags: str) -> str:
    path = tmp_path / "cpuinfo"
    path.write_text("processor\t: 0\n" + flags)
    return str(path)


@pytest.mark.parametrize(("flags", "fast"), [(AMX, True), (BF16_ONLY, True), (NEITHER, False)])
def test_bf16_follows_the_cpu_flags(tmp_path: Path, flags: str, fast: bool) -> None:
    assert cpu_has_fast_bf16(cpuinfo(tmp_path, flags)) is fast


def test_unreadable_cpuinfo_means_fp32(tmp_path: Path) -> None:
    assert cpu_has_fast_bf16(str(tmp_path / "missing")) is False


@pytest.mark.parametrize(
    ("cap", "fast"),
    [
        ("AVX512_CORE_VNNI", False),  # below AVX512-BF16: bf16 would be emulated
        ("avx2", False),
        ("AVX512_CORE", False),
        ("AVX2_VNNI_2", False),  # bf16 conversions only, no bf16 dot products
        ("AVX512_CORE_BF16", True),
        ("AVX512_CORE_AMX", True),
        ("AVX10_1_512_AMX_FP16", True),
        ("ALL", True),
        ("default", True),
        ("AVX10_9_FUTURE", True),  # newer than the table: not a cap below bf16
    ],
)
def test_a_onednn_cap_below_bf16_means_fp32(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cap: str, fast: bool
) -> None:
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    assert cpu_has_fast_bf16(cpuinfo(tmp_path, AMX)) is fast


def test_the_cap_never_adds_what_the_cpu_lacks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert cpu_has_fast_bf16(cpuinfo(tmp_path, NEITHER)) is False


def test_onednn_name_wins_over_the_older_dnnl_name(monkeypatch: pytest.MonkeyPatch) -> None:
    assert onednn_isa_cap() is None
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "avx2")
    assert onednn_isa_cap() == "AVX2"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", " avx512_core_bf16 ")
    assert onednn_isa_cap() == "AVX512_CORE_BF16"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "all")
    assert onednn_isa_cap() is None


AVX2_ONLY = "flags\t\t: fpu avx avx2 fma sha_ni vaes\n"
AVX_VNNI = "flags\t\t: fpu avx2 avx_vnni\n"


@pytest.mark.parametrize(
    ("flags", "fast"),
    [(AMX, True), (BF16_ONLY, True), (NEITHER, True), (AVX_VNNI, True), (AVX2_ONLY, False)],
)
def test_int8_dot_products_follow_the_cpu_flags(tmp_path: Path, flags: str, fast: bool) -> None:
    assert cpu_has_int8_dot_product(cpuinfo(tmp_path, flags)) is fast


@pytest.mark.parametrize(
    ("flags", "cap", "fast"),
    [
        (NEITHER, "AVX512_CORE", False),  # below VNNI: OpenVINO would not use it
        (NEITHER, "AVX512_CORE_VNNI", True),
        (NEITHER, "AVX2_VNNI", False),  # AVX-VNNI allowed, but this CPU has only AVX512's
        (AVX_VNNI, "AVX2_VNNI", True),
        (AVX_VNNI, "AVX2", False),
        (AMX, "AVX10_9_FUTURE", True),
    ],
)
def test_a_onednn_cap_below_vnni_means_no_int8_dot_products(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flags: str, cap: str, fast: bool
) -> None:
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    assert cpu_has_int8_dot_product(cpuinfo(tmp_path, flags)) is fast


def test_a_flag_is_read_whole_not_as_part_of_another(tmp_path: Path) -> None:
    # avx512_vnni must not pass for avx_vnni's kin, nor a longer flag for a shorter one.
    assert cpu_has_int8_dot_product(cpuinfo(tmp_path, "flags\t\t: avx2 avx_vnni_int8\n")) is False
    assert cpu_has_fast_bf16(cpuinfo(tmp_path, "flags\t\t: avx2 avx512_bf16x\n")) is False


@pytest.mark.parametrize(
    ("precision", "backend", "bf16", "vnni", "warned"),
    [
        (Precision.BF16, Backend.TORCH, False, True, "CLIP_PRECISION=bf16"),
        (Precision.BF16, Backend.OPENVINO, True, True, None),
        (Precision.INT8, Backend.OPENVINO, True, False, "OpenVINO int8"),
        (Precision.INT8, Backend.OPENVINO, True, True, None),
        (Precision.INT8, Backend.ONNXRUNTIME, True, False, None),
        (Precision.FP32, Backend.OPENVINO, False, False, None),
    ],
)
def test_a_precision_this_cpu_runs_slowly_is_named_at_startup(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    precision: Precision,
    backend: Backend,
    bf16: bool,
    vnni: bool,
    warned: str | None,
) -> None:
    monkeypatch.setattr("app.inference.model.cpu_has_fast_bf16", lambda: bf16)
    monkeypatch.setattr("app.inference.model.cpu_has_int8_dot_product", lambda: vnni)
    with caplog.at_level(logging.WARNING, logger="app.inference.model"):
        warn_of_slow_choices(precision, backend, torch.device("cpu"))
        warn_of_slow_choices(precision, backend, torch.device("cuda"))  # never on a GPU
    if warned is None:
        assert not caplog.records
    else:
        (record,) = caplog.records
        assert warned in record.getMessage()
        assert "auto" in record.getMessage()
