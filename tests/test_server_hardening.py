"""Issue 14's availability and clarity items, against real processes and raw sockets on 127.0.0.1.

A ``mixpriv serve`` process with short timeouts and small limits takes stalled uploads,
half-sent headers, too many connections, clients that hang up, extreme values and a fuzz run of
over a thousand generated bad requests; the client meets scripted servers that trickle a byte
at a time, answer gzip bombs or describe their model badly.
"""

from __future__ import annotations

import gzip
import io
import json
import socket
import threading
import time
import tracemalloc
import zlib

import httpx
import numpy as np
import pytest
import test_server
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_hub import ScriptedServer, http_answer
from test_server import (
    _PAYLOADS,
    LABELS,
    ServerProcess,
    _Evil,
    assert_same_segmentation,
    free_port,
    in_process,
    make_image,
    make_key,
)

from mixpriv.cli import main
from mixpriv.server.app import HostedSegmenter, create_app
from mixpriv.server.client import PrivateClient, ServerError
from mixpriv.server.config import ServerConfig
from mixpriv.server.wire import encode_mixtures
from mixpriv.validation import InputError

# test_server's module fixtures: the tiny published model, the client's copy of it, the bearer token
published, model, token = test_server.published, test_server.model, test_server.token

BODY_TIMEOUT = HEADER_TIMEOUT = 1.5
MAX_PENDING = 3
MAX_CONNECTIONS = 12
MAX_BODY = 2**20  # as test_server's server: --max-body-mb 1
BUDGET_MB = 2  # two full bodies


@pytest.fixture(autouse=True)
def _one_torch_thread(_seed_and_threads):
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def server(published, token, tmp_path_factory):
    with ServerProcess(published, token[1], tmp_path_factory.mktemp("log") / "server.log",
                       "--max-pending", str(MAX_PENDING), "--max-pending-mb", str(BUDGET_MB),
                       "--body-timeout", str(BODY_TIMEOUT), "--header-timeout", str(HEADER_TIMEOUT),
                       "--max-connections", str(MAX_CONNECTIONS)) as process:
        yield process


@pytest.fixture()
def http(server, token):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token[0]}"}, timeout=30) as client:
        yield client


def small_body(k: int = 1, side: int = 8) -> bytes:
    return encode_mixtures(np.random.default_rng(0).random((k, side, side, side), dtype=np.float32))


def raw_request(bearer: str, content_length: int, sent: bytes = b"", path: str = "/v1/segment") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {bearer}\r\n"
            f"Content-Type: application/x-npy\r\nContent-Length: {content_length}\r\n\r\n").encode() + sent


