"""The main job on the embedded cohort, end to end, in one call.

Builds the cohort (once), loads the published models ``tissue-baseline-2mm`` and
``tissue-mixpriv-2mm`` (or, with ``train=True``, trains the recipes ``tissue-baseline`` and
``tissue-mixpriv``, reusing checkpoints already in ``out``), privately segments held-out test
scans with K references, prints the Dice table and writes figures and NIfTIs.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

PUBLISHED = {"tissue-baseline": "tissue-baseline-2mm", "tissue-mixpriv": "tissue-mixpriv-2mm"}


def _trained_models(out: Path, overrides: Sequence[str]) -> dict:
    from mixpriv.recipe import load_recipe
    from mixpriv.training import load_model, train

    models = {}
    for recipe_name in PUBLISHED:
        checkpoint = out / recipe_name / "checkpoints" / "last.ckpt"
        if checkpoint.is_file():
            log.info("reusing %s", checkpoint)
        else:
            checkpoint = train(load_recipe(recipe_name, overrides), out / recipe_name).checkpoint
        models[recipe_name] = load_model(checkpoint)
    return models


def run_demo(out: str | Path, k: int = 8, max_cases: int | None = 2, train: bool = False,
             overrides: Sequence[str] = ()) -> dict:
    """Run the demo; returns the paths of what it wrote."""
    from mixpriv.data.cohort import build_cohort
    from mixpriv.data.datamodule import bank_from_cases
    from mixpriv.data.folder import DatasetFolder
    from mixpriv.evaluation.runner import evaluate_models
    from mixpriv.hub import from_pretrained

    out = Path(out)
    folder = DatasetFolder(build_cohort())
    if train:
        models = _trained_models(out, overrides)
    else:
        models = {recipe: from_pretrained(name) for recipe, name in PUBLISHED.items()}
    baseline, private = models["tissue-baseline"], models["tissue-mixpriv"]

    key = getattr(private, "default_bank", None)
    if key is None:
        key = bank_from_cases(folder, "train", private.hparams.input_spacing, max_references=16)
    else:
        log.info("using the model's published demo key (not secret: make your own with `mixpriv keygen`)")
    key_path = key.save(out / "key.mpk", overwrite=True)
    result = evaluate_models(baseline, private, folder, key, out / "evaluation", k=k, max_cases=max_cases)
    n_cases = len(result.table.per_case["Learned+TTA"])
    print(result.table.to_markdown(title="Segmentation (Dice), embedded cohort, held-out test scans",
                                   notes={"K (TTA references)": str(k), "test scans": str(n_cases)}))
    print("whole-volume inference, seconds per scan:", {n: round(s, 2) for n, s in result.seconds.items()})
    outputs = {"key": key_path, **result.outputs}
    (out / "outputs.json").write_text(json.dumps({n: str(p) for n, p in outputs.items()}, indent=2))
    print(f"private segmentation of a held-out scan: {result.outputs['segmentation']}")
    print(f"figures and tables: {out / 'evaluation'}")
    return outputs
