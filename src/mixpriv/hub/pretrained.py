"""Load published models: from a folder, a registry name or a URL, through a verified cache.

Example:
    >>> import tempfile
    >>> from mixpriv.lightning.baseline import BaselineSegmenter
    >>> from mixpriv.hub import export_pretrained
    >>> model = BaselineSegmenter({"background": 0, "fg": 1},
    ...     {"encoder_name": "mixpriv-light-8", "encoder_depth": 3, "decoder_channels": [16, 8, 8]}, patch_size=16)
    >>> tmp = tempfile.TemporaryDirectory()
    >>> folder = export_pretrained(model, tmp.name, "tiny", dtype=torch.float32)
    >>> loaded = from_pretrained(str(folder))          # or a registry name, or the folder's URL
    >>> type(loaded).__name__, loaded.training
    ('BaselineSegmenter', False)
    >>> tmp.cleanup()
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from mixpriv.hub.cards import check_card, read_card
from mixpriv.hub.download import (
    DEFAULT_TIMEOUT,
    download_file,
    fetch_bytes,
    is_url,
    join_url,
    models_cache_dir,
    offline_mode,
)
from mixpriv.hub.errors import HubError, ModelCardError, OfflineError
from mixpriv.hub.export import WEIGHTS_FORMAT
from mixpriv.hub.integrity import (
    BANK_FILE,
    METADATA_FILE,
    WEIGHTS_FILE,
    check_model_name,
    matches,
    verify_file,
)
from mixpriv.hub.registry import ENV_REGISTRY, load_registry
from mixpriv.kinds import KINDS
from mixpriv.safetensors_metadata import read_format_metadata

log = logging.getLogger(__name__)


def module_class(kind: str) -> type:
    """The LightningModule class of a card's ``kind`` (imported on demand)."""
    if kind not in KINDS:
        raise ModelCardError(f"unknown model kind {kind!r}; known kinds: {sorted(KINDS)}")
    module_name, class_name = KINDS[kind].module_class.rsplit(".", 1)
    return getattr(importlib.import_module(module_name), class_name)


def kind_of_module(model: torch.nn.Module) -> str | None:
    """The kind of a module (``"baseline"``, ``"mixpriv"``, ...); ``None`` for a module of no kind.

    Example:
        >>> kind_of_module(torch.nn.Linear(1, 1)) is None
        True
    """
    return next((kind for kind in KINDS if isinstance(model, module_class(kind))), None)


def build_module(kind: str, hparams: Mapping, state: Mapping[str, torch.Tensor], where: str) -> torch.nn.Module:
    """Rebuild a module of ``kind`` from its init arguments and load its weights (``strict=True``).

    Args:
        kind: ``"baseline"`` or ``"mixpriv"``.
        hparams: the module's init arguments (a card's or a checkpoint's ``hparams``).
        state: its state dict.
        where: the file the two come from, for the messages.

    Raises:
        ModelCardError: hparams the class does not take or cannot be built from, weights that do not fit.
    """
    cls = module_class(kind)
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(hparams) - accepted)
    if unknown:
        raise ModelCardError(f"{where}: hparams {unknown} are not arguments of {cls.__name__} "
                             f"(it takes {sorted(accepted)}); was it written by a newer mixpriv?")
    try:
        module = cls(**hparams)
    except (TypeError, ValueError) as error:
        raise ModelCardError(f"{where}: cannot build a {cls.__name__} from its hparams: {error}") from error
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ModelCardError(f"{where}: its weights do not fit the {cls.__name__} its hparams describe: "
                             f"{error}") from error
    return module


