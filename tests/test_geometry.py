"""Geometry by construction: keys record their space, scans and references meet in world coordinates."""

from __future__ import annotations

import json
import logging

import nibabel as nib
import numpy as np
import pytest
import torch
import torchio as tio
from conftest import AFFINE, LABELS, SHAPE, phantom, write_nnunet_folder
from safetensors.torch import save_file

from mixpriv.constants import IMAGE, MIX_REFERENCE_ID, REFERENCE_LABEL
from mixpriv.data.datamodule import bank_from_cases
from mixpriv.data.folder import DatasetFolder
from mixpriv.geometry import GridSpace, probabilities_onto, resample_into, subject_into
from mixpriv.inference.mixtures import mix_with_references
from mixpriv.inference.scans import TemplateSpace, check_key_for_model, prepare_scan
from mixpriv.mixing.bank import ReferenceBank, content_sha256
from mixpriv.mixing.transforms import Mix, RandomMix
from mixpriv.validation import InputError

SPACE = GridSpace(SHAPE, AFFINE)


def make_key(n: int = 3, patients: list[str] | None = None) -> ReferenceBank:
    images, labels = zip(*(phantom(10 + i) for i in range(n)))
    return ReferenceBank(torch.from_numpy(np.stack(images))[:, None], torch.from_numpy(np.stack(labels)).long(),
                         LABELS, [f"case{i}" for i in range(n)], SPACE, patients)


def shifted(affine: np.ndarray, voxels: tuple[int, int, int]) -> np.ndarray:
    """``affine`` with its origin moved by whole voxels along its own axes."""
    moved = affine.copy()
    moved[:3, 3] = affine[:3, :3] @ np.asarray(voxels, dtype=float) + affine[:3, 3]
    return moved


def test_grid_space_round_trips_and_compares_by_world_geometry():
    assert GridSpace.from_dict(json.loads(json.dumps(SPACE.to_dict()))) == SPACE
    assert SPACE.spacing == (2.0, 2.0, 2.0)
    assert GridSpace(SHAPE, shifted(AFFINE, (1, 0, 0))) != SPACE
    with pytest.raises(InputError, match="invertible"):
        GridSpace(SHAPE, np.zeros((4, 4)))
    with pytest.raises(InputError, match="not a grid description"):
        GridSpace.from_dict({"shape": [2, 2, 2]})


def test_resampling_goes_by_world_coordinates():
    volume = torch.arange(float(np.prod(SHAPE))).reshape(1, *SHAPE)
    crop = GridSpace((10, 12, 8), shifted(AFFINE, (3, 5, 7)))  # a sub-grid of SPACE, whole voxels in
    moved = resample_into(volume, SPACE, crop, label=False)
    torch.testing.assert_close(moved, volume[:, 3:13, 5:17, 7:15])
    labels = resample_into(volume.long(), SPACE, crop, label=True)
    assert labels.dtype == torch.long and torch.equal(labels, volume[:, 3:13, 5:17, 7:15].long())
    # Probabilities keep summing to one; where the target grid leaves the source, background is certain.
    probabilities = torch.softmax(torch.randn(4, *SHAPE), 0)
    larger = GridSpace((30, 24, 24), shifted(AFFINE, (-6, 0, 0)))
    onto = probabilities_onto(probabilities, SPACE, larger)
    torch.testing.assert_close(onto.sum(0), torch.ones(30, 24, 24))
    assert bool((onto[0, :6] == 1).all()) and bool((onto[1:, :6] == 0).all())
    torch.testing.assert_close(onto[:, 6:], probabilities)
    # A whole subject (what the evaluation and the audit score) goes onto the key's grid, labels and all.
    subject = tio.Subject(image=tio.ScalarImage(tensor=volume[:, 3:13, 5:17, 7:15], affine=crop.affine),
                          label=tio.LabelMap(tensor=volume[:, 3:13, 5:17, 7:15].long(), affine=crop.affine))
    placed = subject_into(subject, SPACE)
    assert GridSpace.of(placed["image"]) == SPACE and GridSpace.of(placed["label"]) == SPACE
    assert torch.equal(placed["label"].data[:, 3:13, 5:17, 7:15], subject["label"].data)
    assert subject_into(placed, SPACE) is placed and subject_into(subject, None) is subject


