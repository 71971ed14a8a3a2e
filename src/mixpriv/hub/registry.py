"""The model registry: ``checkpoints/registry.json`` names published models and their files.

Format::

    {"format": "mixpriv-registry", "version": 1,
     "models": {"tissue-mixpriv-2mm": {
         "description": "...",
         "files": {"model.safetensors": {"sha256": "...", "size": 123, "url": "optional"},
                   "metadata.json": {...}, "README.md": {...}, "bank.mpk": {...}},
         "path": "tissue-mixpriv-2mm",           # optional, relative to the registry's folder
         "url": "https://host/models/tissue-mixpriv-2mm/"}}}   # optional base URL

Which registry: the ``registry=`` argument (a path, a URL, a mapping or a :class:`Registry`),
else ``$MIXPRIV_REGISTRY`` (a path or URL), else the repository's
``checkpoints/registry.json`` when mixpriv runs from a checkout.

Example:
    >>> import json, tempfile, pathlib
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     path = pathlib.Path(tmp) / "registry.json"
    ...     _ = path.write_text(json.dumps(empty_registry()))
    ...     list_models(path)
    []
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from mixpriv.files import mixpriv_home, write_text_atomically
from mixpriv.hub.cards import read_card
from mixpriv.hub.download import (DEFAULT_TIMEOUT, fetch_bytes, is_url, join_url, offline_mode)
from mixpriv.hub.errors import ChecksumError, ModelCardError, OfflineError, UnknownModelError
from mixpriv.hub.integrity import (METADATA_FILE, WEIGHTS_FILE, check_file_name, check_model_name, file_record)

log = logging.getLogger(__name__)

REGISTRY_FORMAT = "mixpriv-registry"
REGISTRY_VERSION = 1
ENV_REGISTRY = "MIXPRIV_REGISTRY"


def empty_registry() -> dict:
    """A registry with no models."""
    return {"format": REGISTRY_FORMAT, "version": REGISTRY_VERSION, "models": {}}


def repository_registry() -> Path:
    """``checkpoints/registry.json`` of the source checkout mixpriv is imported from."""
    import mixpriv

    return Path(mixpriv.__file__).resolve().parents[2] / "checkpoints" / "registry.json"


def default_registry_location() -> str | None:
    """``$MIXPRIV_REGISTRY``, else the repository's registry if it exists, else ``None``."""
    env = os.environ.get(ENV_REGISTRY)
    if env:
        return env
    path = repository_registry()
    return str(path) if path.is_file() else None


@dataclass
class Registry:
    """A parsed registry and where it came from (a path, a URL or ``None`` for an in-memory one)."""

    models: dict[str, dict] = field(default_factory=dict)
    location: str | None = None

    def names(self) -> list[str]:
        """Sorted model names."""
        return sorted(self.models)

    def entry(self, name: str) -> dict:
        """The entry of ``name``; :class:`UnknownModelError` lists the known names otherwise."""
        if name not in self.models:
            known = ", ".join(self.names()) or "none"
            where = self.location or "the in-memory registry"
            hint = "" if self.location else f" (set ${ENV_REGISTRY} or pass registry=)"
            raise UnknownModelError(f"unknown model {name!r} in {where}{hint}; known models: {known}")
        return self.models[name]

    def _is_remote(self) -> bool:
        return self.location is not None and is_url(self.location)

    def local_folder(self, name: str) -> Path | None:
        """The entry's ``path`` resolved against the registry's folder (local registries only)."""
        path = self.entry(name).get("path")
        if not path or self.location is None or self._is_remote():
            return None
        path = Path(path).expanduser()
        return path if path.is_absolute() else Path(self.location).resolve().parent / path

    def base_url(self, name: str) -> str | None:
        """The entry's base ``url``; a relative one is resolved against the registry's location."""
        url = self.entry(name).get("url")
        if not url:
            return None
        if is_url(url):
            return url
        if self._is_remote():
            return urllib.parse.urljoin(self.location, url)
        if self.location is not None:
            return (Path(self.location).resolve().parent / url).as_uri()
        raise ModelCardError(f"model {name!r} has a relative url {url!r} in an in-memory registry")

    def file_url(self, name: str, file_name: str) -> str | None:
        """Where to download ``file_name`` of model ``name`` (its own url, else base url + name)."""
        record = self.entry(name)["files"][file_name]
        if record.get("url"):
            base = self.base_url(name) or (self.location if self._is_remote() else None)
            return join_url(base, record["url"]) if base and not is_url(record["url"]) else record["url"]
        base = self.base_url(name)
        return join_url(base, file_name) if base else None


