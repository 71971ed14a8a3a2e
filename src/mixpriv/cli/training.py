"""``mixpriv train`` and ``mixpriv finetune``: the training commands."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_train(sub: argparse._SubParsersAction) -> None:
    """Declare ``mixpriv train``: train a model from a recipe, with ``section.key=value`` overrides.

    Example:
        >>> from mixpriv.cli import build_parser
        >>> args = build_parser().parse_args(["train", "--recipe", "tissue-mixpriv", "trainer.max_steps=100"])
        >>> args.recipe, args.overrides, args.resume, args.out
        ('tissue-mixpriv', ['trainer.max_steps=100'], False, None)
    """
    p = sub.add_parser("train", help="train a model from a recipe")
    p.add_argument("--recipe", required=True, help="recipe name (recipes/<name>.yaml) or path")
    p.add_argument("--out", type=Path, default=None, help="run folder (default: runs/<recipe name>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint (e.g. after its max_time cap)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. trainer.max_steps=100")
    p.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> None:
    from mixpriv.recipe import load_recipe
    from mixpriv.training import train

    recipe = load_recipe(args.recipe, args.overrides)
    run = train(recipe, args.out or Path("runs") / recipe.get("name", "run"), resume=args.resume)
    print(f"checkpoint: {run.checkpoint}")
    print(f"training: {run.stats['train_seconds_total']} s, {run.stats['patches_per_second']} patches/s")


def add_finetune(sub: argparse._SubParsersAction) -> None:
    """Declare ``mixpriv finetune``: continue training a published model on the user's labelled data.

    Example:
        >>> from mixpriv.cli import build_parser
        >>> args = build_parser().parse_args(["finetune", "--from", "tissue-mixpriv-2mm", "--data", "my-data"])
        >>> args.source, args.max_steps, args.lr, args.out.as_posix()
        ('tissue-mixpriv-2mm', 300, None, 'runs/finetuned')
    """
    p = sub.add_parser("finetune", help="continue training a published model on your labelled data")
    p.add_argument("--from", dest="source", required=True, help="model name, folder or URL")
    p.add_argument("--data", type=Path, required=True, help="nnU-Net v2 folder with labels")
    p.add_argument("--out", type=Path, default=Path("runs/finetuned"))
    p.add_argument("--max-steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the model's)")
    p.add_argument("--freeze", action="append", default=[], metavar="MODULE",
                   help="keep this submodule fixed (repeatable): e.g. segmenter (train the unmixer alone) "
                        "or segmenter.encoder")
    p.add_argument("--freeze-encoder", action="append_const", dest="freeze", const="segmenter.encoder",
                   help="the same as --freeze segmenter.encoder")
    p.add_argument("--name", default=None, help="name of the exported fine-tuned model")
    p.add_argument("overrides", nargs="*", help="recipe overrides, e.g. data.batch_size=2")
    p.set_defaults(func=_finetune)


def _finetune(args: argparse.Namespace) -> None:
    from mixpriv.finetune import finetune

    run = finetune(args.source, args.data, args.out, max_steps=args.max_steps, lr=args.lr,
                   freeze=args.freeze, overrides=args.overrides, export_name=args.name)
    print(f"checkpoint: {run.checkpoint}")