def test_a_key_records_its_space_and_patients(tmp_path):
    key = make_key(3, patients=["p0", "p0", "p1"])
    loaded = ReferenceBank.load(key.save(tmp_path / "key.mpk"))
    assert loaded.space == SPACE and loaded.patient_ids == ["p0", "p0", "p1"]
    tensors = {"images": key.images, "labels": key.labels}
    metadata = {"label_names": json.dumps(LABELS), "ids": json.dumps(key.ids), "patients": json.dumps(key.patient_ids)}
    moved_space = {**metadata, "space": json.dumps(GridSpace(SHAPE, shifted(AFFINE, (1, 0, 0))).to_dict())}
    assert content_sha256(tensors, {**metadata, "space": json.dumps(SPACE.to_dict())}) != content_sha256(
        tensors, moved_space)  # the recorded space is part of what the checksum protects
    with pytest.raises(InputError, match="lie on|voxels but their space"):
        ReferenceBank(key.images, key.labels, LABELS, space=GridSpace((8, 8, 8), AFFINE))


def test_a_key_saved_before_spaces_loads_with_a_warning_and_mixes_by_index(tmp_path, caplog):
    key = make_key(2)
    tensors = {"images": key.images, "labels": key.labels}
    metadata = {"format": "mixpriv-reference-bank", "format_version": "2", "label_names": json.dumps(LABELS),
                "ids": json.dumps(key.ids)}
    metadata["sha256"] = content_sha256(tensors, metadata)
    path = tmp_path / "old.mpk"
    save_file(tensors, str(path), metadata=metadata)
    path.chmod(0o600)
    with caplog.at_level(logging.WARNING):
        old = ReferenceBank.load(path)
    assert old.space is None and "does not record the grid" in caplog.text
    smaller = torch.rand(1, 20, 20, 20)  # by array index: the references are centre-cropped, as before
    assert mix_with_references(smaller, old, 2).mixtures.shape == (2, 1, 20, 20, 20)


def test_mixing_refuses_an_image_off_the_keys_grid():
    with pytest.raises(InputError, match="resample the scan into the key's space"):
        mix_with_references(torch.rand(1, 20, 20, 20), make_key(2), 1)


def test_bank_from_cases_places_every_reference_in_the_first_ones_space(tmp_path):
    root = write_nnunet_folder(tmp_path / "Dataset002_Fov", n_train=5, n_test=0)
    second = DatasetFolder(root).cases("train")[1]
    # The second reference is stored with another field of view: its array starts 4 voxels further on.
    image, label = (np.asanyarray(nib.load(str(path)).dataobj) for path in (second.image_paths[0], second.label_path))
    nib.save(nib.Nifti1Image(image[4:], shifted(AFFINE, (4, 0, 0))), str(second.image_paths[0]))
    nib.save(nib.Nifti1Image(label[4:], shifted(AFFINE, (4, 0, 0))), str(second.label_path))
    bank = bank_from_cases(DatasetFolder(root), "train", progress=False)
    assert bank.space == SPACE and bank.spatial_shape == SHAPE
    assert torch.equal(bank.labels[1, 4:], torch.from_numpy(label[4:]).long())  # in place, not centre-padded
    assert bool((bank.labels[1, :4] == 0).all())
    assert bank.patient_ids == bank.ids


