"""The published models on a real brain: Colin27, skull-stripped, whole head and scanner-like.

Colin27 (one real individual, 1 mm, MNI space; Debian's ``mricron-data``, fetched with
``apt-get download`` into ``--cache``, checked by sha256 and reused: see ``real_brain_data.py``,
also for the licence, which is why no NIfTI of it is published) is scored against pseudo-labels
made on its native 1 mm grid by a 3-class Gaussian mixture inside its brain mask (CSF < GM < WM).
Three inputs:

- ``a`` ``ch2bet``: skull-stripped, as shipped (MNI space, as the models' training scans);
- ``b`` ``ch2``: the whole head, same grid and pseudo-labels;
- ``c`` ``scanner``: ch2 moved by a rigid transform (15° about (1, 0.5, 0.3), (24, −18, 10) mm),
  stored with PSR voxel axes, cut to the head with 30 mm of the neck removed; the pseudo-labels
  moved the same way (nearest neighbour), so it is scored on its own grid.

Each is segmented through the public command line, as a subprocess: ``mixpriv predict-baseline``
(Baseline) and ``mixpriv predict --method naive|learned --k 1|K --seed S`` (Naive, Naive+TTA,
Learned, Learned+TTA) with a key from ``mixpriv keygen --spacing 2`` (the embedded cohort's
training split). For ``b`` and ``c`` the commands get ``--register`` when their ``--help`` offers
it; rows run without it are marked "unregistered". Dice = 2TP / (2TP + FP + FN) per class on the
input's native grid (NaN when a class is absent from both), mean over CSF, GM and WM; also the
mean with the prediction cut to the brain mask (what remains when tissue called outside the brain
is not counted: the whole-head inputs' skull and scalp).

The pseudo-labels are not the models' label convention (their CSF: the MNI template's brain mask −
GM − WM; here: the dark voxels inside BET's mask), so read the Dice as agreement between two
conventions on a real anatomy, not as accuracy; ``csf_convention.png`` shows where they differ.

Writes to ``--out-dir``: ``predictions/*.nii.gz``, ``inputs/colin27_scanner.nii.gz``; and to
``--report`` (default ``--out-dir``): ``table.md``, ``summary.json``, ``input_{a,b,c}.png``
(axial and coronal: scan, pseudo-labels, Baseline, Learned+TTA) and ``csf_convention.png``.

Usage:
    .venv/bin/python benchmarks/real_brain.py [--inputs a,b,c] [--k 8] [--seed 0] [--out-dir outputs/real-brain]
        [--report checkpoints/evaluation/real-brain] [--json FILE] [--cache DIR] [--ch2bet FILE --ch2 FILE]
        [--models tissue-baseline-2mm,tissue-mixpriv-2mm]
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from real_brain_data import (
    LABELS,
    SHA256,
    ScannerLike,
    brain_mask,
    default_cache,
    fetch_colin27,
    make_scanner_like,
    pseudo_labels,
    resample,
    sha256,
)
from tqdm import tqdm

log = logging.getLogger("real_brain")

INPUTS = {"a": "ch2bet", "b": "ch2", "c": "scanner"}
ROWS = ("Baseline", "Naive", "Naive+TTA", "Learned", "Learned+TTA")
CLASSES = ("CSF", "GM", "WM")
LABEL_COLOURS = ListedColormap(["black", "tab:blue", "tab:orange", "white"])


def dice(prediction: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """Per-class Dice (CSF, GM, WM; NaN where a class is in neither) and their ``mean`` (NaNs left out)."""
    if prediction.shape != target.shape:
        raise ValueError(f"prediction shape {prediction.shape} differs from the labels' {target.shape}")
    scores = {}
    for name in CLASSES:
        predicted, true = prediction == LABELS[name], target == LABELS[name]
        denominator = int(predicted.sum()) + int(true.sum())
        scores[name] = float("nan") if denominator == 0 else 2.0 * int((predicted & true).sum()) / denominator
    present = [value for value in scores.values() if not np.isnan(value)]
    scores["mean"] = float(np.mean(present)) if present else float("nan")
    return scores


def mixpriv_command() -> list[str]:
    """The command line interface of the mixpriv installed next to this Python."""
    return [sys.executable, "-m", "mixpriv.cli"]


def mixpriv_provenance() -> dict[str, str | list[str] | None]:
    """Which mixpriv the command line runs: version, package folder, git commit, uncommitted files (git status)."""
    code = "import mixpriv, pathlib; print(mixpriv.__version__); print(pathlib.Path(mixpriv.__file__).resolve().parent)"
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"cannot import mixpriv with {sys.executable}: {result.stderr.strip()[-500:]}")
    version, folder = result.stdout.split()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, check=False, capture_output=True, text=True)
    status = subprocess.run(["git", "status", "--porcelain", "--", "."], cwd=folder, check=False,
                            capture_output=True, text=True)
    known = commit.returncode == 0 and status.returncode == 0
    return {"version": version, "package": folder, "commit": commit.stdout.strip() if known else None,
            "uncommitted": status.stdout.splitlines() if known else None}


def supports_register(subcommand: str) -> bool:
    """Whether ``mixpriv SUBCOMMAND --help`` offers ``--register``."""
    result = subprocess.run([*mixpriv_command(), subcommand, "--help"], check=False, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"`mixpriv {subcommand} --help` failed: {result.stderr.strip()[-500:]}")
    return "--register" in result.stdout


class CommandFailed(RuntimeError):
    """A ``mixpriv`` command exited with an error; ``last_line`` is the last line it wrote."""

    def __init__(self, arguments: list[str], returncode: int, output: str):
        super().__init__(f"`mixpriv {' '.join(arguments)}` failed (exit {returncode}):\n{output[-2000:]}")
        self.last_line = output.splitlines()[-1] if output else f"exit {returncode}"


def run_cli(arguments: list[str]) -> None:
    """Run ``mixpriv ARGUMENTS``. Raises :class:`CommandFailed` with its error output."""
    result = subprocess.run([*mixpriv_command(), *arguments], check=False, capture_output=True, text=True)
    if result.returncode != 0:
        raise CommandFailed(arguments, result.returncode, (result.stderr or result.stdout).strip())


@dataclass
class Input:
    """One input scan, its pseudo-labels on its own grid, and whether ``--register`` is wanted for it."""

    key: str
    name: str
    scan: Path
    labels: np.ndarray
    register: bool


def row_arguments(row: str, scan: Path, out: Path, models: tuple[str, str], key: Path, k: int, seed: int,
                  register: bool) -> list[str]:
    """The ``mixpriv`` arguments of one row."""
    if row == "Baseline":
        arguments = ["predict-baseline", str(scan), "--model", models[0], "--out", str(out)]
    else:
        method, tta = row.removesuffix("+TTA").lower(), row.endswith("+TTA")
        arguments = ["predict", str(scan), "--model", models[1], "--key", str(key), "--k", str(k if tta else 1),
                     "--method", method, "--seed", str(seed), "--out", str(out)]
    return [*arguments, "--register"] if register else arguments


def canonical(volume: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """``volume`` with its axes reordered and flipped to RAS (for display)."""
    return nib.orientations.apply_orientation(volume, nib.orientations.io_orientation(affine))


def figure_input(path: Path, title: str, scan: np.ndarray, affine: np.ndarray, labels: np.ndarray,
                 predictions: dict[str, np.ndarray | None]) -> None:
    """Axial and coronal slices through the pseudo-labels' centre: scan, pseudo-labels, predictions (None: failed)."""
    panels = {"scan": canonical(scan, affine), "pseudo-labels": canonical(labels, affine)}
    panels.update({name: None if volume is None else canonical(volume, affine) for name, volume in predictions.items()})
    centre = np.round(np.argwhere(panels["pseudo-labels"] > 0).mean(0)).astype(int)
    figure = Figure(figsize=(3.2 * len(panels), 6.4))
    axes = figure.subplots(2, len(panels))
    views = (("axial", lambda v: v[:, :, centre[2]]), ("coronal", lambda v: v[:, centre[1], :]))
    for row, (view, cut) in enumerate(views):
        for column, (name, volume) in enumerate(panels.items()):
            axis = axes[row, column]
            if volume is None:
                axis.text(0.5, 0.5, "the command failed", ha="center", va="center", transform=axis.transAxes)
            elif name == "scan":
                axis.imshow(cut(volume).T, origin="lower", cmap="gray")
            else:
                axis.imshow(cut(volume).T, origin="lower", cmap=LABEL_COLOURS, vmin=0, vmax=3, interpolation="nearest")
            axis.set_title(f"{name} ({view})", fontsize=9)
            axis.axis("off")
    figure.suptitle(f"{title}   labels: CSF blue, GM orange, WM white", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110, bbox_inches="tight")


