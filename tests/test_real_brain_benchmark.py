"""benchmarks/real_brain.py and real_brain_data.py: pseudo-labels, the scanner-like move, Dice, fetch errors.

Fast, CPU only, no apt-get and no network: the fetch is tested with ``shutil.which`` and
``subprocess.run`` replaced.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    """Import ``benchmarks/NAME.py`` by path (``real_brain`` imports ``real_brain_data`` by name)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


data = _load("real_brain_data")
real_brain = _load("real_brain")


def _ball_phantom(shape=(40, 40, 40), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """CSF centre, WM core, GM shell, background 0; tissue intensities 40 / 80 / 120 plus noise (σ 6)."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, size) for size in shape], indexing="ij"))
    radius = np.sqrt(((grid - np.array([0.1, -0.05, 0.0])[:, None, None, None]) ** 2).sum(0))
    labels = np.zeros(shape, np.uint8)
    labels[radius < 0.9] = 2
    labels[radius < 0.65] = 3
    labels[radius < 0.3] = 1
    noise = np.random.default_rng(seed).normal(0, 6, shape)
    image = np.where(labels > 0, np.clip(np.array([0, 40, 80, 120])[labels] + noise, 1, None), 0)
    return image.astype(np.float32), labels


def test_pseudo_labels_recover_three_intensity_classes():
    image, truth = _ball_phantom()
    image[0, 0, 0] = 50.0  # an isolated speck outside the brain: not part of the mask
    mask = data.brain_mask(image)
    assert not mask[0, 0, 0] and mask.sum() == (truth > 0).sum()
    labels, fitted = data.pseudo_labels(image, mask)
    assert fitted.means[0] < fitted.means[1] < fitted.means[2]
    np.testing.assert_allclose(fitted.means, (40, 80, 120), atol=2)
    scores = real_brain.dice(labels, truth)
    assert min(scores[name] for name in ("CSF", "GM", "WM")) > 0.95, scores
    assert (labels[truth == 0] == 0).all()


def test_pseudo_labels_keep_the_far_tails_in_the_outer_classes():
    image, truth = _ball_phantom()
    wm, csf = np.argwhere(truth == 3)[:5], np.argwhere(truth == 1)[:5]
    image[tuple(wm.T)] = 250.0  # far brighter than WM: a wider GM Gaussian would claim them
    image[tuple(csf.T)] = 1.0
    labels, _ = data.pseudo_labels(image, data.brain_mask(image))
    assert (labels[tuple(wm.T)] == 3).all() and (labels[tuple(csf.T)] == 1).all()


def _labelled_head() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 1 mm RAS phantom (image, labels, affine) positioned like an MNI volume."""
    image, labels = _ball_phantom((48, 56, 44))
    affine = np.eye(4)
    affine[:3, 3] = (-24.0, -30.0, -20.0)
    return image, labels, affine


def _world_centroid(labels: np.ndarray, affine: np.ndarray, value: int) -> np.ndarray:
    return nib.affines.apply_affine(affine, np.argwhere(labels == value).mean(0))


def test_default_scanner_like_move_is_large_enough():
    settings = data.ScannerLike()
    transform = settings.world_transform()
    angle = np.degrees(np.arccos((np.trace(transform[:3, :3]) - 1) / 2))
    np.testing.assert_allclose(angle, settings.rotation_deg, atol=1e-6)
    np.testing.assert_allclose(transform[:3, :3] @ transform[:3, :3].T, np.eye(3), atol=1e-12)
    assert angle >= 10 and np.linalg.norm(transform[:3, 3]) >= 20
    assert np.count_nonzero(np.asarray(settings.axis)) >= 2  # not about one world axis


def test_scanner_like_copy_moves_reorients_and_resamples_back():
    image, labels, affine = _labelled_head()
    settings = data.ScannerLike(crop_inferior_mm=0.0)
    moved = data.make_scanner_like(image, labels, affine, settings)
    assert nib.aff2axcodes(moved.affine) == ("P", "S", "R")
    assert moved.image.dtype == np.int16 and moved.labels.dtype == np.uint8
    assert moved.image.shape == moved.labels.shape != labels.shape
    transform = settings.world_transform()
    for value in (1, 2, 3):  # each tissue lies where the rigid transform carries it, in world coordinates
        expected = nib.affines.apply_affine(transform, _world_centroid(labels, affine, value))
        np.testing.assert_allclose(_world_centroid(moved.labels, moved.affine, value), expected, atol=0.5)
    back = data.resample(moved.labels, moved.affine, labels.shape, affine, np.linalg.inv(transform), order=0)
    foreground = (labels > 0) | (back > 0)
    assert (back[foreground] == labels[foreground]).mean() > 0.95


def test_scanner_like_crop_removes_the_inferior_end():
    image, labels, affine = _labelled_head()
    full = data.make_scanner_like(image, labels, affine, data.ScannerLike(crop_inferior_mm=0.0))
    cropped = data.make_scanner_like(image, labels, affine, data.ScannerLike(crop_inferior_mm=10.0))
    # the S axis is the second voxel axis of a PSR grid: 10 mm fewer slices, the same top
    assert cropped.labels.shape[1] == full.labels.shape[1] - 10
    top = [nib.affines.apply_affine(moved.affine, [0, moved.labels.shape[1] - 1, 0])[2] for moved in (full, cropped)]
    np.testing.assert_allclose(top[0], top[1])
    assert 0 < (cropped.labels > 0).sum() < (full.labels > 0).sum()


def test_dice_on_hand_made_arrays():
    prediction = np.array([1, 1, 2, 2, 0, 0])
    target = np.array([1, 2, 2, 0, 0, 0])
    scores = real_brain.dice(prediction, target)
    assert scores["CSF"] == pytest.approx(2 / 3) and scores["GM"] == pytest.approx(0.5)
    assert np.isnan(scores["WM"])  # absent from both: left out of the mean
    assert scores["mean"] == pytest.approx((2 / 3 + 0.5) / 2)
    assert real_brain.dice(target, target)["mean"] == 1.0
    with pytest.raises(ValueError, match="shape"):
        real_brain.dice(prediction[:3], target)


def test_row_arguments():
    models, key, scan, out = ("base", "priv"), Path("k.mpk"), Path("s.nii.gz"), Path("o.nii.gz")
    assert real_brain.row_arguments("Baseline", scan, out, models, key, 8, 0, register=False) == [
        "predict-baseline", "s.nii.gz", "--model", "base", "--out", "o.nii.gz"]
    assert real_brain.row_arguments("Naive+TTA", scan, out, models, key, 8, 3, register=True) == [
        "predict", "s.nii.gz", "--model", "priv", "--key", "k.mpk", "--k", "8", "--method", "naive", "--seed", "3",
        "--out", "o.nii.gz", "--register"]
    assert real_brain.row_arguments("Learned", scan, out, models, key, 8, 0, register=False)[6:10] == [
        "--k", "1", "--method", "learned"]


def test_fetch_without_apt_get_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(data.shutil, "which", lambda tool: None)
    with pytest.raises(data.FetchError, match="apt-get and dpkg not found.*--ch2bet and --ch2"):
        data.fetch_colin27(tmp_path)


def test_fetch_reports_a_failing_apt_get(tmp_path, monkeypatch):
    monkeypatch.setattr(data.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    monkeypatch.setattr(data.subprocess, "run", lambda command, **kwargs: subprocess.CompletedProcess(
        command, 100, "", "E: Unable to locate package mricron-data"))
    with pytest.raises(data.FetchError, match="(?s)exit 100.*Unable to locate.*apt-get update.*--ch2bet"):
        data.fetch_colin27(tmp_path)


def test_fetch_refuses_files_with_another_sha256(tmp_path, monkeypatch):
    def fake_run(command, cwd, **kwargs):
        if command[0] == "apt-get":
            (Path(cwd) / "mricron-data_9.9_all.deb").write_bytes(b"deb")
        else:  # dpkg -x DEB root
            templates = Path(cwd) / command[3] / data.TEMPLATES
            templates.mkdir(parents=True)
            for name in ("ch2bet", "ch2"):
                (templates / f"{name}.nii.gz").write_bytes(b"not colin27")
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(data.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    monkeypatch.setattr(data.subprocess, "run", fake_run)
    with pytest.raises(data.FetchError, match="sha256 .* expected 592a2d20"):
        data.fetch_colin27(tmp_path)
    assert not (tmp_path / "ch2bet.nii.gz").exists()  # nothing unverified is left in the cache


def test_a_failing_row_is_recorded_not_scored(tmp_path, monkeypatch):
    labels = np.zeros((6, 6, 6), np.uint8)
    labels[1:5, 1:5, 1:5] = 2
    labels[2:4, 2:4, 2:4] = 3

    def fake_cli(arguments):
        if arguments[0] == "predict-baseline":
            raise real_brain.CommandFailed(arguments, 1, "Traceback ...\nTypeError: float() argument | not 'list'")
        if arguments[0] == "predict":
            out = Path(arguments[arguments.index("--out") + 1])
            nib.save(nib.Nifti1Image(labels, np.eye(4)), str(out))

    monkeypatch.setattr(real_brain, "run_cli", fake_cli)
    (tmp_path / "predictions").mkdir()
    item = real_brain.Input("b", "ch2", tmp_path / "scan.nii.gz", labels, register=True)
    register = {"predict": True, "predict-baseline": True}
    results, predictions, commands = real_brain.segment_all([item], ("base", "priv"), 8, 0, tmp_path, register)
    rows = results["b"]["rows"]
    assert rows["Baseline"]["error"] == "TypeError: float() argument | not 'list'" and "dice" not in rows["Baseline"]
    assert rows["Learned+TTA"]["dice"]["mean"] == 1.0 and rows["Learned+TTA"]["registered"]
    assert "gap" not in results["b"] and ("b", "Baseline") not in predictions
    assert len(commands) == 1 + len(real_brain.ROWS) and "--register" in commands[1]
    table = real_brain.markdown(results, 8)
    assert "| b ch2 | Baseline | yes | failed: `TypeError: float() argument / not 'list'`" in table
    assert "| b ch2 | Learned+TTA | yes | nan | 1.000 | 1.000 | 1.000 | 1.000 |" in table
    assert rows["Learned+TTA"]["mean_in_brain_mask"] == 1.0
    assert "Learned+TTA − Baseline" not in table


def test_figures_show_a_failed_prediction_as_text(tmp_path):
    image, labels = _ball_phantom((20, 24, 18))
    affine = np.diag([-1.0, 1.0, 1.0, 1.0])  # LAS: drawn in RAS
    real_brain.figure_input(tmp_path / "input.png", "phantom", image, affine, labels,
                            {"Baseline": None, "Learned+TTA": labels})
    confusion = real_brain.figure_csf(tmp_path / "csf.png", image, affine, labels, labels)
    assert (tmp_path / "input.png").stat().st_size > 0 and (tmp_path / "csf.png").stat().st_size > 0
    assert np.trace(np.array(confusion["counts"])) == labels.size