def _read_weights(path: Path, kind: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    metadata = read_format_metadata(path, WEIGHTS_FORMAT, "mixpriv model weights", ModelCardError)
    if metadata.get("kind") != kind:
        raise ModelCardError(f"{path} holds a {metadata.get('kind')!r} model but its card says {kind!r}")
    state = load_file(str(path))
    return {key: t.float() if t.is_floating_point() else t for key, t in state.items()}


def load_pretrained_folder(path: str | os.PathLike, *, verify: bool = True, device: str | torch.device = "cpu"):
    """Load an exported model folder: a BaselineSegmenter or MixupPrivacyModule in eval mode, float32.

    Every file listed in ``metadata.json`` must be present and (with ``verify``) match its
    sha256. The module is rebuilt from the card's ``kind`` and ``hparams`` and its weights read
    from safetensors (``strict=True``); nothing is unpickled. When the folder ships a demo
    reference bank, it is attached as ``module.default_bank`` (else ``None``); the card is
    attached as ``module.model_card``.

    Raises:
        FileNotFoundError: the folder or a file its card lists is missing.
        ModelCardError: no or invalid ``metadata.json``, unknown kind, weights that do not fit.
        ChecksumError: a file differs from its card.
    """
    from mixpriv.mixing.bank import ReferenceBank

    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {folder} does not exist")
    card = read_card(folder)
    for file_name, record in card["files"].items():
        file_path = folder / file_name
        if not file_path.is_file():
            raise FileNotFoundError(f"{folder} is incomplete: {file_name}, listed in {METADATA_FILE}, is missing")
        if verify:
            verify_file(file_path, record)
    kind = card["kind"]
    state = _read_weights(folder / WEIGHTS_FILE, kind)
    module = build_module(kind, card["hparams"], state, str(folder))
    module = module.float().to(device).eval()
    bank = None
    if BANK_FILE in card["files"]:
        bank = ReferenceBank.load(folder / BANK_FILE, published=True)
    elif (folder / BANK_FILE).exists():
        log.warning("%s is not listed in %s: not loaded", folder / BANK_FILE, folder / METADATA_FILE)
    module.default_bank = bank
    module.model_card = card
    log.info("loaded %s model %r from %s", kind, card.get("name"), folder)
    return module


def _offline_message(what: str, cache: Path) -> str:
    return (f"model {what} is not available offline (offline=True or MIXPRIV_OFFLINE=1) and its cache {cache} "
            f"is missing or incomplete; fetch it once with network access: from_pretrained({what!r}) "
            f"without offline mode, or copy the model folder to {cache}")


def _fetch_files(files: dict, cache: Path, url_of, *, what: str, offline: bool, force: bool,
                 progress: bool, timeout: float) -> None:
    """Make ``cache`` hold every file of ``files`` with its sha256, downloading what is missing."""
    for file_name, record in files.items():
        target = cache / file_name
        if not force and matches(target, record):
            continue
        if target.exists():
            log.warning("cached %s is partial or corrupted (size or sha256 mismatch): deleting it", target)
            target.unlink()
        if offline:
            raise OfflineError(_offline_message(what, cache))
        url = url_of(file_name)
        if url is None:
            raise HubError(f"model {what}: no URL to download {file_name} from, and no local copy")
        download_file(url, target, sha256=record["sha256"], size=record.get("size"), timeout=timeout,
                      progress=progress)


def _resolve_name(name: str, *, registry, cache_dir, offline: bool, force: bool, progress: bool,
                  timeout: float) -> Path:
    reg = load_registry(registry, offline=offline, timeout=timeout)
    entry = reg.entry(name)
    check_model_name(name)
    files = entry["files"]
    local = reg.local_folder(name)
    if local is not None and local.is_dir() and not force:
        if all(matches(local / f, record) for f, record in files.items()):
            return local
        log.warning("local folder %s of model %r does not match the registry; using the download cache", local, name)
    cache = models_cache_dir(cache_dir) / name
    _fetch_files(files, cache, lambda f: reg.file_url(name, f), what=repr(name), offline=offline, force=force,
                 progress=progress, timeout=timeout)
    return cache


def _resolve_url(url: str, *, cache_dir, offline: bool, force: bool, progress: bool, timeout: float) -> Path:
    base = url if url.endswith("/") else url + "/"
    cache = models_cache_dir(cache_dir) / ("url-" + hashlib.sha256(base.encode()).hexdigest()[:16])
    card_path = cache / METADATA_FILE
    if card_path.is_file() and not force:
        try:
            card = read_card(cache)
            if all(matches(cache / f, record) for f, record in card["files"].items()):
                return cache
        except HubError as error:
            log.warning("cached card %s is unreadable (%s): fetching it again", card_path, error)
    if offline:
        raise OfflineError(_offline_message(url, cache))
    raw = fetch_bytes(join_url(base, METADATA_FILE), timeout=timeout)
    try:
        card = check_card(json.loads(raw.decode("utf-8")), join_url(base, METADATA_FILE))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelCardError(f"{join_url(base, METADATA_FILE)} is not valid JSON: {error}") from error
    cache.mkdir(parents=True, exist_ok=True)
    if card_path.exists():
        card_path.unlink()  # written last: a folder with a card is a complete folder
    _fetch_files(card["files"], cache, lambda f: join_url(base, f), what=url, offline=False, force=force,
                 progress=progress, timeout=timeout)
    tmp = card_path.with_name(f".{METADATA_FILE}.tmp")
    tmp.write_bytes(raw)
    os.replace(tmp, card_path)
    return cache


def resolve_pretrained(
    name_or_path_or_url: str | os.PathLike,
    *,
    registry=None,
    cache_dir: str | os.PathLike | None = None,
    offline: bool | None = None,
    progress: bool = True,
    timeout: float = DEFAULT_TIMEOUT,
    force_download: bool = False,
) -> Path:
    """The local folder of a model, downloading (and verifying) it into the cache when needed.

    Arguments as in :func:`from_pretrained`.
    """
    offline = offline_mode(offline)
    if isinstance(name_or_path_or_url, str) and is_url(name_or_path_or_url):
        return _resolve_url(name_or_path_or_url, cache_dir=cache_dir, offline=offline, force=force_download,
                            progress=progress, timeout=timeout)
    path = Path(name_or_path_or_url).expanduser()
    if path.is_dir():
        return path
    text = os.fspath(name_or_path_or_url)
    if isinstance(name_or_path_or_url, os.PathLike) or os.sep in text or text.startswith("."):
        raise FileNotFoundError(f"model folder {path} does not exist (and {text!r} is not a registry name)")
    return _resolve_name(text, registry=registry, cache_dir=cache_dir, offline=offline, force=force_download,
                         progress=progress, timeout=timeout)


def from_pretrained(
    name_or_path_or_url: str | os.PathLike,
    *,
    registry=None,
    cache_dir: str | os.PathLike | None = None,
    offline: bool | None = None,
    progress: bool = True,
    timeout: float = DEFAULT_TIMEOUT,
    force_download: bool = False,
    device: str | torch.device = "cpu",
):
    """Load a published model (eval mode, float32) by registry name, folder path or URL.

    Args:
        name_or_path_or_url: a model folder; a name in the registry (its local ``path`` when it
            exists and matches, else downloaded into ``$MIXPRIV_HOME/models/<name>/``); or the
            http(s)/file URL of a model folder (``metadata.json`` is fetched first, then the files
            it lists, into ``$MIXPRIV_HOME/models/url-<sha256(url)[:16]>/``).
        registry: a path, URL, mapping or :class:`~mixpriv.hub.Registry`; default
            ``$MIXPRIV_REGISTRY``, else the repository's ``checkpoints/registry.json``.
        cache_dir: root of the model cache instead of ``$MIXPRIV_HOME/models``
            (``~/.cache/mixpriv/models`` by default).
        offline: use only local folders and the cache (default: ``$MIXPRIV_OFFLINE``).
        progress: show a tqdm progress bar while downloading.
        timeout: seconds each download request (the registry, each file) may take in all.
        force_download: fetch every file again even when the cache holds it.
        device: where to put the module.

    Every file is verified against its sha256 (registry and card); a partial or corrupted cached
    file is deleted and fetched again, never loaded. Cache hits make no network call: a model
    fetched by URL (which pins no hash) is reused until ``force_download=True``, while a registry
    entry's new hashes invalidate the cached files by themselves.
    A Mixup-Privacy model published with a demo bank gets it as ``model.default_bank``
    (see :func:`load_default_bank`).

    Raises:
        UnknownModelError: (a ``KeyError``) the registry has no such name; the message lists its models.
        OfflineError: offline and the model is not cached.
        DownloadError: an HTTP failure or timeout (the message names the URL).
        ChecksumError: a download does not match its sha256 (nothing is kept in the cache).

    Example:
        >>> model = from_pretrained("tissue-mixpriv-2mm")  # doctest: +SKIP
        >>> model.hparams.input_spacing, model.default_bank  # doctest: +SKIP
        (2.0, ReferenceBank(8 references, spatial shape (88, 104, 88), 4 labels))
    """
    folder = resolve_pretrained(name_or_path_or_url, registry=registry, cache_dir=cache_dir, offline=offline,
                                progress=progress, timeout=timeout, force_download=force_download)
    return load_pretrained_folder(folder, device=device)


def load_default_bank(name_or_path_or_url: str | os.PathLike, **kwargs):
    """The demo :class:`~mixpriv.mixing.ReferenceBank` published with a Mixup-Privacy model.

    Takes the arguments of :func:`resolve_pretrained`. A published bank is no secret: anyone
    who has it can unmix the server's outputs, so use it to try a model, and make your own key
    (``mixpriv keygen``) for private use.

    Raises:
        FileNotFoundError: the model ships no bank.
    """
    from mixpriv.mixing.bank import ReferenceBank

    folder = resolve_pretrained(name_or_path_or_url, **kwargs)
    card = read_card(folder)
    if BANK_FILE not in card["files"]:
        raise FileNotFoundError(f"model {card.get('name')!r} ({folder}) ships no reference bank")
    verify_file(folder / BANK_FILE, card["files"][BANK_FILE])
    return ReferenceBank.load(folder / BANK_FILE, published=True)


__all__ = ["ENV_REGISTRY", "build_module", "from_pretrained", "load_default_bank", "load_pretrained_folder",
           "module_class", "resolve_pretrained"]
