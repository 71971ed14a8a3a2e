"""Client-server Mixup-Privacy through a real ``mixpriv serve`` process on 127.0.0.1.

One server process (a tiny exported model, 24³ volumes, patch 16) serves the whole module:
the private result matches the in-process pipeline, authentication and size limits hold,
hundreds of malformed payloads get a 4xx and leave the server serving, 32 concurrent clients
get their own results, and a capturing proxy shows that only mixtures cross the wire.
"""

from __future__ import annotations

import io
import os
import re
import secrets
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Self

import httpx
import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import LABELS, TINY_SEGMENTER, TINY_UNMIXER, phantom
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mixpriv.constants import IMAGE
from mixpriv.hub import export_pretrained, from_pretrained
from mixpriv.inference.mixtures import mix_with_references
from mixpriv.inference.pipeline import PrivatePipeline, segment_mixtures
from mixpriv.inference.volume import load_scan
from mixpriv.lightning.baseline import BaselineSegmenter
from mixpriv.lightning.mixup import MixupPrivacyModule
from mixpriv.lightning.tta import TTAEnsembler
from mixpriv.mixing.bank import ReferenceBank
from mixpriv.mixing.settings import MixingSettings
from mixpriv.networks import AdaINUnmixer
from mixpriv.server.app import HostedSegmenter, ServerConfig, create_app
from mixpriv.server.client import PrivateClient, ServerError
from mixpriv.server.wire import MixtureLimits, decode_mixtures, encode_mixtures
from mixpriv.validation import InputError

NAME = "tiny-mixpriv-server"
MAX_K = 8
MAX_BODY = 2**20  # 1 MiB: 8 float32 mixtures of 24³ take 442 kB
SCAN_AFFINE = np.array([[2.0, 0, 0, -23.75], [0, 2.0, 0, -31.125], [0, 0, 2.0, -19.5], [0, 0, 0, 1]])


# ---------------------------------------------------------------- fixtures


def tiny_model() -> MixupPrivacyModule:
    torch.manual_seed(0)
    model = MixupPrivacyModule(LABELS, TINY_SEGMENTER, TINY_UNMIXER, patch_size=16, input_spacing=2.0)
    with torch.no_grad():  # confident, non-trivial outputs, so that label maps are meaningful
        model.segmenter.segmentation_head[0].weight.mul_(20)
    return model.eval()


def make_key(seed: int, n: int = 3, tag: str = "secret-ref") -> ReferenceBank:
    images, labels = zip(*(phantom(seed * 10 + i) for i in range(n)))
    return ReferenceBank.from_arrays(images, labels, LABELS, ids=[f"{tag}-{seed}-{i}-q7Zx" for i in range(n)])


def make_image(seed: int) -> torch.Tensor:
    return torch.from_numpy(np.clip(phantom(1000 + seed)[0], 0, 1))[None]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MIXPRIV_SERVER_TOKEN"}
    env.update(MIXPRIV_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


class ServerProcess:
    """``python -m mixpriv.cli serve`` on a free port of 127.0.0.1, its log in a file."""

    def __init__(self, folder: Path, token_file: Path, log_path: Path, *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "w")  # noqa: SIM115 (closed in stop())
        command = [sys.executable, "-m", "mixpriv.cli", "serve", "--model", str(folder), "--host", "127.0.0.1",
                   "--port", str(self.port), "--token-file", str(token_file), "--max-k", str(MAX_K),
                   "--max-body-mb", str(MAX_BODY / 2**20), "--threads", "1", "--workers", "2", "--timeout", "60",
                   *extra]
        self.proc = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=child_env())

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"the server did not become healthy in {timeout} s:\n{self.log()}")

    def __enter__(self) -> Self:
        """Wait until the server answers /health (it is stopped if it never does)."""
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


@pytest.fixture(autouse=True)
def _one_torch_thread(_seed_and_threads):
    """The server runs beside this process: one torch thread each keeps them from fighting over the cores."""
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("zoo")
    return export_pretrained(tiny_model(), root, NAME, bank=make_key(99, tag="demo"))


@pytest.fixture(scope="module")
def model(published) -> MixupPrivacyModule:
    """The client's local model: the same published weights as the server's segmenter."""
    return from_pretrained(str(published))


