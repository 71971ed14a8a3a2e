"""Exceptions of the model hub, one per failure a user can act on."""

from __future__ import annotations


class HubError(RuntimeError):
    """Base class of every model-hub error."""


class ModelCardError(HubError, ValueError):
    """A model folder or registry is malformed (missing or invalid card, unknown kind...)."""


class ChecksumError(HubError):
    """A file's sha256 (or size) differs from the one its card or registry records."""


class DownloadError(HubError):
    """A network fetch failed (HTTP error, timeout, unreachable host); the message names the URL."""


class OfflineError(HubError):
    """Offline mode is on and the model is not available locally."""


class UnknownModelError(HubError, KeyError):
    """A registry has no model of that name; the message lists the names it has."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""