def connect(server, data: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    if data:
        sock.sendall(data)
    return sock


def read_until_closed(sock: socket.socket, timeout: float = 10.0) -> tuple[bytes, float]:
    """What the server sends until it closes the connection, and the seconds that took."""
    started, data = time.monotonic(), b""
    sock.settimeout(timeout)
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    finally:
        sock.close()
    return data, time.monotonic() - started


def status_of(answer: bytes) -> int | None:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else None


def assert_segments(http) -> None:
    response = http.post("/v1/segment", content=small_body(), headers={"Content-Type": "application/x-npy"})
    assert response.status_code == 200, response.text
    assert np.isfinite(np.load(io.BytesIO(response.content), allow_pickle=False)).all()


# ---------------------------------------------------------------- 4: body timeout, memory budget, safe defaults


def test_stalled_uploads_time_out_and_free_their_slots(server, http, token):
    stalled = [connect(server, raw_request(token[0], 1000, b"\x93NUMPY\x01\x00ab")) for _ in range(MAX_PENDING)]
    time.sleep(0.5)
    busy = http.post("/v1/segment", content=small_body(), headers={"Content-Type": "application/x-npy"})
    assert busy.status_code == 503 and "pending" in busy.json()["detail"]
    for sock in stalled:
        answer, seconds = read_until_closed(sock)
        assert status_of(answer) == 408 and b"did not arrive within 1.5 s" in answer
        assert seconds < BODY_TIMEOUT + 1.5
    assert_segments(http)


def test_pending_bodies_are_held_to_a_memory_budget(server, http, token):
    stalled = [connect(server, raw_request(token[0], MAX_BODY, b"\x93NUMPY")) for _ in range(2)]  # the whole budget
    time.sleep(0.5)
    busy = http.post("/v1/segment", content=small_body(), headers={"Content-Type": "application/x-npy"})
    assert busy.status_code == 503 and "memory budget" in busy.json()["detail"]
    assert busy.headers["retry-after"] == "5"
    for sock in stalled:
        assert status_of(read_until_closed(sock)[0]) == 408
    assert_segments(http)


def test_defaults_bound_what_one_client_can_hold():
    config = ServerConfig()
    config.check()
    assert config.max_pending_bytes <= 2**30 < config.max_pending * config.limits.max_body_bytes
    assert config.body_timeout_s <= 120 and config.header_timeout_s <= 10 and config.max_connections <= 256
    with pytest.raises(ValueError, match="pending-bytes budget"):
        ServerConfig(max_pending_bytes=2**20).check()
    with pytest.raises(ValueError, match="body_timeout_s must be positive"):
        ServerConfig(body_timeout_s=0).check()


# ---------------------------------------------------------------- 5: header timeout, connection limit


def test_slow_headers_time_out_and_connections_are_limited(server, http):
    partial = b"POST /v1/segment HTTP/1.1\r\nHost: 127.0.0.1\r\n"  # no token needed to hold a connection
    opened = time.monotonic()
    held = [connect(server, partial) for _ in range(MAX_CONNECTIONS)]
    time.sleep(0.2)
    refused = [connect(server, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n") for _ in range(3)]
    for sock in refused:
        answer, seconds = read_until_closed(sock)
        assert status_of(answer) == 503 and b"too many connections" in answer and seconds < 1.0
    held.pop(0).close()  # a free place, for a client that sends a header byte every 0.2 s: each in time, not all
    time.sleep(0.2)
    trickling = connect(server, b"G")

    def trickle():
        for byte in b"ET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: " + b"a" * 40:
            try:
                trickling.send(bytes([byte]))
            except OSError:
                return
            time.sleep(0.2)

    threading.Thread(target=trickle, daemon=True).start()
    for sock in held:
        answer, _ = read_until_closed(sock)
        assert answer == b""
    assert time.monotonic() - opened < HEADER_TIMEOUT + 2.0
    answer, seconds = read_until_closed(trickling)
    assert answer == b"" and seconds < HEADER_TIMEOUT + 1.0

    keep_alive = connect(server, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\nGET /health HTTP/1.1\r\n")
    answer, seconds = read_until_closed(keep_alive)  # the first answered, the second's headers never end
    assert answer.count(b"HTTP/1.1 200") == 1 and seconds < HEADER_TIMEOUT + 1.0
    assert http.get("/health").status_code == 200
    assert server.alive()


# ---------------------------------------------------------------- 10: extreme values; 11: clients that hang up


def test_extreme_but_finite_values_get_422_not_nan(http):
    mixtures = np.full((1, 8, 8, 8), 0.5, np.float32)
    mixtures[0, 2, 3, 4] = 3.4e38
    response = http.post("/v1/segment", content=encode_mixtures(mixtures), headers={"Content-Type": "application/x-npy"})
    assert response.status_code == 422 and "magnitude up to 3.4e+38" in response.json()["detail"]
    mixtures[0, 2, 3, 4] = -9000.0  # within the limit: finite probabilities
    response = http.post("/v1/segment", content=encode_mixtures(mixtures), headers={"Content-Type": "application/x-npy"})
    assert response.status_code == 200
    assert np.isfinite(np.load(io.BytesIO(response.content), allow_pickle=False)).all()


def test_non_finite_probabilities_are_never_answered_with_200():
    from starlette.testclient import TestClient

    class Overflowing(torch.nn.Module):
        def forward(self, x):
            return torch.full((x.shape[0], 2, *x.shape[2:]), float("inf"))

    hosted = HostedSegmenter(Overflowing(), {"name": "inf", "labels": {"bg": 0, "fg": 1}, "inputs": {"patch_size": 8}})
    with TestClient(create_app(hosted, ServerConfig(token="t"))) as client:
        response = client.post("/v1/segment", content=small_body(), headers={"Authorization": "Bearer t"})
    assert response.status_code == 422 and "not finite" in response.json()["detail"]


def test_a_client_hanging_up_mid_body_is_not_a_500(server, http, token):
    before = len(server.log())
    for _ in range(3):
        sock = connect(server, raw_request(token[0], 200_000, bytes(1000)))
        time.sleep(0.1)
        sock.close()
    time.sleep(0.5)
    log = server.log()[before:]
    assert "Exception in ASGI application" not in log and "Traceback" not in log
    assert " 500 " not in log
    assert log.count("client went away while sending its body") == 3
    assert_segments(http)


def test_a_client_that_goes_away_cancels_its_inference(tmp_path):
    import uvicorn

    calls = []

    class Slow(torch.nn.Module):
        def forward(self, x):
            calls.append(time.monotonic())
            time.sleep(0.2)
            return torch.zeros(x.shape[0], 2, *x.shape[2:])

    hosted = HostedSegmenter(Slow(), {"name": "slow", "labels": {"bg": 0, "fg": 1}, "inputs": {"patch_size": 8}})
    config = ServerConfig(batch_size=1)
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(create_app(hosted, config), host="127.0.0.1", port=port, http=config.protocol(),
                                       ws="none", log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    try:
        while not uv.started:
            time.sleep(0.05)
        body = encode_mixtures(np.zeros((1, 16, 16, 16), np.float32))  # 8 patches of 0.2 s each
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(f"POST /v1/segment HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        time.sleep(0.5)
        sock.close()
        gone = time.monotonic()
        time.sleep(1.0)
        assert 1 <= len(calls) < 8 and max(calls) < gone + 0.5  # stopped at the next patch batch
    finally:
        uv.should_exit = True
        thread.join(10)


# ---------------------------------------------------------------- fuzz: over a thousand bad requests


_METHODS = st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "CONNECT", "TRACE", "BREW",
                            "", "G\x00T"])
_PATHS = st.sampled_from(["/v1/segment", "/v1/model", "/health", "/", "/v1/segment/../model", "//v1//segment",
                          "/v1/segment?x=" + "a" * 300, "/%00", "*", "http://evil/v1/model", "/" + "a" * 5000])
_HEADER_NAMES = st.sampled_from(["Content-Length", "Transfer-Encoding", "Content-Type", "Content-Encoding",
                                 "Authorization", "Accept-Encoding", "Connection", "Expect", "Host", "X-A"])
_HEADER_VALUES = st.one_of(st.sampled_from(["-1", "0", "18446744073709551616", "1e3", " 12", "chunked", "gzip, br",
                                            "identity", "chunked, gzip", "Bearer", "Bearer wrong", "Basic Zm9vOmJhcg==",
                                            "100-continue", "close", "application/x-npy", "text/plain", ""]),
                           st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40))


@st.composite
def _bad_requests(draw, bearer: str) -> bytes:
    """Raw HTTP/1.1 bytes: broken framing, methods, paths, headers, tokens, or a valid frame around a bad payload."""
    kind = draw(st.sampled_from(["garbage", "frame", "payload"]))
    if kind == "garbage":
        return draw(st.binary(max_size=600))
    body = draw(_PAYLOADS) if kind == "payload" else draw(st.binary(max_size=300))
    headers = [("Host", "127.0.0.1")]
    if kind == "payload" or draw(st.booleans()):
        headers.append(("Authorization", f"Bearer {bearer}"))
    if kind == "payload":
        headers += [("Content-Type", "application/x-npy"), ("Content-Length", str(len(body)))]
    headers += draw(st.lists(st.tuples(_HEADER_NAMES, _HEADER_VALUES), max_size=4))
    method = "POST" if kind == "payload" else draw(_METHODS)
    path = "/v1/segment" if kind == "payload" else draw(_PATHS)
    version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/1.1 x", ""]))
    head = f"{method} {path} {version}\r\n" + "".join(f"{name}: {value}\r\n" for name, value in headers) + "\r\n"
    return head.encode("latin-1", "replace") + body


@pytest.mark.slow
def test_fuzz_over_a_thousand_bad_requests_leave_the_server_answering(server, http, model, token, tmp_path,
                                                                       record_property):
    marker = tmp_path / "unpickled"
    _Evil.marker = str(marker)
    before = len(server.log())
    statuses: dict[str, int] = {}
    started = time.monotonic()

    @settings(max_examples=1100, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(request=_bad_requests(token[0]))
    def check(request: bytes) -> None:
        sock = connect(server)
        try:
            sock.sendall(request)
            sock.shutdown(socket.SHUT_WR)  # the end of what this client sends: the server must answer or close
        except OSError:  # the server already answered and closed (e.g. 400 on the request line)
            pass
        answer, _ = read_until_closed(sock, timeout=10)
        status = status_of(answer)
        statuses[str(status)] = statuses.get(str(status), 0) + 1
        assert status is None or status < 500 or status == 503, answer[:300]

    check()
    seconds = time.monotonic() - started
    count = sum(statuses.values())
    print(f"\nfuzz: {count} bad requests in {seconds:.1f} s, answers {dict(sorted(statuses.items()))}")
    record_property("fuzz_requests", count)
    record_property("fuzz_seconds", round(seconds, 1))
    assert count >= 1000 and seconds < 120
    assert not marker.exists(), "a pickled object was unpickled by the server"
    log = server.log()[before:]
    assert "Exception in ASGI application" not in log and "Traceback" not in log
    assert server.alive()
    assert http.get("/health").status_code == 200
    key, image = make_key(3), make_image(3)
    with PrivateClient(server.url, key, model, token=token[0], k=2, seed=5) as client:
        assert_same_segmentation(client.segment(image), in_process(model, key, image, 2, 5))


# ---------------------------------------------------------------- client: scripted servers


@pytest.fixture(scope="module")
def real_info(server, token) -> bytes:
    """The hardened server's real ``GET /v1/model`` answer."""
    return httpx.get(f"{server.url}/v1/model", headers={"Authorization": f"Bearer {token[0]}"}).content


def gzip_bomb(size: int) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = bytes(1 << 20)
    return b"".join(packer.compress(block) for _ in range(size >> 20)) + packer.flush()


def test_model_info_and_error_bodies_are_read_with_a_bound(model, real_info):
    bomb = gzip_bomb(64 << 20)  # 64 MiB of zeros in about 64 kB
    assert len(bomb) < 100_000

    def answer(line: str) -> tuple[bytes, float]:
        if line.startswith("GET /v1/model") and scripted.requests.count("GET /v1/model") == 1:
            return http_answer(200, bomb, {"Content-Type": "application/json", "Content-Encoding": "gzip"}), 0
        if line.startswith("GET /v1/model"):
            return http_answer(200, real_info, {"Content-Type": "application/json"}), 0
        return http_answer(500, bomb, {"Content-Type": "application/json", "Content-Encoding": "gzip"}), 0

    scripted = ScriptedServer(answer)
    tracemalloc.start()
    try:
        with PrivateClient(scripted.url, make_key(1), model, token="t", compress_answers=True) as client:
            with pytest.raises(ServerError, match="GET /v1/model: the server's answer is larger than the 1048576"):
                client.server_info()
            with pytest.raises(ServerError, match="POST /v1/segment: the server answered 500: X") as error:
                client.segment(make_image(1))
        assert error.value.status == 500
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        scripted.close()
    assert peak < 16 << 20, f"reading the answers took {peak >> 20} MiB"


@pytest.mark.parametrize(("answer", "message"), [
    (b"<html>busy</html>", "answer is not JSON .*it starts with b'<html>busy"),
    (b"[1, 2]", "answer is \\[1, 2\\], not a JSON object"),
    (json.dumps({"labels": LABELS}).encode(), "answer lacks 'num_classes'"),
    (json.dumps({"labels": LABELS, "num_classes": "four"}).encode(), "'num_classes' is 'four', not an integer"),
    (json.dumps({"labels": {"bg": "zero"}, "num_classes": 1}).encode(), "index of label 'bg' is 'zero', not an integer"),
    (json.dumps({"labels": LABELS, "num_classes": 4, "inputs": {"patch_size": 16.5}}).encode(),
     "'inputs.patch_size' is 16.5"),
    (json.dumps({"labels": LABELS, "num_classes": 4, "inputs": {"patch_size": 16}, "limits": {"max_k": 8}}).encode(),
     "answer lacks 'limits.min_side'"),
])
def test_broken_model_info_gives_a_clear_server_error(model, answer, message):
    scripted = ScriptedServer(lambda line: (http_answer(200, answer, {"Content-Type": "application/json"}), 0))
    try:
        with PrivateClient(scripted.url, make_key(1), model, token="t") as client, \
                pytest.raises(ServerError, match=f"GET /v1/model: the server's {message}"):
            client.server_info()
    finally:
        scripted.close()


def test_a_scan_too_small_for_the_server_is_refused_before_sending(model, real_info):
    scripted = ScriptedServer(lambda line: (http_answer(200, real_info, {"Content-Type": "application/json"}), 0))
    try:
        with PrivateClient(scripted.url, make_key(1), model, token="t", k=2) as client:
            with pytest.raises(InputError, match="is 4 x 4 x 4 voxels; the server takes sides of 8 to 512"):
                client.segment(torch.rand(1, 4, 4, 4))
            with pytest.raises(InputError, match="more than the server accepts per request"):
                client.segment_mixtures(torch.rand(9, 1, 8, 8, 8))
    finally:
        scripted.close()
    assert scripted.requests == ["GET /v1/model"]


# ---------------------------------------------------------------- 7: a deadline per request, not per read


def test_a_trickling_server_cannot_hold_the_client_past_its_timeout(model, real_info):
    def answer(line: str) -> tuple[bytes, float]:
        if line.startswith("GET /v1/model"):
            return http_answer(200, real_info, {"Content-Type": "application/json"}), 0
        body = gzip.compress(bytes(4096))
        return http_answer(200, body, {"Content-Type": "application/x-npy"}), 0.05  # 20 bytes/s, never late

    scripted = ScriptedServer(answer, trickle_body_only=True)
    try:
        with PrivateClient(scripted.url, make_key(1), model, token="t", timeout=1.0) as client:
            client.server_info()
            started = time.monotonic()
            with pytest.raises(ServerError, match="POST /v1/segment: .* did not answer within 1 s"):
                client.segment(make_image(1))
            assert time.monotonic() - started < 2.0
    finally:
        scripted.close()


def test_segment_timeout_3_against_a_1_byte_per_second_server_ends_in_3_s(published, model, real_info, tmp_path,
                                                                          token, caplog):
    import nibabel as nib

    scripted = ScriptedServer(lambda line: (http_answer(200, real_info, {"Content-Type": "application/json"}), 1.0))
    scan = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(make_image(1)[0].numpy(), np.diag([2.0, 2.0, 2.0, 1.0])), str(scan))
    key = make_key(1).save(tmp_path / "key.mpk")
    try:
        started = time.monotonic()
        with pytest.raises(SystemExit):
            main(["segment", str(scan), "--server", scripted.url, "--key", str(key), "--model", str(published),
                  "--out", str(tmp_path / "seg.nii.gz"), "--token-file", str(token[1]), "--timeout", "3"])
        seconds = time.monotonic() - started
    finally:
        scripted.close()
    assert "did not answer within 3 s" in caplog.text
    assert seconds < 3.0 + 2.0, f"segment --timeout 3 took {seconds:.1f} s"
    assert not (tmp_path / "seg.nii.gz").exists()
