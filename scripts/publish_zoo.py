"""Publish the 2 mm model-zoo entries from the CPU recipes' runs.

1. Train ``recipes/tissue-baseline.yaml`` and ``recipes/tissue-mixpriv.yaml`` into ``runs/``
   (skipped when a run's checkpoint exists).
2. Export both as float16 safetensors; check on a few test scans that float16 storage does not
   move the Dice table compared with the float32 checkpoints.
3. Evaluate the exported float16 models on the whole test split (K = 8).
4. Write ``checkpoints/<name>/`` with the model card (recipe, data, commit, evaluation table,
   training statistics) and update ``checkpoints/registry.json``.

``--unmixer-stage`` instead keeps the published segmenters and trains the Mixup-Privacy model's
unmixer anew (``UNMIXER_STAGE``: the coarse-context unmixer with its full-resolution refinement,
on the published segmenter kept fixed, in eval mode), then evaluates and publishes as in 2-4. The
card keeps the segmenter's recipe and statistics and adds the unmixer's under ``unmixer_training``.

Usage: .venv/bin/python scripts/publish_zoo.py [--runs runs] [--zoo checkpoints] [--unmixer-stage]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path

import torch
import yaml

from mixpriv.data.cohort import build_cohort
from mixpriv.data.datamodule import bank_from_cases
from mixpriv.data.folder import DatasetFolder
from mixpriv.evaluation.runner import evaluate_models
from mixpriv.hub import export_pretrained, load_pretrained_folder, update_registry
from mixpriv.recipe import load_recipe
from mixpriv.training import load_model, train

ENTRIES = {"tissue-baseline": "tissue-baseline-2mm", "tissue-mixpriv": "tissue-mixpriv-2mm"}
DEMO_BANK_SIZE = 8
#: The published Mixup-Privacy model's unmixer, trained on its published segmenter kept fixed (issue 11).
UNMIXER_STAGE = {
    "run": "tissue-mixpriv-unmixer",
    "max_steps": 2400,
    "freeze": ["segmenter"],
    "overrides": ["model.unmixer={channels: [16, 32], include_naive: true, context_scale: 4, refine_channels: 16}",
                  "trainer.check_val_every_n_epoch=4"],
}
UNMIXER_DESCRIPTION = ("Mixup-Privacy U-Net++ segmenter with its learned AdaIN unmixer (coarse-context U-Net on "
                       "4x-pooled inputs, a per-voxel head and a thin full-resolution refinement)")


def git_commit() -> str:
    result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    return result.stdout.strip() or "unknown"


def cohort_card(folder: DatasetFolder) -> dict:
    """The card's ``data`` entry: the embedded cohort and its generator settings."""
    cohort = folder.meta["mixpriv"]
    return {"name": folder.meta["name"], "description": folder.meta.get("description"),
            "generator": {k: cohort[k] for k in ("generator", "generator_version", "seed", "spacing_mm",
                                                  "n_patients", "scans_per_patient", "split_fractions")}}


def evaluate_half_precision(full: dict, folder: DatasetFolder, demo_bank, zoo: Path, k: int,
                            check_cases: int) -> tuple[dict, object, str]:
    """Stage float16 exports, check them against float32 on a few scans, evaluate them on the test split.

    Returns (float16 check, evaluation result, its markdown table).
    """
    key = bank_from_cases(folder, "train", full["tissue-mixpriv"].hparams.input_spacing)
    with tempfile.TemporaryDirectory() as staging:
        staged = {recipe: export_pretrained(full[recipe], staging, name, dtype=torch.float16,
                                            bank=demo_bank if recipe == "tissue-mixpriv" else None)
                  for recipe, name in ENTRIES.items()}
        half = {recipe: load_pretrained_folder(path) for recipe, path in staged.items()}
        check = {}
        for precision, models in (("float32", full), ("float16", half)):
            result = evaluate_models(models["tissue-baseline"], models["tissue-mixpriv"], folder, key,
                                     Path(staging) / f"check-{precision}", k=k, max_cases=check_cases,
                                     progress=False)
            check[precision] = {m: v["mean"]["mean"] for m, v in result.table.aggregate().items()}
        print("float16 storage check (mean foreground Dice on", check_cases, "scans):", json.dumps(check))
        result = evaluate_models(half["tissue-baseline"], half["tissue-mixpriv"], folder, key, zoo / "evaluation", k=k)
    table = result.table.to_markdown(title="Embedded cohort test split (24 scans, 12 patients), K = 8",
                                     notes={"K (TTA references)": str(k), "key": "72 references of the training split"})
    print(table)
    return check, result, table


