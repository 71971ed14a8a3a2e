"""Training and inference speed of the CPU recipes, as a table.

Reads the ``train_stats.json`` of the recipes' runs (training time, steps, patches/s over the
whole run), measures training throughput again on a short run of each recipe
(``--train-steps`` steps after 5 warm-up steps, so the number is not skewed by whatever else
ran during the demo), and times the whole-volume inference of one held-out test scan: the
baseline, and the private pipeline (mix -> segment -> learned unmix, averaged) with K = 1 and
K = 8, median of ``--repeats`` runs.

Usage (after the recipes were trained into runs/, e.g. by ``scripts/publish_zoo.py``):
    .venv/bin/python benchmarks/cpu_pipeline.py --runs runs
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from mixpriv.constants import IMAGE, TEST
from mixpriv.data.cohort import build_cohort
from mixpriv.data.datamodule import bank_from_cases
from mixpriv.data.folder import DatasetFolder
from mixpriv.inference.volume import load_scan, segment_volume
from mixpriv.lightning.tta import TTAEnsembler
from mixpriv.recipe import load_recipe
from mixpriv.training import load_model, train
from timing import median_seconds



def measure_training(recipe_name: str, steps: int, scratch: Path) -> tuple[str, str]:
    """Patches/s over ``steps`` training steps, after 5 warm-up steps (model init, queue fill)."""
    overrides = [f"trainer.max_steps={steps + 5}", "trainer.max_time=null", "logger.kind=none",
                 "trainer.enable_progress_bar=false", "trainer.limit_val_batches=0"]
    run = train(load_recipe(recipe_name, overrides), scratch / recipe_name)
    return f"{run.stats['steps']} steps", f"{run.stats['patches_per_second_after_warmup']:.2f} patches/s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=Path("runs"), help="where the recipes were trained")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=40, help="steps of the throughput measurement (0: skip)")
    parser.add_argument("--scratch", type=Path, default=Path("outputs/benchmark-scratch"))
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    baseline = load_model(args.runs / "tissue-baseline/checkpoints/last.ckpt")
    private = load_model(args.runs / "tissue-mixpriv/checkpoints/last.ckpt")
    folder = DatasetFolder(build_cohort(progress=False))
    bank = bank_from_cases(folder, "train", private.hparams.input_spacing, progress=False)
    subject, _ = load_scan(folder.cases(TEST)[0].image_paths[0], private.hparams.input_spacing)
    image = subject[IMAGE].data.float()

    rows = []
    for name in ("tissue-baseline", "tissue-mixpriv"):
        stats = json.loads((args.runs / name / "train_stats.json").read_text())
        rows.append((f"train {name} (recipe run)", f"{stats['train_seconds_total']:.0f} s total, {stats['steps']} steps",
                     f"{stats['patches_per_second']:.2f} patches/s ({stats['device']}, {stats['precision']})"))
        if args.train_steps:
            rows.append((f"train {name} (throughput)", *measure_training(name, args.train_steps, args.scratch)))
    patch = baseline.hparams.patch_size
    torch.set_grad_enabled(False)
    seconds = median_seconds(lambda: segment_volume(lambda x: torch.softmax(baseline(x), 1), image, patch), args.repeats)
    rows.append(("inference baseline", f"{seconds:.2f} s / volume", f"shape {tuple(image.shape[1:])}"))
    for k in (1, 8):
        ensembler = TTAEnsembler(private, bank, k=k, seed=0)
        seconds_k = median_seconds(lambda: ensembler(image), args.repeats)
        rows.append((f"inference private K={k}", f"{seconds_k:.2f} s / volume", f"{seconds_k / seconds:.1f}x baseline"))

    print("| what | time | notes |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats} runs after a warm-up")


if __name__ == "__main__":
    main()
