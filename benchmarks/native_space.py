"""Scanner-space input: cohort scans moved, reoriented and recropped, registered and segmented on their own grid.

Each held-out scan of a small 2 mm cohort (the published models' domain, generator seed 3: patients
the models never saw) is segmented twice, and both are scored on the grid the scan is given on:

* **in place**: as the cohort stores it, in the key's space (no registration, no resampling);
* **scanner space**: the same voxels moved by ``MOTION`` (15 degrees about an oblique axis and 28 mm),
  stored in LPI orientation with 8 to 20 mm of the field of view cut, then registered to the key's
  mean reference (12-dof affine, :mod:`mixpriv.registration`), resampled into the key's space,
  segmented, and brought back by resampling the probabilities.

The rows are Baseline and Learned (K references), the columns the mean foreground Dice of each
way and their difference (scanner space minus in place).

Usage:
    .venv/bin/python benchmarks/native_space.py                         # the published models, 4 scans, K = 2
    .venv/bin/python benchmarks/native_space.py --baseline runs/x/export --private runs/y/export --k 8
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import numpy as np
import torch
import torchio as tio
from scipy.spatial.transform import Rotation
from tqdm.auto import tqdm

from mixpriv.data.cohort import build_cohort
from mixpriv.data.datamodule import bank_from_cases
from mixpriv.data.folder import DatasetFolder
from mixpriv.evaluation.dice import dice_per_class, mean_foreground
from mixpriv.hub import from_pretrained
from mixpriv.inference.pipeline import PrivatePipeline
from mixpriv.inference.scans import TemplateSpace, prepare_scan
from mixpriv.inference.volume import baseline_probabilities

MOTION = np.eye(4)
MOTION[:3, :3] = Rotation.from_euler("xyz", [12, -8, 5], degrees=True).as_matrix()
MOTION[:3, 3] = [22.0, -15.0, 10.0]


def small_cohort(folder: Path, n_patients: int = 6) -> DatasetFolder:
    """A 2 mm cohort of the embedded generator with seed 3 (other patients than the published models saw)."""
    return DatasetFolder(build_cohort(folder, n_patients=n_patients, scans_per_patient=1, spacing=2.0, seed=3,
                                      progress=False))


def scanner_space(image: tio.ScalarImage, label: tio.LabelMap) -> tio.Subject:
    """The scan as a scanner could have stored it: moved by ``MOTION``, LPI, with part of its field of view cut."""
    moved = tio.Subject(image=tio.ScalarImage(tensor=image.data, affine=MOTION @ image.affine),
                        label=tio.LabelMap(tensor=label.data, affine=MOTION @ image.affine))
    return tio.ToOrientation("LPI")(tio.Crop((4, 10, 6, 2, 10, 0))(moved))


@torch.no_grad()
def native_space_dice(baseline, private, folder: DatasetFolder, k: int = 2, seed: int = 0,
                      progress: bool = False) -> dict[str, dict[str, list[float]]]:
    """Mean foreground Dice per held-out scan: ``{"Baseline"|"Learned": {"in place"|"scanner space": [...]}}``.

    The key is the folder's training split; the scanner-space copies are registered, the others not.
    """
    key = bank_from_cases(folder, "train", private.hparams.input_spacing, progress=False)
    space = TemplateSpace.of_key(key)
    names = private.hparams.label_names
    pipeline = PrivatePipeline.of_model(private)
    scores = {row: {"in place": [], "scanner space": []} for row in ("Baseline", "Learned")}
    cases = folder.cases("val") + folder.cases("test")
    for index, case in enumerate(tqdm(cases, desc="scans", disable=not progress)):
        image, label = tio.ScalarImage(case.image_paths[0]), tio.LabelMap(case.label_path)
        moved = scanner_space(image, label)
        for way, scan, truth, register in (("in place", image, label, False),
                                           ("scanner space", moved["image"], moved["label"], True)):
            prepared = prepare_scan(scan, space, register=register)
            learned = pipeline(prepared.image, key, k, ("learned",), torch.Generator().manual_seed(seed + index))
            for row, probabilities in (("Baseline", baseline_probabilities(baseline, prepared.image)),
                                       ("Learned", learned["learned"].probabilities)):
                labels = prepared.labels_to_native(probabilities)[0]
                scores[row][way].append(mean_foreground(dice_per_class(labels, truth.data[0], names)))
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default="tissue-baseline-2mm", help="baseline model: name or folder")
    parser.add_argument("--private", default="tissue-mixpriv-2mm", help="Mixup-Privacy model: name or folder")
    parser.add_argument("--k", type=int, default=2, help="TTA references of the Learned row")
    parser.add_argument("--cohort", type=Path, default=Path("outputs/native-space/cohort"))
    args = parser.parse_args()
    baseline, private = (from_pretrained(name).eval() for name in (args.baseline, args.private))
    scores = native_space_dice(baseline, private, small_cohort(args.cohort), args.k, progress=True)
    print(f"### Mean foreground Dice on the scan's own grid ({args.baseline}, {args.private}, K = {args.k})\n")
    print("| row | in place | scanner space, registered | difference |\n|---|---:|---:|---:|")
    for row, ways in scores.items():
        here, there = (statistics.fmean(ways[way]) for way in ("in place", "scanner space"))
        print(f"| {row} | {here:.4f} | {there:.4f} | {there - here:+.4f} |")


if __name__ == "__main__":
    main()