@pytest.fixture(scope="module")
def token(tmp_path_factory) -> tuple[str, Path]:
    value = "tok-" + secrets.token_hex(16)
    path = tmp_path_factory.mktemp("secrets") / "token"
    path.write_text(value + "\n")
    path.chmod(0o600)
    return value, path


@pytest.fixture(scope="module")
def server(published, token, tmp_path_factory):
    with ServerProcess(published, token[1], tmp_path_factory.mktemp("log") / "server.log") as process:
        yield process


@pytest.fixture()
def http(server, token):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token[0]}"}, timeout=60) as client:
        yield client


def in_process(model, key, image, k, seed, method="learned"):
    """The same work without the server: segment the K mixtures over the grid, then unmix the stitched answer.

    (In process, ``TTAEnsembler`` unmixes each patch as it is segmented instead; with overlapping
    patches that differs from unmixing the stitched answer by more than float16 rounding.)
    """
    def local_server(mixtures):
        return segment_mixtures(model.segment_mixture, mixtures, model.hparams.patch_size)

    pipeline = PrivatePipeline.of_model(model, segment_volumes=local_server)
    return pipeline(image, key, k, (method,), torch.Generator().manual_seed(seed))[method]


def test_fused_in_process_segmentation_stays_close_to_the_server_path(model):
    key, image = make_key(1), make_image(1)
    fused = TTAEnsembler(model, key, k=4, seed=11)(image)["learned"]
    assert_same_segmentation(fused, in_process(model, key, image, 4, 11), atol=0.05)


def assert_same_segmentation(actual, expected, atol=5e-3) -> None:
    """Equal within the float16 rounding of the server's answer; labels equal where the vote is clear."""
    torch.testing.assert_close(actual.per_reference, expected.per_reference, atol=atol, rtol=0)
    top2 = expected.probabilities.topk(2, dim=0).values
    clear = (top2[0] - top2[1]) > 2 * atol
    assert clear.any()
    assert torch.equal(actual.labels[clear], expected.labels[clear])


# ---------------------------------------------------------------- the private pipeline through the server


def test_private_segmentation_matches_in_process(server, model, token):
    key, image = make_key(1), make_image(1)
    with PrivateClient(server.url, key, model, token=token[0], k=4, seed=11) as client:
        info = client.server_info()
        assert info["labels"] == LABELS and info["inputs"]["patch_size"] == 16
        assert info["inputs"]["spacing_mm"] == 2.0 and info["limits"]["max_k"] == MAX_K
        assert not {"files", "hparams", "bank", "default_bank"} & set(info)
        result = client.segment(image)
    assert_same_segmentation(result, in_process(model, key, image, 4, 11))
    assert result.per_reference.shape == (4, 4, 24, 24, 24) and result.variance.shape == (4, 24, 24, 24)

    with PrivateClient(server.url, key, model, token=token[0], k=3, seed=12, method="naive") as client:
        naive = client.segment(image)
    assert_same_segmentation(naive, in_process(model, key, image, 3, 12, "naive"))

    mixtures = mix_with_references(image, key, 2).mixtures
    with PrivateClient(server.url, key, model, token=token[0], wire_dtype="float16") as client:
        remote = client.segment_mixtures(mixtures)  # half the bytes: the server segments float16-rounded mixtures
        timing = client.last_server_timing
    assert set(timing) == {"decode", "infer", "encode"} and all(0 <= value < 60 for value in timing.values())
    assert timing["infer"] > 0  # the server says how long its segmenter took (Server-Timing)
    expected = segment_mixtures(model.segment_mixture, mixtures.half().float(), 16)
    torch.testing.assert_close(remote, expected, atol=1e-3, rtol=0)


