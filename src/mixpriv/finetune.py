"""Fine-tune a published model on your own labelled data (nnU-Net v2 folder).

Training continues from the pretrained weights. When the folder's label set differs from the
model's, the layers whose shape depends on the number of classes (the segmentation head, the
unmixer's input and output layers) start fresh, and a warning names them.

Example:
    >>> run = finetune("tissue-mixpriv-2mm", "/data/Dataset001_MyT1", "runs/finetuned",
    ...                max_steps=300, freeze=["segmenter.encoder"])  # doctest: +SKIP
    >>> run.checkpoint  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mixpriv.data.folder import DatasetFolder
from mixpriv.lightning.mixup import MixupPrivacyModule
from mixpriv.recipe import apply_overrides
from mixpriv.training import TrainingRun, train

log = logging.getLogger(__name__)


def finetune_recipe(pretrained, data_dir: str | Path, *, max_steps: int = 300, lr: float | None = None,
                    name: str = "finetuned", overrides: Sequence[str] = ()) -> dict:
    """The recipe of a fine-tuning run: the pretrained model's hparams on the new data."""
    hparams = dict(pretrained.hparams)
    label_names = hparams.pop("label_names")
    patch_size = hparams.pop("patch_size")
    input_spacing = hparams.pop("input_spacing")
    folder = DatasetFolder(data_dir)
    if folder.labels != dict(label_names):
        log.warning("the data's label set %s differs from the model's %s: a new head is trained",
                    folder.labels, dict(label_names))
    data = {"data_dir": str(folder.root), "patch_size": patch_size, "batch_size": 4, "samples_per_volume": 8,
            "queue_length": 32, "num_workers": 1, "val_samples_per_volume": 2}
    if input_spacing is not None and not np.allclose(folder.spacing, input_spacing, atol=1e-3):
        log.info("resampling the data from %s mm to the model's %s mm", folder.spacing, input_spacing)
        data["spacing"] = input_spacing
    model = {"kind": "mixpriv" if isinstance(pretrained, MixupPrivacyModule) else "baseline", **hparams}
    if lr is not None:
        model["lr"] = lr
    recipe = {"name": name, "seed": 0, "model": model, "data": data,
              "trainer": {"max_steps": max_steps, "accelerator": "auto", "devices": "auto", "precision": "auto",
                          "check_val_every_n_epoch": 1},
              "logger": {"kind": "csv"}}
    return apply_overrides(recipe, overrides)


def finetune(
    source,
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    max_steps: int = 300,
    lr: float | None = None,
    freeze: Sequence[str] = (),
    overrides: Sequence[str] = (),
    export_name: str | None = None,
) -> TrainingRun:
    """Fine-tune ``source`` (a model name, folder, URL or an already loaded module) on ``data_dir``.

    Writes a Lightning checkpoint under ``out_dir/checkpoints`` and, as a published model
    would be, a safetensors export with its model card under ``out_dir/<export_name>``.
    ``freeze`` names submodules kept fixed (see :func:`mixpriv.training.train`), e.g.
    ``["segmenter"]`` to train a new unmixer for a published segmenter.
    """
    from mixpriv.hub import export_pretrained, from_pretrained

    from mixpriv.training import load_model

    pretrained = from_pretrained(source) if isinstance(source, (str, Path)) else source
    source_name = getattr(pretrained, "model_card", {}).get("name", "model")
    name = export_name or f"{source_name}-finetuned"
    recipe = finetune_recipe(pretrained, data_dir, max_steps=max_steps, lr=lr, name=name, overrides=overrides)
    run = train(recipe, out_dir, initial_weights=pretrained.state_dict(), freeze=freeze)
    finetuned = load_model(run.checkpoint)
    card = {"finetuned_from": str(source) if isinstance(source, (str, Path)) else source_name,
            "training_recipe": recipe, "data": str(data_dir), "frozen": list(freeze),
            "training_stats": run.stats}
    bank = getattr(pretrained, "default_bank", None)
    if bank is not None and bank.label_names != finetuned.label_names:
        bank = None  # the demo bank's labels no longer match: make a key with `mixpriv keygen`
    export_pretrained(finetuned, Path(out_dir), name, bank=bank, card=card, overwrite=True)
    return run
