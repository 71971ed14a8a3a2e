"""The wire format shared by the segmentation server and its client: ``.npy`` bytes, no pickle.

Request (client -> server), ``POST /v1/segment``:
    body          ``numpy.save`` of a float16 or float32 array ``(K, D, H, W)``: the K mixtures
    Content-Type  ``application/x-npy``
    (no compression, no other header: what crosses the wire is the mixtures and their shape)

Response (server -> client), ``200``:
    body          ``numpy.save`` of a float16 array ``(K, C, D, H, W)``: class probabilities of
                  each mixture, gzip-compressed
    Content-Type      ``application/x-npy``
    Content-Encoding  ``gzip`` (HTTP clients such as httpx or curl ``--compressed`` undo it)
    Server-Timing     ``decode;dur=…, infer;dur=…, encode;dur=…`` (milliseconds of the server's work)

Both sides parse with :func:`read_npy_header` first (magic, version, header of at most
10 000 bytes, dtype, shape, and that the data length is exactly ``prod(shape) * itemsize``),
then with ``np.load(..., allow_pickle=False)``: no object array is ever built, and a header
that claims a huge shape is refused before anything is allocated.

Example:
    >>> import numpy as np
    >>> body = encode_mixtures(np.zeros((2, 8, 8, 8), np.float32))
    >>> decode_mixtures(body, MixtureLimits(max_k=4)).shape
    (2, 8, 8, 8)
    >>> decode_mixtures(body[:-1], MixtureLimits())
    Traceback (most recent call last):
    ...
    mixpriv.server.wire.WireError: the .npy data holds 4095 bytes but its header (float32, shape (2, 8, 8, 8)) needs 4096
"""

from __future__ import annotations

import gzip
import io
import math
from dataclasses import dataclass

import numpy as np
import torch

#: Media type of the request and response bodies.
NPY_MEDIA_TYPE = "application/x-npy"
#: Content-Encoding of the response body.
RESPONSE_ENCODING = "gzip"
#: dtypes a request may carry.
REQUEST_DTYPES = ("float16", "float32")
#: dtype of the response.
RESPONSE_DTYPE = np.dtype(np.float16)
#: Largest ``.npy`` header accepted (numpy's own default limit).
MAX_HEADER_BYTES = 10_000
_MAGIC = b"\x93NUMPY"


class WireError(ValueError):
    """A payload that does not follow the wire format; ``status`` is the HTTP status to answer.

    Messages name the problem (dtype, shape, sizes, counts) and never contain array values.
    """

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class MixtureLimits:
    """What the server accepts in one request.

    Attributes:
        max_k: most mixtures per request (K in 1..max_k).
        min_side: smallest spatial side (voxels).
        max_side: largest spatial side (voxels).
        max_body_bytes: largest request body (bytes); larger bodies get 413.
        max_abs_value: largest magnitude of a mixture value. Mixtures of intensity-normalised
            scans stay near [0, 1]; values far beyond (a float32 holds up to 3.4e38) would
            overflow the segmenter into NaN probabilities, so they get 422.
    """

    max_k: int = 16
    min_side: int = 8
    max_side: int = 512
    max_body_bytes: int = 128 * 2**20
    max_abs_value: float = 1e4

    def as_dict(self) -> dict[str, int | float]:
        return {"max_k": self.max_k, "min_side": self.min_side, "max_side": self.max_side,
                "max_body_bytes": self.max_body_bytes, "max_abs_value": self.max_abs_value}


@dataclass(frozen=True)
class NpyHeader:
    """The parsed header of a ``.npy`` payload."""

    dtype: np.dtype
    shape: tuple[int, ...]
    fortran_order: bool
    data_offset: int

    @property
    def data_bytes(self) -> int:
        """Bytes of data the header announces."""
        return math.prod(self.shape) * self.dtype.itemsize


def _as_numpy(array: np.ndarray | torch.Tensor, dtype: str | np.dtype) -> np.ndarray:
    """``array`` as a numpy array of ``dtype``, converted by torch.

    numpy converts float32 <-> float16 one value at a time: 1 s for the 26 M probabilities of a
    K = 8 answer, against a few tens of ms for torch's vectorised conversion.
    """
    tensor = array.detach() if isinstance(array, torch.Tensor) else torch.from_numpy(np.asarray(array))
    return tensor.to(device="cpu", dtype=getattr(torch, np.dtype(dtype).name)).numpy()


