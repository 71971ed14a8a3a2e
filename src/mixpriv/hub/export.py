"""Export a trained module as a model folder: safetensors weights, card, README, demo bank.

Example:
    >>> import tempfile
    >>> from mixpriv.lightning.baseline import BaselineSegmenter
    >>> model = BaselineSegmenter({"background": 0, "fg": 1},
    ...     {"encoder_name": "mixpriv-light-8", "encoder_depth": 3, "decoder_channels": [16, 8, 8]}, patch_size=16)
    >>> tmp = tempfile.TemporaryDirectory()
    >>> folder = export_pretrained(model, tmp.name, "tiny-baseline")
    >>> sorted(p.name for p in folder.iterdir())
    ['README.md', 'metadata.json', 'model.safetensors']
    >>> tmp.cleanup()
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from mixpriv.hub.cards import build_card, render_readme
from mixpriv.hub.errors import ModelCardError
from mixpriv.hub.integrity import (BANK_FILE, METADATA_FILE, README_FILE, UNHASHED_IN_CARD, WEIGHTS_FILE,
                                   check_model_name, file_record)
from mixpriv.kinds import KINDS

log = logging.getLogger(__name__)

WEIGHTS_FORMAT = "mixpriv-model"
_DTYPES = {torch.float16: "float16", torch.float32: "float32", torch.bfloat16: "bfloat16"}


def model_kind(model: torch.nn.Module) -> str:
    """The card's ``kind`` of a module: ``"baseline"``, ``"mixpriv"``, ``"privacynet"`` or ``"deformproxy"``."""
    from mixpriv.hub.pretrained import kind_of_module

    kind = kind_of_module(model)
    if kind is not None:
        return kind
    raise ModelCardError(f"cannot export a {type(model).__name__}: expected one of "
                         f"{sorted(kind.module_class.rsplit('.', 1)[1] for kind in KINDS.values())}")


def weights_state_dict(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The module's state dict, floating tensors cast to ``dtype``, as contiguous independent copies.

    Raises:
        ValueError: a finite value would become infinite in ``dtype`` (export in float32 instead).
    """
    state = {}
    for key, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu()
        if tensor.is_floating_point():
            cast = tensor.to(dtype)
            if not torch.isfinite(cast).all() and torch.isfinite(tensor).all():
                raise ValueError(f"{key} overflows {_DTYPES[dtype]} (max |value| {tensor.abs().max():.3g}); "
                                 "export with dtype=torch.float32")
            tensor = cast
        state[key] = tensor.contiguous().clone()
    return state


def export_pretrained(
    model: torch.nn.Module,
    out_dir: str | Path,
    name: str,
    *,
    bank=None,
    card: Mapping | None = None,
    dtype: torch.dtype = torch.float16,
    overwrite: bool = False,
) -> Path:
    """Write ``out_dir/name/`` with ``model.safetensors``, ``metadata.json``, ``README.md`` (and ``bank.mpk``).

    Args:
        model: a :class:`~mixpriv.lightning.BaselineSegmenter` or
            :class:`~mixpriv.lightning.MixupPrivacyModule`; its ``hparams`` (plain JSON types) go
            into the card and rebuild it on load.
        out_dir: parent folder.
        name: model name (letters, digits, ``.``, ``_``, ``-``); the folder's name.
        bank: an optional :class:`~mixpriv.mixing.ReferenceBank` published with a Mixup-Privacy
            model as its demo key (a published bank is not secret).
        card: additions to ``metadata.json`` (``description``, ``training``, ``data``, ``commit``,
            ``evaluation``, ``evaluation_markdown`` for the README...).
        dtype: storage dtype of floating tensors (``torch.float16`` by default, ``torch.float32``
            for bit-exact weights); integer buffers are kept as they are.
        overwrite: replace an existing model folder of that name.

    Returns:
        The model folder. It is written to a temporary sibling first and renamed, so a failed
        export leaves no half-written folder.
    """
    check_model_name(name)
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {list(_DTYPES.values())}, got {dtype}")
    kind = model_kind(model)
    if bank is not None and kind != "mixpriv":
        raise ValueError("a reference bank only makes sense with a Mixup-Privacy model (kind 'mixpriv')")
    hparams = dict(model.hparams)
    if bank is not None and dict(bank.label_names) != dict(hparams["label_names"]):
        raise ValueError(f"the bank's labels {bank.label_names} differ from the model's {dict(hparams['label_names'])}")
    out_dir = Path(out_dir)
    target = out_dir / name
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; pass overwrite=True to replace it")
    if target.exists() and not (target / METADATA_FILE).is_file() and any(target.iterdir()):
        raise FileExistsError(f"{target} exists and is not a model folder; refusing to replace it")
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".export", dir=out_dir))
    try:
        state = weights_state_dict(model, dtype)
        save_file(state, str(staging / WEIGHTS_FILE), metadata={"format": WEIGHTS_FORMAT, "kind": kind})
        if bank is not None:
            bank.save(staging / BANK_FILE, image_dtype=torch.float16 if dtype == torch.float16 else torch.float32)
        files = {p.name: file_record(p) for p in sorted(staging.iterdir()) if p.name not in UNHASHED_IN_CARD}
        parameters = sum(int(t.numel()) for t in model.parameters())
        metadata = build_card(name=name, kind=kind, hparams=hparams, files=files, extra=card,
                              weights={"file": WEIGHTS_FILE, "format": "safetensors", "dtype": _DTYPES[dtype],
                                       "parameters": parameters, "load_dtype": "float32"})
        (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
        (staging / README_FILE).write_text(render_readme(metadata), encoding="utf-8")
        staging.chmod(0o755)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    log.info("exported %s model %r to %s (%s weights)", kind, name, target, _DTYPES[dtype])
    return target