def figure_csf(path: Path, scan: np.ndarray, affine: np.ndarray, labels: np.ndarray, prediction: np.ndarray) -> dict:
    """Confusion matrix pseudo-label × prediction (fraction of each pseudo-label) and the CSF each side marks."""
    confusion = np.zeros((4, 4), np.int64)
    np.add.at(confusion, (labels.ravel().astype(int), prediction.ravel().astype(int)), 1)
    fractions = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
    names = list(LABELS)
    figure = Figure(figsize=(15, 5))
    left, middle, right = figure.subplots(1, 3)
    left.imshow(fractions, cmap="Blues", vmin=0, vmax=1)
    for (row, column), value in np.ndenumerate(fractions):
        left.text(column, row, f"{value:.2f}\n({confusion[row, column]})", ha="center", va="center", fontsize=7,
                  color="white" if value > 0.5 else "black")
    left.set_xticks(range(4), names)
    left.set_yticks(range(4), names)
    left.set_xlabel("Baseline prediction")
    left.set_ylabel("pseudo-label (GMM)")
    left.set_title("fraction of each pseudo-label (voxels)", fontsize=9)
    scan_ras, labels_ras, prediction_ras = (canonical(volume, affine) for volume in (scan, labels, prediction))
    centre = np.round(np.argwhere(labels_ras > 0).mean(0)).astype(int)
    axial = min(centre[2] + 10, labels_ras.shape[2] - 1)  # 10 voxels (mm) above the centre: the lateral ventricles
    views = ((middle, "axial", lambda v: v[:, :, axial]), (right, "coronal", lambda v: v[:, centre[1], :]))
    for axis, view, cut in views:
        pseudo, predicted = cut(labels_ras) == 1, cut(prediction_ras) == 1
        overlay = np.zeros((*pseudo.shape, 4))
        overlay[pseudo & predicted] = (0.1, 0.8, 0.1, 0.9)
        overlay[pseudo & ~predicted] = (0.9, 0.1, 0.1, 0.9)
        overlay[~pseudo & predicted] = (0.2, 0.4, 1.0, 0.9)
        axis.imshow(cut(scan_ras).T, origin="lower", cmap="gray")
        axis.imshow(overlay.transpose(1, 0, 2), origin="lower", interpolation="nearest")
        axis.set_title(f"CSF ({view}): both green, GMM only red, Baseline only blue", fontsize=9)
        axis.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=110, bbox_inches="tight")
    return {"labels": names, "rows": "pseudo-label", "columns": "Baseline prediction", "counts": confusion.tolist()}