def check_registry(data, where: str) -> dict[str, dict]:
    """Validate a parsed registry and return its ``models``."""
    if not isinstance(data, dict) or data.get("format") != REGISTRY_FORMAT:
        raise ModelCardError(f"{where} is not a mixpriv registry (expected format {REGISTRY_FORMAT!r})")
    if int(data.get("version", 0)) > REGISTRY_VERSION:
        raise ModelCardError(f"{where} has registry version {data['version']}; this mixpriv reads up to "
                             f"{REGISTRY_VERSION}: upgrade mixpriv")
    models = data.get("models", {})
    if not isinstance(models, dict):
        raise ModelCardError(f"{where}: 'models' must be an object")
    for name, entry in models.items():
        check_model_name(name)
        files = entry.get("files") if isinstance(entry, dict) else None
        if not isinstance(files, dict) or WEIGHTS_FILE not in files or METADATA_FILE not in files:
            raise ModelCardError(f"{where}: model {name!r} must list {WEIGHTS_FILE} and {METADATA_FILE} in 'files'")
        for file_name, record in files.items():
            check_file_name(file_name)
            if not isinstance(record, dict) or not isinstance(record.get("sha256"), str):
                raise ModelCardError(f"{where}: model {name!r} has no sha256 for {file_name!r}")
    return models


def _registry_cache_path(url: str) -> Path:
    return mixpriv_home() / "registries" / (hashlib.sha256(url.encode()).hexdigest()[:16] + ".json")


def _write_json_atomically(path: Path, data) -> None:
    write_text_atomically(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def _read_remote(url: str, offline: bool, timeout: float):
    cached = _registry_cache_path(url)
    if offline:
        if not cached.is_file():
            raise OfflineError(f"offline mode is on and registry {url} was never fetched; "
                               "run once with network access (unset MIXPRIV_OFFLINE)")
        return json.loads(cached.read_text(encoding="utf-8"))
    data = json.loads(fetch_bytes(url, timeout=timeout).decode("utf-8"))
    check_registry(data, url)
    _write_json_atomically(cached, data)
    return data


def load_registry(registry=None, *, offline: bool | None = None, timeout: float = DEFAULT_TIMEOUT) -> Registry:
    """Read a registry.

    Args:
        registry: a :class:`Registry`, a mapping, a path or URL of a ``registry.json``, or
            ``None`` for :func:`default_registry_location` (an empty registry when there is none).
        offline: use the cached copy of a remote registry (default ``$MIXPRIV_OFFLINE``).
        timeout: seconds for fetching a remote registry.
    """
    if isinstance(registry, Registry):
        return registry
    if isinstance(registry, Mapping):
        return Registry(dict(check_registry(dict(registry), "the registry given")), None)
    location = str(registry) if registry is not None else default_registry_location()
    if location is None:
        return Registry({}, None)
    if is_url(location):
        data = _read_remote(location, offline_mode(offline), timeout)
    else:
        path = Path(location).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"registry {path} does not exist")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ModelCardError(f"registry {path} is not valid JSON: {error}") from error
        location = str(path)
    return Registry(dict(check_registry(data, location)), location)


def list_models(registry=None) -> list[str]:
    """Names of the models in a registry (see :func:`load_registry` for ``registry``).

    Example:
        >>> list_models({"format": "mixpriv-registry", "version": 1, "models": {}})
        []
    """
    return load_registry(registry).names()


def update_registry(
    folder: str | Path,
    registry_path: str | Path | None = None,
    url: str | None = None,
    *,
    name: str | None = None,
) -> dict:
    """Add (or replace) the entry of an exported model folder in a local ``registry.json``.

    The entry records the sha256 and size of every file of the folder (``metadata.json`` and
    ``README.md`` included), the folder's path relative to the registry when it lies under the
    registry's folder, and ``url`` (the base URL the folder is published at) when given. The
    registry is created when missing and written atomically.

    Args:
        folder: a folder written by :func:`~mixpriv.hub.export_pretrained`.
        registry_path: the registry to update (default: the repository's ``checkpoints/registry.json``).
        url: base URL of the published folder (``.../<name>/``).
        name: registry name (default: the card's name).

    Returns:
        The new entry.
    """
    folder = Path(folder)
    card = read_card(folder)
    name = check_model_name(name or card["name"])
    registry_path = Path(registry_path) if registry_path is not None else repository_registry()
    if registry_path.is_file():
        data = json.loads(registry_path.read_text(encoding="utf-8"))
        check_registry(data, str(registry_path))
    else:
        data = empty_registry()
    files = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.name.startswith("."):
            continue
        check_file_name(path.name)
        files[path.name] = file_record(path)
    for file_name, record in card["files"].items():
        if file_name not in files:
            raise ModelCardError(f"{folder} is incomplete: {file_name} listed in {METADATA_FILE} is missing")
        if files[file_name]["sha256"] != record["sha256"]:
            raise ChecksumError(f"{folder / file_name} does not match its card: expected sha256 {record['sha256']}, "
                                f"got {files[file_name]['sha256']}")
    entry: dict = {"description": card.get("description") or card.get("task", ""), "kind": card["kind"],
                   "files": files}
    try:
        entry["path"] = folder.resolve().relative_to(registry_path.resolve().parent).as_posix()
    except ValueError:
        log.info("%s is not under %s: the entry gets no local path", folder, registry_path.parent)
    if url:
        entry["url"] = url if url.endswith("/") else url + "/"
    data.setdefault("models", {})[name] = entry
    data["models"] = dict(sorted(data["models"].items()))
    _write_json_atomically(registry_path, data)
    log.info("registered %r in %s", name, registry_path)
    return entry
