"""Preflight checks: say what is wrong before compute is spent.

``preflight`` is train's cheap subset (before any model loads or anything is written);
``run_doctor`` is ``sanakit doctor``. The checks live one group per module (paths, data, models,
checkpoints, null_embedding, distributed); ``runner`` runs them.
"""

from sanakit.doctor.runner import PreflightFailed, preflight, run_doctor

__all__ = ["PreflightFailed", "preflight", "run_doctor"]
