"""Training throughput of the recipes: data pipeline against networks, and MACs against a Conv3d peak.

For each recipe the model and data module are built as ``mixpriv train`` builds them, then, in one
run, on the same model with the same optimiser, loss and Lightning Trainer:

1. ``--warmup`` + ``--steps`` training steps fed by the real TorchIO queue (its worker process
   loads, preprocesses and, for Mixup-Privacy, mixes the volumes; the label sampler draws the
   patches); the batches are kept;
2. the same number of steps on those batches, already in memory (the nnU-Net way of measuring
   loader overhead: same shapes and dtypes, no loading).

Times run from one step's end to the next one's (so waiting for a batch counts), after the
warm-up steps. The data-pipeline share is ``1 - t_dummy / t_real``. The phases of all recipes
alternate (the real queue of each, then the dummy batches of each, ``--rounds`` times, a Conv3d
peak after each round) and each phase reports its best round: on a shared machine another job
slows every step of a phase several times over (the OpenMP threads of both contend for the
cores), and the best round is the least disturbed. Every round's patches/s are in the JSON.
The queue alone (no model, after its first fill) is also timed, to show whether it could keep up.
The TorchIO queue refills (8 volumes loaded, 64 patches sampled) every 16 steps of the recipes:
``--steps`` of a multiple of 16 counts the refills in their true proportion.

MACs are counted on one training step by forward hooks on every ``Conv3d``, ``ConvTranspose3d``
and ``Linear``: output elements x input channels / groups x kernel volume (for a transposed
convolution, input elements x output channels / groups x kernel volume: the MACs it performs).
A training step counts as 3 x its forward MACs (the backward pass computes the gradients of the
inputs and of the weights, each costing about one forward). The Conv3d peak is the best
forward + backward rate of a ``C -> C``, 3^3 convolution on a batch of patches (C = 16, 32, 64;
contiguous and channels-last layouts), the best over the rounds of the run.

Usage:
    .venv/bin/python benchmarks/training_throughput.py --steps 32 --rounds 2 --json outputs/training_throughput.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mixpriv.memory import tune_cpu_memory

tune_cpu_memory()  # as the mixpriv command line does (mixpriv.memory)

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch import nn

from mixpriv.constants import IMAGE
from mixpriv.recipe import load_recipe
from mixpriv.training import auto_precision, build_from_recipe

RECIPES = {"tissue-baseline": "baseline", "tissue-mixpriv": "mixpriv", "tissue-mixpriv-context": "mixpriv_context"}
COUNTED = (nn.Conv3d, nn.ConvTranspose3d, nn.Linear)


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@dataclass(frozen=True)
class Phase:
    """What one measured phase did: steps, patches and wall seconds."""

    steps: int
    patches: int
    seconds: float

    @property
    def patches_per_s(self) -> float:
        return self.patches / self.seconds


class StepClock(Callback):
    """The wall clock at every training step's end, the patches of each step, and the first ``keep`` batches."""

    def __init__(self, keep: int = 0) -> None:
        self.keep = keep
        self.ends: list[float] = []
        self.patches: list[int] = []
        self.batches: list = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        synchronize()
        self.ends.append(time.perf_counter())
        self.patches.append(int(batch[IMAGE]["data"].shape[0]))
        if len(self.batches) < self.keep:
            self.batches.append(batch)

    def steady(self, warmup: int) -> Phase:
        """The steps after the first ``warmup`` ones (``warmup`` >= 1)."""
        return Phase(len(self.patches) - warmup, sum(self.patches[warmup:]), self.ends[-1] - self.ends[warmup - 1])


class MacCounter(Callback):
    """Forward MACs of the first training step, per top-level child of the module (e.g. segmenter, unmixer)."""

    def __init__(self) -> None:
        self.macs: dict[str, int] = {}
        self._handles: list = []
        self._counted = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._counted:
            return
        self._counted = True
        for child_name, child in pl_module.named_children():
            for module in child.modules():
                if isinstance(module, COUNTED):
                    self._handles.append(module.register_forward_hook(self._hook(child_name)))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        for handle in self._handles:  # count one step only
            handle.remove()
        self._handles = []

    def _hook(self, name: str):
        def count(module, inputs, output) -> None:
            per_element = module.weight[0].numel()  # (in / groups) x kernel; out / groups x kernel if transposed
            elements = inputs[0].numel() if isinstance(module, nn.ConvTranspose3d) else output.numel()
            self.macs[name] = self.macs.get(name, 0) + elements * per_element
        return count