def markdown(results: dict, k: int) -> str:
    """The Dice table: one row per input × method, and the gap Learned+TTA − Baseline per input."""
    lines = [f"| input | row | registered | {' | '.join(CLASSES)} | mean | mean inside the brain mask¹ | seconds |",
             "|---|---|---|" + "---:|" * (len(CLASSES) + 3)]
    for key, entry in results.items():
        for row, scores in entry["rows"].items():
            registered = "MNI as shipped" if key == "a" else ("yes" if scores["registered"] else "unregistered")
            if "error" in scores:
                values = f"failed: `{scores['error'].replace('|', '/')}` | | | | | "
            else:
                numbers = [scores["dice"][name] for name in (*CLASSES, "mean")] + [scores["mean_in_brain_mask"]]
                values = " | ".join(f"{value:.3f}" for value in numbers) + " | "
            lines.append(f"| {key} {entry['name']} | {row} | {registered} | {values}{scores['seconds']:.1f} |")
        if "gap" in entry:
            gap = " | ".join(f"{entry['gap'][name]:+.3f}" for name in (*CLASSES, "mean"))
            lines.append(f"| {key} {entry['name']} | Learned+TTA − Baseline | | {gap} | | |")
    notes = (f"K = {k} for the +TTA rows; Dice against the GMM pseudo-labels on each input's grid.\n"
             "¹ The prediction set to background outside the pseudo-labels' brain mask: what is left when labelling "
             "skull, scalp or neck as tissue is not counted.")
    return "\n".join(lines) + f"\n\n{notes}\n"


