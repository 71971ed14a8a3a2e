"""Model hub: export / load round trip, registry, download through a real HTTP server, cache, offline."""

from __future__ import annotations

import functools
import json
import os
import shutil
import socket
import stat
import threading
import time
from collections.abc import Callable
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import LABELS, TINY_SEGMENTER, TINY_UNMIXER
from mixpriv.hub import (ChecksumError, DownloadError, ModelCardError, OfflineError, UnknownModelError,
                         export_pretrained, from_pretrained, list_models, load_default_bank, load_pretrained_folder,
                         update_registry)
from mixpriv.hub.cards import annotate_card, read_card
from mixpriv.hub.download import MAX_DOWNLOAD_BYTES, download_file, fetch_bytes
from mixpriv.lightning.baseline import BaselineSegmenter
from mixpriv.lightning.mixup import MixupPrivacyModule
from mixpriv.mixing.bank import ReferenceBank

NAME = "tiny-mixpriv"
FILES = {"model.safetensors", "metadata.json", "README.md", "bank.mpk"}


def tiny_model() -> MixupPrivacyModule:
    torch.manual_seed(0)
    model = MixupPrivacyModule(LABELS, TINY_SEGMENTER, TINY_UNMIXER, patch_size=16, input_spacing=2.0)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so that they are part of the round trip
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm3d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.num_batches_tracked.fill_(7)
    return model.eval()


def tiny_bank() -> ReferenceBank:
    generator = torch.Generator().manual_seed(1)
    return ReferenceBank(torch.rand(2, 1, 16, 16, 16, generator=generator),
                         torch.randint(0, 4, (2, 16, 16, 16), generator=generator), LABELS)


def outputs(model: MixupPrivacyModule) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    image = torch.rand(2, 1, 16, 16, 16, generator=generator)
    reference = torch.nn.functional.one_hot(torch.randint(0, 4, (2, 16, 16, 16), generator=generator), 4)
    with torch.no_grad():
        probs = model.segment_mixture(image)
        return probs, model.unmix(probs, reference.movedim(-1, 1).float(), torch.tensor([0.7, 0.9]))


