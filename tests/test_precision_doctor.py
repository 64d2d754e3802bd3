"""`doctor` warns when bf16 is asked for on hardware without native bf16; `auto` stays fast."""

from __future__ import annotations

import pytest
import torch

from sanakit.config import load_config
from sanakit.doctor import precision
from sanakit.doctor.precision import check_precision, cpu_bf16_flags
from sanakit.doctor.runner import CHEAP_CHECKS, DOCTOR_CHECKS, preflight
from sanakit.train.components import autocast_dtype

AVX2_ONLY = "processor\t: 0\nflags\t\t: fpu sse sse2 avx avx2 fma\n"
SAPPHIRE = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"


@pytest.fixture
def cpu(monkeypatch, tmp_path):
    """This process sees no GPU and reads the given /proc/cpuinfo text."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def with_cpuinfo(text: str | None):
        path = tmp_path / ("cpuinfo" if text is not None else "missing")
        if text is not None:
            path.write_text(text)
        monkeypatch.setattr(precision, "CPUINFO", path)

    return with_cpuinfo


def doctor(*overrides: str):
    return check_precision(load_config(None, list(overrides)), probe=None)


def test_bf16_on_an_avx2_only_cpu_warns_with_the_measured_cost(cpu):
    cpu(AVX2_ONLY)
    assert cpu_bf16_flags() == []
    found = doctor("--train.mixed_precision=bf16")
    assert found.status == "WARN"
    assert "13x slower than fp32" in found.line() and "2,648 vs 198 ms" in found.line()
    assert found.line().endswith("-> use --train.mixed_precision=auto (fp32 on this hardware)")


def test_native_bf16_cpu_auto_and_no_pass(cpu):
    cpu(SAPPHIRE)
    assert cpu_bf16_flags() == ["avx512_bf16", "amx_bf16"]
    assert doctor("--train.mixed_precision=bf16").status == "PASS"
    cpu(AVX2_ONLY)
    for choice in ("auto", "no"):  # auto picks fp32 on every CPU: never the slow path
        found = doctor(f"--train.mixed_precision={choice}")
        assert found.status == "PASS" and "fp32 on cpu" in found.message
    cfg = load_config(None, [])
    assert autocast_dtype(cfg, torch.device("cpu")) == torch.float32
    assert autocast_dtype(cfg, torch.device("cuda")) == torch.bfloat16
    cpu(None)  # no /proc/cpuinfo (not Linux): no guess
    assert cpu_bf16_flags() is None and doctor("--train.mixed_precision=bf16").status == "PASS"


def test_the_check_runs_in_doctor_and_before_training():
    assert check_precision in DOCTOR_CHECKS and check_precision in CHEAP_CHECKS


def test_train_preflight_prints_the_line(cpu, tmp_path, capsys):
    cpu(AVX2_ONLY)
    cfg = load_config(None, [f"--work_dir={tmp_path / 'work'}", "--train.mixed_precision=bf16"])
    preflight(cfg)  # what `sanakit train` runs before loading any model
    assert "WARN precision: train.mixed_precision=bf16 on a CPU without" in capsys.readouterr().out
