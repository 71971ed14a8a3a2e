"""Train a model from a recipe: DataModule + LightningModule + Trainer + logger, timed.

Example:
    >>> from mixpriv.recipe import load_recipe
    >>> run = train(load_recipe("tissue-mixpriv", ["trainer.max_steps=10"]), "runs/demo")  # doctest: +SKIP
    >>> run.checkpoint  # doctest: +SKIP
    PosixPath('runs/demo/checkpoints/last.ckpt')
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import pickle
import re
import time
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint, TQDMProgressBar
from pytorch_lightning.loggers import CSVLogger, Logger, WandbLogger

from mixpriv.constants import IMAGE, PAIR_IMAGE_A
from mixpriv.data.datamodule import MixprivDataModule
from mixpriv.data.pairs import PairedPatchDataModule
from mixpriv.hub.export import model_kind
from mixpriv.hub.pretrained import build_module, from_pretrained, module_class
from mixpriv.kinds import KINDS, kind_of_hparams
from mixpriv.lightning.freezing import FreezeModules, frozen_submodule
from mixpriv.recipe import RecipeError, dump_recipe
from mixpriv.validation import InputError

log = logging.getLogger(__name__)

# Mixing settings a recipe gives once, in its model section, and the data module receives too.
MIXING_KEYS = ("lambda_range", "references_per_mix", "dirichlet_alpha")


@dataclass
class TrainingRun:
    """Where a run wrote its outputs, and how fast it went."""

    out_dir: Path
    checkpoint: Path
    stats: dict


def auto_precision() -> str:
    """Mixed precision on a GPU (bf16 where supported), full precision on a CPU."""
    if torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


def build_logger(config: Mapping, out_dir: Path, run_name: str) -> Logger | bool:
    """``wandb`` (offline unless ``mode: online``), ``csv`` or ``none``."""
    kind = config.get("kind", "wandb")
    if kind == "none":
        return False
    if kind == "csv":
        return CSVLogger(save_dir=str(out_dir), name="csv")
    if kind == "wandb":
        mode = config.get("mode", "offline")
        os.environ.setdefault("WANDB_MODE", mode)
        os.environ.setdefault("WANDB_SILENT", "true")
        return WandbLogger(project=config.get("project", "mixpriv"), name=run_name, save_dir=str(out_dir),
                           offline=mode == "offline", log_model=False)
    raise RecipeError(f"unknown logger kind {kind!r}; choose wandb, csv or none")


class ThroughputMeter(Callback):
    """Measures training patches per second (excluding validation), also after ``warmup`` steps,
    and the step training started from (non-zero when a run is resumed)."""

    def __init__(self, warmup: int = 5) -> None:
        self.warmup = warmup
        self.start_step = 0
        self.patches = 0
        self.seconds = 0.0
        self.steady_patches = 0
        self.steady_seconds = 0.0
        self._start = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        self.start_step = int(trainer.global_step)  # restored from the checkpoint by now

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        seconds = time.perf_counter() - self._start
        patches = int(batch[IMAGE]["data"].shape[0]) if IMAGE in batch else 2 * int(batch[PAIR_IMAGE_A].shape[0])
        self.seconds += seconds
        self.patches += patches
        if trainer.global_step > self.warmup:
            self.steady_seconds += seconds
            self.steady_patches += patches


def build_from_recipe(recipe: Mapping) -> tuple[pl.LightningModule, MixprivDataModule]:
    """Instantiate the DataModule and the LightningModule a recipe describes.

    The model section is the single source of the mixing settings (lambda range, references
    per mix, Dirichlet alpha); the data section the single source of the patch size and
    spacing (all are recorded in the model's hparams).
    """
    model_config = dict(recipe["model"])
    kind = model_config.pop("kind", None)
    if kind not in KINDS:
        raise RecipeError(f"model.kind must be one of {sorted(KINDS)}, got {kind!r}")
    data_config = dict(recipe.get("data", {}))
    if kind == "mixpriv":
        data_config["mixing"] = True
        for key in MIXING_KEYS:
            if key in model_config:
                data_config[key] = model_config[key]
    datamodule_class = PairedPatchDataModule if KINDS[kind].paired else MixprivDataModule
    accepted_data = set(inspect.signature(datamodule_class.__init__).parameters) - {"self"}
    unknown_data = sorted(set(data_config) - accepted_data)
    if unknown_data:
        raise RecipeError(f"data section has keys {unknown_data} that {datamodule_class.__name__} (model kind "
                          f"{kind!r}) does not take; it takes {sorted(accepted_data)}")
    datamodule = datamodule_class(**data_config)
    datamodule.setup("fit")
    model_config["patch_size"] = datamodule.hparams.patch_size
    spacing = datamodule.hparams.spacing or datamodule.folder.spacing
    model_config["input_spacing"] = spacing if isinstance(spacing, (int, float)) else list(spacing)
    module_type = module_class(kind)
    accepted = set(inspect.signature(module_type.__init__).parameters) - {"self", "label_names"}
    unknown = sorted(set(model_config) - accepted)
    if unknown:
        raise RecipeError(f"model section has keys {unknown} that {module_type.__name__} does not take; "
                          f"it takes {sorted(accepted)}")
    return module_type(label_names=datamodule.folder.labels, **model_config), datamodule


def train(
    recipe: Mapping,
    out_dir: str | Path,
    initial_weights: Mapping[str, torch.Tensor] | None = None,
    freeze: Sequence[str] = (),
    resume: bool = False,
) -> TrainingRun:
    """Train the recipe's model; write checkpoints, the resolved recipe and ``train_stats.json``.

    Args:
        recipe: a loaded recipe (see :mod:`mixpriv.recipe`).
        out_dir: run folder.
        initial_weights: start from these weights (fine-tuning); tensors whose shape differs
            (e.g. a head for another label set) keep their fresh initialisation.
        freeze: submodules kept fixed (no gradients, BatchNorm statistics unchanged), e.g.
            ``["segmenter.encoder"]`` or ``["segmenter"]`` to train a new unmixer alone.
        resume: continue the run in ``out_dir`` from ``checkpoints/last.ckpt`` (weights, optimiser,
            learning-rate schedule, step count and elapsed time), e.g. after its ``max_time`` cap
            stopped it or the recipe's ``max_steps`` was raised. The ``max_time`` cap then applies
            to this segment anew (:func:`segment_time_cap`). ``train_stats.json`` describes this
            segment and keeps the earlier ones under ``earlier_segments``.
    """
    out_dir = Path(out_dir)
    resume_from = out_dir / "checkpoints" / "last.ckpt"
    if resume and not resume_from.is_file():
        raise FileNotFoundError(f"cannot resume: {resume_from} does not exist (train this run first)")
    out_dir.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(int(recipe.get("seed", 0)), workers=True)
    model, datamodule = build_from_recipe(recipe)
    if initial_weights is not None:
        reinitialised = transfer_weights(model, initial_weights)
        if reinitialised:
            log.warning("new weights (shape or name differs from the pretrained model): %s", ", ".join(reinitialised))
    for path in freeze:
        frozen_submodule(model, path)  # fail before any training starts
        log.info("%s frozen", path)
    dump_recipe(recipe, out_dir / "recipe.yaml")
    trainer_config = dict(recipe.get("trainer", {}))
    if trainer_config.get("precision", "auto") == "auto":
        trainer_config["precision"] = auto_precision()
    if resume and trainer_config.get("max_time") is not None:
        trainer_config["max_time"] = segment_time_cap(trainer_config["max_time"], resume_from)
    # The queue shards subjects itself under DDP; Lightning must not add a sampler to it.
    trainer_config["use_distributed_sampler"] = False
    meter = ThroughputMeter()
    checkpoint = ModelCheckpoint(dirpath=out_dir / "checkpoints", filename="last", save_last=False,
                                 save_top_k=1, every_n_train_steps=None, save_on_train_epoch_end=True)
    callbacks = [meter, checkpoint]
    if freeze:
        callbacks.append(FreezeModules(freeze))
    if trainer_config.get("enable_progress_bar", True):
        callbacks.append(TQDMProgressBar(refresh_rate=10))
    logger = build_logger(recipe.get("logger", {}), out_dir, recipe.get("name", "mixpriv"))
    trainer = pl.Trainer(default_root_dir=str(out_dir), logger=logger, callbacks=callbacks, **trainer_config)
    stats_path = out_dir / "train_stats.json"
    earlier_segments = _earlier_segments(stats_path) if resume else []
    start = time.perf_counter()
    try:
        trainer.fit(model, datamodule, ckpt_path=resume_from if resume else None)
    finally:
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()  # the next run in this process gets its own wandb run
    elapsed = time.perf_counter() - start
    last = out_dir / "checkpoints" / "last.ckpt"
    trainer.save_checkpoint(last)
    stats = {
        "recipe": recipe.get("name"),
        "steps": int(trainer.global_step),
        "resumed_from_step": meter.start_step,
        "epochs": int(trainer.current_epoch),
        "train_seconds_total": round(elapsed, 1),
        "train_seconds_in_steps": round(meter.seconds, 1),
        "patches": meter.patches,
        "patches_per_second": round(meter.patches / meter.seconds, 3) if meter.seconds else None,
        "patches_per_second_after_warmup": (round(meter.steady_patches / meter.steady_seconds, 3)
                                            if meter.steady_seconds else None),
        "precision": str(trainer_config["precision"]),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "torch_threads": torch.get_num_threads(),
        "val_metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")},
        "earlier_segments": earlier_segments,
    }
    stats_path.write_text(json.dumps(stats, indent=2))
    log.info("trained %s in %.0f s (%s patches/s)", recipe.get("name"), elapsed, stats["patches_per_second"])
    return TrainingRun(out_dir, last, stats)


def segment_time_cap(max_time: str | Mapping | timedelta, checkpoint: Path) -> timedelta:
    """The ``max_time`` of a resumed run, so that the cap applies to the new segment.

    Lightning's ``Timer`` restores the training time of the checkpoint and counts it against
    ``max_time``: a run stopped by its cap would otherwise stop again at once when resumed. The
    cap given (``"DD:HH:MM:SS"``, a dict of :class:`~datetime.timedelta` fields, or a timedelta) is
    lengthened by the training time the checkpoint records.

    Raises:
        RecipeError: a string cap that is not ``DD:HH:MM:SS``.

    Example:
        >>> segment_time_cap("00:02:00:00", Path("missing.ckpt"))  # no checkpoint: the cap as given
        datetime.timedelta(seconds=7200)
    """
    if isinstance(max_time, str):
        parts = max_time.split(":")
        if len(parts) != 4 or not all(part.isdigit() for part in parts):
            raise RecipeError(f"trainer.max_time {max_time!r} is not DD:HH:MM:SS (e.g. '00:02:00:00' for 2 hours)")
        days, hours, minutes, seconds = (int(part) for part in parts)
        cap = timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)
    elif isinstance(max_time, Mapping):
        cap = timedelta(**max_time)
    else:
        cap = max_time
    if not checkpoint.is_file():
        return cap
    # the run's own checkpoint, written by this trainer (Lightning loads it the same way to resume)
    state = torch.load(checkpoint, map_location="cpu", weights_only=False).get("callbacks", {})
    elapsed = float(state.get("Timer", {}).get("time_elapsed", {}).get("train", 0.0))
    log.info("resuming after %.0f s of training: max_time %s applies to this segment", elapsed, cap)
    return cap + timedelta(seconds=elapsed)


def _earlier_segments(stats_path: Path) -> list[dict]:
    """The statistics of a resumed run's earlier segments, oldest first (empty when none were written)."""
    if not stats_path.is_file():
        return []
    previous = json.loads(stats_path.read_text())
    return [*previous.pop("earlier_segments", []), previous]


def transfer_weights(model: torch.nn.Module, weights: Mapping[str, torch.Tensor]) -> list[str]:
    """Copy every tensor of ``weights`` whose name and shape match ``model``'s; return the others."""
    state = model.state_dict()
    kept = {name: tensor.to(state[name].dtype) for name, tensor in weights.items()
            if name in state and state[name].shape == tensor.shape}
    model.load_state_dict(kept, strict=False)
    return sorted(name for name in state if name not in kept)


def read_checkpoint(path: str | Path) -> dict:
    """The content of a Lightning checkpoint, unpickled with ``weights_only=True``: tensors and plain data
    only, so that a crafted file cannot run code.

    Raises:
        InputError: the file needs more than tensors and plain data (it is not loaded), is not a
            checkpoint, or holds no ``state_dict`` and ``hyper_parameters``.
    """
    path = Path(path)
    if not zipfile.is_zipfile(path):  # what torch.save writes (Lightning checkpoints included)
        raise InputError(f"{path} is not a PyTorch checkpoint (a zip archive written by torch.save)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        needed = re.search(r"GLOBAL ([\w.]+)", str(error))  # the object torch refused to rebuild, if it says
        which = f" ({needed.group(1)})" if needed else ""
        raise InputError(f"checkpoint {path} was not loaded: it holds Python objects beyond tensors and plain "
                         f"data{which}, and unpickling them could run code. "
                         "Checkpoints written by `mixpriv train` hold only tensors and plain data; if you trust "
                         "this file, re-save its state_dict and hyper_parameters as tensors and plain data") from error
    except Exception as error:  # zip, pickle and storage readers raise many types for a damaged file
        raise InputError(f"{path} is not a readable PyTorch checkpoint ({type(error).__name__}: {error})") from error
    if (not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict)
            or not isinstance(checkpoint.get("hyper_parameters"), dict)):
        raise InputError(f"{path} is not a Lightning checkpoint of a mixpriv model: it has no state_dict and "
                         "hyper_parameters")
    return checkpoint


def load_model(source: str | os.PathLike, map_location: str | torch.device = "cpu",
               kind: str | None = None) -> pl.LightningModule:
    """A baseline or Mixup-Privacy module in eval mode, from a checkpoint, a model folder, a registry name or a URL.

    A file is read as a Lightning checkpoint (:func:`read_checkpoint`: nothing but tensors and
    plain data is unpickled) and the module rebuilt from its ``hyper_parameters`` and
    ``state_dict``; anything else goes to :func:`~mixpriv.hub.from_pretrained` (safetensors).

    Args:
        source: a ``.ckpt`` file, a model folder, a registry name (``tissue-mixpriv-2mm``) or a URL.
        map_location: the device of the module.
        kind: a kind of :data:`mixpriv.kinds.KINDS` (``"baseline"``, ``"mixpriv"``, ...): refuse a model of
            another kind with a clear message.

    Example:
        >>> load_model("runs/tissue-mixpriv/checkpoints/last.ckpt", kind="mixpriv")  # doctest: +SKIP
        >>> load_model("tissue-baseline-2mm", kind="mixpriv")  # doctest: +SKIP
        Traceback (most recent call last):
        ...
        mixpriv.validation.InputError: tissue-baseline-2mm is a non-private baseline model (kind 'baseline'), ...
    """
    path = Path(source).expanduser()
    if path.is_file():
        checkpoint = read_checkpoint(path)
        hparams = checkpoint["hyper_parameters"]
        model = build_module(kind_of_hparams(hparams), hparams, checkpoint["state_dict"], str(path)).to(map_location)
    elif os.fspath(source).endswith(".ckpt"):
        raise FileNotFoundError(f"checkpoint {source} does not exist")
    else:
        model = from_pretrained(source, device=map_location)
    if kind is not None and model_kind(model) != kind:
        raise InputError(f"{os.fspath(source)} is {KINDS[model_kind(model)].message_name}, but "
                         f"{KINDS[kind].message_name} is needed "
                         "(`mixpriv predict` runs Mixup-Privacy models, `mixpriv predict-baseline` baselines, "
                         "`mixpriv predict-compared` Privacy-Net and Deformation-Proxy models)")
    return model.eval()