class _Server:
    """A real HTTP server on 127.0.0.1 serving a folder; it records the paths it was asked for."""

    def __init__(self, root: Path) -> None:
        self.requests: list[str] = []
        server = self

        class Handler(SimpleHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.path)
                if self.path.startswith("/slow/"):
                    time.sleep(1.5)
                return super().do_GET()

            def log_message(self, *args):  # keep the test output quiet
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):  # a client that timed out hung up: fine
                pass

        self.httpd = Server(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture(scope="module")
def model() -> MixupPrivacyModule:
    return tiny_model()


@pytest.fixture(scope="module")
def published(tmp_path_factory, model) -> Path:
    """The exported model folder, published under ``<root>/<NAME>/`` (tests must not modify it)."""
    root = tmp_path_factory.mktemp("published")
    export_pretrained(model, root, NAME, bank=tiny_bank(),
                      card={"training": {"recipe": "test"}, "evaluation_markdown": "| Dice | 0.9 |"})
    return root / NAME


@pytest.fixture(scope="module")
def _server(published):
    server = _Server(published.parent)
    yield server
    server.close()


@pytest.fixture()
def server(_server):
    _server.requests.clear()
    return _server


@pytest.fixture()
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("MIXPRIV_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MIXPRIV_OFFLINE", raising=False)
    monkeypatch.delenv("MIXPRIV_REGISTRY", raising=False)
    return tmp_path / "home"


@pytest.fixture()
def registry(tmp_path, published, server) -> Path:
    """A registry in tmp_path whose entry points at the HTTP server (no local path)."""
    path = tmp_path / "registry" / "registry.json"
    update_registry(published, path, url=f"{server.url}/{NAME}")
    return path


def model_requests(server) -> list[str]:
    return [r for r in server.requests if r.startswith(f"/{NAME}/")]


# ---------------------------------------------------------------- export / load


def test_export_writes_the_documented_folder(published, model):
    assert {p.name for p in published.iterdir()} == FILES
    card = json.loads((published / "metadata.json").read_text())
    assert card["name"] == NAME and card["kind"] == "mixpriv" and card["license"] == "Apache-2.0"
    assert card["labels"] == LABELS and card["hparams"]["label_names"] == LABELS
    assert card["hparams"]["lambda_range"] == list(model.hparams.lambda_range)
    assert card["inputs"]["spacing_mm"] == 2.0 and card["inputs"]["orientation"] == "RAS+ (canonical)"
    assert card["inputs"]["patch_size"] == 16 and card["mixing"]["lambda_range"] == [0.65, 0.95]
    assert (card["mixing"]["references_per_mix"], card["mixing"]["dirichlet_alpha"]) == (1, 1.0)
    assert card["training"] == {"recipe": "test"}
    assert {"torch", "pytorch-lightning", "torchio", "segmentation-models-pytorch-3d", "numpy",
            "mixpriv"} <= set(card["versions"])
    assert set(card["files"]) == {"model.safetensors", "bank.mpk"}
    with safe_open(str(published / "model.safetensors"), framework="pt") as handle:
        assert handle.metadata() == {"format": "mixpriv-model", "kind": "mixpriv"}
        dtypes = {key: handle.get_tensor(key).dtype for key in handle.keys()}  # noqa: SIM118 (safe_open is not a dict)
    assert all(d == torch.float16 for k, d in dtypes.items() if not k.endswith("num_batches_tracked"))
    assert all(d == torch.int64 for k, d in dtypes.items() if k.endswith("num_batches_tracked"))
    assert stat.S_IMODE((published / "bank.mpk").stat().st_mode) == 0o600
    readme = (published / "README.md").read_text()
    assert "from_pretrained" in readme and "| Dice | 0.9 |" in readme and "U(0.65, 0.95)" in readme


def test_kway_model_card_records_and_reloads_its_mixing(tmp_path):
    torch.manual_seed(0)
    model = MixupPrivacyModule(LABELS, TINY_SEGMENTER, TINY_UNMIXER, patch_size=16, input_spacing=2.0,
                               references_per_mix=3, dirichlet_alpha=0.5).eval()
    folder = export_pretrained(model, tmp_path / "kway", name="tiny-kway")
    card = json.loads((folder / "metadata.json").read_text())
    assert (card["mixing"]["references_per_mix"], card["mixing"]["dirichlet_alpha"]) == (3, 0.5)
    assert "| references per mix | 3 (K-way), weights Dirichlet(α = 0.5) |" in (folder / "README.md").read_text()
    reloaded = from_pretrained(folder, offline=True, progress=False)
    assert (reloaded.hparams.references_per_mix, reloaded.hparams.dirichlet_alpha) == (3, 0.5)


def test_round_trip_fp16_close_and_fp32_exact(tmp_path, published, model):
    loaded = load_pretrained_folder(published)
    assert isinstance(loaded, MixupPrivacyModule) and not loaded.training
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    for expected, actual in zip(outputs(model), outputs(loaded)):
        torch.testing.assert_close(actual, expected, atol=2e-2, rtol=0)
    assert loaded.segmenter.encoder is not None and len(loaded.default_bank) == 2

    exact = load_pretrained_folder(export_pretrained(model, tmp_path, "exact", dtype=torch.float32))
    for expected, actual in zip(outputs(model), outputs(exact)):
        assert torch.equal(actual, expected)
    assert exact.default_bank is None
    state, loaded_state = model.state_dict(), exact.state_dict()
    assert all(torch.equal(state[key], loaded_state[key]) for key in state)


def test_baseline_round_trip_and_overwrite(tmp_path):
    baseline = BaselineSegmenter(LABELS, TINY_SEGMENTER, patch_size=16).eval()
    folder = export_pretrained(baseline, tmp_path, "base", dtype=torch.float32)
    with pytest.raises(FileExistsError):
        export_pretrained(baseline, tmp_path, "base")
    export_pretrained(baseline, tmp_path, "base", overwrite=True)
    loaded = load_pretrained_folder(folder)
    assert isinstance(loaded, BaselineSegmenter) and loaded.default_bank is None
    x = torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), baseline(x), atol=2e-2, rtol=0)
    with pytest.raises(ValueError, match="Mixup-Privacy"):
        export_pretrained(baseline, tmp_path, "base2", bank=tiny_bank())