def trainer_for(recipe: dict, steps: int, callbacks: list[Callback]) -> pl.Trainer:
    """The recipe's Trainer as ``mixpriv train`` configures it, for ``steps`` steps, without validation or outputs."""
    config = dict(recipe.get("trainer", {}))
    if config.get("precision", "auto") == "auto":
        config["precision"] = auto_precision()
    config.update(max_steps=steps, max_time=None, limit_val_batches=0, num_sanity_val_steps=0,
                  use_distributed_sampler=False, enable_progress_bar=False, enable_checkpointing=False,
                  enable_model_summary=False, logger=False)
    return pl.Trainer(callbacks=callbacks, default_root_dir="outputs/benchmark-scratch", **config)


def queue_alone(datamodule, batches: int) -> float:
    """Patches/s of the training loader alone over ``batches`` batches after its first (the first fill)."""
    patches, start = 0, None
    for index, batch in enumerate(datamodule.train_dataloader()):
        if start is None:
            start = time.perf_counter()
            continue
        patches += int(batch[IMAGE]["data"].shape[0])
        if index == batches:
            break
    return patches / (time.perf_counter() - start)


class RecipeRun:
    """One recipe's model and data module, built as ``mixpriv train`` builds them, and its measured phases."""

    def __init__(self, name: str, steps: int, warmup: int, keep: int, overrides: Sequence[str] = ()) -> None:
        self.recipe = load_recipe(name, list(overrides))
        pl.seed_everything(int(self.recipe.get("seed", 0)), workers=True)
        self.model, self.datamodule = build_from_recipe(self.recipe)
        self.steps, self.warmup, self.keep = steps, warmup, keep
        self.queue_patches_per_s = queue_alone(self.datamodule, steps)
        self.batches: list = []
        self.macs = MacCounter()
        self.phases: dict[str, list[Phase]] = {"real": [], "dummy": []}

    def real_phase(self) -> None:
        """``warmup`` + ``steps`` steps fed by the TorchIO queue (a fresh one: its first fill in the warm-up)."""
        clock = StepClock(keep=0 if self.batches else self.keep)
        trainer_for(self.recipe, self.warmup + self.steps, [clock]).fit(self.model, datamodule=self.datamodule)
        self.batches = self.batches or clock.batches
        self.phases["real"].append(clock.steady(self.warmup))

    def dummy_phase(self) -> None:
        """The same number of steps on the kept real batches, cycled, already in memory."""
        total = self.warmup + self.steps
        cycled = [self.batches[i % len(self.batches)] for i in range(total)]
        loader = torch.utils.data.DataLoader(cycled, batch_size=None, shuffle=False, num_workers=0)
        clock = StepClock()
        trainer_for(self.recipe, total, [clock, self.macs]).fit(self.model, train_dataloaders=loader)
        self.phases["dummy"].append(clock.steady(self.warmup))

    def result(self) -> dict:
        """The best round of each phase (the least disturbed by other jobs), and every round's patches/s."""
        real, dummy = (max(self.phases[phase], key=lambda p: p.patches_per_s) for phase in ("real", "dummy"))
        step_macs = 3 * sum(self.macs.macs.values())
        return {
            "patches_per_s": real.patches_per_s,
            "dummy_patches_per_s": dummy.patches_per_s,
            "data_share": 1 - real.patches_per_s / dummy.patches_per_s,
            "seconds_per_step": real.seconds / real.steps,
            "dummy_seconds_per_step": dummy.seconds / dummy.steps,
            "rounds_patches_per_s": {phase: [p.patches_per_s for p in phases] for phase, phases in self.phases.items()},
            "queue_alone_patches_per_s": self.queue_patches_per_s,
            "forward_gmac_per_step": {part: value / 1e9 for part, value in self.macs.macs.items()},
            "step_gmac": step_macs / 1e9,
            "gmacs": step_macs * real.steps / real.seconds / 1e9,
            "dummy_gmacs": step_macs * dummy.steps / dummy.seconds / 1e9,
        }


