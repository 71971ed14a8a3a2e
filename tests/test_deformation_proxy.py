"""Deformation-Proxy: the key's reversible deformation, and its LightningModule on hand-made pair batches."""

from __future__ import annotations

import json
import math

import pytest
import pytorch_lightning as pl
import torch
from conftest import LABELS, TINY_SEGMENTER, phantom, write_nnunet_folder
from torch.utils.data import DataLoader

from mixpriv.constants import (
    PAIR_IMAGE_A,
    PAIR_IMAGE_B,
    PAIR_LABEL_A,
    PAIR_LABEL_B,
    PAIR_SAME_PATIENT,
)
from mixpriv.lightning.deformation_proxy import DeformationProxyModule
from mixpriv.proxies import (
    DeformationKey,
    DeformationSpec,
    FlowFieldGenerator,
    jacobian_determinant,
    key_fields,
    warp,
    warp_probabilities,
)

PATCH = 16
TINY_DEFORMATION = {"magnitude": 2.0, "control_spacing": 8.0, "smoothing": 2.0, "channels": [4]}
TINY_DISCRIMINATOR = {"channels": [4, 8]}


def smooth_image(shape=(32, 32, 32)) -> torch.Tensor:
    grid = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, n) for n in shape], indexing="ij"))
    return (torch.sin(3 * grid[0]) * torch.cos(2 * grid[1]) + grid[2])[None, None]


def dice(a: torch.Tensor, b: torch.Tensor, value: int) -> float:
    a, b = a == value, b == value
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def interior(volume: torch.Tensor, margin: int) -> torch.Tensor:
    return volume[..., margin:-margin, margin:-margin, margin:-margin]


# -- the deformation -----------------------------------------------------------------------------

def test_round_trip_returns_a_smooth_image_inside_the_field_of_view():
    image = smooth_image()
    forward, inverse = key_fields([DeformationKey(seed=3, magnitude=4.0)], image.shape[2:])
    deformed = warp(image, forward)
    restored = warp(deformed, inverse)
    margin = 5  # beyond the peak displacement, nothing was sampled from outside the volume
    assert float(interior(deformed - image, margin).abs().max()) > 0.3  # it did deform
    assert float(interior(restored - image, margin).abs().max()) < 0.02  # the image spans [-2, 2]


@pytest.mark.parametrize("magnitude", [2.0, 4.0, 6.0])
def test_label_maps_survive_the_round_trip(magnitude):
    _, label = phantom(0, shape=(32, 32, 32))
    label = torch.as_tensor(label, dtype=torch.long)[None]
    probabilities = torch.nn.functional.one_hot(label, 4).movedim(-1, 1).float()
    forward, inverse = key_fields([DeformationKey(seed=11, magnitude=magnitude)], label.shape[1:])
    deformed = warp_probabilities(probabilities, forward)
    restored = warp_probabilities(deformed, inverse)
    assert torch.allclose(restored.sum(1), torch.ones(1, 32, 32, 32))
    assert float((deformed.argmax(1) != label).float().mean()) > 0.005  # it did deform the labels
    for value in (1, 2, 3):
        assert dice(restored.argmax(1), label, value) >= 0.97, (magnitude, value)


def test_nearest_warp_keeps_integer_labels_and_refuses_bilinear():
    label = torch.randint(0, 4, (2, 1, 8, 8, 8))
    forward, _ = key_fields([DeformationKey(seed=0, magnitude=1.0, control_spacing=4.0)] * 2, (8, 8, 8))
    warped = warp(label, forward, mode="nearest")
    assert warped.dtype == torch.long and set(warped.unique().tolist()) <= {0, 1, 2, 3}
    with pytest.raises(ValueError, match="mode='nearest'"):
        warp(label, forward)


def test_warp_samples_at_x_plus_u_along_the_right_axis():
    image = torch.arange(6.0).view(1, 1, 6, 1, 1).expand(1, 1, 6, 3, 3)  # varies along D
    shift = torch.zeros(1, 3, 6, 3, 3)
    shift[:, 0] = 2.0
    assert warp(image, shift)[0, 0, :, 1, 1].tolist() == [2.0, 3.0, 4.0, 5.0, 5.0, 5.0]


def test_keys_are_deterministic_and_distinct():
    shape = (24, 24, 24)
    key = DeformationKey(seed=5, magnitude=3.0)
    assert torch.equal(key.velocity(shape), DeformationKey(seed=5, magnitude=3.0).velocity(shape))
    assert torch.equal(key_fields([key], shape)[0], key_fields([key], shape)[0])
    for other in (DeformationKey(seed=6, magnitude=3.0), DeformationKey(seed=5, magnitude=3.0, control_spacing=6.0)):
        assert float((key.velocity(shape) - other.velocity(shape)).abs().max()) > 0.5
    assert math.isclose(float(key.velocity(shape).abs().max()), 3.0, rel_tol=1e-5)


