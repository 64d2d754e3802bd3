"""Is the asked-for precision native on this hardware?

bf16 autocast on a CPU without native bf16 instructions (AVX2 only) measured 13x slower than
fp32 (2,648 vs 198 ms per training step); on a CPU with avx512_bf16 it was 1.1x faster. ``auto``
already picks fp32 on every CPU and bf16 on CUDA (``train/components.autocast_dtype``), so only
an explicit ``train.mixed_precision=bf16`` can land on the slow path.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sanakit.config import Config
from sanakit.doctor.check import PASS, WARN, Check
from sanakit.doctor.probe import Probe
from sanakit.train.components import autocast_dtype

CPUINFO = Path("/proc/cpuinfo")
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # x86 flags for bf16 dot products / tiles
MEASURED_COST = "measured 13x slower than fp32 there (2,648 vs 198 ms per step)"


def cpu_bf16_flags(cpuinfo: Path | None = None) -> list[str] | None:
    """The native-bf16 flags this CPU reports; None when the flags cannot be read."""
    try:
        text = (cpuinfo or CPUINFO).read_text(errors="replace")
    except OSError:
        return None
    flags = next((line for line in text.splitlines() if line.startswith("flags")), None)
    if flags is None:
        return None
    present = set(flags.partition(":")[2].split())
    return [f for f in NATIVE_BF16_FLAGS if f in present]


def check_precision(cfg: Config, probe: Probe) -> Check:
    mp = cfg.train.mixed_precision
    on_cuda = torch.cuda.is_available()
    device = torch.device("cuda" if on_cuda else "cpu")
    if autocast_dtype(cfg, device) != torch.bfloat16:
        return Check("precision", PASS, f"train.mixed_precision={mp}: fp32 on {device.type}")
    fix = "use --train.mixed_precision=auto (fp32 on this hardware)"
    if on_cuda:
        name = torch.cuda.get_device_name()
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return Check("precision", PASS, f"bf16 autocast on {name} (native bf16)")
        return Check("precision", WARN, f"bf16 autocast on {name}, which has no native bf16", fix)
    flags = cpu_bf16_flags()
    if flags is None:
        return Check("precision", PASS, f"bf16 autocast on CPU (cannot read {CPUINFO} to check)")
    if flags:
        return Check("precision", PASS, f"bf16 autocast on a CPU with {', '.join(flags)}")
    return Check(
        "precision",
        WARN,
        f"train.mixed_precision={mp} on a CPU without native bf16 (no "
        f"{' / '.join(NATIVE_BF16_FLAGS)} in {CPUINFO}): bf16 autocast {MEASURED_COST}",
        fix,
    )
