"""Domain randomisation (mixpriv.data.randomisation, .deformation, .synthesis) on tiny phantoms, CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchio as tio
import yaml

from mixpriv.data.randomisation import DomainRandomisation, RicianNoise, save_preview
from mixpriv.data.deformation import Atrophy, Warp
from mixpriv.data.synthesis import (
    RandomTissueIntensities,
    RemapIntensities,
    SynthesiseIntensities,
    SyntheticHead,
)
from mixpriv.validation import InputError

SHAPE = (32, 32, 32)
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
AFFINE[:3, 3] = [-31.0, -31.0, -31.0]
ALL_ON = {"p_atrophy": 1.0, "p_synthetic_head": 1.0, "p_gamma": 1.0, "p_bias": 1.0, "p_anisotropy": 1.0,
          "p_blur": 1.0, "p_motion": 1.0, "p_ghosting": 1.0, "p_noise": 1.0}
ALL_OFF = {name: 0.0 for name in (*ALL_ON, "p_warp", "p_synth")}


def brain_phantom(seed: int = 0) -> tio.Subject:
    """A 2 mm ball 'brain': sulcal CSF rim, GM shell, WM core, ventricle ball; T1-like intensities."""
    rng = np.random.default_rng(seed)
    radius = np.sqrt(((np.indices(SHAPE) - 15.5 + rng.uniform(-0.5, 0.5, (3, 1, 1, 1))) ** 2).sum(0)) * 2.0  # mm
    label = np.zeros(SHAPE, np.uint8)
    label[radius < 28] = 1
    label[radius < 26] = 2
    label[radius < 20] = 3
    label[radius < 7] = 1
    image = np.array([0.0, 0.3, 0.6, 0.9], np.float32)[label] + rng.normal(0, 0.02, SHAPE).astype(np.float32)
    return tio.Subject(image=tio.ScalarImage(tensor=torch.from_numpy(image.clip(0, 1))[None], affine=AFFINE),
                       label=tio.LabelMap(tensor=torch.from_numpy(label)[None], affine=AFFINE))


def randomise(settings: DomainRandomisation, seed: int, subject: tio.Subject | None = None) -> tio.Subject:
    torch.manual_seed(seed)
    return settings.build()(subject if subject is not None else brain_phantom())


@pytest.mark.parametrize("values", [{}, ALL_ON, {"p_synth": 1.0, "displacement_mm": [4.0, 2.0, 1.0],
                                                 "control_points": [4, 8, 16], "blur_mm": [0.5, 0.5]}])
def test_settings_round_trip_through_yaml(values):
    settings = DomainRandomisation.from_dict(values)
    again = DomainRandomisation.from_dict(yaml.safe_load(yaml.safe_dump(settings.to_dict())))
    assert again == settings
    assert isinstance(settings.control_points, tuple) and all(isinstance(n, int) for n in settings.control_points)
    assert DomainRandomisation.from_dict(None) == DomainRandomisation()
    assert DomainRandomisation.from_dict({"p_synth": np.float64(1.0), "cortical_atrophy_voxels": 3.0}).to_dict() == {
        **DomainRandomisation().to_dict(), "p_synth": 1.0, "cortical_atrophy_voxels": 3}


@pytest.mark.parametrize("values, field", [
    ({"p_synth": 1.5}, "p_synth"),
    ({"p_noise": "high"}, "p_noise"),
    ({"blur_mm": [2.0, 1.0]}, "blur_mm"),
    ({"noise_std": [0.1]}, "noise_std"),
    ({"synth_mean_range": "0, 1"}, "synth_mean_range"),
    ({"control_points": [5.5, 12]}, "control_points"),
    ({"rotation_degrees": -1.0}, "rotation_degrees"),
    ({"cortical_atrophy_voxels": True}, "cortical_atrophy_voxels"),
    ({"displacement_mm": [8.0]}, "displacement_mm"),
    ({"p_sinth": 0.5}, "p_sinth"),
    ({"rotation_degrees": [5.0, 10.0]}, "rotation_degrees"),
    ({"control_points": []}, "control_points"),
])
def test_settings_reject_bad_values_naming_the_field(values, field):
    with pytest.raises(InputError, match=field):
        DomainRandomisation.from_dict(values)


def test_settings_must_be_a_mapping():
    with pytest.raises(InputError, match="mapping"):
        DomainRandomisation.from_dict([("p_synth", 1.0)])


@pytest.mark.parametrize("values", [{}, ALL_ON, {**ALL_ON, "p_synth": 1.0}])
def test_keeps_grid_labels_and_intensity_range(values):
    subject = brain_phantom()
    for seed in range(3):
        out = randomise(DomainRandomisation.from_dict(values), seed, subject)
        for key in ("image", "label"):
            assert out[key].shape == subject[key].shape
            np.testing.assert_allclose(out[key].affine, AFFINE)
        assert out["label"].data.dtype == torch.uint8
        assert set(out["label"].data.unique().tolist()) <= {0, 1, 2, 3}
        image = out["image"].data
        assert torch.isfinite(image).all() and image.min() >= 0 and image.max() <= 1
    assert torch.equal(subject["image"].data, brain_phantom()["image"].data)  # the input is not modified


def test_deterministic_under_manual_seed_and_different_across_seeds():
    settings = DomainRandomisation.from_dict(ALL_ON)
    first, again, other = randomise(settings, 7), randomise(settings, 7), randomise(settings, 8)
    assert torch.equal(first["image"].data, again["image"].data)
    assert torch.equal(first["label"].data, again["label"].data)
    assert not torch.equal(first["image"].data, other["image"].data)
    assert not torch.equal(first["label"].data, other["label"].data)


def test_other_images_of_the_subject_are_left_alone():
    subject = brain_phantom()
    reference = torch.rand(1, *SHAPE)
    subject.add_image(tio.ScalarImage(tensor=reference.clone(), affine=AFFINE), "reference_image")
    out = randomise(DomainRandomisation.from_dict(ALL_ON), 0, subject)
    assert torch.equal(out["reference_image"].data, reference)


def test_needs_image_and_label():
    subject = tio.Subject(image=tio.ScalarImage(tensor=torch.rand(1, 8, 8, 8)))
    with pytest.raises(InputError, match="'label'"):
        Atrophy(cortical_voxels=1, region_fraction=1.0)(subject)


def test_identity_warp_changes_nothing_and_a_warp_keeps_image_and_label_aligned():
    subject = brain_phantom()
    same = Warp()(subject)
    torch.testing.assert_close(same["image"].data, subject["image"].data, atol=1e-5, rtol=0)
    assert torch.equal(same["label"].data, subject["label"].data)
    subject["image"].set_data(subject["label"].data.float())  # intensity == label value
    warped = Warp((8.0, -5.0, 3.0), (1.1, 0.9, 1.0), (6.0, 2.0), (5, 12), seed=3)(subject)
    assert not torch.equal(warped["label"].data, subject["label"].data)
    agree = (warped["image"].data.round() == warped["label"].data.float()).float().mean()
    assert agree > 0.95


def test_atrophy_grows_csf_into_tissue_only():
    subject = brain_phantom()
    before = subject["label"].data.clone()
    out = Atrophy(cortical_voxels=2, ventricle_voxels=2, region_fraction=0.5, seed=0)(subject)
    after = out["label"].data
    grown = (after == 1) & (before != 1)
    assert grown.sum() > 0
    assert torch.equal(after != before, grown)  # only CSF is created, only from GM/WM
    assert set(before[grown].unique().tolist()) <= {2, 3}
    assert torch.equal(after > 0, before > 0)  # brain mask unchanged
    csf_mean = float(subject["image"].data[before == 1].mean())
    assert abs(float(out["image"].data[grown].mean()) - csf_mean) < 0.05  # the image follows the labels
    ventricles_only = Atrophy(ventricle_voxels=1, seed=0)(brain_phantom())["label"].data
    assert ((ventricles_only == 1) & (before != 1)).sum() > 0


def test_synthesis_draws_per_label_intensities_aligned_with_labels():
    subject = brain_phantom()
    label = subject["label"].data
    out = SynthesiseIntensities(means=(0.9, 0.1, 0.5), stds=(0.01, 0.01, 0.01), seed=1)(subject)
    for value, mean in enumerate((0.0, 0.9, 0.1, 0.5)):
        assert abs(float(out["image"].data[label == value].mean()) - mean) < 0.01
    torch.manual_seed(3)
    drawn = RandomTissueIntensities(p_synth=1.0, partial_volume_mm=(0.0, 0.0))(brain_phantom())
    means = next(t for t in drawn.history if isinstance(t, SynthesiseIntensities)).means
    measured = [float(drawn["image"].data[label == value].mean()) for value in (1, 2, 3)]
    np.testing.assert_allclose(measured, means, atol=0.02)


def test_remap_scales_each_tissue_and_keeps_the_background():
    subject = brain_phantom()
    label, image = subject["label"].data, subject["image"].data.clone()
    out = RemapIntensities(scales=(2.0, 0.5, 1.0), gammas=(1.0, 1.0, 1.0))(subject)["image"].data
    core = ((torch.from_numpy(np.indices(SHAPE)) - 15.5) ** 2).sum(0)[None] < 2 ** 2  # inside the ventricle
    assert abs(float(out[core].mean()) / float(image[core].mean()) - 2.0) < 0.05
    torch.testing.assert_close(out[label == 0], image[label == 0].clamp(min=0), atol=0.02, rtol=0)


def test_synthetic_head_paints_outside_the_brain_labelled_background():
    subject = brain_phantom()
    brain = subject["label"].data > 0
    out = SyntheticHead(thickness_mm=(2.0, 4.0, 4.0), intensity=(0.1, 1.0), n_blobs=2, seed=0)(subject)
    assert torch.equal(out["label"].data, subject["label"].data)
    assert torch.equal(out["image"].data[brain], subject["image"].data[brain])
    assert (out["image"].data[~brain] > 0.2).sum() > 100
    settings = DomainRandomisation.from_dict({**ALL_OFF, "p_synthetic_head": 1.0})
    plain, head = randomise(DomainRandomisation.from_dict(ALL_OFF), 0), randomise(settings, 0)
    assert torch.equal(head["label"].data, plain["label"].data)
    assert float(head["image"].data[~brain].max()) > 0.1 and float(plain["image"].data[~brain].max()) < 0.1


def test_rician_noise_is_non_negative_and_seeded():
    image = tio.ScalarImage(tensor=torch.zeros(1, 8, 8, 8))
    first, again = RicianNoise(0.1, seed=2)(image).data, RicianNoise(0.1, seed=2)(image).data
    assert torch.equal(first, again) and first.min() >= 0 and first.mean() > 0.05


def test_save_preview_writes_a_png(tmp_path):
    path = save_preview(tmp_path / "preview.png", seed=0, n=2, subject=brain_phantom())
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