def test_shuffled_batches_mix_the_scans_of_every_request_and_unmix_each_scan_as_alone(server, model, token,
                                                                                       monkeypatch):
    key, images = make_key(1), [make_image(1), make_image(2), make_image(3)]
    with PrivateClient(server.url, key, model, token=token[0], k=2, seed=21) as client:
        mixed_runs = []
        mix = client.pipeline.mix
        monkeypatch.setattr(client.pipeline, "mix", lambda *a, **kw: mixed_runs.append(mix(*a, **kw)) or mixed_runs[-1])
        sent = []
        send = client.segment_mixtures
        monkeypatch.setattr(client, "segment_mixtures", lambda batch: sent.append(batch) or send(batch))
        results = client.segment_batch(images)
        with pytest.raises(InputError, match="at least two scans"):
            client.segment_batch(images[:1])
    assert [len(batch) for batch in sent] == [2, 2, 2]
    owner = {float(m.sum()): i for i, run in enumerate(mixed_runs) for m in run.mixtures}
    assert any(len({owner[float(m.sum())] for m in batch}) > 1 for batch in sent)  # requests hold mixtures of 2 scans
    for run, result in zip(mixed_runs, results):  # each scan unmixed from its own mixtures' answers
        local = segment_mixtures(model.segment_mixture, run.mixtures, 16)
        expected = PrivatePipeline.of_model(model).unmix_answer(run, local)["learned"]
        assert_same_segmentation(result, expected)


def test_kway_client_mixes_as_its_model_was_trained(server, model, token):
    """A model trained with K-way mixing is used K-way by default; only the (composite) mixtures are sent."""
    key, image = make_key(3), make_image(3)
    kway = MixupPrivacyModule(**{**model.hparams, "references_per_mix": 2})
    kway.load_state_dict(model.state_dict())
    with PrivateClient(server.url, key, kway.eval(), token=token[0], k=3, seed=5) as client:
        assert (client.pipeline.mixing.references_per_mix, client.pipeline.mixing.dirichlet_alpha) == (2, 1.0)
        result = client.segment(image)
    assert_same_segmentation(result, in_process(kway, key, image, 3, 5))
    with pytest.raises(InputError, match="between 1 and 2"):
        PrivateClient(server.url, key, kway, token=token[0], mixing=MixingSettings(references_per_mix=3))


def test_the_server_hosts_only_the_segmenter(published, model, tmp_path, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the server must not load a bank or build an unmixer")

    with monkeypatch.context() as patch:
        patch.setattr(ReferenceBank, "load", forbidden)
        patch.setattr(AdaINUnmixer, "__init__", forbidden)
        hosted = HostedSegmenter.from_pretrained(str(published))
    mixtures = torch.rand(2, 1, 16, 16, 16)
    assert torch.equal(hosted.segment_mixture(mixtures), model.segment_mixture(mixtures))
    assert set(vars(hosted)) == {"segmenter", "card", "labels", "num_classes", "patch_size"}
    assert not any(isinstance(m, AdaINUnmixer) for m in hosted.segmenter.modules())
    assert not any(isinstance(v, ReferenceBank) for v in vars(hosted).values())
    baseline = export_pretrained(BaselineSegmenter(LABELS, TINY_SEGMENTER, patch_size=16), tmp_path, "base")
    with pytest.raises(ValueError, match="Mixup-Privacy"):
        HostedSegmenter.from_pretrained(str(baseline))


# ---------------------------------------------------------------- authentication and limits


def test_missing_or_wrong_token_gets_401(server, model, token):
    body = encode_mixtures(np.zeros((1, 8, 8, 8), np.float32))
    assert httpx.get(f"{server.url}/health").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {token[0]}"},
                    {"Authorization": f"Bearer {token[0]}x"}, {"Authorization": "Bearer"}):
        for method, path, content in (("GET", "/v1/model", None), ("POST", "/v1/segment", body)):
            response = httpx.request(method, f"{server.url}{path}", content=content, headers=headers)
            assert response.status_code == 401, (headers, path)
            assert response.headers["www-authenticate"] == "Bearer"
    with pytest.raises(ServerError, match="401"):
        PrivateClient(server.url, make_key(2), model, token="nope").server_info()


def test_oversized_body_gets_413(http):
    too_big = b"\x93NUMPY" + bytes(MAX_BODY)
    response = http.post("/v1/segment", content=too_big, headers={"Content-Type": "application/x-npy"})
    assert response.status_code == 413

    def chunks():  # no Content-Length: the server counts the streamed bytes
        for _ in range(20):
            yield bytes(2**16)

    response = http.post("/v1/segment", content=chunks(), headers={"Content-Type": "application/x-npy"})
    assert response.status_code == 413
    assert http.post("/v1/segment", content=b"x", headers={"Content-Type": "text/plain"}).status_code == 415


