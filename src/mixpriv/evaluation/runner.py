"""Evaluate the baseline and the private pipeline on a test split (paper Table 1, Fig. 2-3).

For every test case the server segments K mixtures once; the client unmixes them naively
and with the learned unmixer. ``Naive`` / ``Learned`` use the first reference only,
``Naive+TTA`` / ``Learned+TTA`` average all K; the Dice-versus-K curve uses the first k.
A model trained with K-way mixing is evaluated K-way (its ``references_per_mix``). The compared
systems (Privacy-Net, Deformation-Proxy; :mod:`mixpriv.evaluation.compared`) add their rows on the
same scans.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from mixpriv.constants import IMAGE, LABEL, TEST
from mixpriv.data.folder import DatasetFolder
from mixpriv.data.preprocessing import preprocessing
from mixpriv.evaluation.compared import ComparedRows, CompareModel
from mixpriv.evaluation.dice import dice_per_class, mean_foreground
from mixpriv.evaluation.plots import (
    plot_dice_vs_k,
    plot_private_segmentation,
    plot_variance_map,
)
from mixpriv.evaluation.regions import TUMOUR_CLASSES, RegionTable
from mixpriv.evaluation.report import DiceTable
from mixpriv.geometry import GridSpace, probabilities_onto, subject_into
from mixpriv.inference.pipeline import PrivatePipeline, PrivateRun
from mixpriv.inference.volume import baseline_probabilities, save_like, to_original_grid
from mixpriv.lightning.baseline import BaselineSegmenter
from mixpriv.lightning.mixup import MixupPrivacyModule
from mixpriv.mixing.bank import ReferenceBank
from mixpriv.mixing.settings import MixingSettings

log = logging.getLogger(__name__)


@dataclass
class EvaluationResult:
    table: DiceTable
    dice_vs_k: dict[str, dict[int, float]]
    seconds: dict[str, float]
    outputs: dict[str, Path] = field(default_factory=dict)
    regions: RegionTable | None = None  # the BraTS regions' Dice and HD95, for the tumour task


def evaluate_models(
    baseline: BaselineSegmenter | None,
    private: MixupPrivacyModule,
    folder: DatasetFolder,
    bank: ReferenceBank,
    out_dir: str | Path,
    k: int = 8,
    seed: int = 0,
    max_cases: int | None = None,
    progress: bool = True,
    *,
    compared: Mapping[str, CompareModel] | None = None,
    mixing: MixingSettings | None = None,
) -> EvaluationResult:
    """Run the evaluation, write ``summary.json``, ``table.md``, figures and the first case's NIfTIs; for the
    tumour task (labels NCR / ED / ET) also the BraTS regions' Dice and HD95 (``regions.json``, ``regions.md``).

    ``compared`` (row name -> model, :func:`~mixpriv.evaluation.compared.compared_systems`) adds the
    Privacy-Net and Deformation-Proxy rows, scored on the same scans, and their whole-volume seconds.
    ``mixing`` replaces the private model's own mixing (e.g. to add the references' fresh warps).

    Example:
        >>> result = evaluate_models(baseline, private, folder, bank, "eval",  # doctest: +SKIP
        ...                          compared=compared_systems([privacy_net, deformation_proxy]))
        >>> result.table.methods  # doctest: +SKIP
        ['Baseline', 'Privacy-Net', 'Deformation-Proxy', 'Naive', 'Naive+TTA', 'Learned', 'Learned+TTA']
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cases = [c for c in folder.cases(TEST) if c.label_path is not None][:max_cases]
    if not cases:
        raise ValueError(f"{folder.root} has no labelled test case to evaluate")
    generator = torch.Generator().manual_seed(seed)
    spacing = private.hparams.input_spacing
    pipeline = PrivatePipeline.of_model(private, mixing=mixing)
    systems = ComparedRows(compared or {}, spacing, seed)
    mixing = pipeline.mixing.check_bank(len(bank))
    table = DiceTable(folder.labels)
    regions = RegionTable(bank.space.spacing) if folder.labels == TUMOUR_CLASSES and bank.space else None
    curves: dict[str, list[list[float]]] = {"Naive+TTA": [], "Learned+TTA": []}
    seconds: dict[str, list[float]] = {"baseline": [], "private_k1": [], f"private_k{k}": []}
    outputs: dict[str, Path] = {}
    transform = preprocessing(spacing)
    for index, case in enumerate(tqdm(cases, desc="evaluating test cases", disable=not progress)):
        subject = subject_into(transform(case.to_subject()), bank.space)  # scored on the key's grid
        image, label = subject[IMAGE].data.float(), subject[LABEL].data[0]
        if baseline is not None:
            start = time.perf_counter()
            baseline_probs = baseline_probabilities(baseline, image)
            seconds["baseline"].append(time.perf_counter() - start)
            _score(table, regions, "Baseline", case.case_id, baseline_probs.argmax(0), label)
        for name, labels in systems(image).items():
            _score(table, regions, name, case.case_id, labels, label)
        start = time.perf_counter()
        run = pipeline(image, bank, k, ("learned", "naive"), generator)
        seconds[f"private_k{k}"].append(time.perf_counter() - start)
        learned, naive = run["learned"], run["naive"]
        if index == 0:
            start = time.perf_counter()
            pipeline(image, bank, 1)
            seconds["private_k1"].append(time.perf_counter() - start)
        for method, result in (("Naive", naive.first(1)), ("Naive+TTA", naive), ("Learned", learned.first(1)),
                               ("Learned+TTA", learned)):
            _score(table, regions, method, case.case_id, result.labels, label)
        for name, result in (("Naive+TTA", naive), ("Learned+TTA", learned)):
            curves[name].append([mean_foreground(dice_per_class(result.first(j).labels, label, folder.labels))
                                 for j in range(1, k + 1)])
        if index == 0:
            outputs.update(_write_case_outputs(case, subject, bank, run, folder.labels, out_dir))
    dice_vs_k = {name: dict(zip(range(1, k + 1), np.nanmean(values, axis=0).tolist())) for name, values in curves.items()}
    stds = {name: dict(zip(range(1, k + 1), np.nanstd(values, axis=0).tolist())) for name, values in curves.items()}
    baseline_mean = table.aggregate().get("Baseline", {}).get("mean", {}).get("mean")
    outputs["dice_vs_k"] = plot_dice_vs_k(dice_vs_k, out_dir / "dice_vs_k.png", baseline=baseline_mean, stds=stds)
    mean_seconds = {name: float(np.mean(v)) for name, v in {**seconds, **systems.seconds}.items() if v}
    metadata = {"K": k, **mixing.to_dict(), "seed": seed, "n_cases": len(cases),
                **({"compared": {name: _model_name(model) for name, model in compared.items()}} if compared else {}),
                "dataset": str(folder.root), "whole_volume_seconds": mean_seconds,
                "device": str(private.device), "torch_threads": torch.get_num_threads()}
    notes = {"K (TTA references)": str(k), "λ range": f"[{mixing.lambda_range[0]}, {mixing.lambda_range[1]}]",
             "test cases": str(len(cases)), "Naive / Learned": "first reference only"}
    if mixing.references_per_mix > 1:
        notes["references per mixture (K-way)"] = (f"{mixing.references_per_mix}, Dirichlet(α = {mixing.dirichlet_alpha})"
                                                    " weights")
    if mixing.reference_warp > 0:
        notes["references"] = f"warped afresh for each mixture (peak {mixing.reference_warp:g} voxels)"
    if compared:
        notes["compared systems"] = ", ".join(compared) + (" (the client's segmentation; Deformation-Proxy: a fresh "
                                                           "secret key per scan)")
    outputs.update(table.save(out_dir, metadata=metadata, title="Segmentation (Dice), test split", notes=notes))
    if regions is not None:
        outputs.update(regions.save(out_dir))
    (out_dir / "dice_vs_k.json").write_text(json.dumps({"mean": dice_vs_k, "std": stds}, indent=2))
    return EvaluationResult(table, dice_vs_k, mean_seconds, outputs, regions)


