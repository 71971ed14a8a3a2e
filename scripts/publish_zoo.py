"""Publish the 2 mm model-zoo entries of a task from the CPU recipes' runs.

1. Train the task's recipes into ``runs/`` (skipped when a run's checkpoint exists): for ``--task tissue``
   ``recipes/tissue-baseline.yaml`` and ``recipes/tissue-mixpriv.yaml``, for ``--task tumour``
   ``recipes/tumour-baseline.yaml`` and ``recipes/tumour-mixpriv.yaml`` (the embedded tumour cohort).
2. Export both as float16 safetensors; check on a few test scans that float16 storage does not
   move the Dice table compared with the float32 checkpoints.
3. Evaluate the exported float16 models on the whole test split (K = 8) into ``checkpoints/evaluation``
   (tissue) or ``checkpoints/evaluation/tumour`` (tumour: with the BraTS regions' Dice and HD95).
4. Write ``checkpoints/<name>/`` with the model card (recipe, data and label mapping, commit, evaluation
   table, training statistics) and update ``checkpoints/registry.json``.

``--compared`` instead publishes the paper's compared systems, Privacy-Net and Deformation-Proxy
(issue 16): trains their recipes, evaluates them next to the published tissue models (the paper's
Table 1 into ``checkpoints/evaluation/compared``) and publishes them with that table on their cards.

``--unmixer-stage`` instead keeps the published segmenters and trains the Mixup-Privacy model's
unmixer anew (``UNMIXER_STAGE``: the coarse-context unmixer with its full-resolution refinement,
on the published segmenter kept fixed, in eval mode), then evaluates and publishes as in 2-4. The
card keeps the segmenter's recipe and statistics and adds the unmixer's under ``unmixer_training``
(tissue task only).

Usage: .venv/bin/python scripts/publish_zoo.py [--task tissue|tumour] [--runs runs] [--zoo checkpoints] [--unmixer-stage | --compared]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path

import torch
import yaml

from mixpriv.data.datamodule import bank_from_cases
from mixpriv.data.folder import DatasetFolder
from mixpriv.data.sources import resolve_data_dir
from mixpriv.demo import TASKS
from mixpriv.evaluation.compared import compared_systems
from mixpriv.evaluation.runner import evaluate_models
from mixpriv.hub import export_pretrained, load_pretrained_folder, update_registry
from mixpriv.kinds import KINDS, compared_kinds
from mixpriv.recipe import load_recipe
from mixpriv.training import load_model, train

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
    result = subprocess.run(["git", "rev-parse", "HEAD"], check=False, capture_output=True, text=True)
    return result.stdout.strip() or "unknown"


def cohort_card(folder: DatasetFolder, data: str) -> dict:
    """The card's ``data`` entry: the dataset, its label mapping and the embedded cohort's generator settings."""
    meta = folder.meta["mixpriv"]
    card = {"name": folder.meta["name"], "source": data, "description": folder.meta.get("description"),
            "labels": folder.labels}
    if "brats_labels" in meta:  # the tumour cohort, converted from the BraTS layout (T1ce)
        from mixpriv.data.tumour import build_tumour_cohort

        card.update(brats_labels=meta["brats_labels"], label_descriptions=meta["label_descriptions"],
                    modalities=meta["modalities"])
        meta = {**meta, **json.loads((build_tumour_cohort() / "cohort.json").read_text())}
    card["generator"] = {k: meta[k] for k in ("generator", "generator_version", "seed", "spacing_mm", "n_patients",
                                              "scans_per_patient", "split_fractions") if k in meta}
    return card


def evaluate_half_precision(full: dict, entries: dict[str, str], folder: DatasetFolder, demo_bank, out: Path,
                            k: int, check_cases: int) -> tuple[dict, object, str]:
    """Stage float16 exports, check them against float32 on a few scans, evaluate them on the test split.

    ``full`` and ``entries`` are keyed by role (``baseline``, ``private``). Returns (float16 check,
    evaluation result, its markdown table).
    """
    key = bank_from_cases(folder, "train", full["private"].hparams.input_spacing)
    with tempfile.TemporaryDirectory() as staging:
        staged = {role: export_pretrained(full[role], staging, name, dtype=torch.float16,
                                          bank=demo_bank if role == "private" else None)
                  for role, name in entries.items()}
        half = {role: load_pretrained_folder(path) for role, path in staged.items()}
        check = {}
        for precision, models in (("float32", full), ("float16", half)):
            result = evaluate_models(models["baseline"], models["private"], folder, key,
                                     Path(staging) / f"check-{precision}", k=k, max_cases=check_cases,
                                     progress=False)
            check[precision] = {m: v["mean"]["mean"] for m, v in result.table.aggregate().items()}
        print("float16 storage check (mean foreground Dice on", check_cases, "scans):", json.dumps(check))
        result = evaluate_models(half["baseline"], half["private"], folder, key, out, k=k)
    test = [case for case in folder.cases("test") if case.label_path is not None]
    title = (f"Embedded cohort test split ({len(test)} scans, {len({c.patient_id for c in test})} patients), "
             f"K = {k}")
    table = result.table.to_markdown(title=title, notes={"K (TTA references)": str(k),
                                                         "key": f"{len(key)} references of the training split"})
    if result.regions is not None:
        table += "\n" + result.regions.to_markdown()
    print(table)
    return check, result, table


def train_unmixer_stage(runs: Path, zoo: Path, folder: DatasetFolder) -> Path:
    """Train ``UNMIXER_STAGE`` on the published Mixup-Privacy model (skipped when its checkpoint exists)."""
    from mixpriv.finetune import finetune

    out = runs / UNMIXER_STAGE["run"]
    checkpoint = out / "checkpoints" / "last.ckpt"
    if not checkpoint.is_file():
        finetune(zoo / TASKS["tissue"].private_model, folder.root, out, max_steps=UNMIXER_STAGE["max_steps"],
                 freeze=UNMIXER_STAGE["freeze"], overrides=UNMIXER_STAGE["overrides"],
                 export_name=TASKS["tissue"].private_model)
    return checkpoint


def trained_checkpoint(runs: Path, recipe_name: str) -> Path:
    """``runs/<recipe>/checkpoints/last.ckpt``, training the recipe there first when it does not exist."""
    checkpoint = runs / recipe_name / "checkpoints" / "last.ckpt"
    if not checkpoint.is_file():
        checkpoint = train(load_recipe(recipe_name), runs / recipe_name).checkpoint
    return checkpoint


def training_card(checkpoint: Path) -> dict:
    """The card's training entries: the run's resolved recipe and its ``train_stats.json``."""
    run = checkpoint.parent.parent
    return {"training_recipe": yaml.safe_load((run / "recipe.yaml").read_text()),
            "training_stats": json.loads((run / "train_stats.json").read_text())}


def publish_compared(runs: Path, zoo: Path, k: int) -> None:
    """Publish Privacy-Net and Deformation-Proxy (issue 16) next to the published tissue models.

    Trains ``recipes/tissue-privacynet.yaml`` and ``recipes/tissue-deformproxy.yaml`` into ``runs/``
    (skipped when a run's checkpoint exists; ``scripts/train_compared.sh`` resumes a stopped one),
    exports both as float16, evaluates them on the test split next to the published baseline and
    Mixup-Privacy models (the paper's Table 1, K = ``k``) into ``<zoo>/evaluation/compared`` and
    publishes them with that evaluation on their cards.
    """
    task = TASKS["tissue"]
    folder = DatasetFolder(resolve_data_dir(task.data))
    baseline = load_pretrained_folder(zoo / task.baseline_model)
    private = load_pretrained_folder(zoo / task.private_model)
    key = bank_from_cases(folder, "train", private.hparams.input_spacing)
    checkpoints = {kind.name: trained_checkpoint(runs, f"tissue-{kind.name}") for kind in compared_kinds()}
    models = {name: load_model(checkpoint) for name, checkpoint in checkpoints.items()}
    with tempfile.TemporaryDirectory() as staging:
        half = {name: load_pretrained_folder(export_pretrained(model, staging, name, dtype=torch.float16))
                for name, model in models.items()}
        result = evaluate_models(baseline, private, folder, key, zoo / "evaluation" / "compared", k=k,
                                 compared=compared_systems(half.values()))
    table = result.table.to_markdown(title=f"Embedded cohort test split, K = {k}",
                                     notes={"key": f"{len(key)} references of the training split"})
    print(table)
    aggregate = result.table.aggregate()
    for name, checkpoint in checkpoints.items():
        row = KINDS[name].system
        card = {**training_card(checkpoint), "data": cohort_card(folder, task.data), "commit": git_commit(),
                "evaluation": {"aggregate": {row: aggregate[row]}, "K": k,
                               "n_cases": len(result.table.per_case[row])},
                "evaluation_markdown": table}
        path = export_pretrained(models[name], zoo, f"tissue-{name}-2mm", card=card,
                                 dtype=torch.float16, overwrite=True)
        update_registry(path, zoo / "registry.json")
        print(f"published tissue-{name}-2mm -> {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(TASKS), default="tissue")
    parser.add_argument("--runs", type=Path, default=Path("runs"))
    parser.add_argument("--zoo", type=Path, default=Path("checkpoints"))
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--check-cases", type=int, default=4, help="test scans for the float16-vs-float32 check")
    parser.add_argument("--unmixer-stage", action="store_true",
                        help="keep the published segmenters; train and publish a new unmixer (UNMIXER_STAGE)")
    parser.add_argument("--compared", action="store_true",
                        help="publish the compared systems (Privacy-Net, Deformation-Proxy) next to the published "
                             "tissue models instead")
    args = parser.parse_args()
    if (args.unmixer_stage or args.compared) and args.task != "tissue":
        parser.error("--unmixer-stage and --compared are for the tissue task only")
    if args.compared:
        publish_compared(args.runs, args.zoo, args.k)
        return

    task = TASKS[args.task]
    recipes = {"baseline": task.baseline_recipe, "private": task.private_recipe}
    entries = {"baseline": task.baseline_model, "private": task.private_model}
    folder = DatasetFolder(resolve_data_dir(task.data))
    cards = {}
    if args.unmixer_stage:
        published = {role: json.loads((args.zoo / name / "metadata.json").read_text()) for role, name in entries.items()}
        checkpoint = train_unmixer_stage(args.runs, args.zoo, folder)
        full = {"baseline": load_pretrained_folder(args.zoo / entries["baseline"]), "private": load_model(checkpoint)}
        run = checkpoint.parent.parent
        stage = {"recipe": yaml.safe_load((run / "recipe.yaml").read_text()),
                 "stats": json.loads((run / "train_stats.json").read_text()),
                 "frozen": UNMIXER_STAGE["freeze"],
                 "segmenter_from": {"commit": published["private"]["commit"],
                                    "model.safetensors": published["private"]["files"]["model.safetensors"]}}
        for role in entries:
            cards[role] = {key: published[role][key] for key in ("training_recipe", "training_stats")}
        cards["private"].update(description=UNMIXER_DESCRIPTION, unmixer_training=stage)
    else:
        full = {}
        for role, recipe_name in recipes.items():
            checkpoint = trained_checkpoint(args.runs, recipe_name)
            cards[role] = training_card(checkpoint)
            full[role] = load_model(checkpoint)
    demo_bank = bank_from_cases(folder, "train", full["private"].hparams.input_spacing, max_references=DEMO_BANK_SIZE)
    out = args.zoo / "evaluation" if args.task == "tissue" else args.zoo / "evaluation" / args.task
    check, result, table = evaluate_half_precision(full, entries, folder, demo_bank, out, args.k, args.check_cases)
    evaluation = {"aggregate": result.table.aggregate(), "K": args.k,
                  "n_cases": len(result.table.per_case["Learned+TTA"]), "float16_check": check}
    if result.regions is not None:
        evaluation["regions"] = result.regions.aggregate()
    for role, name in entries.items():
        card = {**cards[role], "data": cohort_card(folder, task.data), "commit": git_commit(),
                "evaluation": evaluation, "evaluation_markdown": table}
        path = export_pretrained(full[role], args.zoo, name, bank=demo_bank if role == "private" else None,
                                 card=card, dtype=torch.float16, overwrite=True)
        update_registry(path, args.zoo / "registry.json")
        print(f"published {name} -> {path}")


if __name__ == "__main__":
    main()