@pytest.mark.parametrize("magnitude", [2.0, 4.0, 8.0])
def test_fields_are_diffeomorphic(magnitude):
    keys = [DeformationKey(seed=seed, magnitude=magnitude) for seed in range(2)]
    forward, inverse = key_fields(keys, (28, 28, 28))
    assert float(jacobian_determinant(forward).min()) > 0
    assert float(jacobian_determinant(inverse).min()) > 0


def test_jacobian_determinant_detects_a_fold_and_keys_that_would_fold_are_refused():
    fold = torch.zeros(1, 3, 8, 8, 8)
    fold[:, 2] = -2.0 * torch.arange(8.0)  # x -> x - 2x along W: orientation reversed
    assert float(jacobian_determinant(fold).max()) < 0
    with pytest.raises(ValueError, match="would fold"):
        DeformationKey(seed=0, magnitude=20.0, control_spacing=2.0, smoothing=0.0, steps=0).velocity((16, 16, 16))


def test_bad_specs_are_refused_with_the_problem_named():
    with pytest.raises(ValueError, match="unknown keys"):
        DeformationSpec.from_dict({"magnitud": 3.0})
    with pytest.raises(ValueError, match="residual_magnitude 500 voxels could fold"):
        FlowFieldGenerator(DeformationSpec(residual_magnitude=500.0, steps=2))
    with pytest.raises(ValueError, match="seed"):
        DeformationKey(seed=-1)
    with pytest.raises(ValueError, match="discriminator spec"):
        DeformationProxyModule(LABELS, TINY_SEGMENTER, TINY_DEFORMATION, {"width": 3})


def test_a_trained_looking_generator_stays_invertible_and_diffeomorphic():
    torch.manual_seed(0)
    generator = FlowFieldGenerator(DeformationSpec(magnitude=3.0, channels=(4, 8)))
    for parameter in generator.parameters():
        torch.nn.init.normal_(parameter, std=1.0)  # saturates the correction at its bound
    image = smooth_image((24, 24, 24)).expand(2, 1, -1, -1, -1)
    keys = [DeformationSpec(magnitude=3.0).key(seed) for seed in (1, 2)]
    velocity = generator.velocity(image, keys)
    base = torch.stack([key.velocity((24, 24, 24)) for key in keys])
    assert float((velocity - base).abs().max()) > 0.5  # the network does change the field
    forward, inverse = generator(image, keys)
    assert float(jacobian_determinant(forward).min()) > 0
    restored = warp(warp(image, forward), inverse)
    assert float(interior(restored - image, 6).abs().max()) < 0.03


# -- the LightningModule --------------------------------------------------------------------------

def module(**kwargs) -> DeformationProxyModule:
    options = {"deformation": TINY_DEFORMATION, "discriminator": TINY_DISCRIMINATOR, "lr": 1e-2,
               "discriminator_lr": 1e-2, "patch_size": PATCH, **kwargs}
    return DeformationProxyModule(LABELS, TINY_SEGMENTER, **options)


def pair_samples(n: int = 4) -> list[dict]:
    """Hand-made pair samples: phantoms of patients 0..3, the same patient for every second pair."""
    samples = []
    for index in range(n):
        same = index % 2 == 0
        image_a, label_a = phantom(index, shape=(PATCH,) * 3)
        image_b, label_b = phantom(index if same else index + 10, shape=(PATCH,) * 3)
        samples.append({PAIR_IMAGE_A: torch.as_tensor(image_a)[None], PAIR_LABEL_A: torch.as_tensor(label_a).long()[None],
                        PAIR_IMAGE_B: torch.as_tensor(image_b)[None], PAIR_LABEL_B: torch.as_tensor(label_b).long()[None],
                        PAIR_SAME_PATIENT: float(same)})
    return samples


def fit(model: DeformationProxyModule, batches: int) -> pl.Trainer:
    torch.manual_seed(0)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, max_steps=batches, limit_val_batches=1,
                         num_sanity_val_steps=0)
    loader = DataLoader(pair_samples(), batch_size=2)
    trainer.fit(model, loader, loader)
    return trainer


def snapshot(part: torch.nn.Module) -> list[torch.Tensor]:
    return [parameter.detach().clone() for parameter in part.parameters()]


def changed(before: list[torch.Tensor], part: torch.nn.Module) -> bool:
    return any(not torch.equal(old, new) for old, new in zip(before, part.parameters()))