def test_loading_never_unpickles(published, monkeypatch):
    import pickle

    def forbidden(*args, **kwargs):
        raise AssertionError("unpickling is forbidden")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    assert isinstance(load_pretrained_folder(published), MixupPrivacyModule)


def test_tampered_weights_give_a_hash_error(tmp_path, published):
    folder = Path(shutil.copytree(published, tmp_path / NAME))
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="sha256 mismatch for .*model.safetensors"):
        load_pretrained_folder(folder)


def test_malformed_folders_give_clear_errors(tmp_path, published):
    folder = Path(shutil.copytree(published, tmp_path / NAME))
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_pretrained_folder(folder)
    shutil.copy(published / "model.safetensors", folder)
    card = json.loads((folder / "metadata.json").read_text())
    (folder / "metadata.json").write_text(json.dumps({**card, "kind": "gan"}))
    with pytest.raises(ModelCardError, match="unknown model kind 'gan'"):
        load_pretrained_folder(folder)
    (folder / "metadata.json").unlink()
    with pytest.raises(ModelCardError, match="no metadata.json"):
        load_pretrained_folder(folder)
    with pytest.raises(FileNotFoundError):
        from_pretrained(str(tmp_path / "nowhere"))


# ---------------------------------------------------------------- registry + download


def test_registry_entry_and_list_models(registry, published, server, monkeypatch):
    data = json.loads(registry.read_text())
    assert data["format"] == "mixpriv-registry" and data["version"] == 1
    entry = data["models"][NAME]
    assert set(entry["files"]) == FILES and entry["url"] == f"{server.url}/{NAME}/"
    assert "path" not in entry  # the folder is not under the registry's folder
    assert list_models(registry) == [NAME]
    monkeypatch.setenv("MIXPRIV_REGISTRY", str(registry))
    import mixpriv

    assert mixpriv.list_models() == [NAME]


def test_registry_by_url_is_cached_for_offline_use(home, registry, server, monkeypatch):
    monkeypatch.setenv("MIXPRIV_REGISTRY", registry.as_uri())
    assert list_models() == [NAME]
    from_pretrained(NAME, progress=False)
    registry.unlink()  # the registry's cached copy serves offline
    monkeypatch.setenv("MIXPRIV_OFFLINE", "1")
    server.requests.clear()
    assert isinstance(from_pretrained(NAME), MixupPrivacyModule) and server.requests == []


def test_unknown_name_lists_known_models(home, registry):
    with pytest.raises(UnknownModelError, match=f"'no-such-model'.*known models: {NAME}") as info:
        from_pretrained("no-such-model", registry=registry)
    assert isinstance(info.value, KeyError)


def test_download_then_cache_hit(home, registry, server, model):
    loaded = from_pretrained(NAME, registry=registry, progress=False)
    cache = home / "models" / NAME
    assert {p.name for p in cache.iterdir()} == FILES
    assert sorted(model_requests(server)) == sorted(f"/{NAME}/{f}" for f in FILES)
    torch.testing.assert_close(outputs(loaded)[1], outputs(model)[1], atol=2e-2, rtol=0)
    server.requests.clear()
    from_pretrained(NAME, registry=registry, progress=False)
    assert server.requests == []  # cache hit: no network
    assert len(load_default_bank(NAME, registry=registry)) == 2 and server.requests == []


def test_corrupted_cache_file_is_fetched_again(home, registry, server):
    from_pretrained(NAME, registry=registry, progress=False)
    weights = home / "models" / NAME / "model.safetensors"
    weights.write_bytes(b"\0" * weights.stat().st_size)  # same size, wrong bytes
    server.requests.clear()
    assert isinstance(from_pretrained(NAME, registry=registry, progress=False), MixupPrivacyModule)
    assert model_requests(server) == [f"/{NAME}/model.safetensors"]


