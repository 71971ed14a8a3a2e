"""``mixpriv evaluate`` and ``mixpriv predict``: private segmentation in-process (a Dice table, one scan).

Each command is self-contained: ``_evaluate`` and ``_predict`` import what they use when they run.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_evaluate(sub: argparse._SubParsersAction) -> None:
    """Declare ``mixpriv evaluate``: the Dice table and figures of the test split.

    Example:
        >>> from mixpriv.cli import build_parser
        >>> args = build_parser().parse_args(["evaluate", "--mixpriv", "mp.ckpt"])
        >>> args.k, args.seed, args.baseline, args.out.as_posix()
        (8, 0, None, 'outputs/evaluation')
    """
    p = sub.add_parser("evaluate", help="Dice table (Baseline, Naive, Naive+TTA, Learned, Learned+TTA) on a test split")
    p.add_argument("--mixpriv", type=Path, required=True, help="Mixup-Privacy checkpoint")
    p.add_argument("--baseline", type=Path, default=None, help="baseline checkpoint (optional row)")
    p.add_argument("--data", type=Path, default=None, help="nnU-Net v2 folder (default: embedded cohort)")
    p.add_argument("--key", type=Path, default=None, help="reference bank (default: drawn from the training split)")
    p.add_argument("--k", type=int, default=8, help="number of TTA references")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-cases", type=int, default=None)
    p.add_argument("--out", type=Path, default=Path("outputs/evaluation"))
    p.set_defaults(func=_evaluate)


def _evaluate(args: argparse.Namespace) -> None:
    from mixpriv.data.datamodule import bank_from_cases, resolve_data_dir
    from mixpriv.data.folder import DatasetFolder
    from mixpriv.evaluation.runner import evaluate_models
    from mixpriv.mixing.bank import ReferenceBank
    from mixpriv.training import load_model

    private = load_model(args.mixpriv)
    baseline = load_model(args.baseline) if args.baseline else None
    folder = DatasetFolder(resolve_data_dir(args.data))
    bank = ReferenceBank.load(args.key) if args.key else bank_from_cases(folder, "train", private.hparams.input_spacing)
    result = evaluate_models(baseline, private, folder, bank, args.out, k=args.k, seed=args.seed,
                             max_cases=args.max_cases)
    print(result.table.to_markdown(title="Segmentation (Dice), test split", notes={"K": str(args.k)}))
    print("whole-volume seconds per case:", {k: round(v, 2) for k, v in result.seconds.items()})
    print(f"outputs in {args.out}")


def add_predict(sub: argparse._SubParsersAction) -> None:
    """Declare ``mixpriv predict``: privately segment one NIfTI scan (mix, segment, unmix, TTA) in-process.

    Example:
        >>> from mixpriv.cli import build_parser
        >>> args = build_parser().parse_args(["predict", "scan.nii.gz", "--model", "mp.ckpt", "--key", "key.mpk",
        ...                                   "--out", "seg.nii.gz"])
        >>> args.k, args.method, args.variance, args.seed
        (8, 'learned', None, None)
    """
    p = sub.add_parser("predict", help="privately segment one scan in-process (mix, segment, unmix, TTA)")
    p.add_argument("scan", type=Path, help="NIfTI scan")
    p.add_argument("--model", type=Path, required=True, help="Mixup-Privacy checkpoint")
    p.add_argument("--key", type=Path, required=True, help="reference bank from `mixpriv keygen`")
    p.add_argument("--out", type=Path, required=True, help="label map to write (NIfTI, on the scan's grid)")
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--method", choices=("learned", "naive"), default="learned")
    p.add_argument("--variance", type=Path, default=None, help="also write the TTA variance map here")
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(func=_predict)


def _predict(args: argparse.Namespace) -> None:
    import numpy as np
    import torch

    from mixpriv.constants import IMAGE
    from mixpriv.inference.volume import load_scan, save_like, to_original_grid
    from mixpriv.lightning.tta import TTAEnsembler
    from mixpriv.mixing.bank import ReferenceBank
    from mixpriv.training import load_model

    model = load_model(args.model)
    subject, original = load_scan(args.scan, model.hparams.input_spacing)
    ensembler = TTAEnsembler(model, ReferenceBank.load(args.key), k=args.k, methods=(args.method,), seed=args.seed)
    result = ensembler(subject[IMAGE].data.float())[args.method]
    affine = subject[IMAGE].affine
    labels = to_original_grid(result.labels[None].to(torch.uint8), affine, original, label=True)
    print(f"wrote {save_like(labels, args.scan, args.out)}")
    if args.variance:
        variance = to_original_grid(result.variance.sum(0, keepdim=True), affine, original, label=False)
        print(f"wrote {save_like(variance, args.scan, args.variance, dtype=np.float32)}")