def prepare_inputs(chosen: list[str], ch2bet_path: Path, ch2_path: Path, out_dir: Path,
                   settings: ScannerLike) -> tuple[list[Input], dict]:
    """The chosen inputs with their pseudo-labels, and what was done to make them (for the JSON)."""
    ch2bet, ch2 = nib.load(str(ch2bet_path)), nib.load(str(ch2_path))
    image = np.asarray(ch2bet.dataobj)
    labels, fitted = pseudo_labels(image, brain_mask(image))
    same_grid = ch2.shape == ch2bet.shape and np.allclose(ch2.affine, ch2bet.affine)
    ch2_labels = labels if same_grid else resample(labels, ch2bet.affine, ch2.shape, ch2.affine, np.eye(4), order=0)
    voxels = {name: int((labels == value).sum()) for name, value in LABELS.items()}
    method = ("largest connected component of ch2bet > 0; inside it a 3-class GaussianMixture (full variances, "
              "seed 0) on the intensities, classes by mean CSF 1 < GM 2 < WM 3, posterior argmax except below the "
              "CSF mean (CSF) and above the WM mean (WM); background 0 outside")
    info = {"pseudo_labels": {"method": method, **asdict(fitted), "voxels": voxels,
                              "ch2_same_grid_as_ch2bet": bool(same_grid)}}
    inputs = []
    for key in chosen:
        if key == "a":
            inputs.append(Input(key, INPUTS[key], ch2bet_path, labels, register=False))
        elif key == "b":
            inputs.append(Input(key, INPUTS[key], ch2_path, ch2_labels, register=True))
        else:
            moved = make_scanner_like(np.asarray(ch2.dataobj), ch2_labels, ch2.affine, settings)
            scan = out_dir / "inputs" / "colin27_scanner.nii.gz"
            scan.parent.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(moved.image, moved.affine), str(scan))
            info["scanner_like"] = {**settings.describe(), "shape": list(moved.image.shape),
                                    "axcodes_measured": "".join(nib.aff2axcodes(moved.affine)),
                                    "affine": moved.affine.round(4).tolist()}
            inputs.append(Input(key, INPUTS[key], scan, moved.labels, register=True))
    return inputs, info


def colin27_paths(args: argparse.Namespace) -> dict[str, Path]:
    """``--ch2bet``/``--ch2`` if given (a sha256 other than :data:`SHA256` is only warned about), else fetched."""
    if args.ch2bet is None:
        return fetch_colin27(args.cache)
    for name, path in (("ch2bet", args.ch2bet), ("ch2", args.ch2)):
        if sha256(path) != SHA256[name]:
            log.warning("%s (%s) is not the file this benchmark was written for (sha256 differs)", path, name)
    return {"ch2bet": args.ch2bet, "ch2": args.ch2}


Predictions = dict[tuple[str, str], np.ndarray]  # (input key, row) -> label map on the input's grid


def segment_all(inputs: list[Input], models: tuple[str, str], k: int, seed: int, out_dir: Path,
                register: dict[str, bool]) -> tuple[dict[str, dict], Predictions, list[list[str]]]:
    """Run every row on every input through the CLI: results (Dice, seconds), predictions, commands.

    A row whose command fails is recorded with its error (the last line the command wrote) and the
    others still run.
    """
    results: dict[str, dict] = {}
    predictions: Predictions = {}
    commands = []
    with tempfile.TemporaryDirectory(prefix="mixpriv-real-brain-") as tmp:
        key = Path(tmp) / "key.mpk"
        run_cli(["keygen", "--out", str(key), "--spacing", "2"])
        commands.append(["mixpriv", "keygen", "--out", "key.mpk", "--spacing", "2"])
        for item, row in tqdm([(item, row) for item in inputs for row in ROWS], desc="segmenting", unit="run"):
            registered = item.register and register["predict-baseline" if row == "Baseline" else "predict"]
            out = out_dir / "predictions" / f"{item.key}_{item.name}_{row.replace('+', '_')}.nii.gz"
            arguments = row_arguments(row, item.scan, out, models, key, k, seed, registered)
            commands.append(["mixpriv", *("key.mpk" if argument == str(key) else argument for argument in arguments)])
            entry = results.setdefault(item.key, {"name": item.name, "scan": str(item.scan), "rows": {}})
            start = time.perf_counter()
            try:
                run_cli(arguments)
            except CommandFailed as error:
                log.error("%s %s failed: %s", item.name, row, error)
                entry["rows"][row] = {"error": error.last_line, "registered": registered,
                                      "seconds": time.perf_counter() - start}
                continue
            seconds = time.perf_counter() - start
            prediction = np.asarray(nib.load(str(out)).dataobj).astype(np.uint8)
            predictions[item.key, row] = prediction
            in_mask = dice(np.where(item.labels > 0, prediction, 0), item.labels)["mean"]
            entry["rows"][row] = {"dice": dice(prediction, item.labels), "mean_in_brain_mask": in_mask,
                                  "registered": registered, "seconds": seconds}
            log.info("%s %s: mean Dice %.3f (%.0f s)", item.name, row, entry["rows"][row]["dice"]["mean"], seconds)
    for entry in results.values():
        scored = {row: scores["dice"] for row, scores in entry["rows"].items() if "dice" in scores}
        if {"Baseline", "Learned+TTA"} <= scored.keys():
            entry["gap"] = {name: scored["Learned+TTA"][name] - scored["Baseline"][name] for name in (*CLASSES, "mean")}
    return results, predictions, commands


