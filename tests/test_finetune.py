"""Fine-tuning a published model on a tiny folder written by the test (same and different label sets)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import LABELS, TINY_SEGMENTER, TINY_UNMIXER, write_nnunet_folder

from mixpriv.cli import main
from mixpriv.hub import export_pretrained, load_pretrained_folder
from mixpriv.lightning.mixup import MixupPrivacyModule
from mixpriv.mixing.bank import ReferenceBank

SMALL = ["data.patch_size=16", "data.batch_size=2", "data.samples_per_volume=2", "data.queue_length=4",
         "data.num_workers=0", "data.val_samples_per_volume=1", "trainer.enable_progress_bar=false"]


@pytest.fixture()
def published(tmp_path):
    model = MixupPrivacyModule(LABELS, TINY_SEGMENTER, TINY_UNMIXER, patch_size=16)
    bank = ReferenceBank(torch.rand(2, 1, 24, 24, 24), torch.randint(0, 4, (2, 24, 24, 24)), LABELS)
    return export_pretrained(model, tmp_path / "zoo", "tiny-mixpriv", bank=bank, dtype=torch.float32), model


@pytest.mark.slow
def test_finetune_same_labels_with_frozen_encoder(tmp_path, published):
    folder, pretrained = published
    data = write_nnunet_folder(tmp_path / "ds")
    out = tmp_path / "run"
    assert main(["finetune", "--from", str(folder), "--data", str(data), "--out", str(out), "--max-steps", "3",
                 "--freeze-encoder", "--name", "tiny-finetuned", *SMALL]) == 0
    finetuned = load_pretrained_folder(out / "tiny-finetuned")
    card = json.loads((out / "tiny-finetuned" / "metadata.json").read_text())
    assert card["finetuned_from"] == str(folder) and card["frozen"] == ["segmenter.encoder"]
    assert finetuned.default_bank is not None  # labels unchanged: the demo bank still fits
    # The fine-tuned export stores float16: compare at that precision.
    before = {k: v.half() for k, v in pretrained.state_dict().items()}
    after = {k: v.half() for k, v in finetuned.state_dict().items()}
    encoder = [k for k in before if k.startswith("segmenter.encoder.")]
    decoder = [k for k in before if k.startswith("segmenter.decoder.") and k.endswith("weight")]
    assert decoder and any(k.endswith("running_mean") for k in encoder)
    assert all(torch.equal(before[k], after[k]) for k in encoder)  # weights and BatchNorm statistics
    assert any(not torch.equal(before[k], after[k]) for k in decoder)


@pytest.mark.slow
def test_finetune_a_new_unmixer_for_a_frozen_segmenter(tmp_path, published, caplog):
    folder, pretrained = published
    data = write_nnunet_folder(tmp_path / "ds")
    out = tmp_path / "run"
    new_unmixer = "model.unmixer={channels: [4, 8], context_scale: 2, refine_channels: 4}"
    assert main(["finetune", "--from", str(folder), "--data", str(data), "--out", str(out), "--max-steps", "3",
                 "--freeze", "segmenter", "--name", "tiny-new-unmixer", *SMALL, new_unmixer]) == 0
    finetuned = load_pretrained_folder(out / "tiny-new-unmixer")
    assert finetuned.unmixer.spec.refine_channels == 4
    before = {k: v.half() for k, v in pretrained.state_dict().items() if k.startswith("segmenter.")}
    after = finetuned.state_dict()
    assert all(torch.equal(value, after[k].half()) for k, value in before.items())
    assert main(["finetune", "--from", str(folder), "--data", str(data), "--out", str(tmp_path / "bad"),
                 "--freeze", "segmenter.nothing", *SMALL]) == 2
    assert "cannot freeze 'segmenter.nothing': the model has no such submodule" in caplog.text


@pytest.mark.slow
def test_finetune_to_another_label_set_makes_a_new_head(tmp_path, published, caplog):
    folder, pretrained = published
    three = {"background": 0, "grey": 1, "white": 2}
    data = write_nnunet_folder(tmp_path / "ds3", labels=three)
    # The phantom writes label values 0-3: fold CSF into background so the folder is valid.
    import nibabel as nib
    import numpy as np
    for path in list((data / "labelsTr").glob("*.nii.gz")) + list((data / "labelsTs").glob("*.nii.gz")):
        image = nib.load(str(path))
        labels = np.asarray(image.dataobj)
        nib.save(nib.Nifti1Image(np.clip(labels.astype(np.int16) - 1, 0, 2).astype(np.uint8), image.affine), str(path))
    out = tmp_path / "run3"
    with caplog.at_level(logging.WARNING):
        assert main(["finetune", "--from", str(folder), "--data", str(data), "--out", str(out), "--max-steps", "2",
                     "--name", "tiny-3", *SMALL]) == 0
    assert "differs from the model's" in caplog.text and "segmentation_head" in caplog.text
    finetuned = load_pretrained_folder(out / "tiny-3")
    assert finetuned.label_names == three
    assert finetuned.default_bank is None
    assert finetuned.segment_mixture(torch.rand(1, 1, 16, 16, 16)).shape[1] == 3
