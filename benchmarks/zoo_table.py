"""Regenerate the Dice table of the published 2 mm models on the embedded cohort's test split.

Loads ``tissue-baseline-2mm`` and ``tissue-mixpriv-2mm`` with ``mixpriv.from_pretrained`` (the
safetensors in ``checkpoints/``), draws the client's key from the cohort's training split (72
references) and evaluates all 24 held-out test scans with K = 8 references.

Usage:
    .venv/bin/python benchmarks/zoo_table.py [--k 8] [--max-cases N] [--out outputs/zoo-table]
    .venv/bin/python benchmarks/zoo_table.py --private runs/finetuned/my-model   # another model, same protocol
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mixpriv.memory import tune_cpu_memory

tune_cpu_memory()  # as the mixpriv command line does (mixpriv.memory)

from mixpriv.data.cohort import build_cohort
from mixpriv.data.datamodule import bank_from_cases
from mixpriv.data.folder import DatasetFolder
from mixpriv.evaluation.runner import evaluate_models
from mixpriv.hub import from_pretrained


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--max-cases", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("outputs/zoo-table"))
    parser.add_argument("--baseline", default="tissue-baseline-2mm", help="baseline model: name, folder or URL")
    parser.add_argument("--private", default="tissue-mixpriv-2mm", help="Mixup-Privacy model: name, folder or URL")
    args = parser.parse_args()
    baseline, private = from_pretrained(args.baseline), from_pretrained(args.private)
    folder = DatasetFolder(build_cohort())
    key = bank_from_cases(folder, "train", private.hparams.input_spacing)
    result = evaluate_models(baseline, private, folder, key, args.out, k=args.k, seed=args.seed,
                             max_cases=args.max_cases)
    print(result.table.to_markdown(title=f"{args.baseline} / {args.private}, embedded cohort test split",
                                   notes={"K": str(args.k)}))
    print("seconds per scan:", {name: round(value, 2) for name, value in result.seconds.items()})


if __name__ == "__main__":
    main()
