"""Model cards: ``metadata.json`` (machine-readable, MONAI-bundle-like) and ``README.md``.

The card records what a model is, what it expects as input, the module's init arguments
(``hparams``, which rebuild it), package versions and the sha256 of every weight file.

Example:
    >>> card = build_card(name="demo", kind="baseline", hparams={"label_names": {"background": 0, "fg": 1},
    ...     "segmenter": {"encoder_name": "mixpriv-light-8"}, "input_spacing": 2.0, "patch_size": 32},
    ...     files={}, extra={"description": "a demo"})
    >>> card["inputs"]["spacing_mm"], card["labels"]
    (2.0, {'background': 0, 'fg': 1})
    >>> "from_pretrained" in render_readme(card)
    True
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from importlib import metadata as importlib_metadata
from pathlib import Path

from mixpriv.constants import DEFAULT_DIRICHLET_ALPHA, DEFAULT_REFERENCES_PER_MIX, TUMOUR_CLASSES
from mixpriv.hub.errors import ModelCardError
from mixpriv.hub.integrity import BANK_FILE, METADATA_FILE, README_FILE, WEIGHTS_FILE, check_file_name
from mixpriv.kinds import KINDS

log = logging.getLogger(__name__)

CARD_FORMAT = "mixpriv-model-card"
CARD_FORMAT_VERSION = 1
TASK = "brain tissue segmentation (CSF/GM/WM) of T1 MRI"
TUMOUR_TASK = "brain tumour segmentation (NCR/ED/ET, BraTS 2021 labels 1/2/4 as classes 1/2/3) of T1ce MRI"
ORIENTATION = "RAS+ (canonical)"
LICENSE = "Apache-2.0"
#: Distributions whose versions a card records.
PACKAGES = ("mixpriv", "torch", "pytorch-lightning", "torchio", "segmentation-models-pytorch-3d", "numpy",
            "safetensors")
#: Keys computed by the exporter that a caller's ``card`` may not override.
RESERVED_KEYS = frozenset({"format", "format_version", "name", "kind", "module_class", "hparams", "labels",
                           "inputs", "files", "versions", "weights"})
def to_json_value(value, where: str = "hparams"):
    """Convert ``value`` to plain JSON types (mappings -> dict, tuples -> list), or raise.

    Example:
        >>> to_json_value({"lambda_range": (0.65, 0.95)})
        {'lambda_range': [0.65, 0.95]}
    """
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ModelCardError(f"{where} has a non-string key {key!r}; a model card needs JSON types")
            out[key] = to_json_value(item, f"{where}.{key}")
        return out
    if isinstance(value, (list, tuple)):
        return [to_json_value(item, f"{where}[{i}]") for i, item in enumerate(value)]
    # numpy / torch scalars
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return to_json_value(value.item(), where)
    raise ModelCardError(f"{where} is a {type(value).__name__}, which a JSON model card cannot hold")


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages a model depends on (``None`` when absent)."""
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            versions[name] = None
    if versions.get("mixpriv") is None:
        from mixpriv import __version__

        versions["mixpriv"] = __version__
    return versions


def _caller_entries(entries: Mapping) -> dict:
    """A caller's card entries as JSON values; ``ModelCardError`` if one would override a computed key."""
    entries = to_json_value(dict(entries), "card")
    clash = sorted(RESERVED_KEYS & set(entries))
    if clash:
        raise ModelCardError(f"card keys {clash} are computed by the exporter and cannot be set by the caller")
    return entries


