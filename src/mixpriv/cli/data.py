"""``mixpriv build-cohort``, ``mixpriv keygen`` and ``mixpriv convert-brats``: the data commands.

The synthetic cohort, a secret key, and BraTS 2021 folders to and from the nnU-Net v2 layout.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_build_cohort(sub: argparse._SubParsersAction) -> None:
    """Declare ``mixpriv build-cohort``: write the embedded synthetic brain cohort.

    Example:
        >>> from mixpriv.cli import build_parser
        >>> args = build_parser().parse_args(["build-cohort", "--spacing", "1"])
        >>> args.spacing, args.n_patients, args.scans_per_patient, args.out
        (1.0, 60, 2, None)
    """
    p = sub.add_parser("build-cohort", help="build the embedded synthetic brain cohort (nnU-Net v2 layout)")
    p.add_argument("--out", type=Path, default=None, help="folder (default: under $MIXPRIV_HOME or ~/.cache/mixpriv)")
    p.add_argument("--spacing", type=float, default=2.0, help="voxel size in mm (2 by default, 1 for paper size)")
    p.add_argument("--n-patients", type=int, default=60)
    p.add_argument("--scans-per-patient", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_build_cohort)


def _build_cohort(args: argparse.Namespace) -> None:
    from mixpriv.data.cohort import build_cohort, default_cohort_dir

    out = args.out or default_cohort_dir(args.spacing, args.seed, args.n_patients, args.scans_per_patient)
    path = build_cohort(out, n_patients=args.n_patients, scans_per_patient=args.scans_per_patient,
                        spacing=args.spacing, seed=args.seed)
    print(path)


def add_keygen(sub: argparse._SubParsersAction) -> None:
    """Declare ``mixpriv keygen``: save a reference bank (the client's secret key) with mode 600.

    Example:
        >>> from mixpriv.cli import build_parser
        >>> args = build_parser().parse_args(["keygen", "--out", "key.mpk", "--n", "4"])
        >>> args.out.name, args.split, args.n, args.overwrite
        ('key.mpk', 'train', 4, False)
    """
    p = sub.add_parser("keygen", help="create a secret key: a reference bank saved with owner-only permissions")
    p.add_argument("--out", type=Path, required=True, help="key file to write (e.g. key.mpk)")
    p.add_argument("--data", type=Path, default=None, help="labelled references (default: embedded cohort)")
    p.add_argument("--split", default="train")
    p.add_argument("--n", type=int, default=None, help="number of references (default: all of the split)")
    p.add_argument("--spacing", type=float, default=None,
                   help="voxel size of the references (mm; default: that of --model)")
    p.add_argument("--model", default="tissue-mixpriv-2mm",
                   help="the model the key is for (its spacing is the default): name, folder, checkpoint or URL")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_keygen)


def _keygen(args: argparse.Namespace) -> None:
    from mixpriv.data.datamodule import bank_from_cases
    from mixpriv.data.folder import DatasetFolder
    from mixpriv.data.sources import resolve_data_dir

    spacing = args.spacing
    if spacing is None:
        from mixpriv.training import load_model

        spacing = load_model(args.model, kind="mixpriv").hparams.input_spacing
    bank = bank_from_cases(DatasetFolder(resolve_data_dir(args.data)), args.split, spacing, args.n)
    path = bank.save(args.out, overwrite=args.overwrite)
    print(f"wrote {bank!r} to {path} (mode 600)")


def add_convert_brats(sub: argparse._SubParsersAction) -> None:
    """Declare ``mixpriv convert-brats``: BraTS 2021 challenge layout <-> nnU-Net v2 folder.

    Example:
        >>> parser = argparse.ArgumentParser()
        >>> add_convert_brats(parser.add_subparsers(dest="command"))
        >>> args = parser.parse_args(["convert-brats", "BraTS2021", "nnUNet_raw", "--modalities", "t1ce", "flair"])
        >>> args.to, args.modalities, args.dataset_id, args.seed, args.func.__name__
        ('nnunet', ['t1ce', 'flair'], None, None, '_convert_brats')
    """
    p = sub.add_parser("convert-brats",
                       help="convert a BraTS 2021 folder to an nnU-Net v2 folder (Dataset<ID>_BraTS2021), or back")
    p.add_argument("src", type=Path,
                   help="BraTS folder (BraTS2021_XXXXX/...), or the nnU-Net dataset folder with --to brats")
    p.add_argument("out", type=Path, help="folder receiving Dataset<ID>_BraTS2021 (nnUNet_raw), or the BraTS folder "
                                          "to write with --to brats (new or empty)")
    p.add_argument("--to", choices=("nnunet", "brats"), default="nnunet", help="layout to write (default: nnunet)")
    p.add_argument("--modalities", nargs="+", default=None, metavar="MODALITY",
                   help="modalities among t1, t1ce, t2, flair, one channel each, in order (default: t1ce)")
    p.add_argument("--dataset-id", type=int, default=None, help="nnU-Net dataset id, 1 to 999 (default: 1)")
    p.add_argument("--seed", type=int, default=None, help="seed of the split by patient (patients.csv; without it each case is its own patient) (default: 0)")
    p.add_argument("--split-fractions", type=float, nargs=3, default=None, metavar=("TRAIN", "VAL", "TEST"),
                   help="fractions of the patients (default: 0.6 0.2 0.2)")
    p.set_defaults(func=_convert_brats)


def _convert_brats(args: argparse.Namespace) -> None:
    from mixpriv.data import brats, brats_convert
    from mixpriv.validation import InputError

    options = {"modalities": args.modalities, "dataset_id": args.dataset_id, "seed": args.seed,
               "fractions": args.split_fractions}
    if args.to == "brats":
        flags = {"modalities": "--modalities", "dataset_id": "--dataset-id", "seed": "--seed",
                 "fractions": "--split-fractions"}
        given = [flags[name] for name, value in options.items() if value is not None]
        if given:
            raise InputError(f"{', '.join(given)} only apply to --to nnunet (the dataset records them)")
        print(brats_convert.nnunet_to_brats(args.src, args.out))
        return
    defaults = {"modalities": brats.DEFAULT_MODALITIES, "dataset_id": 1, "seed": 0,
                "fractions": brats.DEFAULT_FRACTIONS}
    chosen = {name: defaults[name] if value is None else value for name, value in options.items()}
    print(brats_convert.brats_to_nnunet(args.src, args.out, **chosen))
