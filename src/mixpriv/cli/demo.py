"""``mixpriv demo``: the main job end to end (:func:`mixpriv.demo.run_demo`)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_demo(sub: argparse._SubParsersAction) -> None:
    """Declare ``mixpriv demo``: cohort, published (or trained) models, private segmentation, Dice table.

    Example:
        >>> from mixpriv.cli import build_parser
        >>> args = build_parser().parse_args(["demo", "--max-cases", "0"])
        >>> args.k, args.max_cases, args.train, args.task, args.out
        (8, 0, False, 'tissue', None)
    """
    p = sub.add_parser("demo", help="the main job: cohort -> published (or trained) models -> private segmentation "
                                    "-> Dice table")
    p.add_argument("--task", choices=("tissue", "tumour"), default="tissue",
                   help="the embedded cohort and its models: brain tissue (CSF/GM/WM) or brain tumours (NCR/ED/ET)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default outputs/demo, outputs/demo-tumour)")
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--max-cases", type=int, default=2, help="held-out test scans to segment (0: all)")
    p.add_argument("--train", action="store_true", help="train the recipes instead of loading the published models")
    p.add_argument("overrides", nargs="*", help="with --train: recipe overrides, e.g. trainer.max_steps=200")
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> None:
    from mixpriv.demo import run_demo

    out = args.out or Path("outputs/demo" if args.task == "tissue" else f"outputs/demo-{args.task}")
    run_demo(out, k=args.k, max_cases=args.max_cases or None, train=args.train, overrides=args.overrides,
             task=args.task)