def build_card(
    *,
    name: str,
    kind: str,
    hparams: Mapping,
    files: Mapping[str, Mapping],
    weights: Mapping | None = None,
    extra: Mapping | None = None,
) -> dict:
    """Assemble ``metadata.json`` for a model.

    Args:
        name: model name (the folder's and the registry's).
        kind: ``"baseline"`` or ``"mixpriv"``.
        hparams: the module's init arguments (JSON types); they rebuild the module.
        files: file name -> ``{"sha256", "size"}`` for the weights and the bank.
        weights: description of the weights file (dtype, number of parameters).
        extra: the caller's additions (training recipe, data, commit, evaluation...); they may
            not override the computed keys in :data:`RESERVED_KEYS`.
    """
    from mixpriv import __version__
    from mixpriv.data.preprocessing import INTENSITY_NORMALISATION

    if kind not in KINDS:
        raise ModelCardError(f"unknown model kind {kind!r}; known kinds: {sorted(KINDS)}")
    hparams = to_json_value(dict(hparams))
    extra = _caller_entries(extra or {})
    labels = dict(hparams.get("label_names", {}))
    tumour = labels == TUMOUR_CLASSES
    card = {
        "format": CARD_FORMAT,
        "format_version": CARD_FORMAT_VERSION,
        "name": name,
        "version": __version__,
        "kind": kind,
        "module_class": KINDS[kind].module_class,
        "task": TUMOUR_TASK if tumour else TASK,
        "description": KINDS[kind].description,
        "labels": labels,
        "inputs": {
            "modality": "contrast-enhanced T1-weighted MRI (T1ce)" if tumour else "T1-weighted MRI",
            "channels": 1,
            "spacing_mm": hparams.get("input_spacing"),
            "orientation": ORIENTATION,
            "intensity_normalisation": INTENSITY_NORMALISATION,
            "patch_size": hparams.get("patch_size"),
            "dtype": "float32",
        },
        "outputs": {"classes": len(labels), "kind": KINDS[kind].outputs},
        "hparams": hparams,
        "weights": dict(weights or {}),
        "versions": package_versions(),
        "license": LICENSE,
        "files": {check_file_name(k): {"sha256": v["sha256"], "size": int(v["size"])} for k, v in files.items()},
    }
    if kind == "mixpriv":
        card["mixing"] = {"lambda_range": hparams.get("lambda_range"),
                          "lambda_distribution": "uniform",
                          "references_per_mix": hparams.get("references_per_mix", DEFAULT_REFERENCES_PER_MIX),
                          "dirichlet_alpha": hparams.get("dirichlet_alpha", DEFAULT_DIRICHLET_ALPHA),
                          "default_bank": BANK_FILE if BANK_FILE in files else None}
    card.update(extra)
    return card


def read_card(folder: str | Path) -> dict:
    """Read and check ``folder/metadata.json``.

    Raises:
        ModelCardError: no card, not JSON, not a mixpriv card, a newer format, no ``files`` table
            or no weights in it.
    """
    path = Path(folder) / METADATA_FILE
    if not path.is_file():
        raise ModelCardError(f"{Path(folder)} is not a mixpriv model folder: it has no {METADATA_FILE}")
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelCardError(f"{path} is not valid JSON: {error}") from error
    return check_card(card, str(path))


def check_card(card, where: str) -> dict:
    """Validate a parsed card (format, version, kind, files table) and return it."""
    if not isinstance(card, dict) or card.get("format") != CARD_FORMAT:
        fmt = card.get("format") if isinstance(card, dict) else type(card).__name__
        raise ModelCardError(f"{where} is not a mixpriv model card (format {fmt!r}, expected {CARD_FORMAT!r})")
    if int(card.get("format_version", 0)) > CARD_FORMAT_VERSION:
        raise ModelCardError(f"{where} has card format version {card['format_version']}; this mixpriv reads up "
                             f"to {CARD_FORMAT_VERSION}: upgrade mixpriv")
    if card.get("kind") not in KINDS:
        raise ModelCardError(f"{where} has unknown model kind {card.get('kind')!r}; "
                             f"known kinds: {sorted(KINDS)}")
    files = card.get("files")
    if not isinstance(files, dict) or WEIGHTS_FILE not in files:
        raise ModelCardError(f"{where} lists no {WEIGHTS_FILE} in its 'files' table")
    for name, record in files.items():
        check_file_name(name)
        if name == METADATA_FILE or not isinstance(record, dict) or not isinstance(record.get("sha256"), str):
            raise ModelCardError(f"{where}: invalid 'files' entry for {name!r}")
    if not isinstance(card.get("hparams"), dict):
        raise ModelCardError(f"{where} has no 'hparams' object to rebuild the model from")
    return card


