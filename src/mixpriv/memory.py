"""How the mixpriv processes ask for memory on the CPU: transparent huge pages, and freed memory kept.

A K = 8 inference allocates and frees gigabytes of large tensors. With 4 KiB pages, memory the C
allocator hands back to the kernel is faulted in again on the next request, and how often that
happens varies with what ran before: measured for ``mixpriv serve`` on the 2-core CPU, 95 k minor
page faults and 0.4-0.6 s of kernel time in a typical K = 8 inference, but 650 k faults and 1.8 s
(the inference 15 % slower) right after another process on the machine ran the same work. PyTorch
backs tensors of 2 MiB and more with transparent huge pages when ``THP_MEM_ALLOC_ENABLE=1``
(PyTorch reads it once, at its first allocation). Measured side by side (processes alternated,
off/on/off/on, same scan, 2026-12-04): page faults of a whole benchmark process 2.2 M and 1.2 M
without, 0.31 M with; K = 8 segmentation 5.68 / 5.02 s without, 5.14 / 4.93 s with; private K = 1
1.13 / 0.93 s against 0.89 / 0.91 s; the baseline unchanged (0.63-0.70 s). The kernel must allow
it (``/sys/kernel/mm/transparent_hugepage/enabled`` set to ``madvise`` or ``always``); elsewhere
the setting does nothing.

Huge pages make each fault cheaper; they do not stop the faults. glibc's ``malloc`` serves every
block of more than its mmap threshold (128 KiB, raised dynamically up to 32 MiB) with a fresh
``mmap`` and unmaps it on ``free``, so each large tensor of each patch batch is faulted in (and
zeroed by the kernel) again. :func:`keep_freed_memory` tells glibc to serve them from its heap and
keep what is freed there (``mallopt``: no mmap, a 2 GiB trim threshold): the next tensor reuses
pages already mapped. Measured in fresh processes alternated without / with / without / with on
the same scan (2026-12-04, 2-core CPU, huge pages on in all, medians of 3): baseline 0.661 / 0.621
/ 0.637 / 0.619 s, private K = 1 0.742 / 0.709 / 0.731 / 0.704 s, K = 8 6.06 / 5.34 / 6.01 / 5.30 s;
minor page faults of the whole process 605 k / 249 k / 724 k / 249 k; peak memory 2119 / 2223 /
2132 / 2176 MiB. The cost: a process keeps its peak heap until it exits (what jemalloc and tcmalloc do too).

The ``mixpriv`` command line calls :func:`tune_cpu_memory` (both) before it imports torch; a
library user who wants the same calls it first. A value already in the environment wins:
``THP_MEM_ALLOC_ENABLE=0`` opts out of huge pages, ``MIXPRIV_KEEP_FREED_MEMORY=0`` (or any glibc
malloc setting in the environment) out of the second.

Example (a script's first lines; ``tests/test_cli.py`` checks the answers in fresh processes):
    >>> from mixpriv.memory import tune_cpu_memory
    >>> tune_cpu_memory()  # doctest: +SKIP
    {'huge_pages': True, 'keep_freed_memory': True}
    >>> import torch  # its CPU allocator now uses huge pages, and glibc keeps freed blocks
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

#: PyTorch's switch for transparent-huge-page backed CPU tensors.
THP_ENV = "THP_MEM_ALLOC_ENABLE"
#: mixpriv's switch for :func:`keep_freed_memory` (``0`` opts out).
KEEP_FREED_ENV = "MIXPRIV_KEEP_FREED_MEMORY"
#: glibc's own malloc settings: when the environment holds one, its owner has chosen; mixpriv leaves malloc alone.
GLIBC_MALLOC_ENV = ("GLIBC_TUNABLES", "MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
                    "MALLOC_TOP_PAD_", "MALLOC_ARENA_MAX")
# mallopt parameters (glibc's malloc.h) and the largest trim threshold an int holds.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_TRIM_THRESHOLD = 2**31 - 1


def prefer_huge_pages() -> bool:
    """Ask PyTorch to back large CPU tensors with transparent huge pages, unless the environment says
    otherwise; ``True`` when this process's PyTorch will do so, ``False`` when torch is already imported
    (PyTorch has read its setting) or ``THP_MEM_ALLOC_ENABLE`` is set to something else than ``1``."""
    if "torch" in sys.modules:
        return False
    os.environ.setdefault(THP_ENV, "1")
    return os.environ[THP_ENV] == "1"


def keep_freed_memory() -> bool:
    """Make glibc's malloc serve large blocks from its heap and keep freed ones mapped (see the module).

    ``True`` when it did; ``False`` off glibc, when ``MIXPRIV_KEEP_FREED_MEMORY`` is set to something
    else than ``1``, or when the environment already holds a glibc malloc setting. It acts on
    allocations made after the call, so call it first.
    """
    os.environ.setdefault(KEEP_FREED_ENV, "1")
    if os.environ[KEEP_FREED_ENV] != "1" or any(name in os.environ for name in GLIBC_MALLOC_ENV):
        return False
    if platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt  # this process's C library
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))


def tune_cpu_memory() -> dict[str, bool]:
    """:func:`prefer_huge_pages` and :func:`keep_freed_memory`; which of them took effect."""
    return {"huge_pages": prefer_huge_pages(), "keep_freed_memory": keep_freed_memory()}
