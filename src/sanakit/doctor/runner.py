"""Run the checks: train's cheap preflight, and the full ``sanakit doctor``.

Each check returns a ``Check`` (PASS / WARN / FAIL, a message, and for non-PASS what to do),
printed as one line ``STATUS name: message -> what to do``. ``preflight`` runs the cheap subset
at the start of ``train`` before any model is loaded and before anything is written, and refuses
to start on a FAIL; ``sanakit doctor`` runs them all, loading the encoders on the CPU.

A check leaves no trace: nothing is written into ``work_dir``, the null-embedding root or the
caches, and checkpoints are found without the housekeeping renames that ``train`` performs.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

from sanakit.config import Config
from sanakit.doctor.check import FAIL, PASS, WARN, Check, Skipped, Status
from sanakit.doctor.checkpoints import check_checkpoint_model, check_resume_target
from sanakit.doctor.data import check_data
from sanakit.doctor.distributed import check_distributed, check_nodes
from sanakit.doctor.models import check_autoencoder, check_memory, check_model, check_text_encoder
from sanakit.doctor.null_embedding import check_null_embed_provenance, check_null_embedding
from sanakit.doctor.paths import check_cache, check_disk, check_null_embed_root, check_work_dir
from sanakit.doctor.precision import check_precision
from sanakit.doctor.pretrained import check_base_model, check_pretrained
from sanakit.doctor.probe import Probe
from sanakit.errors import SanakitError

log = logging.getLogger("sanakit")

CheckFn = Callable[[Config, Probe], Check]

# train's preflight: no model is loaded, nothing is hashed, nothing is written
CHEAP_CHECKS: tuple[CheckFn, ...] = (
    check_work_dir,
    check_null_embed_root,
    check_cache,
    check_data,
    check_resume_target,
    check_checkpoint_model,
    check_base_model,
    check_distributed,
    check_precision,
)

DOCTOR_CHECKS: tuple[CheckFn, ...] = (
    check_work_dir,
    check_cache,
    check_data,
    check_text_encoder,
    check_autoencoder,
    check_model,
    check_pretrained,
    check_disk,
    check_memory,
    check_null_embedding,
    check_resume_target,
    check_checkpoint_model,
    check_base_model,
    check_null_embed_provenance,
    check_distributed,
    check_precision,
    check_nodes,  # a collective under a launch: every rank runs it, last
)


class PreflightFailed(SanakitError):
    """A preflight check FAILed; the message is its line."""


def check_name(check: CheckFn) -> str:
    return check.__name__.removeprefix("check_").removesuffix("_target")


def run_check(check: CheckFn, cfg: Config, probe: Probe, crashed: Status = FAIL) -> Check:
    """One check; an error inside it becomes its line (the doctor never shows tracebacks).

    ``crashed`` is the status of a check that raised something unexpected: FAIL for the doctor,
    WARN for train's preflight (a bug in a check must not block training).
    """
    name = check_name(check)
    try:
        return check(cfg, probe)
    except Skipped as why:
        return Check(name, WARN, f"not checked: {why}", "fix the FAIL above first")
    except SanakitError as err:
        return Check(name, FAIL, str(err), "fix the setting or file named above")
    except Exception as err:  # noqa: BLE001 - a crashing check must still produce its line
        first = (str(err).splitlines() or [""])[0][:200]
        return Check(
            name,
            crashed,
            f"the check crashed ({type(err).__name__}: {first})",
            "this is a sanakit bug or an unusual setup; please report this line",
        )


def is_main_process() -> bool:
    return os.environ.get("RANK", "0") in ("", "0")


def preflight(cfg: Config, echo: bool = True) -> list[Check]:
    """The cheap checks, before any model is loaded; raise on the first FAIL with its line.

    Prints the PASS/WARN lines (main process only) in the doctor's format; the FAIL line becomes
    the ``error:`` line of the refusing ``train``.
    """
    if not is_main_process():
        # the probes create and remove directories: concurrent ranks would race on them. Rank 0
        # checks for everyone; if it refuses, the launcher tears the other ranks down.
        return []
    probe = Probe(cfg, full=False)
    results = []
    for check in CHEAP_CHECKS:
        result = run_check(check, cfg, probe, crashed=WARN)
        if result.status == FAIL:
            raise PreflightFailed(result.line())
        if echo:
            print(result.line(), flush=True)
        results.append(result)
    return results


def run_doctor(cfg: Config, source: str = "") -> int:
    """Print one line per check as it completes; exit code 0 when nothing FAILs, else 1."""
    started = time.monotonic()
    where = source or "the packaged default config"
    print(Check("config", PASS, f"{where} resolves and type-checks").line(), flush=True)
    probe = Probe(cfg, full=True)
    failed = False
    for check in DOCTOR_CHECKS:
        result = run_check(check, cfg, probe)
        failed |= result.status == FAIL
        print(result.line(), flush=True)
    log.debug("doctor took %.1f s", time.monotonic() - started)
    return 1 if failed else 0