def write_figures(report: Path, inputs: list[Input], predictions: Predictions) -> dict | None:
    """``input_KEY.png`` per input; with input a's Baseline, ``csf_convention.png`` (returns its confusion matrix)."""
    confusion = None
    for item in inputs:
        scan = nib.load(str(item.scan))
        volume = np.asarray(scan.dataobj)
        shown = {row: predictions.get((item.key, row)) for row in ("Baseline", "Learned+TTA")}
        figure_input(report / f"input_{item.key}.png", f"{item.key}: {item.name}", volume, scan.affine, item.labels,
                     shown)
        if item.key == "a" and shown["Baseline"] is not None:
            confusion = figure_csf(report / "csf_convention.png", volume, scan.affine, item.labels,
                                   predictions["a", "Baseline"])
    return confusion


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inputs", default="a,b,c", help="which inputs, comma-separated: a ch2bet, b ch2, c scanner")
    parser.add_argument("--models", default="tissue-baseline-2mm,tissue-mixpriv-2mm",
                        help="BASELINE,PRIVATE: names, folders or URLs")
    parser.add_argument("--k", type=int, default=8, help="references of the +TTA rows")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", type=Path, default=default_cache(),
                        help="where Colin27 is fetched to and reused from")
    parser.add_argument("--ch2bet", type=Path, help="your copy of ch2bet.nii.gz (skips the fetch; with --ch2)")
    parser.add_argument("--ch2", type=Path, help="your copy of ch2.nii.gz")
    parser.add_argument("--out-dir", type=Path, default=Path("outputs/real-brain"),
                        help="predictions and the scanner-like scan")
    parser.add_argument("--report", type=Path, help="table.md, summary.json and figures (default: --out-dir)")
    parser.add_argument("--json", type=Path, help="also write the summary here")
    args = parser.parse_args()
    args.inputs = [key.strip() for key in args.inputs.split(",") if key.strip()]
    if unknown := sorted(set(args.inputs) - set(INPUTS)):
        parser.error(f"--inputs: unknown {unknown}; choose from {sorted(INPUTS)}")
    args.models = tuple(args.models.split(","))
    if len(args.models) != 2:
        parser.error("--models takes BASELINE,PRIVATE")
    if (args.ch2bet is None) != (args.ch2 is None):
        parser.error("give both --ch2bet and --ch2, or neither (then they are fetched)")
    args.report = args.report or args.out_dir
    return args


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for folder in (args.out_dir / "predictions", args.report):
        folder.mkdir(parents=True, exist_ok=True)
    paths = colin27_paths(args)
    provenance = mixpriv_provenance()
    register = {command: supports_register(command) for command in ("predict", "predict-baseline")}
    log.info("mixpriv %s; --register offered by: %s", provenance, register)
    inputs, info = prepare_inputs(args.inputs, paths["ch2bet"], paths["ch2"], args.out_dir, ScannerLike())
    results, predictions, commands = segment_all(inputs, args.models, args.k, args.seed, args.out_dir, register)
    if (confusion := write_figures(args.report, inputs, predictions)) is not None:
        info["csf_convention"] = confusion

    table = markdown(results, args.k)
    print(table)
    files = {name: {"path": str(paths[name]), "sha256": sha256(paths[name])} for name in ("ch2bet", "ch2")}
    summary = {"source": {"package": "mricron-data", "files": files}, "mixpriv": provenance,
               "models": {"baseline": args.models[0], "private": args.models[1]}, "k": args.k, "seed": args.seed,
               "register_offered": register, **info, "results": results, "commands": commands}
    changes = provenance["uncommitted"]
    state = " (commit unknown)" if changes is None else ""
    if changes:
        state = f", with uncommitted changes: {'; '.join(changes)}"
    (args.report / "table.md").write_text(
        f"# Colin27: Dice against GMM pseudo-labels\n\n{table}\nmixpriv {provenance['version']} at commit "
        f"{provenance['commit']}{state}; models {', '.join(args.models)}.\n")
    for path in filter(None, (args.report / "summary.json", args.json)):
        path.write_text(json.dumps(summary, indent=1) + "\n")
    log.info("wrote %s", args.report)


if __name__ == "__main__":
    main()
