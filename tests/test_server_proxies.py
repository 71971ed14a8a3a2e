"""The compared systems (Privacy-Net, Deformation-Proxy) through ``mixpriv serve``'s app and ``ProxyClient``.

Each tiny model is exported, its segmenter hosted by ``HostedSegmenter.from_pretrained`` in the
FastAPI app, and reached in process (starlette's ``TestClient``) through a transport that
records every request body: the served segmentation matches the in-process pipeline, only the
view crosses the wire, the server reads only the segmenter's tensors, and a baseline model or a
server of another kind is refused with a clear message. ``mixpriv predict-compared`` writes the same
segmentation in-process and through the server.
"""

from __future__ import annotations

import functools
import io
import logging

import httpx
import nibabel as nib
import numpy as np
import pytest
import safetensors
import torch
from conftest import TINY_SEGMENTER, TINY_UNMIXER, phantom
from starlette.testclient import TestClient

import mixpriv.cli.inference as cli_inference
import mixpriv.server.client as client_module
from mixpriv.cli import build_parser, main
from mixpriv.hub import export_pretrained, from_pretrained
from mixpriv.inference.mixtures import client_generator
from mixpriv.inference.proxies import ProxyPipeline
from mixpriv.inference.scans import prepare_scan
from mixpriv.lightning.baseline import BaselineSegmenter
from mixpriv.lightning.deformation_proxy import DeformationProxyModule
from mixpriv.lightning.mixup import MixupPrivacyModule
from mixpriv.lightning.privacy_net import PrivacyNetModule
from mixpriv.mixing.bank import ReferenceBank
from mixpriv.server import ProxyClient
from mixpriv.server.app import HostedSegmenter, ServerConfig, create_app
from mixpriv.server.client import PrivateClient
from mixpriv.validation import InputError

LABELS = {"background": 0, "fg": 1}
TOKEN = "tok-proxies-3f9c"
URL = "http://127.0.0.1:8000"  # the loopback: answers come uncompressed, no https warning
#: The server answers float16 probabilities: half a float16 ulp below 1 is 2.4e-4, and reading a
#: Deformation-Proxy answer back (trilinear, a convex combination) does not widen it.
ATOL = 1e-3
KINDS = ("privacynet", "deformproxy")


def tiny_model(kind: str) -> PrivacyNetModule | DeformationProxyModule:
    torch.manual_seed(0)
    if kind == "privacynet":
        model = PrivacyNetModule(LABELS, TINY_SEGMENTER, TINY_SEGMENTER, {"channels": [4, 8]}, patch_size=16)
    else:
        model = DeformationProxyModule(LABELS, TINY_SEGMENTER, {"magnitude": 3.0, "control_spacing": 8.0,
                                                                "channels": [4, 8]}, {"channels": [4, 8]},
                                       patch_size=16)
    model.eval()
    head = model.segmenter.segmentation_head[0]
    with torch.no_grad():  # outputs that follow the input (an untrained head's are about constant) ...
        head.weight.mul_(1000)
        view, _ = ProxyPipeline(model).make_view(make_image(0), torch.Generator().manual_seed(0))
        logits = model.segmenter(view[None, :, :16, :16, :16])
        head.bias[1] -= (logits[:, 1] - logits[:, 0]).median()  # ... and label maps of both classes
    return model


def make_image(seed: int) -> torch.Tensor:
    return torch.from_numpy(np.clip(phantom(1000 + seed)[0], 0, 1))[None]