def _score(table: DiceTable, regions: RegionTable | None, method: str, case_id: str, prediction: torch.Tensor,
           label: torch.Tensor) -> None:
    """Record one prediction's per-class Dice and, for the tumour task, its region scores."""
    table.add_prediction(method, case_id, prediction, label)
    if regions is not None:
        regions.add_prediction(method, case_id, prediction, label)


def _model_name(model: torch.nn.Module) -> str:
    return getattr(model, "model_card", {}).get("name", type(model).__name__)


def _write_case_outputs(case, subject, bank: ReferenceBank, run: PrivateRun, label_names: Mapping[str, int],
                        out_dir: Path) -> dict[str, Path]:
    """Figures and NIfTIs of one case (on the input's original grid and affine)."""
    mixtures, naive, learned = run.mixtures, run["naive"], run["learned"]
    image = subject[IMAGE].data[0].numpy()
    label = subject[LABEL].data[0].numpy()
    # All K references go to the figure, as they were mixed: it draws the first three and states that
    # TTA used K. A composite reference (K-way mixing) is drawn as its weighted image and its dominant label.
    references = [reference_image[0].numpy() for reference_image in mixtures.references]
    reference_labels = [mixtures.reference_probabilities(k).argmax(0).to(bank.labels.dtype).numpy()
                        for k in range(len(mixtures))]
    outputs = {
        "figure": plot_private_segmentation(
            image, label, references, reference_labels, [m[0].numpy() for m in mixtures.mixtures],
            [p.numpy() for p in run.mixed_probabilities], [p.numpy() for p in naive.per_reference],
            [p.numpy() for p in learned.per_reference], naive.labels.numpy(), learned.labels.numpy(),
            label_names, out_dir / "private_segmentation.png", title=f"test case {case.case_id}"),
        "variance_figure": plot_variance_map(image, learned.variance.numpy(), out_dir / "tta_variance.png",
                                             title=f"Learned+TTA variance, {case.case_id}"),
    }
    original = case.to_subject()[IMAGE]
    affine = subject[IMAGE].affine
    native = probabilities_onto(learned.probabilities, GridSpace.of(subject[IMAGE]), GridSpace.of(original))
    segmentation = native.argmax(0, keepdim=True).to(torch.uint8)
    outputs["segmentation"] = save_like(segmentation, case.image_paths[0], out_dir / f"{case.case_id}_private_seg.nii.gz")
    variance = to_original_grid(learned.variance.sum(0, keepdim=True), affine, original, label=False)
    outputs["variance"] = save_like(variance, case.image_paths[0], out_dir / f"{case.case_id}_tta_variance.nii.gz",
                                    dtype=np.float32)
    return outputs
