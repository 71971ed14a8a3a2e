"""Build-once folders of the embedded cohorts: where each is cached, and how it is written atomically.

A cohort is written into a temporary sibling folder and renamed into place only when complete,
so an interrupted build never leaves a half-written cohort where a complete one is expected.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from mixpriv.files import mixpriv_home

logger = logging.getLogger(__name__)


def cohort_dir(kind: str, spacing: float, seed: int, n_patients: int, scans_per_patient: int) -> Path:
    """``$MIXPRIV_HOME/cohorts/<kind>-<spacing>mm-p<patients>x<scans>-seed<seed>``: where an embedded cohort is cached.

    Example:
        >>> cohort_dir("tumour", 1.5, 0, 24, 2).name
        'tumour-1p5mm-p24x2-seed0'
    """
    tag = f"{float(spacing):g}".replace(".", "p")
    return mixpriv_home() / "cohorts" / f"{kind}-{tag}mm-p{n_patients}x{scans_per_patient}-seed{seed}"


def build_once(out: Path, wanted: dict, stored: dict | None, overwrite: bool, what: str,
               write: Callable[[Path], None]) -> Path:
    """Return ``out`` if it already holds what ``wanted`` describes (its ``stored`` parameters), else
    ``write`` it into a temporary sibling folder and swap that in when complete.

    Raises:
        ValueError: ``out`` holds something else and not ``overwrite``.

    Example:
        >>> import tempfile
        >>> out = Path(tempfile.mkdtemp()) / "demo"
        >>> build_once(out, {"n": 1}, None, False, "demo", lambda tmp: (tmp / "a.txt").write_text("a")).name
        'demo'
        >>> sorted(p.name for p in out.iterdir())
        ['a.txt']
    """
    if stored == wanted:
        logger.info("Reusing the %s in %s", what, out)
        return out
    if out.exists() and any(out.iterdir()) and not overwrite:
        held = f"a {what} built with {stored}" if stored else f"files that are not a complete {what}"
        raise ValueError(f"{out} already holds {held}, not {wanted}; pass overwrite=True or another out_dir")
    out.parent.mkdir(parents=True, exist_ok=True)
    start, tmp = time.perf_counter(), Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)
        write(tmp)
        _swap_in(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("Built the %s in %s in %.1f s", what, out, time.perf_counter() - start)
    return out


def _swap_in(tmp: Path, out: Path) -> None:
    """Rename the complete ``tmp`` folder to ``out``, moving any previous ``out`` aside first."""
    if out.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, trash / out.name)
        os.replace(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out)