def _table(rows: list[tuple[str, str]]) -> str:
    lines = ["| | |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in rows]
    return "\n".join(lines)


def _size(value, unit: str) -> str:
    """``2.0 mm (isotropic)`` for a number, ``1 × 1 × 2 mm`` for a sequence."""
    if value is None:
        return "not recorded"
    if isinstance(value, (list, tuple)):
        return " × ".join(str(v) for v in value) + unit
    return f"{value}{unit} (isotropic)" if unit == " mm" else f"{value}³{unit}"


def render_readme(card: Mapping) -> str:
    """Render the human model card (``README.md``) from ``metadata.json``'s content."""
    name = card["name"]
    inputs = card.get("inputs", {})
    labels = card.get("labels", {})
    label_text = ", ".join(f"{value} {key}" for key, value in sorted(labels.items(), key=lambda kv: kv[1]))
    rows = [
        ("kind", f"`{card['kind']}` ({card.get('module_class', '')})"),
        ("task", card.get("task", "")),
        ("labels", label_text),
        ("input", f"{inputs.get('channels', 1)} channel, {inputs.get('modality', 'T1-weighted MRI')}"),
        ("spacing", _size(inputs.get("spacing_mm"), " mm")),
        ("orientation", inputs.get("orientation", ORIENTATION)),
        ("intensity", inputs.get("intensity_normalisation", "")),
        ("patch size", _size(inputs.get("patch_size"), " voxels")),
    ]
    mixing = card.get("mixing")
    if mixing:
        rows.append(("λ range", f"U({mixing['lambda_range'][0]}, {mixing['lambda_range'][1]})"
                     if mixing.get("lambda_range") else "not recorded"))
        references_per_mix = mixing.get("references_per_mix", DEFAULT_REFERENCES_PER_MIX)
        alpha = mixing.get("dirichlet_alpha", DEFAULT_DIRICHLET_ALPHA)
        if references_per_mix > 1:
            rows.append(("references per mix", f"{references_per_mix} (K-way), weights Dirichlet(α = {alpha})"))
    weights = card.get("weights", {})
    if weights:
        rows.append(("weights", f"{weights.get('dtype', '')}, {weights.get('parameters', '?'):,} parameters"
                     if isinstance(weights.get("parameters"), int) else str(weights.get("dtype", ""))))
    rows.append(("mixpriv", str(card.get("version", ""))))
    parts = [f"# {name}", "", str(card.get("description", "")), "", _table(rows), ""]
    parts += [
        "## Load it", "",
        "```python",
        "from mixpriv import from_pretrained",
        f'model = from_pretrained("{name}")  # a registry name, this folder\'s path or its URL',
        "```", "",
        ("The weights are a safetensors file and the card is JSON: loading runs no pickle. Every file is "
         "checked against the sha256 recorded in `metadata.json` (and in the registry)."), "",
    ]
    if mixing and mixing.get("default_bank"):
        parts += [
            "## The demo reference bank", "",
            (f"`{mixing['default_bank']}` is a *published* reference bank for trying the model. A published "
             "bank is no secret: anyone holding it can unmix the server's outputs. For private use, make "
             "your own key (`mixpriv keygen`) and keep it on the client."), "",
        ]
    evaluation = card.get("evaluation_markdown")
    if evaluation:
        parts += ["## Evaluation", "", str(evaluation).strip(), ""]
    privacy = card.get("privacy")
    if privacy:
        rows = [(f"{design}: worst-case re-identification mAP",
                 f"{row['worst_case_map']:.3f} ({row['worst_case_attacker']} attacker)")
                for design, row in privacy.get("designs", {}).items()]
        parts += ["## Privacy (audited)", "", str(privacy.get("summary", "")), "", _table(rows), ""]
    for key, title in (("training", "Training"), ("data", "Data")):
        if card.get(key):
            value = card[key]
            text = value if isinstance(value, str) else "```json\n" + json.dumps(value, indent=2) + "\n```"
            parts += [f"## {title}", "", text, ""]
    parts += ["## License", "", str(card.get("license", LICENSE)), ""]
    return "\n".join(parts)


def annotate_card(folder: str | Path, additions: Mapping) -> dict:
    """Add entries (e.g. an audit's ``privacy``) to a published model's card, in place, and render its README again.

    The weights and the bank are not touched, so their sha256 in the card stay true; ``metadata.json``
    and ``README.md`` are each written atomically. Update the registry afterwards
    (:func:`~mixpriv.hub.update_registry`): it records every file's hash.

    Raises:
        ModelCardError: ``folder`` holds no valid card, or ``additions`` would override a key the exporter computes.

    Example:
        >>> annotate_card("checkpoints/tissue-mixpriv-2mm", {"privacy": {"summary": "..."}})  # doctest: +SKIP
    """
    from mixpriv.files import write_text_atomically

    folder = Path(folder)
    card = read_card(folder)
    card.update(_caller_entries(additions))
    write_text_atomically(folder / METADATA_FILE, json.dumps(card, indent=2) + "\n")
    write_text_atomically(folder / README_FILE, render_readme(card))
    return card