def test_validation_messages_name_the_problem(http):
    def post(array=None, raw=None, allow_pickle=False):
        if raw is None:
            buffer = io.BytesIO()
            np.save(buffer, array, allow_pickle=allow_pickle)
            raw = buffer.getvalue()
        response = http.post("/v1/segment", content=raw, headers={"Content-Type": "application/x-npy"})
        assert response.status_code == 422
        return response.json()["detail"]

    nan = np.full((1, 8, 8, 8), 0.5, np.float32)
    nan[0, 1, 2, 3] = np.nan
    assert "not a .npy" in post(raw=b"GIF89a" + bytes(100))
    assert "object arrays" in post(np.array([[[[None]]]], dtype=object), allow_pickle=True)
    assert "float16 or float32" in post(np.zeros((1, 8, 8, 8), np.float64))
    assert "4-dimensional" in post(np.zeros((8, 8, 8), np.float32))
    assert "outside 1..8" in post(np.zeros((9, 8, 8, 8), np.float32))
    assert "too small" in post(np.zeros((1, 4, 8, 8), np.float32))
    assert "too large" in post(np.zeros((1, 8, 8, 513), np.float16))
    assert "1 NaN or infinite" in post(nan)
    assert "needs 2048" in post(raw=encode_mixtures(np.zeros((1, 8, 8, 8)))[:-5])


def test_a_slow_inference_gets_504_and_frees_its_worker():
    from starlette.testclient import TestClient

    class Slow(torch.nn.Module):
        def forward(self, x):
            time.sleep(0.3)
            return torch.zeros(x.shape[0], 2, *x.shape[2:])

    hosted = HostedSegmenter(Slow(), {"name": "slow", "labels": {"bg": 0, "fg": 1}, "inputs": {"patch_size": 8}})
    app = create_app(hosted, ServerConfig(token="t", timeout_s=0.5, limits=MixtureLimits(max_k=2)))
    body = encode_mixtures(np.zeros((1, 16, 16, 16), np.float32))  # 8 patch batches of 0.3 s
    with TestClient(app) as client:
        response = client.post("/v1/segment", content=body, headers={"Authorization": "Bearer t"})
        assert response.status_code == 504
        small = encode_mixtures(np.zeros((1, 8, 8, 8), np.float32))
        started = time.perf_counter()
        response = client.post("/v1/segment", content=small, headers={"Authorization": "Bearer t"})
        assert response.status_code == 200 and time.perf_counter() - started < 1.5
        assert response.headers["content-encoding"] == "gzip"
        assert np.load(io.BytesIO(response.content), allow_pickle=False).shape == (1, 2, 8, 8, 8)


def test_answers_are_gzipped_only_for_clients_that_accept_it(server, model, token):
    body = encode_mixtures(np.random.default_rng(0).random((1, 24, 24, 24), dtype=np.float32))
    headers = {"Authorization": f"Bearer {token[0]}", "Content-Type": "application/x-npy"}
    raw = httpx.post(f"{server.url}/v1/segment", content=body, headers={**headers, "Accept-Encoding": "identity"},
                     timeout=60)
    assert raw.status_code == 200 and "content-encoding" not in raw.headers
    plain = np.load(io.BytesIO(raw.content), allow_pickle=False)
    gzipped = httpx.post(f"{server.url}/v1/segment", content=body, headers={**headers, "Accept-Encoding": "gzip"},
                         timeout=60)
    assert gzipped.headers["content-encoding"] == "gzip" and len(gzipped.content) == plain.nbytes + 128
    assert np.array_equal(np.load(io.BytesIO(gzipped.content), allow_pickle=False), plain)  # httpx gunzips
    key, image = make_key(1), make_image(1)
    mixtures = mix_with_references(image, key, 2).mixtures
    with PrivateClient(server.url, key, model, token=token[0]) as loopback, \
            PrivateClient(server.url, key, model, token=token[0], compress_answers=True) as compressing:
        assert not loopback.compress_answers and compressing.compress_answers
        torch.testing.assert_close(loopback.segment_mixtures(mixtures), compressing.segment_mixtures(mixtures))


def test_serve_refuses_to_start_without_a_token(published):
    result = subprocess.run([sys.executable, "-m", "mixpriv.cli", "serve", "--model", str(published), "--port",
                             str(free_port())], capture_output=True, text=True, env=child_env(), timeout=60, check=False)
    assert result.returncode == 2 and "no token" in result.stderr


# ---------------------------------------------------------------- malformed payloads (fuzzing)


