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
