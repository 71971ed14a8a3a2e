"""The ``mixpriv`` command line: build the cohort, train, evaluate, make a key, segment, audit privacy, demo.

One module per command group; each command is a pair: ``add_<command>(sub)`` declares its
sub-parser (flags, defaults, help) and ``_<command>(args)`` runs it, importing the heavy parts
of the library (torch, matplotlib, the server) only then, so that ``mixpriv --help`` stays fast.

- :mod:`mixpriv.cli.data`: ``build-cohort``, ``convert-brats``, ``keygen``
- :mod:`mixpriv.cli.training`: ``train``, ``finetune``
- :mod:`mixpriv.cli.inference`: ``evaluate``, ``predict``, ``predict-baseline``, ``predict-compared``
- :mod:`mixpriv.cli.service`: ``serve``, ``segment``
- :mod:`mixpriv.cli.hub`: ``models``, ``publish``
- :mod:`mixpriv.cli.audit`: ``audit``
- :mod:`mixpriv.cli.demo`: ``demo``
- :mod:`mixpriv.cli.options`: flags several commands share (``--reference-warp``, the server connection)

This module holds :func:`build_parser` and :func:`main`, the ``mixpriv`` console script
(``mixpriv = mixpriv.cli:main``); ``python -m mixpriv.cli`` runs it too.
"""

from __future__ import annotations

import argparse
import logging

from mixpriv import __version__
from mixpriv.cli.audit import add_audit
from mixpriv.cli.data import add_build_cohort, add_convert_brats, add_keygen
from mixpriv.cli.demo import add_demo
from mixpriv.cli.hub import add_models, add_publish
from mixpriv.cli.inference import (
    add_evaluate,
    add_predict,
    add_predict_baseline,
    add_predict_compared,
)
from mixpriv.cli.service import add_segment, add_serve
from mixpriv.cli.training import add_finetune, add_train

__all__ = ["build_parser", "main"]

log = logging.getLogger("mixpriv")

# The order of the commands in ``mixpriv --help``.
_COMMANDS = (add_build_cohort, add_convert_brats, add_train, add_finetune, add_evaluate, add_keygen, add_predict,
             add_predict_baseline, add_predict_compared, add_serve, add_segment, add_models, add_publish, add_audit,
             add_demo)


def build_parser() -> argparse.ArgumentParser:
    """The ``mixpriv`` argument parser, one sub-command per command of :mod:`mixpriv.cli`.

    Each parsed command carries the function that runs it as ``func``.

    Example:
        >>> args = build_parser().parse_args(["keygen", "--out", "key.mpk"])
        >>> args.command, args.split, args.func.__name__
        ('keygen', 'train', '_keygen')
    """
    parser = argparse.ArgumentParser(prog="mixpriv", description="Privacy-preserving 3D segmentation (Mixup-Privacy).")
    parser.add_argument("--version", action="version", version=f"mixpriv {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one ``mixpriv`` command; the exit status: 0, or 2 after logging a user error.

    Args:
        argv: the arguments after ``mixpriv`` (default: ``sys.argv[1:]``).

    Example:
        >>> main(["models", "--registry", "no-such-registry.json"])  # logs "registry ... does not exist"
        2
    """
    from mixpriv.memory import tune_cpu_memory

    tune_cpu_memory()  # before anything imports torch or allocates much
    from mixpriv.hub.errors import HubError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except (ValueError, KeyError, OSError, HubError) as error:
        log.error("%s", error)
        log.debug("traceback", exc_info=True)
        return 2
    return 0


