"""``mixpriv evaluate``, ``mixpriv predict``, ``predict-baseline`` and ``predict-compared``: segmentation.

``evaluate`` writes a Dice table, ``predict`` privately segments one scan, ``predict-baseline``
segments one scan with the non-private baseline, ``predict-compared`` with a compared system
(Privacy-Net, Deformation-Proxy), in-process or through its ``mixpriv serve``. Models are checkpoints, model folders or
registry names (:func:`mixpriv.training.load_model`). The output files are checked (never an
input, a NIfTI name, a writable folder) before anything is computed and all appear at the end,
or none. Each command imports what it uses when it runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Self

from mixpriv.cli.options import add_connection, add_reference_warp, server_errors_exit

if TYPE_CHECKING:
    import torch

    from mixpriv.inference.scans import TemplateSpace


def add_evaluate(sub: argparse._SubParsersAction) -> None:
    """Declare ``mixpriv evaluate``: the Dice table and figures of the test split.

    Example:
        >>> from mixpriv.cli import build_parser
        >>> args = build_parser().parse_args(["evaluate", "--mixpriv", "mp.ckpt"])
        >>> args.k, args.seed, args.baseline, args.privacynet, args.out.as_posix()
        (8, 0, None, None, 'outputs/evaluation')
    """
    p = sub.add_parser("evaluate", help="Dice table (Baseline, Privacy-Net, Deformation-Proxy, Naive, Naive+TTA, "
                                        "Learned, Learned+TTA) on a test split")
    p.add_argument("--mixpriv", required=True, help="Mixup-Privacy model: checkpoint, folder, registry name or URL")
    p.add_argument("--baseline", default=None, help="baseline model (optional row): checkpoint, folder, name or URL")
    p.add_argument("--privacynet", default=None,
                   help="Privacy-Net model (optional compared row): checkpoint, folder, name or URL")
    p.add_argument("--deformproxy", default=None,
                   help="Deformation-Proxy model (optional compared row): checkpoint, folder, name or URL")
    p.add_argument("--data", type=Path, default=None, help="nnU-Net v2 folder (default: embedded cohort)")
    p.add_argument("--key", type=Path, default=None, help="reference bank (default: drawn from the training split)")
    p.add_argument("--k", type=int, default=8, help="number of TTA references")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-cases", type=int, default=None)
    add_reference_warp(p)
    p.add_argument("--out", type=Path, default=Path("outputs/evaluation"))
    p.set_defaults(func=_evaluate)


def _evaluate(args: argparse.Namespace) -> None:
    from mixpriv.data.datamodule import bank_from_cases
    from mixpriv.data.folder import DatasetFolder
    from mixpriv.data.sources import resolve_data_dir
    from mixpriv.evaluation.compared import compared_systems
    from mixpriv.evaluation.runner import evaluate_models
    from mixpriv.mixing.bank import ReferenceBank
    from mixpriv.mixing.settings import MixingSettings
    from mixpriv.training import load_model

    private = load_model(args.mixpriv, kind="mixpriv")
    mixing = MixingSettings.of_model(private.hparams, reference_warp=args.reference_warp)
    baseline = load_model(args.baseline, kind="baseline") if args.baseline else None
    compared = compared_systems(load_model(source, kind=kind) for kind, source in (
        ("privacynet", args.privacynet), ("deformproxy", args.deformproxy)) if source)
    folder = DatasetFolder(resolve_data_dir(args.data))
    bank = ReferenceBank.load(args.key) if args.key else bank_from_cases(folder, "train", private.hparams.input_spacing)
    result = evaluate_models(baseline, private, folder, bank, args.out, k=args.k, seed=args.seed,
                             max_cases=args.max_cases, compared=compared, mixing=mixing)
    print(result.table.to_markdown(title="Segmentation (Dice), test split", notes={"K": str(args.k),
                                                                                  "mixing": mixing.name}))
    print("whole-volume seconds per case:", {k: round(v, 2) for k, v in result.seconds.items()})
    print(f"outputs in {args.out}")


def add_predict(sub: argparse._SubParsersAction) -> None:
    """Declare ``mixpriv predict``: privately segment one NIfTI scan (mix, segment, unmix, TTA) in-process.

    Example:
        >>> from mixpriv.cli import build_parser
        >>> args = build_parser().parse_args(["predict", "scan.nii.gz", "--model", "mp.ckpt", "--key", "key.mpk",
        ...                                   "--out", "seg.nii.gz"])
        >>> args.k, args.method, args.variance, args.probabilities, args.seed, args.reference_warp
        (8, 'learned', None, None, None, None)
    """
    p = sub.add_parser("predict", help="privately segment one scan in-process (mix, segment, unmix, TTA)")
    p.add_argument("scan", type=Path, help="NIfTI scan")
    p.add_argument("--model", required=True, help="Mixup-Privacy model: checkpoint, folder, registry name or URL")
    p.add_argument("--key", type=Path, required=True, help="reference bank from `mixpriv keygen`")
    _add_outputs(p)
    p.add_argument("--variance", type=Path, default=None, help="also write the TTA variance map here")
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--method", choices=("learned", "naive"), default="learned")
    p.add_argument("--seed", type=int, default=None)
    add_reference_warp(p)
    p.set_defaults(func=_predict)


def _predict(args: argparse.Namespace) -> None:
    from mixpriv.inference.scans import TemplateSpace
    from mixpriv.lightning.tta import TTAEnsembler
    from mixpriv.mixing.bank import ReferenceBank
    from mixpriv.mixing.settings import MixingSettings
    from mixpriv.training import load_model

    with _ScanOutputs(args, inputs=(args.key, args.model), variance=args.variance) as outputs:
        model = load_model(args.model, kind="mixpriv")
        key = ReferenceBank.load(args.key)
        mixing = MixingSettings.of_model(model.hparams, reference_warp=args.reference_warp)
        ensembler = TTAEnsembler(model, key, k=args.k, methods=(args.method,), mixing=mixing, seed=args.seed)
        image = outputs.load_scan(TemplateSpace.of_key(key), model.hparams.input_spacing)
        result = ensembler(image)[args.method]
        outputs.save(result.probabilities, variance=result.variance.sum(0, keepdim=True))


def add_predict_baseline(sub: argparse._SubParsersAction) -> None:
    """Declare ``mixpriv predict-baseline``: segment one NIfTI scan with a non-private baseline model.

    Example:
        >>> from mixpriv.cli import build_parser
        >>> args = build_parser().parse_args(["predict-baseline", "scan.nii.gz", "--model", "tissue-baseline-2mm",
        ...                                   "--out", "seg.nii.gz"])
        >>> args.model, args.out.name, args.probabilities
        ('tissue-baseline-2mm', 'seg.nii.gz', None)
    """
    p = sub.add_parser("predict-baseline", help="segment one scan with the non-private baseline (no key, no mixing)")
    p.add_argument("scan", type=Path, help="NIfTI scan")
    p.add_argument("--model", required=True, help="baseline model: checkpoint, folder, registry name or URL")
    _add_outputs(p)
    _add_template_data(p)
    p.set_defaults(func=_predict_baseline)


def _predict_baseline(args: argparse.Namespace) -> None:
    from mixpriv.inference.volume import baseline_probabilities
    from mixpriv.training import load_model

    with _ScanOutputs(args, inputs=(args.model,)) as outputs:
        model = load_model(args.model, kind="baseline")
        spacing = model.hparams.input_spacing
        outputs.save(baseline_probabilities(model, outputs.load_scan(_template_space(args, spacing), spacing)))


def add_predict_compared(sub: argparse._SubParsersAction) -> None:
    """Declare ``mixpriv predict-compared``: segment one NIfTI scan with Privacy-Net or Deformation-Proxy.

    The client half (the encoder, or the warp by a fresh secret key and its inverse) runs here; the
    segmenter runs here too, or on ``--server`` (a ``mixpriv serve`` of the same model), which is
    then sent only the view.

    Example:
        >>> from mixpriv.cli import build_parser
        >>> args = build_parser().parse_args(["predict-compared", "scan.nii.gz", "--model", "tissue-privacynet-2mm",
        ...                                   "--out", "seg.nii.gz"])
        >>> args.server, args.seed, args.wire_dtype, args.register
        (None, None, 'float32', False)
    """
    p = sub.add_parser("predict-compared", help="segment one scan with a compared system (Privacy-Net, "
                                                "Deformation-Proxy), in-process or through its server")
    p.add_argument("scan", type=Path, help="NIfTI scan")
    p.add_argument("--model", required=True, help="Privacy-Net or Deformation-Proxy model: checkpoint, folder, "
                                                  "registry name or URL (its client half runs here)")
    _add_outputs(p)
    _add_template_data(p)
    p.add_argument("--view", type=Path, default=None,
                   help="also write what the server sees (the encoded or warped scan), resampled onto the scan's grid")
    p.add_argument("--server", default=None, help="segment on this `mixpriv serve` (e.g. http://127.0.0.1:8000) "
                                                  "instead of in-process: only the view is sent")
    add_connection(p, "view", condition="with --server: ")
    p.add_argument("--seed", type=int, default=None, help="seed of the deformation key (reproduction only)")
    p.set_defaults(func=_predict_compared)


def _predict_compared(args: argparse.Namespace) -> None:
    from mixpriv.evaluation.compared import system_name
    from mixpriv.inference.mixtures import client_generator
    from mixpriv.inference.proxies import ProxyPipeline
    from mixpriv.training import load_model

    with _ScanOutputs(args, inputs=(args.model,), view=args.view) as outputs:
        model = load_model(args.model)
        system_name(model, args.model)  # refuses a baseline or a Mixup-Privacy model
        spacing = model.hparams.input_spacing
        image = outputs.load_scan(_template_space(args, spacing), spacing)
        if args.server is None:
            run = ProxyPipeline.of_model(model)(image, client_generator(args.seed))
        else:
            run = _segment_remotely(args, model, image)
        outputs.save(run.probabilities, view=run.view)


def _segment_remotely(args: argparse.Namespace, model, image: torch.Tensor):
    """One scan through a remote compared-system server (only the view is sent)."""
    from mixpriv.server.auth import read_token
    from mixpriv.server.client import ProxyClient

    with server_errors_exit(), ProxyClient(args.server, model, token=read_token(args.token_file), seed=args.seed,
                                           wire_dtype=args.wire_dtype, timeout=args.timeout) as client:
        return client.segment(image)


def _template_space(args: argparse.Namespace, spacing) -> TemplateSpace | None:
    """Where a model without a key segments: any field of view, or with ``--register`` the template's
    (the training cases of ``--template-data``, default the embedded cohort at the model's voxel size)."""
    if not args.register:
        return None
    from mixpriv.data.folder import DatasetFolder
    from mixpriv.data.sources import resolve_data_dir
    from mixpriv.inference.scans import TemplateSpace

    side = spacing if isinstance(spacing, (int, float)) or spacing is None else max(spacing)
    return TemplateSpace.of_cases(DatasetFolder(resolve_data_dir(args.template_data, side or 2.0)), spacing)


def _add_template_data(p: argparse.ArgumentParser) -> None:
    p.add_argument("--template-data", type=Path, default=None,
                   help="with --register: nnU-Net folder whose training cases make the template (default: the "
                        "embedded cohort, the published models' training data)")


def _add_outputs(p: argparse.ArgumentParser) -> None:
    """What ``predict`` and ``predict-baseline`` share: registration, the label map and the class probabilities."""
    p.add_argument("--register", action="store_true",
                   help="register the scan (12-dof affine, SimpleITK) to the model's template space first: for scans "
                        "in scanner space, with or without skull; results come back on the scan's own grid")
    p.add_argument("--out", type=Path, required=True, help="label map to write (.nii or .nii.gz, on the scan's grid)")
    p.add_argument("--probabilities", type=Path, default=None, help="also write the class probabilities here")


class _ScanOutputs:
    """One scan in, its label map and the maps asked for out: declared before computing, written together.

    Creating it checks every output path (never the scan nor another input, a NIfTI name, a
    writable folder) and reserves its temporary file; :meth:`save` writes the maps on the scan's
    grid, renames them all into place and prints their paths. Leaving the ``with`` block on an
    error leaves every previous output as it was.

    Args:
        args: the command's arguments (``scan``, ``register``, ``out``, ``probabilities``).
        inputs: the other input files (key, model).
        extra: more optional maps, ``--<name>`` -> path (e.g. ``variance``).
    """

    def __init__(self, args: argparse.Namespace, inputs: tuple[str | Path | None, ...] = (),
                 **extra: Path | None) -> None:
        from mixpriv.inference.volume import nifti_outputs

        self.scan = args.scan
        self.register = args.register
        paths = {"--out": args.out, "--probabilities": args.probabilities}
        paths.update({f"--{name}": path for name, path in extra.items()})
        self.files = nifti_outputs(paths, inputs=(args.scan, *inputs))
        self.prepared = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.files.discard()

    def load_scan(self, space: TemplateSpace | None, spacing: float | None) -> torch.Tensor:
        """The scan placed in ``space`` (registered if asked; else canonical at ``spacing``): (1, D, H, W)."""
        from mixpriv.inference.scans import prepare_scan

        self.prepared = prepare_scan(self.scan, space, spacing=spacing, register=self.register)
        return self.prepared.image

    def save(self, probabilities: torch.Tensor, **extra: torch.Tensor) -> None:
        """Write the label map (the argmax of ``probabilities`` (C, D, H, W) resampled onto the scan's grid),
        the probabilities and the ``extra`` maps (name -> (C, D, H, W)) that were asked for, then print their paths."""
        import numpy as np
        import torch

        from mixpriv.inference.volume import save_like

        native = self.prepared.probabilities_to_native(probabilities)
        maps = {"--out": native.argmax(0, keepdim=True).to(torch.uint8), "--probabilities": native,
                **{f"--{name}": self.prepared.to_native(volume) for name, volume in extra.items()}}
        for name, path in self.files.paths.items():
            dtype = np.uint8 if name == "--out" else np.float32
            save_like(maps[name], self.scan, path, dtype=dtype, outputs=self.files)
        for path in self.files.commit().values():
            print(f"wrote {path}")