def encode_npy(array: np.ndarray) -> bytes:
    """``numpy.save`` bytes of a numeric array (never pickled).

    Example:
        >>> encode_npy(np.zeros(3, np.float16))[:6]
        b'\\x93NUMPY'
    """
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def encode_mixtures(mixtures: np.ndarray | torch.Tensor, dtype: str = "float32") -> bytes:
    """The request body: mixtures ``(K, D, H, W)`` (or ``(K, 1, D, H, W)``) as ``.npy`` of ``dtype``.

    Example:
        >>> len(encode_mixtures(torch.zeros(1, 1, 8, 8, 8), "float16"))
        1152
    """
    if dtype not in REQUEST_DTYPES:
        raise ValueError(f"wire dtype must be one of {REQUEST_DTYPES}, got {dtype!r}")
    if mixtures.ndim == 5 and mixtures.shape[1] == 1:
        mixtures = mixtures[:, 0]
    if mixtures.ndim != 4:
        raise ValueError(f"mixtures must have shape (K, D, H, W) or (K, 1, D, H, W), got {tuple(mixtures.shape)}")
    return encode_npy(_as_numpy(mixtures, dtype))


def encode_probabilities(probabilities: np.ndarray | torch.Tensor, compresslevel: int | None = 1) -> bytes:
    """The response body: probabilities ``(K, C, D, H, W)`` as float16 ``.npy``, gzip-compressed at
    ``compresslevel`` (``None``: not compressed, for clients that do not accept gzip).

    Example:
        >>> body = encode_probabilities(np.full((1, 2, 8, 8, 8), 0.5, np.float32))
        >>> decode_probabilities(gzip.decompress(body), (1, 2, 8, 8, 8)).dtype
        dtype('float16')
        >>> decode_probabilities(encode_probabilities(np.zeros((1, 2, 4, 4, 4)), None)).shape
        (1, 2, 4, 4, 4)
    """
    body = encode_npy(_as_numpy(probabilities, RESPONSE_DTYPE))
    return body if compresslevel is None else gzip.compress(body, compresslevel=compresslevel, mtime=0)


def accepts_gzip(accept_encoding: str) -> bool:
    """Whether an ``Accept-Encoding`` header value allows a gzip answer (``gzip`` or ``*``, not ``q=0``).

    Example:
        >>> accepts_gzip("gzip, deflate"), accepts_gzip("identity"), accepts_gzip("gzip;q=0"), accepts_gzip("")
        (True, False, False, False)
    """
    for entry in accept_encoding.lower().split(","):
        coding, _, params = entry.strip().partition(";")
        quality = params.strip().removeprefix("q=") if params.strip().startswith("q=") else "1"
        try:
            allowed = float(quality) > 0
        except ValueError:
            allowed = False
        if coding.strip() in ("gzip", "*") and allowed:
            return True
    return False


def server_timing_header(seconds: dict[str, float]) -> str:
    """A ``Server-Timing`` header value (W3C Server Timing) of named durations given in seconds.

    Example:
        >>> server_timing_header({"decode": 0.0125, "infer": 6.4})
        'decode;dur=12.5, infer;dur=6400.0'
    """
    return ", ".join(f"{name};dur={value * 1000:.1f}" for name, value in seconds.items())


def parse_server_timing(value: str) -> dict[str, float]:
    """The named durations (seconds) of a ``Server-Timing`` header value; entries without ``dur`` are skipped.

    Example:
        >>> parse_server_timing('decode;dur=12.5, infer;desc="segmenter";dur=6400, cache')
        {'decode': 0.0125, 'infer': 6.4}
    """
    durations = {}
    for entry in value.split(","):
        name, *params = (part.strip() for part in entry.split(";"))
        for param in params:
            key, _, number = param.partition("=")
            if key.strip() == "dur" and name:
                try:
                    durations[name] = float(number) / 1000
                except ValueError:
                    continue
    return durations


def read_npy_header(body: bytes) -> NpyHeader:
    """Parse and check the header of a ``.npy`` payload, without reading its data.

    Raises:
        WireError: not a ``.npy`` (magic, version), an unparsable or too long header, a shape
            that is not a tuple of non-negative integers, or data whose length differs from
            what the header announces.
    """
    if len(body) < len(_MAGIC) + 2 or not body.startswith(_MAGIC):
        raise WireError(f"the body is not a .npy file (it does not start with the .npy magic; {len(body)} bytes)")
    stream = io.BytesIO(body)
    try:
        version = np.lib.format.read_magic(stream)
    except ValueError:
        raise WireError("the body is not a .npy file (bad magic or version bytes)") from None
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    if version not in readers:
        raise WireError(f".npy format version {version[0]}.{version[1]} is not supported (1.0 or 2.0)")
    try:
        shape, fortran_order, dtype = readers[version](stream, max_header_size=MAX_HEADER_BYTES)
    except Exception:  # noqa: BLE001 (numpy raises ValueError, SyntaxError, TypeError... on a corrupt header)
        raise WireError("the .npy header cannot be parsed (corrupt, truncated or too long)") from None
    if not isinstance(shape, tuple) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                               for s in shape):
        raise WireError("the .npy header's shape is not a tuple of non-negative integers")
    return NpyHeader(np.dtype(dtype), shape, bool(fortran_order), stream.tell())