class Recording(httpx.BaseTransport):
    """Sends each request to the app through ``TestClient`` and keeps ``(method, path, body)`` of each."""

    def __init__(self, app) -> None:
        self.app = TestClient(app, base_url=URL)
        self.requests: list[tuple[str, str, bytes]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        body = request.read()
        self.requests.append((request.method, request.url.path, body))
        answer = self.app.request(request.method, request.url.path, content=body, headers=request.headers)
        headers = {k: v for k, v in answer.headers.items() if k not in ("content-encoding", "content-length")}
        return httpx.Response(answer.status_code, headers=headers, stream=httpx.ByteStream(answer.content))

    def sent_volumes(self) -> list[np.ndarray]:
        return [np.load(io.BytesIO(body), allow_pickle=False) for method, path, body in self.requests
                if (method, path) == ("POST", "/v1/segment")]

    def close(self) -> None:
        """Kept open when a client closes: several clients of a test share it (the fixture closes it)."""


@pytest.fixture(autouse=True)
def _one_torch_thread(_seed_and_threads):
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("zoo")
    return {kind: export_pretrained(tiny_model(kind), root, f"tiny-{kind}", dtype=torch.float32) for kind in KINDS}


@pytest.fixture(scope="module")
def models(published) -> dict:
    """The clients' local models: the same published weights as the servers' segmenters."""
    return {kind: from_pretrained(str(folder)) for kind, folder in published.items()}


@pytest.fixture(scope="module")
def apps(published) -> dict:
    return {kind: create_app(HostedSegmenter.from_pretrained(str(folder)), ServerConfig(token=TOKEN))
            for kind, folder in published.items()}


@pytest.fixture()
def transports(apps):
    recorders = {kind: Recording(app) for kind, app in apps.items()}
    yield recorders
    for recorder in recorders.values():
        recorder.app.close()


# ---------------------------------------------------------------- the compared systems through the server


@pytest.mark.parametrize("kind", KINDS)
def test_served_segmentation_equals_the_in_process_pipeline(kind, models, transports):
    model, image = models[kind], make_image(1)
    with ProxyClient(URL, model, token=TOKEN, seed=7, transport=transports[kind]) as client:
        assert client.server_info()["kind"] == kind
        served = client.segment(image)
    local = ProxyPipeline(model)(image, torch.Generator().manual_seed(7))
    torch.testing.assert_close(served.view, local.view, atol=1e-6, rtol=0)
    if kind == "deformproxy":
        torch.testing.assert_close(served.secret, local.secret, atol=1e-6, rtol=0)
    else:
        assert served.secret is None
    torch.testing.assert_close(served.answer, local.answer, atol=ATOL, rtol=0)
    torch.testing.assert_close(served.probabilities, local.probabilities, atol=ATOL, rtol=0)
    top2 = local.probabilities.topk(2, dim=0).values
    clear = (top2[0] - top2[1]) > 2 * ATOL
    assert clear.float().mean() > 0.5 and len(local.labels[clear].unique()) == 2
    assert torch.equal(served.labels[clear], local.labels[clear])


@pytest.mark.parametrize("kind", KINDS)
def test_only_the_view_crosses_the_wire(kind, models, transports, caplog):
    model, image, transport = models[kind], make_image(2), transports[kind]
    with caplog.at_level(logging.DEBUG), ProxyClient(URL, model, token=TOKEN, transport=transport) as client:
        run = client.segment(image)
        assert TOKEN not in repr(client)
    assert [(method, path) for method, path, _ in transport.requests] == [("GET", "/v1/model"),
                                                                          ("POST", "/v1/segment")]
    (sent,) = transport.sent_volumes()
    assert sent.shape == (1, *image.shape[1:]) and sent.dtype == np.float32
    assert np.array_equal(sent, run.view.numpy())  # the view, exactly
    assert np.abs(sent - image.numpy()).max() > 0.2  # and not the image
    body = transport.requests[1][2]
    assert image.numpy().tobytes() not in body
    if run.secret is not None:  # the inverse field stays on the client
        assert run.secret.numpy().astype(np.float32).tobytes()[:4096] not in body
    assert TOKEN not in caplog.text


@pytest.mark.parametrize("kind", KINDS)
def test_the_server_reads_only_the_segmenters_tensors(kind, published, models, monkeypatch):
    read = []
    open_weights = safetensors.safe_open

    class Recorded:
        def __init__(self, *args, **kwargs) -> None:
            self.handle = open_weights(*args, **kwargs)

        def __enter__(self):
            self.handle.__enter__()
            return self

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

        def metadata(self):
            return self.handle.metadata()

        def keys(self):
            return self.handle.keys()

        def get_tensor(self, name):
            read.append(name)
            return self.handle.get_tensor(name)

    monkeypatch.setattr(safetensors, "safe_open", Recorded)
    hosted = HostedSegmenter.from_pretrained(str(published[kind]))
    model = models[kind]
    assert read and all(name.startswith("segmenter.") for name in read)
    assert len(read) == len(model.segmenter.state_dict())
    assert set(vars(hosted)) == {"segmenter", "card", "labels", "num_classes", "patch_size"}
    views = torch.rand(2, 1, 16, 16, 16)
    server_half = model.segment_encoded if kind == "privacynet" else model.segment_deformed
    with torch.no_grad():
        torch.testing.assert_close(hosted.segment_mixture(views), server_half(views), atol=0, rtol=0)


def test_a_baseline_model_is_refused(tmp_path):
    baseline = export_pretrained(BaselineSegmenter(LABELS, TINY_SEGMENTER, patch_size=16), tmp_path, "base")
    with pytest.raises(ValueError, match="is a 'baseline' model, which segments raw scans; the server hosts only"):
        HostedSegmenter.from_pretrained(str(baseline))


def test_a_server_of_another_kind_is_refused_before_anything_is_sent(models, transports):
    transport = transports["privacynet"]
    with ProxyClient(URL, models["deformproxy"], token=TOKEN, transport=transport) as client, \
            pytest.raises(InputError, match="hosts the segmenter of a 'privacynet' model but the local model is a "
                                            "'deformproxy' model"):
        client.segment(make_image(3))
    torch.manual_seed(0)
    mixpriv = MixupPrivacyModule(LABELS, TINY_SEGMENTER, TINY_UNMIXER, patch_size=16).eval()
    images, labels = zip(*(phantom(i) for i in range(2)))
    key = ReferenceBank.from_arrays(images, [(label > 0).astype(np.uint8) for label in labels], LABELS,
                                    ids=["ref-0", "ref-1"])
    with PrivateClient(URL, key, mixpriv, token=TOKEN, k=2, transport=transport) as client, \
            pytest.raises(InputError, match="'privacynet' model but the local model is a 'mixpriv' model"):
        client.segment(make_image(3))
    assert [path for _, path, _ in transport.requests] == ["/v1/model", "/v1/model"]
    with pytest.raises(InputError, match="not a compared system"):
        ProxyClient(URL, mixpriv, token=TOKEN, transport=transport)


def test_other_weights_on_the_server_are_warned_about(models, transports, caplog):
    model = models["privacynet"]
    other = PrivacyNetModule(**model.hparams).eval()
    other.load_state_dict(model.state_dict())
    other.model_card = {"name": "retrained", "files": {"model.safetensors": {"sha256": "0" * 64}}}
    with caplog.at_level(logging.WARNING), \
            ProxyClient(URL, other, token=TOKEN, transport=transports["privacynet"]) as client:
        client.server_info()
    assert "other weights (tiny-privacynet) than the local model (retrained): its encoder was trained" in caplog.text


@pytest.mark.parametrize("kind", KINDS)
def test_model_info_reports_the_kind_and_mixing_only_for_mixup_privacy(kind, apps):
    with TestClient(apps[kind]) as http:
        info = http.get("/v1/model", headers={"Authorization": f"Bearer {TOKEN}"}).json()
        assert http.get("/v1/model").status_code == 401
    assert info["kind"] == kind and info["labels"] == LABELS and info["inputs"]["patch_size"] == 16
    assert "mixing" not in info
    assert not {"files", "hparams", "bank", "default_bank"} & set(info)
    mixpriv = MixupPrivacyModule(LABELS, TINY_SEGMENTER, TINY_UNMIXER, patch_size=16)
    hosted = HostedSegmenter(mixpriv.segmenter, {"kind": "mixpriv", "labels": LABELS,
                                                 "hparams": dict(mixpriv.hparams)})
    assert tuple(hosted.info()["mixing"]["lambda_range"]) == tuple(mixpriv.hparams.lambda_range)


# ---------------------------------------------------------------- `mixpriv predict-compared`, in-process and served


def write_scan(path, image: torch.Tensor) -> None:
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = (-30.0, 12.0, 5.0)
    nib.save(nib.Nifti1Image(image[0].numpy().astype(np.float32), affine), str(path))


@pytest.mark.parametrize("kind", KINDS)
def test_predict_compared_segments_a_scan_here_or_through_the_server(kind, published, models, tmp_path, monkeypatch):
    transport = Recording(create_app(HostedSegmenter.from_pretrained(str(published[kind])), ServerConfig(token=TOKEN)))
    scan = tmp_path / "scan.nii.gz"
    write_scan(scan, make_image(4))
    runs = {}
    for where in ("here", "served"):
        out = {name: tmp_path / f"{where}-{name}.nii.gz" for name in ("seg", "prob", "view")}
        command = ["predict-compared", str(scan), "--model", str(published[kind]), "--seed", "5",
                   "--out", str(out["seg"]), "--probabilities", str(out["prob"]), "--view", str(out["view"])]
        if where == "served":
            monkeypatch.setattr(client_module, "ProxyClient",
                                functools.partial(ProxyClient, transport=transport))
            monkeypatch.setenv("MIXPRIV_SERVER_TOKEN", TOKEN)
            command += ["--server", URL]
        assert main(command) == 0
        runs[where] = {name: nib.load(str(path)) for name, path in out.items()}
    image = prepare_scan(scan, spacing=models[kind].hparams.input_spacing).image
    expected = ProxyPipeline(models[kind])(image, client_generator(5))
    reference = nib.load(str(scan))
    for where, written in runs.items():
        assert np.allclose(written["seg"].affine, reference.affine) and written["seg"].shape == reference.shape
        probabilities = torch.from_numpy(np.asarray(written["prob"].dataobj)).permute(3, 0, 1, 2)
        torch.testing.assert_close(probabilities, expected.probabilities, atol=ATOL if where == "served" else 1e-5,
                                   rtol=0)
        view = np.asarray(written["view"].dataobj)
        np.testing.assert_allclose(view, expected.view[0].numpy(), atol=1e-6)
        labels = np.asarray(written["seg"].dataobj)
        assert set(np.unique(labels)) == {0, 1}
    (sent,) = transport.sent_volumes()  # the served run sent the view, and only it
    np.testing.assert_allclose(sent[0], expected.view[0].numpy(), atol=1e-6)
    transport.app.close()


def test_predict_compared_refuses_other_models_and_writes_nothing(tmp_path):
    scan = tmp_path / "scan.nii.gz"
    write_scan(scan, make_image(5))
    baseline = export_pretrained(BaselineSegmenter(LABELS, TINY_SEGMENTER, patch_size=16), tmp_path, "base")
    out, before = tmp_path / "seg.nii.gz", scan.read_bytes()
    with pytest.raises(InputError, match="is a BaselineSegmenter, not a compared system"):
        cli_inference._predict_compared(build_parser().parse_args(
            ["predict-compared", str(scan), "--model", str(baseline), "--out", str(out)]))
    assert main(["predict-compared", str(scan), "--model", str(baseline), "--out", str(out)]) == 2
    assert not out.exists()
    assert main(["predict-compared", str(scan), "--model", str(baseline), "--out", str(scan)]) == 2  # never an input
    assert scan.read_bytes() == before
