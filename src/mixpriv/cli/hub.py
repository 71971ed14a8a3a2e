"""``mixpriv models`` and ``mixpriv publish``: the model zoo (:mod:`mixpriv.hub`) from the command line."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_models(sub: argparse._SubParsersAction) -> None:
    """Declare ``mixpriv models``: list the models of a registry.

    Example:
        >>> from mixpriv.cli import build_parser
        >>> build_parser().parse_args(["models"]).registry is None
        True
    """
    p = sub.add_parser("models", help="list the published models of the registry")
    p.add_argument("--registry", default=None, help="registry.json path or URL (default: the package's)")
    p.set_defaults(func=_models)


def _models(args: argparse.Namespace) -> None:
    from mixpriv.hub import load_registry

    registry = load_registry(args.registry)
    for name in registry.names():
        print(f"{name}: {registry.models[name].get('description', '')}")


def add_publish(sub: argparse._SubParsersAction) -> None:
    """Declare ``mixpriv publish``: export a checkpoint to the zoo folder and add it to its ``registry.json``.

    Example:
        >>> from mixpriv.cli import build_parser
        >>> args = build_parser().parse_args(["publish", "last.ckpt", "--name", "tissue-mixpriv-2mm"])
        >>> args.out.as_posix(), args.float32, args.url, args.overwrite
        ('checkpoints', False, None, False)
    """
    p = sub.add_parser("publish", help="export a checkpoint as a model-zoo entry (safetensors + card) and register it")
    p.add_argument("checkpoint", type=Path, help="Lightning checkpoint to export")
    p.add_argument("--name", required=True, help="model name, e.g. tissue-mixpriv-2mm")
    p.add_argument("--out", type=Path, default=Path("checkpoints"), help="zoo folder (holds registry.json)")
    p.add_argument("--card", type=Path, default=None, help="JSON file of extra card fields (recipe, data, evaluation)")
    p.add_argument("--bank", type=Path, default=None, help="demo reference bank to publish with a Mixup-Privacy model")
    p.add_argument("--float32", action="store_true", help="store float32 weights (default float16)")
    p.add_argument("--url", default=None, help="base URL the folder will be served from")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_publish)


def _publish(args: argparse.Namespace) -> None:
    import json

    import torch

    from mixpriv.hub import export_pretrained, update_registry
    from mixpriv.mixing.bank import ReferenceBank
    from mixpriv.training import load_model

    card = json.loads(args.card.read_text()) if args.card else {}
    bank = ReferenceBank.load(args.bank) if args.bank else None
    folder = export_pretrained(load_model(args.checkpoint), args.out, args.name, bank=bank, card=card,
                               dtype=torch.float32 if args.float32 else torch.float16, overwrite=args.overwrite)
    update_registry(folder, args.out / "registry.json", url=args.url)
    print(f"published {args.name} in {folder}")
