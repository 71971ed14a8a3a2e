"""Bearer tokens for the segmentation service: where they come from and how they are compared.

Example:
    >>> tokens_match("Bearer s3cret", "s3cret"), tokens_match("Bearer guess", "s3cret"), tokens_match("", "s3cret")
    (True, False, False)
"""

from __future__ import annotations

import hmac
import logging
import os
from pathlib import Path

log = logging.getLogger("mixpriv.server")

#: Environment variable holding the bearer token (server and client).
ENV_TOKEN = "MIXPRIV_SERVER_TOKEN"


def read_token(token_file: str | os.PathLike | None = None, env: str = ENV_TOKEN) -> str | None:
    """The token: the first line of ``token_file`` if given, else ``$MIXPRIV_SERVER_TOKEN``, else ``None``.

    Raises:
        FileNotFoundError: ``token_file`` does not exist.
        ValueError: ``token_file`` holds no token.
    """
    if token_file is None:
        return os.environ.get(env) or None
    path = Path(token_file)
    if not path.is_file():
        raise FileNotFoundError(f"token file {path} does not exist")
    if path.stat().st_mode & 0o077:
        log.warning("token file %s is readable by other users; chmod 600 it", path)
    lines = path.read_text(encoding="utf-8").strip().splitlines()
    token = lines[0].strip() if lines else ""
    if not token:
        raise ValueError(f"token file {path} holds no token")
    return token


def tokens_match(authorization: str, token: str) -> bool:
    """Whether an ``Authorization`` header value carries ``token`` (constant-time comparison)."""
    scheme, _, given = authorization.partition(" ")
    same = hmac.compare_digest(given.strip().encode("utf-8"), token.encode("utf-8"))
    return scheme.lower() == "bearer" and same
