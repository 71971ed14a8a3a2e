"""The main job on the embedded cohort, end to end, in one call.

Builds the cohort (once), trains the CPU recipes ``tissue-baseline`` and ``tissue-mixpriv``
(or reuses their checkpoints in ``out``), evaluates on the held-out test split, prints the
Dice table, and privately segments one held-out test scan with a fresh secret key.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from mixpriv.constants import IMAGE, TEST

log = logging.getLogger(__name__)


def run_demo(out: str | Path, k: int = 8, max_cases: int | None = None, overrides: Sequence[str] = ()) -> dict:
    """Run the demo; returns the paths of what it wrote."""
    import numpy as np
    import torch

    from mixpriv.data.cohort import build_cohort
    from mixpriv.data.datamodule import bank_from_cases
    from mixpriv.data.folder import DatasetFolder
    from mixpriv.evaluation.runner import evaluate_models
    from mixpriv.inference.volume import load_scan, save_like, to_original_grid
    from mixpriv.lightning.tta import TTAEnsembler
    from mixpriv.recipe import load_recipe
    from mixpriv.training import load_model, train

    out = Path(out)
    folder = DatasetFolder(build_cohort())
    checkpoints = {}
    for name in ("tissue-baseline", "tissue-mixpriv"):
        checkpoint = out / name / "checkpoints" / "last.ckpt"
        if checkpoint.is_file():
            log.info("reusing %s", checkpoint)
        else:
            checkpoint = train(load_recipe(name, overrides), out / name).checkpoint
        checkpoints[name] = checkpoint
    baseline, private = load_model(checkpoints["tissue-baseline"]), load_model(checkpoints["tissue-mixpriv"])

    key = bank_from_cases(folder, "train", private.hparams.input_spacing)
    key_path = key.save(out / "key.mpk", overwrite=True)
    result = evaluate_models(baseline, private, folder, key, out / "evaluation", k=k, max_cases=max_cases)
    print(result.table.to_markdown(title="Segmentation (Dice), embedded cohort test split",
                                   notes={"K (TTA references)": str(k)}))
    print("whole-volume inference, seconds per scan:", {n: round(s, 2) for n, s in result.seconds.items()})

    scan = folder.cases(TEST)[0].image_paths[0]
    subject, original = load_scan(scan, private.hparams.input_spacing)
    segmentation = TTAEnsembler(private, key, k=k)(subject[IMAGE].data.float())["learned"]
    affine = subject[IMAGE].affine
    seg_path = save_like(to_original_grid(segmentation.labels[None].to(torch.uint8), affine, original, True),
                         scan, out / "test_scan_private_seg.nii.gz")
    var_path = save_like(to_original_grid(segmentation.variance.sum(0, keepdim=True), affine, original, False),
                         scan, out / "test_scan_tta_variance.nii.gz", dtype=np.float32)
    outputs = {"key": key_path, "segmentation": seg_path, "variance": var_path, **result.outputs,
               **{f"checkpoint_{n}": c for n, c in checkpoints.items()}}
    (out / "outputs.json").write_text(json.dumps({n: str(p) for n, p in outputs.items()}, indent=2))
    print(f"private segmentation of held-out scan {scan.name}: {seg_path}")
    print(f"figures and tables: {out / 'evaluation'}")
    return outputs
