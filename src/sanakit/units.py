"""Human-readable quantities for messages and reports."""

from __future__ import annotations


def human_bytes(n: float) -> str:
    """``21.4 MB``-style sizes (decimal units, as disks are sold)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