def test_training_mixes_the_reference_where_the_subject_lies_and_never_its_patient():
    key = make_key(3, patients=["pA", "pA", "pB"])
    crop = GridSpace((16, 16, 16), shifted(AFFINE, (2, 4, 6)))
    target = tio.ScalarImage(tensor=torch.zeros(1, 16, 16, 16), affine=crop.affine)
    mixed = Mix(0.5, 2, key)(tio.Subject(image=target))
    expected = 0.5 * key.images[2][:, 2:18, 4:20, 6:22]
    torch.testing.assert_close(mixed[IMAGE].data, expected)
    reference_labels = mixed[REFERENCE_LABEL].data.argmax(0)
    assert torch.equal(reference_labels, key.labels[2, 2:18, 4:20, 6:22])

    subject = tio.Subject(image=tio.ScalarImage(tensor=key.images[0], affine=AFFINE), case_id="case0",
                          patient_id="pA")
    drawn = set()
    for seed in range(20):
        torch.manual_seed(seed)
        drawn.add(int(RandomMix(key, (0.6, 0.9))(subject)[MIX_REFERENCE_ID]))
    assert drawn == {2}  # case1 is the same patient's other scan


def test_prepare_scan_places_a_scan_by_its_affine_and_brings_results_back(tmp_path):
    key = make_key(3)
    image, _ = phantom(4)
    # Stored in another orientation and field of view: same anatomy, same world positions.
    stored = tio.ToOrientation("LPI")(tio.ScalarImage(tensor=torch.from_numpy(image[None, 2:, :22]),
                                                     affine=shifted(AFFINE, (2, 0, 0))))
    stored.save(tmp_path / "scan.nii.gz")
    prepared = prepare_scan(tmp_path / "scan.nii.gz", TemplateSpace.of_key(key))
    assert prepared.space == SPACE and prepared.overlap.aligned
    normalised = prepared.image[0, 2:, :22]
    reference = torch.from_numpy(image[2:, :22])
    assert torch.corrcoef(torch.stack([normalised.flatten(), reference.flatten()]))[0, 1] > 0.999
    # A result on the key's grid comes back onto the scan's voxels, in its orientation.
    probabilities = torch.softmax(torch.randn(4, *SHAPE) * 5, 0)
    labels = prepared.labels_to_native(probabilities)
    assert labels.shape == (1, *stored.spatial_shape) and labels.dtype == torch.uint8
    expected = tio.ToOrientation("LPI")(tio.LabelMap(tensor=probabilities.argmax(0)[None, 2:, :22].to(torch.uint8),
                                                     affine=shifted(AFFINE, (2, 0, 0)))).data
    assert torch.equal(labels.long(), expected.long())


def test_a_scan_off_the_keys_brain_is_refused_with_what_to_do():
    key = make_key(2)
    image, _ = phantom(5)
    far = tio.ScalarImage(tensor=torch.from_numpy(image[None]), affine=shifted(AFFINE, (12, 12, 0)))
    with pytest.raises(InputError, match=r"covers \d+% of the references' brain region.*Register it"):
        prepare_scan(far, TemplateSpace.of_key(key))
    with pytest.raises(InputError, match="registration needs a template space"):
        prepare_scan(far, None, register=True)


def test_a_key_of_another_voxel_size_is_refused_for_the_model():
    key = make_key(1)
    check_key_for_model(key, 4, 2.0)
    with pytest.raises(InputError, match="keygen --spacing 1"):
        check_key_for_model(key, 4, 1.0)
    with pytest.raises(InputError, match="4 labels but the model predicts 3"):
        check_key_for_model(key, 3, 2.0)


def test_without_a_space_results_still_come_back_onto_the_scans_voxels(tmp_path):
    image, _ = phantom(6, (30, 28, 26))
    scan = tio.ScalarImage(tensor=torch.from_numpy(image[None]), affine=np.diag([1.0, 1.0, 1.0, 1.0]))
    prepared = prepare_scan(scan, None, spacing=2.0)  # a baseline's path: canonical, resampled to 2 mm
    assert prepared.space.spacing == (2.0, 2.0, 2.0) and prepared.image.shape[1:] == (15, 14, 13)
    inside = (prepared.image > 0.45).float()
    probabilities = torch.cat([1 - inside, inside])
    labels = prepared.labels_to_native(probabilities)[0]
    assert labels.shape == (30, 28, 26)
    truth = torch.from_numpy(image > 0.45)
    agreement = float((labels.bool() == truth).float().mean())
    assert agreement > 0.9, agreement  # in place on the 1 mm grid, not squeezed into a corner