def conv3d_peak(batch_size: int, patch: int, repeats: int = 3) -> dict:
    """Best forward + backward GMAC/s of a C -> C 3^3 Conv3d on ``batch_size`` patches of ``patch``^3."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    best = {"gmacs": 0.0}
    for channels in (16, 32, 64):
        conv = nn.Conv3d(channels, channels, 3, padding=1).to(device)
        macs = 3 * batch_size * channels * patch**3 * channels * 27
        for layout in (torch.contiguous_format, torch.channels_last_3d):
            x = torch.randn(batch_size, channels, patch, patch, patch, device=device).contiguous(memory_format=layout)
            x.requires_grad_(True)
            seconds = []
            for _ in range(repeats + 1):  # the first run warms up (kernel choice, allocator)
                synchronize()
                start = time.perf_counter()
                conv(x).sum().backward()
                synchronize()
                seconds.append(time.perf_counter() - start)
            rate = macs / min(seconds[1:]) / 1e9
            if rate > best["gmacs"]:
                best = {"gmacs": rate, "channels": channels, "layout": str(layout).replace("torch.", "")}
            del x
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), help="recipe names or paths")
    parser.add_argument("--steps", type=int, default=30, help="measured steps per phase, after the warm-up")
    parser.add_argument("--warmup", type=int, default=5, help="unmeasured steps first (queue fill, allocator)")
    parser.add_argument("--keep", type=int, default=8, help="real batches kept and cycled by the dummy phase")
    parser.add_argument("--rounds", type=int, default=1,
                        help="alternate the real and dummy phases this many times (evens out a varying load)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads (default: what training gets, all cores)")
    parser.add_argument("--override", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="recipe override for every recipe, e.g. trainer.precision=bf16-mixed (repeatable)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if min(args.steps, args.warmup, args.keep, args.rounds) < 1:
        parser.error("--steps, --warmup, --keep and --rounds must be at least 1")
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]

    # The phases of all recipes alternate (real queue of each, then dummy batches of each, per round),
    # so that a load varying over the run weighs on all of them alike.
    runs = {name: RecipeRun(name, args.steps, args.warmup, args.keep, args.override) for name in args.recipes}
    recipe = next(iter(runs.values())).recipe
    peak = {"gmacs": 0.0}
    for _ in range(args.rounds):
        for run in runs.values():
            run.real_phase()
        for run in runs.values():
            run.dummy_phase()
        measured = conv3d_peak(int(recipe["data"]["batch_size"]), int(recipe["data"]["patch_size"]))
        peak = max(peak, measured, key=lambda p: p["gmacs"])
    results = {name: run.result() for name, run in runs.items()}

    print("| recipe | patches/s (TorchIO queue) | patches/s (dummy batches) | data pipeline share "
          "| queue alone patches/s | forward GMAC / step | GMAC/s | of Conv3d peak |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        parts = " + ".join(f"{part} {value:.1f}" for part, value in r["forward_gmac_per_step"].items())
        print(f"| {name} | {r['patches_per_s']:.2f} | {r['dummy_patches_per_s']:.2f} | {100 * r['data_share']:.1f} % "
              f"| {r['queue_alone_patches_per_s']:.1f} | {parts} | {r['gmacs']:.1f} "
              f"| {100 * r['gmacs'] / peak['gmacs']:.0f} % |")
    load = os.getloadavg()[0]
    print(f"\nConv3d peak: {peak['gmacs']:.1f} GMAC/s (forward + backward, {peak['channels']} -> {peak['channels']}, "
          f"3^3, {peak['layout']}). torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"best of {args.rounds} x ({args.warmup} warm-up + {args.steps} measured steps) per phase; "
          f"a step = 3 x forward MACs; "
          f"load average {load_before:.1f} before, {load:.1f} after on {os.cpu_count()} cores.")

    summary = {"steps": args.steps, "warmup": args.warmup, "rounds": args.rounds, "threads": torch.get_num_threads(),
               "overrides": args.override,
               "load_average": [load_before, load], "cores": os.cpu_count(),
               "torch": torch.__version__, "device": "cuda" if torch.cuda.is_available() else "cpu",
               "conv3d_peak_gmacs": peak["gmacs"], "conv3d_peak": peak, "recipes": results}
    for name, r in results.items():
        kind = RECIPES.get(name, Path(name).stem)
        summary.update({f"{kind}_patches_per_s": r["patches_per_s"], f"{kind}_data_share": r["data_share"],
                        f"{kind}_gmacs": r["gmacs"], f"{kind}_peak_fraction": r["gmacs"] / peak["gmacs"]})
    if "mixpriv_patches_per_s" in summary and "baseline_patches_per_s" in summary:
        summary["ratio"] = summary["mixpriv_patches_per_s"] / summary["baseline_patches_per_s"]
    if "mixpriv_context_patches_per_s" in summary and "baseline_patches_per_s" in summary:
        summary["context_ratio"] = summary["mixpriv_context_patches_per_s"] / summary["baseline_patches_per_s"]
    if "mixpriv_gmacs" in summary:
        summary["peak_fraction"] = summary["mixpriv_peak_fraction"]
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