def test_training_updates_all_three_networks_and_counts_one_step_per_batch():
    model = module()
    before = {name: snapshot(getattr(model, name)) for name in ("generator", "segmenter", "discriminator")}
    trainer = fit(model, batches=2)
    assert trainer.global_step == 2  # one trainer step per batch, though both optimisers stepped
    assert trainer.fit_loop.epoch_loop.batch_progress.total.completed == 2
    for name, parameters in before.items():
        assert changed(parameters, getattr(model, name)), f"{name} did not train"
    assert all(math.isfinite(float(value)) for value in trainer.callback_metrics.values())
    assert 0 <= float(trainer.callback_metrics["val/discriminator_accuracy"]) <= 1
    # Both learning rates decay polynomially, stepped once per batch, to 0 at the last batch.
    assert [optimizer.param_groups[0]["lr"] for optimizer in trainer.optimizers] == [0.0, 0.0]


def test_the_discriminator_optimiser_never_updates_the_generator_or_segmenter():
    model = module(lr=0.0, poly_decay=False)  # the main optimiser moves nothing; only the discriminator's may
    _, discriminator = model.configure_optimizers()
    owned = {id(parameter) for group in discriminator.param_groups for parameter in group["params"]}
    assert owned == {id(parameter) for parameter in model.discriminator.parameters()}
    before = {name: snapshot(getattr(model, name)) for name in ("generator", "segmenter", "discriminator")}
    fit(model, batches=1)
    assert not changed(before["generator"], model.generator)
    assert not changed(before["segmenter"], model.segmenter)
    assert changed(before["discriminator"], model.discriminator)


def test_the_analytic_deformation_trains_the_segmenter_alone():
    model = module(deformation={**TINY_DEFORMATION, "learned": False})
    assert list(model.generator.parameters()) == []
    before = snapshot(model.segmenter)
    fit(model, batches=1)
    assert changed(before, model.segmenter)


def test_hparams_round_trip_rebuilds_the_same_model():
    model = module()
    torch.nn.init.normal_(model.generator.net[-1].weight, std=0.1)  # as if trained: the correction matters
    rebuilt = DeformationProxyModule(**model.hparams)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    image = torch.as_tensor(phantom(1, shape=(PATCH,) * 3)[0])[None, None]
    key = model.deformation_spec.key(123)
    model.eval()
    rebuilt.eval()
    with torch.no_grad():
        assert torch.allclose(model(image, key), rebuilt(image, key))


def test_the_chain_returns_probabilities_on_the_original_grid():
    model = module().eval()
    image = torch.rand(2, 1, PATCH, PATCH, PATCH)
    key = model.deformation_spec.key(9)
    with torch.no_grad():
        deformed, inverse = model.deform(image, key)
        assert float((deformed - image).abs().max()) > 0.05
        assert torch.equal(model.deform(image, key)[0], deformed)  # same key, same proxy
        assert not torch.equal(model.deform(image)[0], deformed)  # fresh keys differ
        probabilities = model.restore(model.segment_deformed(deformed), inverse)
    assert probabilities.shape == (2, len(LABELS), PATCH, PATCH, PATCH)
    assert torch.allclose(probabilities.sum(1), torch.ones(2, PATCH, PATCH, PATCH), atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(model(image, key), probabilities)
    with pytest.raises(ValueError, match="2 images but 3 deformation keys"):
        model.deform(image, [key] * 3)


def test_end_to_end_fit_on_the_paired_data_module(tmp_path):
    pairs = pytest.importorskip("mixpriv.data.pairs")
    root = write_nnunet_folder(tmp_path / "Dataset003_DeformPairs", n_train=7, n_test=0)
    meta = json.loads((root / "dataset.json").read_text())
    patients = {"case000": ("P0", "train"), "case001": ("P0", "train"), "case002": ("P1", "train"),
                "case003": ("P1", "train"), "case004": ("P2", "val"), "case005": ("P2", "val"),
                "case006": ("P3", "val")}
    meta["mixpriv"] = {"cases": {case: {"patient": patient, "split": split}
                                 for case, (patient, split) in patients.items()}}
    (root / "dataset.json").write_text(json.dumps(meta))
    datamodule = pairs.PairedPatchDataModule(data_dir=str(root), patch_size=PATCH, batch_size=2,
                                             steps_per_epoch=2, val_pairs=2)
    model = module()
    before = snapshot(model.generator)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, max_steps=2, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=datamodule)
    assert trainer.fit_loop.epoch_loop.batch_progress.total.completed == 2
    assert changed(before, model.generator)
    assert math.isfinite(float(trainer.callback_metrics["val/dice_mean"]))