def test_truncated_file_and_stale_part_are_never_loaded(home, registry, server, published):
    from_pretrained(NAME, registry=registry, progress=False)
    cache = home / "models" / NAME
    weights = cache / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a short file, as after a crash
    stale = cache / "model.safetensors.x1y2.part"
    stale.write_bytes(b"partial")
    os.utime(stale, (time.time() - 3 * 86400,) * 2)
    server.requests.clear()
    from_pretrained(NAME, registry=registry, progress=False)
    assert model_requests(server) == [f"/{NAME}/model.safetensors"]
    assert weights.read_bytes() == (published / "model.safetensors").read_bytes()
    assert not list(cache.glob("*.part"))


def test_wrong_hash_in_registry_is_a_clear_error_and_leaves_nothing(home, registry, server):
    data = json.loads(registry.read_text())
    actual = data["models"][NAME]["files"]["model.safetensors"]["sha256"]
    data["models"][NAME]["files"]["model.safetensors"]["sha256"] = "0" * 64
    registry.write_text(json.dumps(data))
    with pytest.raises(ChecksumError) as info:
        from_pretrained(NAME, registry=registry, progress=False)
    message = str(info.value)
    assert "model.safetensors" in message and "0" * 64 in message and actual in message
    cache = home / "models" / NAME
    assert not (cache / "model.safetensors").exists() and not list(cache.glob("*.part"))


def test_offline_mode(home, registry, server, monkeypatch):
    monkeypatch.setenv("MIXPRIV_OFFLINE", "1")
    with pytest.raises(OfflineError, match=f"'{NAME}'.*MIXPRIV_OFFLINE") as info:
        from_pretrained(NAME, registry=registry)
    assert str(home / "models" / NAME) in str(info.value)
    assert server.requests == []
    from_pretrained(NAME, registry=registry, offline=False, progress=False)
    server.requests.clear()
    assert isinstance(from_pretrained(NAME, registry=registry), MixupPrivacyModule)
    assert server.requests == []


def test_local_path_in_registry_needs_no_network(tmp_path, home, published, server):
    checkpoints = tmp_path / "checkpoints"
    folder = Path(shutil.copytree(published, checkpoints / NAME))
    entry = update_registry(folder, checkpoints / "registry.json", url=f"{server.url}/{NAME}")
    assert entry["path"] == NAME
    from_pretrained(NAME, registry=checkpoints / "registry.json", progress=False)
    assert server.requests == [] and not (home / "models").exists()
    (folder / "model.safetensors").write_bytes(b"tampered")  # falls back to the verified download
    from_pretrained(NAME, registry=checkpoints / "registry.json", progress=False)
    assert model_requests(server) and (home / "models" / NAME / "model.safetensors").is_file()


def test_url_download_and_cache(home, server, published):
    url = f"{server.url}/{NAME}/"
    assert isinstance(from_pretrained(url, progress=False), MixupPrivacyModule)
    assert model_requests(server)[0] == f"/{NAME}/metadata.json"
    assert set(model_requests(server)) == {f"/{NAME}/{f}" for f in ("metadata.json", "model.safetensors",
                                                                      "bank.mpk")}
    (cache,) = (home / "models").iterdir()
    assert cache.name.startswith("url-")
    server.requests.clear()
    from_pretrained(url.rstrip("/"), progress=False, offline=True)
    assert server.requests == []


def test_http_errors_and_timeouts_name_the_url(home, server, tmp_path):
    with pytest.raises(DownloadError, match=f"{server.url}/missing/metadata.json.*HTTP 404"):
        from_pretrained(f"{server.url}/missing/", progress=False)
    with pytest.raises(DownloadError, match="/slow/.*timed out"):
        from_pretrained(f"{server.url}/slow/", progress=False, timeout=0.3)


# ---------------------------------------------------------------- download deadline and unsized files