def _check_length(header: NpyHeader, body: bytes) -> None:
    available = len(body) - header.data_offset
    if available != header.data_bytes:
        raise WireError(f"the .npy data holds {available} bytes but its header ({header.dtype.name}, shape "
                        f"{header.shape}) needs {header.data_bytes}")


def _load(body: bytes, header: NpyHeader) -> np.ndarray:
    _check_length(header, body)
    try:
        array = np.load(io.BytesIO(body), allow_pickle=False)
    except (ValueError, OSError, EOFError):
        raise WireError("the .npy payload cannot be read") from None
    return array


def decode_mixtures(body: bytes, limits: MixtureLimits | None = None) -> np.ndarray:
    """Server side: the request body as a float32 array ``(K, D, H, W)``, fully checked.

    Raises:
        WireError: (status 422) not a ``.npy``, pickled/object or other non-float16/float32
            dtype, ``ndim != 4``, K outside ``1..max_k``, a side outside ``min_side..max_side``,
            truncated or over-long data, NaN or infinite values, values beyond ``±max_abs_value``;
            (413) a body over the size limit.
    """
    limits = limits or MixtureLimits()
    if len(body) > limits.max_body_bytes:
        raise WireError(f"the body has {len(body)} bytes, over the limit of {limits.max_body_bytes}", 413)
    header = read_npy_header(body)
    dtype = header.dtype
    if dtype.hasobject:
        raise WireError("object arrays (pickled Python objects) are refused: send float16 or float32 numbers")
    if dtype.fields is not None or dtype.subdtype is not None or dtype.kind != "f" or dtype.itemsize not in (2, 4):
        raise WireError(f"dtype {dtype.str!r} is not accepted: send float16 or float32")
    if len(header.shape) != 4:
        raise WireError(f"mixtures must be a 4-dimensional array (K, D, H, W), got {len(header.shape)} "
                        f"dimension(s) with shape {header.shape}")
    k, *spatial = header.shape
    if not 1 <= k <= limits.max_k:
        raise WireError(f"the number of mixtures K = {k} is outside 1..{limits.max_k}")
    if min(spatial) < limits.min_side:
        raise WireError(f"spatial size {tuple(spatial)} is too small: every side needs at least "
                        f"{limits.min_side} voxels")
    if max(spatial) > limits.max_side:
        raise WireError(f"spatial size {tuple(spatial)} is too large: every side must be at most "
                        f"{limits.max_side} voxels")
    native = _load(body, header)
    native = native.astype(native.dtype.newbyteorder("="), copy=False)  # a big-endian body is allowed
    array = _as_numpy(native, np.float32)  # float16 converted by torch: 8x faster than numpy's
    finite = np.isfinite(array)
    if not finite.all():
        raise WireError(f"the mixtures contain {int(finite.size - np.count_nonzero(finite))} NaN or infinite "
                        f"value(s)")
    peak = max(float(array.max()), -float(array.min()))  # no |array| copy
    if peak > limits.max_abs_value:
        raise WireError(f"the mixtures hold values of magnitude up to {peak:.3g}, beyond the limit of "
                        f"{limits.max_abs_value:g}: mixtures of intensity-normalised scans are expected")
    return np.ascontiguousarray(array)


def decode_probabilities(body: bytes, expected_shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Client side: the (already gunzipped) response body as float16 ``(K, C, D, H, W)``.

    Raises:
        WireError: not a float16 ``.npy``, another shape than ``expected_shape``, truncated
            data or non-finite values.
    """
    header = read_npy_header(body)
    if header.dtype.str not in ("<f2", ">f2"):
        raise WireError(f"the server answered dtype {header.dtype.str!r}; float16 was expected")
    if expected_shape is not None and header.shape != tuple(expected_shape):
        raise WireError(f"the server answered shape {header.shape}; {tuple(expected_shape)} was expected")
    array = _load(body, header)
    if not np.isfinite(array).all():
        raise WireError("the server answered NaN or infinite probabilities")
    return np.ascontiguousarray(array, dtype=RESPONSE_DTYPE)


def response_size_limit(shape: tuple[int, ...]) -> int:
    """Most bytes a response of ``shape`` may take once decompressed (data plus a maximal header)."""
    return math.prod(shape) * RESPONSE_DTYPE.itemsize + MAX_HEADER_BYTES + 16
