"""The walkthrough notebook runs end to end (headless, tiny models) and is committed without outputs."""

from __future__ import annotations

import re
import stat
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import LABELS, TINY_SEGMENTER, TINY_UNMIXER

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "walkthrough.ipynb"
CELL_TIMEOUT_S = 300


def code_cells(notebook) -> list:
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def test_committed_notebook_has_cleared_outputs():
    nbformat = pytest.importorskip("nbformat")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    assert notebook.metadata.kernelspec.name == "python3"
    cells = code_cells(notebook)
    assert cells, "the walkthrough has no code cell"
    dirty = [i for i, cell in enumerate(cells) if cell.outputs or cell.execution_count is not None]
    assert not dirty, f"code cells {dirty} carry outputs or execution counts: clear them before committing"


def test_notebook_uses_only_the_public_api():
    nbformat = pytest.importorskip("nbformat")
    source = "\n".join(cell.source for cell in code_cells(nbformat.read(NOTEBOOK, as_version=4)))
    # ``x._name`` or ``import _name`` (dunders such as ``mixpriv.__version__`` are public)
    private = re.findall(r"\w\._(?!_)\w*|\bimport\b[^\n]*\b_(?!_)\w+", source)
    assert not private, f"the walkthrough reaches into private names: {private}"
    first = code_cells(nbformat.read(NOTEBOOK, as_version=4))[0].source
    for setting in ('MODEL = "tissue-mixpriv-2mm"', 'BASELINE = "tissue-baseline-2mm"', "K = 8", "N_CASES = 4"):
        assert setting in first, f"the parameters cell lacks {setting}"


def export_tiny_models(data_dir: Path, out_dir: Path) -> tuple[Path, Path]:
    """Untrained tiny models, exported like published ones (the mixpriv one with a demo bank)."""
    from mixpriv.data.datamodule import bank_from_cases
    from mixpriv.data.folder import DatasetFolder
    from mixpriv.hub import export_pretrained
    from mixpriv.lightning.baseline import BaselineSegmenter
    from mixpriv.lightning.mixup import MixupPrivacyModule

    torch.manual_seed(0)
    private = MixupPrivacyModule(LABELS, TINY_SEGMENTER, TINY_UNMIXER, patch_size=16, input_spacing=2.0).eval()
    baseline = BaselineSegmenter(LABELS, TINY_SEGMENTER, patch_size=16, input_spacing=2.0).eval()
    bank = bank_from_cases(DatasetFolder(data_dir), "train", 2.0, progress=False)
    model_dir = export_pretrained(private, out_dir, "tiny-mixpriv", bank=bank, dtype=torch.float32)
    baseline_dir = export_pretrained(baseline, out_dir, "tiny-baseline", dtype=torch.float32)
    return model_dir, baseline_dir


@pytest.mark.slow
def test_walkthrough_runs_headless(tiny_folder, tmp_path, monkeypatch):
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    pytest.importorskip("ipykernel")
    model_dir, baseline_dir = export_tiny_models(tiny_folder, tmp_path / "models")
    out_dir = tmp_path / "out"
    monkeypatch.setenv("MIXPRIV_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MIXPRIV_OFFLINE", "1")  # everything is local: never touch the network
    monkeypatch.setenv("MIXPRIV_NOTEBOOK_MODEL", str(model_dir))
    monkeypatch.setenv("MIXPRIV_NOTEBOOK_BASELINE", str(baseline_dir))
    monkeypatch.setenv("MIXPRIV_NOTEBOOK_K", "2")
    monkeypatch.setenv("MIXPRIV_NOTEBOOK_CASES", "1")
    monkeypatch.setenv("MIXPRIV_NOTEBOOK_DATA", str(tiny_folder))
    monkeypatch.setenv("MIXPRIV_NOTEBOOK_OUT", str(out_dir))
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend draws the figures

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError, naming the cell, if any cell fails
    elapsed = time.perf_counter() - start

    outputs = [output for cell in code_cells(notebook) for output in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "ReferenceBank(3 references" in text and "mode 600" in text
    assert "affine identical to the scan's" in text
    images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.data]
    # label overlay, mixing figure, variance map, Fig. 2, Dice vs K
    assert len(images) >= 5, f"{len(images)} figures shown"
    markdown = [o.data["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {})]
    assert markdown and all(row in markdown[0] for row in ("Baseline", "Naive+TTA", "Learned+TTA"))

    for name in ("key.mpk", "tta_variance.png", "private_segmentation.png", "dice_vs_k.png"):
        assert (out_dir / name).is_file(), f"the notebook did not write {name}"
    assert stat.S_IMODE((out_dir / "key.mpk").stat().st_mode) == 0o600
    segmentations = sorted(out_dir.glob("*_private_seg.nii.gz"))
    assert len(segmentations) == 1
    scan = nib.load(str(min((tiny_folder / "imagesTs").glob("*_0000.nii.gz"))))
    written = nib.load(str(segmentations[0]))
    assert written.shape == scan.shape and np.allclose(written.affine, scan.affine)
    assert set(np.unique(np.asarray(written.dataobj)).tolist()) <= set(LABELS.values())
    assert elapsed < 120, f"the tiny walkthrough took {elapsed:.0f} s"
