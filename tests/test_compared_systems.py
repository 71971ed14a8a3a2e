"""The compared systems (Privacy-Net, Deformation-Proxy) through the library's own paths: a recipe trains from the
command line, the checkpoint loads as its kind, and the exported model folder rebuilds the same network."""

from __future__ import annotations

import pytest
import torch
from test_pairs import write_paired_folder

from mixpriv.cli import main
from mixpriv.hub import export_pretrained, load_pretrained_folder
from mixpriv.lightning.deformation_proxy import DeformationProxyModule
from mixpriv.lightning.privacy_net import PrivacyNetModule
from mixpriv.training import load_model

TINY_PAIRS = [
    "data.patch_size=16", "data.batch_size=2", "data.steps_per_epoch=2", "data.val_pairs=2", "data.num_workers=0",
    "trainer.max_steps=2", "trainer.check_val_every_n_epoch=1", "logger.kind=csv",
    "model.segmenter={encoder_name: mixpriv-light-8, encoder_depth: 3, decoder_channels: [16, 8, 8]}",
    "model.discriminator={channels: [4, 8]}",
]
TINY_ENCODER = ("model.encoder={architecture: Unet, encoder_name: mixpriv-light-8, encoder_depth: 2, "
                "decoder_channels: [8, 4], extra: {strides: [[2, 2, 2], [2, 2, 2]]}}")
TINY_DEFORMATION = "model.deformation={magnitude: 2.0, control_spacing: 8.0, channels: [4, 8]}"
SYSTEMS = {"tissue-privacynet": (PrivacyNetModule, [TINY_ENCODER]),
           "tissue-deformproxy": (DeformationProxyModule, [TINY_DEFORMATION])}


@pytest.mark.parametrize("recipe", sorted(SYSTEMS))
def test_a_compared_system_trains_from_its_recipe_loads_and_exports(recipe, tmp_path):
    module_class, overrides = SYSTEMS[recipe]
    data = write_paired_folder(tmp_path / "data")
    out = tmp_path / "run"
    assert main(["train", "--recipe", recipe, "--out", str(out), f"data.data_dir={data}", *TINY_PAIRS,
                 *overrides]) == 0
    model = load_model(out / "checkpoints" / "last.ckpt")
    assert type(model) is module_class
    folder = export_pretrained(model, tmp_path / "zoo", recipe, dtype=torch.float32)
    loaded = load_pretrained_folder(folder)
    assert type(loaded) is module_class and loaded.model_card["kind"] == recipe.removeprefix("tissue-")
    image = torch.rand(1, 1, 16, 16, 16)
    segment = (lambda m: m.segment_encoded(m.encode(image))) if module_class is PrivacyNetModule else (
        lambda m: m.segment_deformed(image))
    with torch.no_grad():
        torch.testing.assert_close(segment(loaded), segment(model))


def test_the_proxy_pipeline_reads_a_deformation_proxy_answer_back_onto_the_scans_grid():
    from mixpriv.inference.proxies import ProxyPipeline

    tiny = {"encoder_name": "mixpriv-light-8", "encoder_depth": 3, "decoder_channels": [16, 8, 8]}
    model = DeformationProxyModule({"background": 0, "fg": 1}, tiny, {"magnitude": 6.0, "control_spacing": 8.0,
                                                                      "learned": False}, {"channels": [4, 8]},
                                   patch_size=16).eval()
    image = torch.zeros(1, 24, 24, 24)
    image[:, 8:16, 6:18, 8:16] = 1.0
    # An oracle server that segments what it sees by thresholding: read back, it must land on the scan's box.
    pipeline = ProxyPipeline(model, segment_views=lambda view: torch.cat([1 - view, view]).clamp(0, 1))
    run = pipeline(image, torch.Generator().manual_seed(0))
    assert run.secret is not None and not torch.allclose(run.view, image)  # the server sees the scan deformed
    torch.testing.assert_close(run.probabilities.sum(0), torch.ones(24, 24, 24))
    truth, moved = image[0] > 0.5, run.view[0] > 0.5
    dice = lambda a, b: float(2 * (a & b).sum() / (a.sum() + b.sum()))
    restored, deformed = dice(run.labels.bool(), truth), dice(moved, truth)
    assert restored > 0.95 and deformed < restored - 0.1, (restored, deformed)
    second = pipeline(image, torch.Generator().manual_seed(1))
    assert not torch.allclose(second.view, run.view)  # a fresh key per scan
