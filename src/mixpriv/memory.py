"""How the mixpriv processes ask PyTorch for memory on the CPU: transparent huge pages.

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

The ``mixpriv`` command line calls :func:`prefer_huge_pages` before it imports torch; a library
user who wants the same sets the variable before importing torch. A value already in the
environment wins (``THP_MEM_ALLOC_ENABLE=0`` opts out).

Example (a script's first lines; ``tests/test_cli.py`` checks both answers in fresh processes):
    >>> from mixpriv.memory import prefer_huge_pages
    >>> prefer_huge_pages()  # doctest: +SKIP
    True
    >>> import torch  # its CPU allocator now uses huge pages for large tensors
"""

from __future__ import annotations

import os
import sys

#: PyTorch's switch for transparent-huge-page backed CPU tensors.
THP_ENV = "THP_MEM_ALLOC_ENABLE"


def prefer_huge_pages() -> bool:
    """Ask PyTorch to back large CPU tensors with transparent huge pages, unless the environment says
    otherwise; ``True`` when this process's PyTorch will do so, ``False`` when torch is already imported
    (PyTorch has read its setting) or ``THP_MEM_ALLOC_ENABLE`` is set to something else than ``1``."""
    if "torch" in sys.modules:
        return False
    os.environ.setdefault(THP_ENV, "1")
    return os.environ[THP_ENV] == "1"
