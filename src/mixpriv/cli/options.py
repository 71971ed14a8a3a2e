"""What several ``mixpriv`` commands share: the client's reference-warp and connection flags, and how a
client command reports a server's error.

Example:
    >>> import argparse
    >>> p = argparse.ArgumentParser()
    >>> add_connection(p, "mixtures")
    >>> add_reference_warp(p)
    >>> args = p.parse_args([])
    >>> args.token_file, args.wire_dtype, args.timeout, args.reference_warp
    (None, 'float32', 600.0, None)
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def add_reference_warp(p: argparse.ArgumentParser) -> None:
    """``--reference-warp``, of the commands that mix (``evaluate``, ``predict``, ``segment``)."""
    p.add_argument("--reference-warp", type=float, default=None, metavar="VOXELS",
                   help="warp every reference of every mixture by a fresh random diffeomorphism of this peak "
                        "displacement (voxels), so that no reference recurs in what the server receives "
                        "(against the key-recovery attacker; default: none)")


def add_connection(p: argparse.ArgumentParser, sent: str, condition: str = "") -> None:
    """``--token-file``, ``--wire-dtype`` and ``--timeout`` of a client of ``mixpriv serve``.

    Args:
        p: the command's parser.
        sent: what the client sends (``"mixtures"``, ``"view"``), for the help.
        condition: a prefix of each help when the flags only apply with another (``"with --server: "``).
    """
    p.add_argument("--token-file", type=Path, default=None,
                   help=f"{condition}file holding the bearer token (default: $MIXPRIV_SERVER_TOKEN)")
    p.add_argument("--wire-dtype", choices=("float32", "float16"), default="float32",
                   help=f"{condition}dtype of the {sent} sent (float16: half the bytes)")
    p.add_argument("--timeout", type=float, default=600.0, help=f"{condition}seconds a request may take")


@contextmanager
def server_errors_exit() -> Iterator[None]:
    """Run a client command's server exchange: httpx's URL-per-request lines kept out of the output, and a
    :class:`~mixpriv.server.client.ServerError` logged as its message and turned into exit status 1.

    Example:
        >>> from mixpriv.server.client import ServerError
        >>> with server_errors_exit():
        ...     raise ServerError("the server refused the token")
        Traceback (most recent call last):
        ...
        SystemExit: 1
    """
    from mixpriv.server.client import ServerError

    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        yield
    except ServerError as error:
        logging.getLogger("mixpriv").error("%s", error)
        raise SystemExit(1) from None
