"""The client's reading of the server's answers: bounded bodies and a checked ``GET /v1/model``.

A server (or whatever answers in its place) is not trusted with the client's memory or its
error messages: every body is read through :func:`read_bounded`, which undoes gzip itself,
chunk by chunk with an output bound, so that a small compressed answer cannot expand into
gigabytes; and :func:`check_model_info` turns a broken description into a :class:`ServerError`
that names the field at fault.

Example:
    >>> check_model_info(b'{"labels": {"bg": 0}}')
    Traceback (most recent call last):
    ...
    mixpriv.server.answers.ServerError: GET /v1/model: the server's answer lacks 'num_classes'
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping
from typing import Any

import httpx

#: Largest ``GET /v1/model`` answer read (the real one is about 1 kB).
MAX_INFO_BYTES = 1 << 20
#: Largest error body read (only its ``detail`` is shown, cut to 300 characters).
MAX_ERROR_BYTES = 64 << 10
_INFO = "GET /v1/model"


class ServerError(RuntimeError):
    """The server could not be reached or refused a request; ``status`` is its HTTP status (or None)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def read_bounded(response: httpx.Response, limit: int, what: str) -> bytes:
    """The body of a streamed ``response``, decompressed, or :class:`ServerError` past ``limit`` bytes.

    Only gzip (which the client may ask for) and no encoding are accepted; gzip is inflated
    here with at most ``limit + 1`` bytes of output per step, never all at once.
    """
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity", "gzip"):
        raise ServerError(f"{what}: the server's answer has Content-Encoding {encoding!r}; only gzip or none is read")
    inflate = zlib.decompressobj(16 + zlib.MAX_WBITS) if encoding == "gzip" else None
    body = bytearray()

    def add(data: bytes) -> None:
        body.extend(data)
        if len(body) > limit or (inflate is not None and inflate.unconsumed_tail):
            raise ServerError(f"{what}: the server's answer is larger than the {limit} bytes expected")

    for raw in response.iter_raw():
        if inflate is None:
            add(raw)
            continue
        try:
            add(inflate.decompress(raw, limit + 1 - len(body)))
        except zlib.error as error:
            raise ServerError(f"{what}: the server's gzip answer is corrupt ({error})") from None
    if inflate is not None:
        add(inflate.flush(limit + 1 - len(body)))
        if not inflate.eof:
            raise ServerError(f"{what}: the server's gzip answer is truncated")
    return bytes(body)


def error_detail(response: httpx.Response) -> str:
    """The ``detail`` of an error answer (read with a bound, cut to 300 characters), else its reason phrase."""
    try:
        detail = json.loads(read_bounded(response, MAX_ERROR_BYTES, "")).get("detail", "")
    except (ServerError, httpx.HTTPError, ValueError, AttributeError):
        detail = ""
    return str(detail)[:300] or response.reason_phrase


def _integer(value: Any, name: str, least: int = 0) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise ServerError(f"{_INFO}: the server's {name} is {value!r:.80}, not an integer of at least {least}")
    return value


def _mapping(value: Any, name: str) -> Mapping:
    if not isinstance(value, Mapping):
        raise ServerError(f"{_INFO}: the server's {name} is {value!r:.80}, not a JSON object")
    return value


def _required(info: Mapping, key: str, where: str = "") -> Any:
    if key not in info:
        raise ServerError(f"{_INFO}: the server's answer lacks '{where}{key}'")
    return info[key]


def check_model_info(raw: bytes) -> dict:
    """The ``GET /v1/model`` answer, parsed and checked in what the client relies on.

    Checked: a JSON object; ``labels`` a mapping of names to class indices; ``num_classes``,
    ``inputs.patch_size`` and the ``limits`` (``max_k``, ``min_side``, ``max_side``,
    ``max_body_bytes``) positive integers; ``mixing.lambda_range``, if given, two numbers.

    Raises:
        ServerError: naming what is missing or malformed.
    """
    try:
        info = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ServerError(f"{_INFO}: the server's answer is not JSON ({error}; it starts with {raw[:40]!r})") from None
    info = dict(_mapping(info, "answer"))
    labels = _mapping(_required(info, "labels"), "'labels'")
    info["labels"] = {str(name): _integer(index, f"index of label {name!r}") for name, index in labels.items()}
    info["num_classes"] = _integer(_required(info, "num_classes"), "'num_classes'", 1)
    inputs = info["inputs"] = dict(_mapping(_required(info, "inputs"), "'inputs'"))
    inputs["patch_size"] = _integer(_required(inputs, "patch_size", "inputs."), "'inputs.patch_size'", 1)
    limits = info["limits"] = dict(_mapping(_required(info, "limits"), "'limits'"))
    for key in ("max_k", "min_side", "max_side", "max_body_bytes"):
        limits[key] = _integer(_required(limits, key, "limits."), f"'limits.{key}'", 1)
    mixing = _mapping(info.get("mixing") or {}, "'mixing'")
    lambda_range = mixing.get("lambda_range")
    if lambda_range is not None and not (isinstance(lambda_range, list) and len(lambda_range) == 2 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in lambda_range)):
        raise ServerError(f"{_INFO}: the server's 'mixing.lambda_range' is {lambda_range!r:.80}, not two numbers")
    return info
