"""Publish the 2 mm model-zoo entries from the CPU recipes' runs.

1. Train ``recipes/tissue-baseline.yaml`` and ``recipes/tissue-mixpriv.yaml`` into ``runs/``
   (skipped when a run's checkpoint exists).
2. Export both as float16 safetensors; check on a few test scans that float16 storage does not
   move the Dice table compared with the float32 checkpoints.
3. Evaluate the exported float16 models on the whole test split (K = 8).
4. Write ``checkpoints/<name>/`` with the model card (recipe, data, commit, evaluation table,
   training statistics) and update ``checkpoints/registry.json``.

Usage: .venv/bin/python scripts/publish_zoo.py [--runs runs] [--zoo checkpoints]
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


def git_commit() -> str:
    result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    return result.stdout.strip() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=Path("runs"))
    parser.add_argument("--zoo", type=Path, default=Path("checkpoints"))
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--check-cases", type=int, default=4, help="test scans for the float16-vs-float32 check")
    args = parser.parse_args()

    folder = DatasetFolder(build_cohort())
    checkpoints = {}
    for recipe_name in ENTRIES:
        checkpoint = args.runs / recipe_name / "checkpoints" / "last.ckpt"
        if not checkpoint.is_file():
            checkpoint = train(load_recipe(recipe_name), args.runs / recipe_name).checkpoint
        checkpoints[recipe_name] = checkpoint
    full = {name: load_model(path) for name, path in checkpoints.items()}
    key = bank_from_cases(folder, "train", full["tissue-mixpriv"].hparams.input_spacing)
    demo_bank = bank_from_cases(folder, "train", full["tissue-mixpriv"].hparams.input_spacing,
                                max_references=DEMO_BANK_SIZE)

    with tempfile.TemporaryDirectory() as staging:
        staged = {recipe: export_pretrained(full[recipe], staging, name, dtype=torch.float16,
                                            bank=demo_bank if recipe == "tissue-mixpriv" else None)
                  for recipe, name in ENTRIES.items()}
        half = {recipe: load_pretrained_folder(path) for recipe, path in staged.items()}
        check = {}
        for precision, models in (("float32", full), ("float16", half)):
            result = evaluate_models(models["tissue-baseline"], models["tissue-mixpriv"], folder, key,
                                     Path(staging) / f"check-{precision}", k=args.k, max_cases=args.check_cases,
                                     progress=False)
            check[precision] = {m: v["mean"]["mean"] for m, v in result.table.aggregate().items()}
        print("float16 storage check (mean foreground Dice on", args.check_cases, "scans):", json.dumps(check))
        result = evaluate_models(half["tissue-baseline"], half["tissue-mixpriv"], folder, key,
                                 args.zoo / "evaluation", k=args.k)
    table = result.table.to_markdown(title="Embedded cohort test split (24 scans, 12 patients), K = 8",
                                     notes={"K (TTA references)": str(args.k),
                                            "key": "72 references of the training split"})
    print(table)
    cohort = folder.meta["mixpriv"]
    for recipe, name in ENTRIES.items():
        stats = json.loads((args.runs / recipe / "train_stats.json").read_text())
        card = {
            "training_recipe": yaml.safe_load((args.runs / recipe / "recipe.yaml").read_text()),
            "training_stats": stats,
            "data": {"name": folder.meta["name"], "description": folder.meta.get("description"),
                     "generator": {k: cohort[k] for k in ("generator", "generator_version", "seed", "spacing_mm",
                                                           "n_patients", "scans_per_patient", "split_fractions")}},
            "commit": git_commit(),
            "evaluation": {"aggregate": result.table.aggregate(), "K": args.k, "n_cases": 24,
                           "float16_check": check},
            "evaluation_markdown": table,
        }
        bank = demo_bank if recipe == "tissue-mixpriv" else None
        path = export_pretrained(full[recipe], args.zoo, name, bank=bank, card=card, dtype=torch.float16,
                                 overwrite=True)
        update_registry(path, args.zoo / "registry.json")
        print(f"published {name} -> {path}")


if __name__ == "__main__":
    main()