def http_answer(status: int, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    lines = [f"HTTP/1.1 {status} X", f"Content-Length: {len(body)}", "Connection: close",
             *(f"{k}: {v}" for k, v in (headers or {}).items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class ScriptedServer:
    """A raw HTTP server on 127.0.0.1: ``answer(request line)`` gives the bytes to send and the seconds between
    two of them (0: all at once), from the first byte or, with ``trickle_body_only``, after the headers; a
    trickle stops after ``give_up_s``. It records the request lines."""

    def __init__(self, answer: Callable[[str], tuple[bytes, float]], give_up_s: float = 15.0,
                 trickle_body_only: bool = False) -> None:
        self.answer = answer
        self.give_up_s = give_up_s
        self.trickle_body_only = trickle_body_only
        self.requests: list[str] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            data = b""
            while b"\r\n\r\n" not in data and (chunk := conn.recv(65536)):
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            line = head.split(b"\r\n")[0].decode("latin-1")
            length = next((int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")),
                          0)
            while len(body) < length and (chunk := conn.recv(65536)):
                body += chunk
            self.requests.append(line.rsplit(" ", 1)[0])
            payload, pause = self.answer(line)
            if not pause:
                split = len(payload)
            else:
                split = payload.index(b"\r\n\r\n") + 4 if self.trickle_body_only else 0
            try:
                conn.sendall(payload[:split])
                end = time.monotonic() + self.give_up_s
                for byte in payload[split:]:
                    if time.monotonic() > end:
                        return
                    conn.sendall(bytes([byte]))
                    time.sleep(pause)
            except OSError:
                pass

    def close(self) -> None:
        self.listener.close()




def test_download_timeout_bounds_the_whole_request_not_each_read(tmp_path):
    body = b"x" * 100
    headers_trickle = ScriptedServer(lambda line: (http_answer(200, body), 1.0), give_up_s=12)  # 1 byte/s
    body_trickle = ScriptedServer(lambda line: (http_answer(200, body), 0.2), give_up_s=12, trickle_body_only=True)
    try:
        started = time.monotonic()
        with pytest.raises(DownloadError, match=f"{headers_trickle.url}/w.*timed out after 2 s"):
            download_file(f"{headers_trickle.url}/w", tmp_path / "w", sha256="0" * 64, timeout=2, progress=False)
        assert time.monotonic() - started < 3.0
        started = time.monotonic()
        with pytest.raises(DownloadError, match=r"timed out after 1 s \(\d+ bytes received\)"):
            fetch_bytes(f"{body_trickle.url}/card.json", timeout=1)
        assert time.monotonic() - started < 2.0
    finally:
        headers_trickle.close()
        body_trickle.close()
    assert list(tmp_path.iterdir()) == []  # no file, no .part


def test_a_file_without_a_size_is_bounded_before_its_sha256_check(tmp_path):
    assert download_file.__kwdefaults__["max_bytes"] == MAX_DOWNLOAD_BYTES <= 2**31
    data = bytes(3 << 20)
    announced = ScriptedServer(lambda line: (http_answer(200, data), 0))
    unannounced = ScriptedServer(lambda line: (b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + data, 0))
    try:
        with pytest.raises(DownloadError, match="has 3145728 bytes, over the 1048576 accepted for w, whose card"):
            download_file(f"{announced.url}/w", tmp_path / "w", sha256="0" * 64, max_bytes=1 << 20, progress=False)
        with pytest.raises(DownloadError, match="sent more than the 1048576 bytes accepted for w"):
            download_file(f"{unannounced.url}/w", tmp_path / "w", sha256="0" * 64, max_bytes=1 << 20, progress=False)
    finally:
        announced.close()
        unannounced.close()
    assert list(tmp_path.iterdir()) == []


def test_annotating_a_card_keeps_the_weights_and_shows_the_audit(tmp_path, model):
    folder = export_pretrained(model, tmp_path, "annotated", bank=tiny_bank())
    weights = (folder / "model.safetensors").read_bytes()
    privacy = {"summary": "Audited.", "designs": {"single": {"worst_case_map": 0.25, "worst_case_attacker": "paper"}}}
    card = annotate_card(folder, {"privacy": privacy})
    assert card["privacy"] == privacy and read_card(folder)["privacy"] == privacy
    assert "## Privacy (audited)" in (folder / "README.md").read_text()
    assert "| single: worst-case re-identification mAP | 0.250 (paper attacker) |" in (folder / "README.md").read_text()
    assert (folder / "model.safetensors").read_bytes() == weights
    load_pretrained_folder(folder)  # every recorded hash still holds
    with pytest.raises(ModelCardError, match="computed by the exporter"):
        annotate_card(folder, {"files": {}})
