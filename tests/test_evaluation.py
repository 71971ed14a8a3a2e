"""Tests of mixpriv.evaluation: Dice (nnU-Net conventions), DiceTable reports, figures."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mixpriv.evaluation.dice import dice_per_class, foreground_labels, mean_foreground
from mixpriv.evaluation.plots import (
    label_colormap,
    plot_dice_vs_k,
    plot_label_overlay,
    plot_private_segmentation,
    plot_variance_map,
)
from mixpriv.evaluation.report import METHOD_ORDER, DiceTable, order_methods

LABELS = {"background": 0, "CSF": 1, "GM": 2, "WM": 3}
NAN = float("nan")


def _random_labels(seed: int, shape: tuple[int, ...] = (6, 7, 8)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 4, shape)


# --------------------------------------------------------------------------- Dice


def test_identical_maps_give_one() -> None:
    label = _random_labels(0)
    assert dice_per_class(label, label, LABELS) == {"CSF": 1.0, "GM": 1.0, "WM": 1.0}


def test_disjoint_maps_give_zero() -> None:
    prediction = np.zeros((4, 4, 4), dtype=np.int64)
    target = np.zeros((4, 4, 4), dtype=np.int64)
    prediction[:2] = 1
    target[2:] = 1
    dice = dice_per_class(prediction, target, {"background": 0, "fg": 1})
    assert dice == {"fg": 0.0}


def test_partial_overlap_hand_computed() -> None:
    # GM: TP=2, FP=1, FN=1 -> 4/6.  WM: TP=1, FP=0, FN=2 -> 2/4.  CSF: TP=0, FP=1, FN=0 -> 0.
    target = np.array([[2, 2, 2, 0], [3, 3, 3, 0]])
    prediction = np.array([[0, 2, 2, 2], [3, 0, 0, 1]])
    dice = dice_per_class(prediction, target, LABELS)
    assert list(dice) == ["CSF", "GM", "WM"]
    assert dice["GM"] == pytest.approx(2 / 3)
    assert dice["WM"] == pytest.approx(0.5)
    assert dice["CSF"] == 0.0


def test_both_empty_is_nan_and_ignored_by_mean() -> None:
    target = np.array([0, 2, 2, 3])
    prediction = np.array([0, 2, 3, 3])  # no CSF anywhere
    dice = dice_per_class(prediction, target, LABELS)
    assert math.isnan(dice["CSF"])
    assert mean_foreground(dice) == pytest.approx((dice["GM"] + dice["WM"]) / 2)
    assert math.isnan(mean_foreground({"a": NAN, "b": NAN}))
    assert math.isnan(mean_foreground({}))


def test_shape_mismatch_names_both_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(3, 2\)"):
        dice_per_class(np.zeros((2, 3), int), np.zeros((3, 2), int), LABELS)


def test_probabilities_are_rejected() -> None:
    with pytest.raises(ValueError, match="argmax"):
        dice_per_class(np.full((2, 2), 0.4), np.zeros((2, 2), int), LABELS)


def test_float_label_maps_are_accepted() -> None:
    label = _random_labels(3)
    assert dice_per_class(label.astype(np.float32), label, LABELS)["GM"] == 1.0


def test_torch_and_numpy_agree() -> None:
    prediction, target = _random_labels(1, (5, 9, 9, 9)), _random_labels(2, (5, 9, 9, 9))
    from_numpy = dice_per_class(prediction, target, LABELS)
    from_torch = dice_per_class(torch.from_numpy(prediction), torch.from_numpy(target), LABELS)
    mixed = dice_per_class(torch.from_numpy(prediction), target, LABELS)
    assert from_torch == from_numpy
    assert mixed == from_numpy


def test_foreground_labels_sorted_by_value() -> None:
    assert list(foreground_labels({"WM": 3, "background": 0, "GM": 2, "CSF": 1})) == ["CSF", "GM", "WM"]


# --------------------------------------------------------------------------- DiceTable


def _tiny_table() -> DiceTable:
    table = DiceTable({"background": 0, "GM": 1, "WM": 2})
    table.add("Learned+TTA", "c1", {"GM": 0.9, "WM": 0.7})
    table.add("Learned+TTA", "c2", {"GM": 0.8, "WM": NAN})
    table.add("Learned+TTA", "c3", {"GM": 0.7, "WM": 0.5})
    table.add("Mine", "c1", {"GM": 0.5, "WM": 0.5})
    table.add("Baseline", "c1", {"GM": 1.0, "WM": 0.9})
    table.add("Naive", "c1", {"GM": 0.6, "WM": 0.4})
    return table


def test_aggregate_hand_example_with_nan() -> None:
    stats = _tiny_table().aggregate()["Learned+TTA"]
    assert stats["GM"]["mean"] == pytest.approx(0.8)
    assert stats["GM"]["std"] == pytest.approx(np.std([0.9, 0.8, 0.7]))
    assert stats["GM"]["n"] == 3
    assert stats["WM"]["mean"] == pytest.approx(0.6)
    assert stats["WM"]["std"] == pytest.approx(0.1)
    assert stats["WM"]["n"] == 2
    # per-case mean foreground: 0.8, 0.8 (WM NaN ignored), 0.6
    assert stats["mean"]["mean"] == pytest.approx((0.8 + 0.8 + 0.6) / 3)
    assert stats["mean"]["n"] == 3


def test_aggregate_all_nan_class_is_nan_without_warning() -> None:
    table = DiceTable({"background": 0, "a": 1, "b": 2})
    table.add("Naive", "c1", {"a": NAN, "b": 0.5})
    with np.errstate(all="raise"):
        stats = table.aggregate()["Naive"]
    assert math.isnan(stats["a"]["mean"]) and stats["a"]["n"] == 0


def test_add_validates_classes_and_duplicates() -> None:
    table = DiceTable(LABELS)
    with pytest.raises(ValueError, match="missing"):
        table.add("Naive", "c1", {"GM": 0.5})
    table.add("Naive", "c1", {"CSF": 0.1, "GM": 0.5, "WM": 0.6})
    with pytest.raises(ValueError, match="already"):
        table.add("Naive", "c1", {"CSF": 0.1, "GM": 0.5, "WM": 0.6})


def test_add_prediction_records_dice() -> None:
    table = DiceTable(LABELS)
    label = _random_labels(4)
    assert table.add_prediction("Baseline", "c1", label, label) == {"CSF": 1.0, "GM": 1.0, "WM": 1.0}
    assert table.per_case["Baseline"]["c1"]["GM"] == 1.0


def test_markdown_follows_method_order() -> None:
    table = _tiny_table()
    text = table.to_markdown(title="Toy", notes={"K": "8", "λ range": "[0.65, 0.95]"})
    rows = [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ")]
    assert rows == ["Method", "Baseline", "Naive", "Learned+TTA", "Mine"]
    assert order_methods(list(reversed(METHOD_ORDER))) == list(METHOD_ORDER)
    assert "| Method | GM | WM | Avg |" in text
    assert "0.800 ± 0.082" in text
    assert "±" in text and "## Toy" in text
    assert "- K: 8" in text and "- λ range: [0.65, 0.95]" in text


def test_summary_json_valid_and_round_trips(tmp_path: Path) -> None:
    table = _tiny_table()
    paths = table.save(tmp_path / "out", metadata={"K": 8, "lambda_range": (0.65, 0.95), "seed": np.int64(3)})
    assert paths["summary"].name == "summary.json" and paths["table"].read_text().startswith("| Method")
    text = paths["summary"].read_text()
    summary = json.loads(text, parse_constant=lambda name: pytest.fail(f"non-standard JSON constant {name}"))
    assert summary["per_case"]["Learned+TTA"]["c2"]["WM"] is None
    assert summary["aggregate"]["Learned+TTA"]["WM"]["n"] == 2
    assert summary["labels"] == {"background": 0, "GM": 1, "WM": 2}
    assert summary["metadata"] == {"K": 8, "lambda_range": [0.65, 0.95], "seed": 3}
    assert list(summary["per_case"]) == ["Baseline", "Naive", "Learned+TTA", "Mine"]

    again = DiceTable.from_summary(tmp_path / "out")
    assert again.labels == table.labels and again.metadata == summary["metadata"]
    assert again.to_markdown() == table.to_markdown()
    assert math.isnan(again.per_case["Learned+TTA"]["c2"]["WM"])
    assert json.loads(json.dumps(again.to_dict())) == summary


# --------------------------------------------------------------------------- plots


def _png_size(path: Path) -> tuple[int, int]:
    assert path.exists() and path.stat().st_size > 1000
    with Image.open(path) as image:
        return image.size


def _phantom(seed: int, shape: tuple[int, int, int] = (12, 14, 10)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.linspace(-1, 1, size) for size in shape], indexing="ij")
    radius = np.sqrt(sum(axis**2 for axis in grid)) + 0.1 * rng.standard_normal(shape)
    label = np.digitize(-radius, [-0.9, -0.6, -0.2])  # 0 outside, 1, 2, 3 inwards
    return label + 0.1 * rng.standard_normal(shape), label


def _one_hot(label: np.ndarray) -> np.ndarray:
    return np.stack([label == value for value in range(4)]).astype(np.float32)


def test_label_colormap_background_transparent() -> None:
    cmap = label_colormap(10)
    assert cmap(0)[3] == 0.0
    assert all(cmap(value)[3] == 1.0 for value in range(1, 10))


def test_plot_label_overlay(tmp_path: Path) -> None:
    image, label = _phantom(0)
    width, height = _png_size(plot_label_overlay(image, label, LABELS, tmp_path / "overlay.png"))
    assert width >= 300 and height >= 300


def test_plot_dice_vs_k(tmp_path: Path) -> None:
    ks = [1, 2, 4, 8, 16]
    curves = {"Naive+TTA": {k: 0.7 + 0.01 * k for k in ks}, "Learned+TTA": {k: 0.85 + 0.002 * k for k in ks}}
    stds = {method: {k: 0.02 for k in ks} for method in curves}
    path = plot_dice_vs_k(curves, tmp_path / "fig3" / "dice_vs_k.png", baseline=0.9, stds=stds)
    width, height = _png_size(path)
    assert 400 <= width <= 2000 and 300 <= height <= 1500


@pytest.mark.parametrize("n_references", [1, 3, 5])
def test_plot_private_segmentation(tmp_path: Path, n_references: int) -> None:
    image, label = _phantom(0)
    references, reference_labels = zip(*[_phantom(10 + k) for k in range(n_references)])
    mixtures = [0.8 * image + 0.2 * reference for reference in references]
    mixed = [0.8 * _one_hot(label) + 0.2 * _one_hot(ref_label) for ref_label in reference_labels]
    naive = [(m - 0.2 * _one_hot(ref_label)) / 0.8 for m, ref_label in zip(mixed, reference_labels)]
    learned = [label] * n_references
    path = plot_private_segmentation(
        image, label, references, reference_labels, mixtures, mixed, naive, learned,
        np.mean(naive, axis=0), label, LABELS, tmp_path / f"fig2_{n_references}.png",
    )
    width, height = _png_size(path)
    assert width >= 800
    rows = min(3, n_references)
    assert 150 * rows <= height <= 400 * rows + 200


def test_plot_private_segmentation_checks_shapes(tmp_path: Path) -> None:
    image, label = _phantom(0)
    with pytest.raises(ValueError, match="mixtures"):
        plot_private_segmentation(image, label, [image], [label], [image[:-1]], [_one_hot(label)], [label],
                                  [label], label, label, LABELS, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="lengths"):
        plot_private_segmentation(image, label, [image, image], [label], [image], [_one_hot(label)], [label],
                                  [label], label, label, LABELS, tmp_path / "bad.png")


def test_plot_variance_map(tmp_path: Path) -> None:
    image, label = _phantom(0)
    variance = np.stack([_one_hot(np.roll(label, shift, axis=0)) for shift in (-1, 0, 1)]).var(axis=0)
    path = plot_variance_map(image, variance, tmp_path / "variance.png", slice_index=3, axis=0)
    width, height = _png_size(path)
    assert width >= 300 and height >= 300
    with pytest.raises(ValueError, match="slice_index"):
        plot_variance_map(image, variance, tmp_path / "bad.png", slice_index=99)