def train_unmixer_stage(runs: Path, zoo: Path, folder: DatasetFolder) -> Path:
    """Train ``UNMIXER_STAGE`` on the published Mixup-Privacy model (skipped when its checkpoint exists)."""
    from mixpriv.finetune import finetune

    out = runs / UNMIXER_STAGE["run"]
    checkpoint = out / "checkpoints" / "last.ckpt"
    if not checkpoint.is_file():
        finetune(zoo / ENTRIES["tissue-mixpriv"], folder.root, out, max_steps=UNMIXER_STAGE["max_steps"],
                 freeze=UNMIXER_STAGE["freeze"], overrides=UNMIXER_STAGE["overrides"],
                 export_name=ENTRIES["tissue-mixpriv"])
    return checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=Path("runs"))
    parser.add_argument("--zoo", type=Path, default=Path("checkpoints"))
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--check-cases", type=int, default=4, help="test scans for the float16-vs-float32 check")
    parser.add_argument("--unmixer-stage", action="store_true",
                        help="keep the published segmenters; train and publish a new unmixer (UNMIXER_STAGE)")
    args = parser.parse_args()

    folder = DatasetFolder(build_cohort())
    cards = {}
    if args.unmixer_stage:
        published = {recipe: json.loads((args.zoo / name / "metadata.json").read_text())
                     for recipe, name in ENTRIES.items()}
        checkpoint = train_unmixer_stage(args.runs, args.zoo, folder)
        full = {"tissue-baseline": load_pretrained_folder(args.zoo / ENTRIES["tissue-baseline"]),
                "tissue-mixpriv": load_model(checkpoint)}
        run = checkpoint.parent.parent
        stage = {"recipe": yaml.safe_load((run / "recipe.yaml").read_text()),
                 "stats": json.loads((run / "train_stats.json").read_text()),
                 "frozen": UNMIXER_STAGE["freeze"],
                 "segmenter_from": {"commit": published["tissue-mixpriv"]["commit"],
                                    "model.safetensors": published["tissue-mixpriv"]["files"]["model.safetensors"]}}
        for recipe in ENTRIES:
            cards[recipe] = {key: published[recipe][key] for key in ("training_recipe", "training_stats")}
        cards["tissue-mixpriv"].update(description=UNMIXER_DESCRIPTION, unmixer_training=stage)
    else:
        for recipe_name in ENTRIES:
            checkpoint = args.runs / recipe_name / "checkpoints" / "last.ckpt"
            if not checkpoint.is_file():
                checkpoint = train(load_recipe(recipe_name), args.runs / recipe_name).checkpoint
            run = checkpoint.parent.parent
            cards[recipe_name] = {"training_recipe": yaml.safe_load((run / "recipe.yaml").read_text()),
                                  "training_stats": json.loads((run / "train_stats.json").read_text())}
        full = {name: load_model(args.runs / name / "checkpoints" / "last.ckpt") for name in ENTRIES}
    demo_bank = bank_from_cases(folder, "train", full["tissue-mixpriv"].hparams.input_spacing,
                                max_references=DEMO_BANK_SIZE)
    check, result, table = evaluate_half_precision(full, folder, demo_bank, args.zoo, args.k, args.check_cases)
    for recipe, name in ENTRIES.items():
        card = {**cards[recipe], "data": cohort_card(folder), "commit": git_commit(),
                "evaluation": {"aggregate": result.table.aggregate(), "K": args.k, "n_cases": 24,
                               "float16_check": check},
                "evaluation_markdown": table}
        bank = demo_bank if recipe == "tissue-mixpriv" else None
        path = export_pretrained(full[recipe], args.zoo, name, bank=bank, card=card, dtype=torch.float16,
                                 overwrite=True)
        update_registry(path, args.zoo / "registry.json")
        print(f"published {name} -> {path}")


if __name__ == "__main__":
    main()