class _Evil:
    """Unpickling this would create ``marker``: proof that nothing is unpickled if it never appears."""

    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _npy(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


def _raw_npy(header: str, data: bytes = b"", version: bytes = b"\x01\x00") -> bytes:
    text = header.encode("latin-1", "replace")
    text += b" " * (-(len(text) + 11) % 64) + b"\n"
    return b"\x93NUMPY" + version + len(text).to_bytes(2, "little") + text + data


_SHAPES = st.tuples(st.integers(1, 3), st.integers(8, 10), st.integers(8, 10), st.integers(8, 10))
_FLOAT = st.sampled_from(["<f2", "<f4", ">f4"])
_BAD_DTYPES = st.sampled_from(["<f8", "i1", "<i2", "<i4", "<i8", "u1", "?", "<c8", "<c16", "<U2", "S3", "<M8[s]",
                               "V4"])
_HUGE = st.one_of(st.integers(-(10**6), 7), st.integers(513, 10**30))


def _truncated(shape, dtype, fraction):
    full = _npy(np.random.default_rng(0).random(shape).astype(dtype))
    return full[: int(len(full) * fraction)]


def _non_finite(shape, dtype, count, value):
    array = np.random.default_rng(1).random(shape).astype(dtype)
    array.reshape(-1)[np.linspace(0, array.size - 1, count).astype(int)] = value
    return _npy(array)


def _bad_shape_header(shape):
    return _raw_npy(f"{{'descr': '<f4', 'fortran_order': False, 'shape': {tuple(shape)}, }}", bytes(64))


_PAYLOADS = st.one_of(
    st.binary(max_size=2048),                                                            # random bytes
    st.binary(max_size=512).map(lambda b: b"\x93NUMPY" + b),                             # magic, then garbage
    st.builds(_truncated, _SHAPES, _FLOAT, st.floats(0.0, 0.999)),                       # truncated .npy
    st.builds(lambda s, d, extra: _npy(np.zeros(s, d)) + extra, _SHAPES, _FLOAT, st.binary(min_size=1, max_size=64)),
    st.builds(lambda s, d: _npy(np.zeros(s, d)), _SHAPES, _BAD_DTYPES),                  # wrong dtypes
    st.builds(lambda s: _npy(np.zeros(s, [("a", "<f4")])), _SHAPES),                     # structured
    st.builds(lambda n: _npy(np.array([_Evil()] * n, dtype=object), allow_pickle=True), st.integers(1, 3)),
    st.builds(lambda s: _npy(np.full(s, None, dtype=object), allow_pickle=True), _SHAPES),  # pickled objects
    st.builds(lambda s, d: _npy(np.zeros(s, d)),                                         # wrong ndim
              st.lists(st.integers(1, 8), max_size=6).filter(lambda s: len(s) != 4), _FLOAT),
    st.builds(_non_finite, _SHAPES, _FLOAT, st.integers(1, 5), st.sampled_from([np.nan, np.inf, -np.inf])),
    st.builds(_bad_shape_header, st.tuples(st.integers(MAX_K + 1, 10**6) | st.integers(-3, 0), _HUGE, _HUGE, _HUGE)),
    st.builds(_bad_shape_header, st.tuples(st.integers(1, MAX_K), st.integers(8, 512), st.integers(8, 512),
                                           st.integers(8, 512))),                       # huge shape, no data
    st.builds(_bad_shape_header, st.lists(_HUGE, max_size=7)),                           # any shape at all
    st.builds(_raw_npy, st.text(max_size=300), st.binary(max_size=64)),                  # garbage header
    st.builds(lambda s, v: _npy(np.zeros(s, "<f4"))[:6] + v + _npy(np.zeros(s, "<f4"))[8:], _SHAPES,
              st.binary(min_size=2, max_size=2).filter(lambda v: v not in (b"\x01\x00", b"\x02\x00"))),
)


@pytest.mark.parametrize("dtype", ["<f2", ">f2", "<f4", ">f4"])
def test_bodies_of_every_accepted_dtype_decode_to_the_same_float32(dtype):
    values = np.random.default_rng(0).normal(size=(2, 9, 8, 10)).astype(dtype)
    decoded = decode_mixtures(_npy(values))
    assert decoded.dtype == np.float32 and decoded.flags.c_contiguous and decoded.flags.writeable
    np.testing.assert_array_equal(decoded, values.astype(np.float32))


def test_malformed_payloads_get_4xx_and_the_server_keeps_serving(server, http, model, token, tmp_path):
    marker = tmp_path / "unpickled"
    _Evil.marker = str(marker)
    statuses: list[int] = []

    @settings(max_examples=240, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(payload=_PAYLOADS)
    def check(payload: bytes) -> None:
        response = http.post("/v1/segment", content=payload, headers={"Content-Type": "application/x-npy"})
        statuses.append(response.status_code)
        assert 400 <= response.status_code < 500 and response.status_code != 401, response.text
        assert server.alive()

    check()
    assert len(statuses) >= 200 and set(statuses) <= {413, 422}
    assert not marker.exists(), "a pickled object was unpickled by the server"
    key, image = make_key(3), make_image(3)
    with PrivateClient(server.url, key, model, token=token[0], k=2, seed=5) as client:
        assert_same_segmentation(client.segment(image), in_process(model, key, image, 2, 5))


# ---------------------------------------------------------------- concurrency


def test_32_concurrent_clients_get_their_own_results(server, model, token):
    n = 32
    keys = [make_key(100 + i) for i in range(n)]
    images = [make_image(100 + i) for i in range(n)]
    barrier = threading.Barrier(n)

    def run(i: int):
        with PrivateClient(server.url, keys[i], model, token=token[0], k=2, seed=1000 + i) as client:
            client.server_info()
            barrier.wait(30)
            return client.segment(images[i])

    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(run, range(n)))
    for i, result in enumerate(results):
        assert_same_segmentation(result, in_process(model, keys[i], images[i], 2, 1000 + i))


# ---------------------------------------------------------------- what crosses the wire


class CapturingProxy:
    """A TCP proxy in front of the server that records every byte the client sends."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.streams: list[bytearray] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            record = bytearray()
            self.streams.append(record)
            threading.Thread(target=self._pump, args=(client, upstream, record), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, None), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, target: socket.socket, record: bytearray | None) -> None:
        try:
            while data := source.recv(65536):
                if record is not None:
                    record.extend(data)
                target.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def requests(self) -> list[tuple[str, dict[str, str], bytes]]:
        """(request line, headers, body) of every request, parsed from the raw client->server bytes."""
        parsed = []
        for stream in self.streams:
            data = bytes(stream)
            while data:
                head, _, rest = data.partition(b"\r\n\r\n")
                line, *header_lines = head.decode("latin-1").split("\r\n")
                headers = {}
                for header in header_lines:
                    name, _, value = header.partition(":")
                    headers[name.strip().lower()] = value.strip()
                assert "transfer-encoding" not in headers
                length = int(headers.get("content-length", 0))
                parsed.append((line, headers, rest[:length]))
                data = rest[length:]
        return parsed

    def close(self) -> None:
        self.listener.close()


def _float_forms(values: np.ndarray) -> list[bytes]:
    """Text and binary renderings of numbers, as a leak would carry them."""
    forms = []
    for value in np.asarray(values, np.float64).ravel():
        forms += [f"{value:.3f}".encode(), f"{value:.4f}".encode(), repr(float(value)).encode(),
                  str(np.float32(value)).encode(), np.float64(value).tobytes()]
    return [f for f in forms if len(f) >= 5]


def test_only_mixtures_cross_the_wire(server, published, model, token, tmp_path):
    scan = tmp_path / "patient-7f3e9b-secret_0000.nii.gz"
    raw, _ = phantom(4242)
    raw = (raw * 873.0 + 41.0).astype(np.float32)  # scanner units, not [0, 1]
    nib.save(nib.Nifti1Image(raw, SCAN_AFFINE), str(scan))
    key = make_key(7, n=4)
    key_path = key.save(tmp_path / "key.mpk")
    proxy = CapturingProxy(server.port)
    out, probs, var = tmp_path / "seg.nii.gz", tmp_path / "probs.nii.gz", tmp_path / "var.nii.gz"
    try:
        result = subprocess.run(
            [sys.executable, "-m", "mixpriv.cli", "segment", str(scan), "--server", proxy.url, "--key", str(key_path),
             "--model", str(published), "--out", str(out), "--k", "4", "--seed", "7", "--token-file", str(token[1]),
             "--probabilities", str(probs), "--variance", str(var)],
            capture_output=True, text=True, env=child_env(), timeout=180, check=False)
    finally:
        proxy.close()
    assert result.returncode == 0, result.stderr
    assert f"wrote {out}" in result.stdout

    # What the client drew (same seed, same code path): the secrets that must not leak.
    subject, _ = load_scan(scan, 2.0)
    image = subject[IMAGE].data.float()
    mixed = mix_with_references(image, key, 4, MixingSettings.of_model(model.hparams), torch.Generator().manual_seed(7))
    lambdas = mixed.lambdas.numpy()
    ids = [key.ids[i] for indices in mixed.reference_indices for i in indices]

    requests = proxy.requests()
    assert [line.rsplit(" ", 1)[0] for line, _, _ in requests] == ["GET /v1/model", "POST /v1/segment"]
    allowed = {"host", "accept", "accept-encoding", "connection", "user-agent", "authorization", "content-type",
               "content-length"}
    for _, headers, _ in requests:
        assert set(headers) <= allowed, set(headers) - allowed
    body = requests[1][2]
    sent = np.load(io.BytesIO(body), allow_pickle=False)
    assert sent.shape == (4, 24, 24, 24) and sent.dtype == np.float32
    np.testing.assert_array_equal(sent, mixed.mixtures[:, 0].numpy())  # the mixtures, nothing else
    npy_header = body[: len(body) - sent.nbytes]
    assert re.fullmatch(rb"\x93NUMPY\x01\x00.{2}\{'descr': '<f4', 'fortran_order': False, 'shape': "
                        rb"\(4, 24, 24, 24\), \} *\n", npy_header, re.DOTALL)

    wire = b"".join(bytes(s) for s in proxy.streams)
    metadata = wire.replace(body, b"")  # request lines and headers
    secrets_anywhere = _float_forms(lambdas) + [lambdas.astype(np.float32).tobytes(),
                                                lambdas.astype(np.float16).tobytes()]
    secrets_anywhere += [i.encode() for i in ids] + [scan.name.encode(), scan.name.split(".")[0].encode()]
    secrets_anywhere += [SCAN_AFFINE.tobytes(), SCAN_AFFINE.astype(np.float32).tobytes(), b"23.75", b"31.125"]
    secrets_anywhere += [row.tobytes() for row in SCAN_AFFINE] + [row.astype(np.float32).tobytes() for row in SCAN_AFFINE]
    secrets_anywhere += [nib.load(str(scan)).header.binaryblock, scan.read_bytes()[100:164]]
    flat_raw, flat_image = raw.ravel(), image.numpy().ravel()
    for start in range(2000, flat_raw.size - 16, flat_raw.size // 8):  # windows of 16 voxels of the scan
        secrets_anywhere += [flat_raw[start:start + 16].tobytes(), flat_image[start:start + 16].tobytes(),
                             flat_image[start:start + 16].astype(np.float16).tobytes()]
    for secret in secrets_anywhere:
        assert secret not in wire
    for lam in lambdas:  # short binary forms: only meaningful outside the (random-looking) mixture data
        assert np.float32(lam).tobytes() not in metadata + npy_header
        assert np.float16(lam).tobytes() not in metadata + npy_header

    # The result: on the scan's own grid and affine, equal to the in-process pipeline.
    written = nib.load(str(out))
    np.testing.assert_allclose(written.affine, SCAN_AFFINE)
    assert written.shape == raw.shape and written.get_data_dtype() == np.uint8
    expected = in_process(model, key, image, 4, 7)
    top2 = expected.probabilities.topk(2, dim=0).values
    clear = ((top2[0] - top2[1]) > 1e-2).numpy()
    np.testing.assert_array_equal(np.asarray(written.dataobj)[clear], expected.labels.numpy()[clear])
    assert nib.load(str(probs)).shape == (24, 24, 24, 4) and nib.load(str(var)).shape == (24, 24, 24)

    log = server.log()
    assert "K=4 shape=(4, 24, 24, 24)" in log
    # request durations ("0.847s", from any test sharing the server) may print like a λ: drop them first
    log_without_durations = re.sub(r"\b\d+\.\d+s\b", "", log)
    for secret in [scan.name, *ids, f"{lambdas[0]:.3f}"]:
        assert secret not in log_without_durations
