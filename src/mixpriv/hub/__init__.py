"""Model zoo: export trained models, publish them in a registry, load them with ``from_pretrained``.

A published model is a folder of four files, none of them a pickle:

* ``model.safetensors`` - the module's weights (float16 by default);
* ``metadata.json`` - the model card: kind, hparams that rebuild the module, expected input
  (spacing, orientation, intensity normalisation, patch size), λ range, package versions,
  license, and the sha256 of every other file;
* ``README.md`` - the same card for people;
* ``bank.mpk`` - a demo reference bank (Mixup-Privacy models only, optional).

Example:
    >>> from mixpriv.hub import list_models, from_pretrained
    >>> list_models({"format": "mixpriv-registry", "version": 1, "models": {}})
    []
    >>> model = from_pretrained("tissue-mixpriv-2mm")  # doctest: +SKIP

Environment: ``MIXPRIV_HOME`` (cache root, ``~/.cache/mixpriv``), ``MIXPRIV_REGISTRY`` (path or
URL of a registry.json), ``MIXPRIV_OFFLINE=1`` (no network).
"""

from mixpriv.hub.cards import build_card, read_card, render_readme
from mixpriv.hub.download import ENV_OFFLINE, download_file, models_cache_dir
from mixpriv.hub.errors import (ChecksumError, DownloadError, HubError, ModelCardError, OfflineError,
                                UnknownModelError)
from mixpriv.hub.export import export_pretrained
from mixpriv.hub.pretrained import from_pretrained, load_default_bank, load_pretrained_folder, resolve_pretrained
from mixpriv.hub.registry import ENV_REGISTRY, Registry, list_models, load_registry, update_registry

__all__ = [
    "ENV_OFFLINE", "ENV_REGISTRY", "ChecksumError", "DownloadError", "HubError", "ModelCardError", "OfflineError",
    "Registry", "UnknownModelError", "build_card", "download_file", "export_pretrained", "from_pretrained",
    "list_models", "load_default_bank", "load_pretrained_folder", "load_registry", "models_cache_dir",
    "read_card", "render_readme", "resolve_pretrained", "update_registry",
]
