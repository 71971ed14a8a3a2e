"""The main job on an embedded cohort, end to end, in one call.

For the task's cohort (``tissue``: the brain-tissue cohort, ``tumour``: the brain-tumour cohort),
builds the cohort (once), loads the task's published baseline and Mixup-Privacy models (or, with
``train=True``, trains their recipes, reusing checkpoints already in ``out``), privately segments
held-out test scans with K references, prints the Dice table (and, for tumours, the BraTS regions)
and writes figures and NIfTIs.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mixpriv.data.sources import EMBEDDED_TISSUE, EMBEDDED_TUMOUR

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoTask:
    """An embedded cohort and the recipes and published models of its two rows."""

    data: str
    baseline_recipe: str
    baseline_model: str
    private_recipe: str
    private_model: str


TASKS = {
    "tissue": DemoTask(EMBEDDED_TISSUE, "tissue-baseline", "tissue-baseline-2mm", "tissue-mixpriv", "tissue-mixpriv-2mm"),
    "tumour": DemoTask(EMBEDDED_TUMOUR, "tumour-baseline", "tumour-baseline-2mm", "tumour-mixpriv", "tumour-mixpriv-2mm"),
}


def _trained_model(recipe_name: str, out: Path, data: str, overrides: Sequence[str]):
    from mixpriv.recipe import load_recipe
    from mixpriv.training import load_model, train

    checkpoint = out / recipe_name / "checkpoints" / "last.ckpt"
    if checkpoint.is_file():
        log.info("reusing %s", checkpoint)
    else:
        recipe = load_recipe(recipe_name, [f"data.data_dir={data}", *overrides])
        checkpoint = train(recipe, out / recipe_name).checkpoint
    return load_model(checkpoint)


def run_demo(out: str | Path, k: int = 8, max_cases: int | None = 2, train: bool = False,
             overrides: Sequence[str] = (), task: str = "tissue") -> dict:
    """Run the demo of ``task`` (``"tissue"`` or ``"tumour"``); returns the paths of what it wrote.

    Example:
        >>> run_demo("outputs/demo-tumour", task="tumour", max_cases=1)  # doctest: +SKIP
        {'key': PosixPath('outputs/demo-tumour/key.mpk'), ...}
    """
    from mixpriv.data.datamodule import bank_from_cases
    from mixpriv.data.folder import DatasetFolder
    from mixpriv.data.sources import resolve_data_dir
    from mixpriv.evaluation.runner import evaluate_models
    from mixpriv.hub import from_pretrained

    if task not in TASKS:
        raise ValueError(f"unknown demo task {task!r}; choose one of {sorted(TASKS)}")
    spec, out = TASKS[task], Path(out)
    folder = DatasetFolder(resolve_data_dir(spec.data))
    if train:
        baseline = _trained_model(spec.baseline_recipe, out, spec.data, overrides)
        private = _trained_model(spec.private_recipe, out, spec.data, overrides)
    else:
        baseline, private = from_pretrained(spec.baseline_model), from_pretrained(spec.private_model)

    key = getattr(private, "default_bank", None)
    if key is None:
        key = bank_from_cases(folder, "train", private.hparams.input_spacing, max_references=16)
    else:
        log.info("using the model's published demo key (not secret: make your own with `mixpriv keygen`)")
    key_path = key.save(out / "key.mpk", overwrite=True)
    result = evaluate_models(baseline, private, folder, key, out / "evaluation", k=k, max_cases=max_cases)
    n_cases = len(result.table.per_case["Learned+TTA"])
    print(result.table.to_markdown(title=f"Segmentation (Dice), embedded {task} cohort, held-out test scans",
                                   notes={"K (TTA references)": str(k), "test scans": str(n_cases)}))
    if result.regions is not None:
        print(result.regions.to_markdown())
    print("whole-volume inference, seconds per scan:", {n: round(s, 2) for n, s in result.seconds.items()})
    outputs = {"key": key_path, **result.outputs}
    (out / "outputs.json").write_text(json.dumps({n: str(p) for n, p in outputs.items()}, indent=2))
    print(f"private segmentation of a held-out scan: {result.outputs['segmentation']}")
    print(f"figures and tables: {out / 'evaluation'}")
    return outputs
