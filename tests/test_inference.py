"""Whole-volume inference: patch grid, the private pipeline (mix / segment / unmix / TTA), NIfTI I/O."""

from __future__ import annotations

import json
import shutil
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torchio as tio
from conftest import LABELS, TINY_SEGMENTER, TINY_UNMIXER, phantom

from mixpriv.constants import IMAGE
from mixpriv.data.preprocessing import preprocessing
from mixpriv.hub import from_pretrained
from mixpriv.inference import pipeline as pipeline_module
from mixpriv.inference.grid import PatchGrid, sliding_window
from mixpriv.inference.mixtures import Mixtures, draw_lambdas, mix_with_references
from mixpriv.inference.pipeline import (
    PrivatePipeline,
    PrivateSegmentation,
    segment_mixtures,
)
from mixpriv.inference.volume import (
    load_scan,
    save_like,
    segment_volume,
    to_original_grid,
)
from mixpriv.lightning.mixup import MixupPrivacyModule
from mixpriv.lightning.tta import TTAEnsembler
from mixpriv.mixing import ReferenceBank, mix, naive_unmix, one_hot
from mixpriv.mixing.settings import MixingSettings
from mixpriv.validation import InputError

NUM_CLASSES = len(LABELS)


def n_grid_patches(shape, patch_size: int, overlap: int | None) -> int:
    return len(PatchGrid(shape, patch_size, overlap))


def naive_of(mixed: torch.Tensor, mixtures: Mixtures) -> torch.Tensor:
    """Naive unmixing (Eq. 4, projected) of given mixed probabilities, through the pipeline's remote path."""
    pipeline = PrivatePipeline(mixtures.num_classes, segment_volumes=lambda _: mixed)
    return pipeline.run(mixtures, ("naive",))["naive"].per_reference


# ----------------------------------------------------------------------------- sliding window


@pytest.mark.parametrize("shape, patch_size", [
    ((17, 9, 23), 8),  # odd sides, not multiples of the patch stride
    ((5, 6, 7), 16),  # smaller than one patch on every side
    ((3, 20, 11), 8),  # smaller than a patch on one side only
    ((16, 16, 16), 16),  # exactly one patch
])
@pytest.mark.parametrize("mode", ["hann", "average"])
def test_sliding_window_reproduces_identity(shape, patch_size, mode):
    x = torch.rand(2, *shape, generator=torch.Generator().manual_seed(0))
    out = sliding_window(lambda b: b["x"], {"x": x}, patch_size, overlap_mode=mode)
    assert out.shape == x.shape
    torch.testing.assert_close(out, x, atol=1e-5, rtol=0)


def test_sliding_window_combines_named_volumes_and_changes_channels():
    generator = torch.Generator().manual_seed(1)
    a, b = torch.rand(1, 13, 10, 9, generator=generator), torch.rand(2, 13, 10, 9, generator=generator)

    def fn(patches):
        return torch.cat([patches["a"] * patches["b"][:, :1], patches["b"].sum(1, keepdim=True), patches["a"] ** 2], 1)

    out = sliding_window(fn, {"a": a, "b": b}, patch_size=8, overlap=4, batch_size=3)
    assert out.shape == (3, 13, 10, 9)
    torch.testing.assert_close(out, torch.cat([a * b[:1], b.sum(0, keepdim=True), a ** 2]), atol=1e-5, rtol=0)


def test_sliding_window_batches_patches():
    shapes = []

    def fn(patches):
        shapes.append(tuple(patches["x"].shape))
        return patches["x"]

    x = torch.rand(1, 20, 20, 12)
    sliding_window(fn, {"x": x}, patch_size=8, overlap=4, batch_size=3)
    n = n_grid_patches((20, 20, 12), 8, 4)
    assert len(shapes) == math.ceil(n / 3)
    assert sum(s[0] for s in shapes) == n
    assert all(s[1:] == (1, 8, 8, 8) for s in shapes)


def test_sliding_window_rejects_bad_volumes():
    with pytest.raises(InputError, match="at least one volume"):
        sliding_window(lambda b: b, {}, 8)
    with pytest.raises(InputError, match=r"volume 'x' must be \(C, D, H, W\)"):
        sliding_window(lambda b: b["x"], {"x": torch.zeros(8, 8, 8)}, 8)
    with pytest.raises(InputError, match="share their spatial shape"):
        sliding_window(lambda b: b["x"], {"x": torch.zeros(1, 8, 8, 8), "y": torch.zeros(1, 8, 8, 9)}, 8)


def test_segment_volume_applies_the_segmenter_on_the_grid():
    image = torch.rand(1, 11, 19, 10)
    out = segment_volume(lambda x: torch.cat([x, 1 - x], 1), image, patch_size=8)
    torch.testing.assert_close(out, torch.cat([image, 1 - image]), atol=1e-5, rtol=0)


def torchio_sliding_window(fn, volume: torch.Tensor, patch_size: int, overlap: int, mode: str) -> torch.Tensor:
    """The grid inference mixpriv used before its own grid: TorchIO's GridSampler and GridAggregator."""
    subject = tio.Subject(x=tio.ScalarImage(tensor=volume))
    sampler = tio.GridSampler(subject, patch_size, overlap)
    aggregator = tio.inference.GridAggregator(sampler, overlap_mode=mode)
    for batch in torch.utils.data.DataLoader(sampler, batch_size=3):
        aggregator.add_batch(fn(batch["x"][tio.DATA]), batch[tio.LOCATION])
    return aggregator.get_output_tensor()


@pytest.mark.parametrize("shape, patch_size, overlap", [((84, 48, 120), 48, 12), ((20, 32, 14), 8, 2)])
@pytest.mark.parametrize("mode", ["hann", "average"])
def test_sliding_window_equals_torchios_aggregator_on_the_same_patches(shape, patch_size, overlap, mode):
    """Where both grids place the same patches, the stitched outputs agree to float rounding (1e-5)."""
    grid = PatchGrid(shape, patch_size, overlap)
    torchio_starts = {tuple(int(i) for i in location[:3]) for location in tio.GridSampler(
        tio.Subject(x=tio.ScalarImage(tensor=torch.zeros(1, *shape))), patch_size, overlap).locations}
    assert set(grid.starts) == torchio_starts
    x = torch.rand(1, *shape, generator=torch.Generator().manual_seed(1))
    weights = torch.rand(3, 1, 1, 1, 1, generator=torch.Generator().manual_seed(2))

    def fn(patches):  # a non-local function of the patch, so that overlapping patches disagree
        return torch.cat([patches.tanh() * w + patches.mean() for w in weights], 1)

    ours = sliding_window(lambda b: fn(b["x"]), {"x": x}, patch_size, overlap, batch_size=3, overlap_mode=mode)
    torch.testing.assert_close(ours, torchio_sliding_window(fn, x, patch_size, overlap, mode), atol=1e-5, rtol=0)


@pytest.mark.parametrize("size, patch, overlap", [(88, 48, 6), (104, 48, 6), (88, 48, 12), (48, 48, 6), (49, 48, 0),
                                                  (17, 8, 4), (200, 48, 24)])
def test_grid_starts_cover_the_side_with_the_fewest_patches_and_at_least_the_overlap(size, patch, overlap):
    from mixpriv.inference.grid import grid_starts

    starts = grid_starts(size, patch, overlap)
    assert starts[0] == 0 and starts[-1] == size - patch and starts == sorted(set(starts))
    assert all(b - a <= patch - overlap for a, b in zip(starts, starts[1:]))  # neighbours share >= overlap voxels
    n = len(starts)
    assert n == 1 or (n - 1) * patch - (n - 2) * overlap < size  # one patch fewer could not cover the side


def test_default_grid_of_the_cohort_volume_has_as_many_patches_as_torchios():
    assert len(PatchGrid((88, 104, 88), 48)) == 27 and len(PatchGrid((88, 104, 88), 48, overlap=6)) == 12


# ----------------------------------------------------------------------------- private pipeline


def make_bank(n: int = 3, shape=(20, 20, 20)) -> ReferenceBank:
    images, labels = zip(*[phantom(50 + i, shape) for i in range(n)])
    return ReferenceBank.from_arrays(images, labels, LABELS)


def test_mix_with_references_matches_the_bank():
    bank = make_bank(3, shape=(20, 20, 20))
    image = torch.from_numpy(phantom(0, (20, 20, 20))[0])[None]
    lambdas = torch.tensor([0.9, 0.7])
    mixtures = mix_with_references(image, bank, 2, reference_indices=[2, 0], lambdas=lambdas)
    assert mixtures.mixtures.shape == (2, 1, 20, 20, 20)
    assert mixtures.reference_probabilities().shape == (2, NUM_CLASSES, 20, 20, 20)
    assert mixtures.reference_labels.shape == (2, 1, 20, 20, 20) and mixtures.reference_labels.dtype == torch.uint8
    assert mixtures.reference_indices == [(2,), (0,)]
    for k, (index, lam) in enumerate(zip([2, 0], lambdas)):
        reference_image, reference_one_hot = bank.get(index)
        torch.testing.assert_close(mixtures.mixtures[k], lam * image + (1 - lam) * reference_image)
        torch.testing.assert_close(mixtures.reference_probabilities(k), reference_one_hot)
    drawn = mix_with_references(image, bank, 3, MixingSettings((0.6, 0.8)), torch.Generator().manual_seed(0))
    assert sorted(drawn.reference_indices) == [(0,), (1,), (2,)]
    assert bool(((drawn.lambdas >= 0.6) & (drawn.lambdas <= 0.8)).all())
    again = mix_with_references(image, bank, 3, MixingSettings((0.6, 0.8)), torch.Generator().manual_seed(0))
    assert torch.equal(again.mixtures, drawn.mixtures) and again.reference_indices == drawn.reference_indices


def test_mix_with_references_single_reference_draws_are_pinned():
    """Values recorded before K-way mixing existed: the single-reference random stream must not change."""
    bank = make_bank(4, shape=(20, 20, 20))
    image = torch.from_numpy(phantom(0, (20, 20, 20))[0])[None]
    generator = torch.Generator().manual_seed(5)
    mixtures = mix_with_references(image, bank, 3, MixingSettings((0.6, 0.8)), generator)
    assert mixtures.reference_indices == [(3,), (1,), (0,)] and torch.equal(mixtures.reference_weights, torch.ones(3, 1))
    assert mixtures.lambdas.tolist() == [0.7639854550361633, 0.784020721912384, 0.6233290433883667]
    assert torch.rand(1, generator=generator).item() == 0.16439151763916016  # no extra draw
    for k, index in enumerate([3, 1, 0]):
        reference_image, reference_one_hot = bank.get(index)
        assert torch.equal(mixtures.mixtures[k], mix(image, reference_image, float(mixtures.lambdas[k])))
        assert torch.equal(mixtures.reference_probabilities(k), reference_one_hot)


def test_mix_with_references_rejects_bad_inputs():
    bank = make_bank(2)
    with pytest.raises(InputError, match=r"\(1, D, H, W\)"):
        mix_with_references(torch.zeros(20, 20, 20), bank, 2)
    bad = torch.zeros(1, 20, 20, 20)
    bad[0, 1, 1, 1] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        mix_with_references(bad, bank, 2)
    with pytest.raises(InputError, match="at least 1"):
        mix_with_references(torch.zeros(1, 20, 20, 20), bank, 0)
    with pytest.raises(InputError, match="lambda range"):
        draw_lambdas(3, (0.0, 0.5))
    with pytest.raises(InputError, match="2 lambdas"):
        mix_with_references(torch.zeros(1, 20, 20, 20), bank, 2, reference_indices=[0, 1], lambdas=torch.ones(3))
    with pytest.raises(InputError, match="lambda must lie"):
        mix_with_references(torch.zeros(1, 20, 20, 20), bank, 2, reference_indices=[0, 1], lambdas=torch.zeros(2))


def test_mix_with_references_kway_is_the_weighted_sum_of_distinct_references():
    bank = make_bank(5, shape=(20, 20, 20))
    image = torch.from_numpy(phantom(0, (20, 20, 20))[0])[None]
    kway = MixingSettings((0.6, 0.8), references_per_mix=3)
    mixtures = mix_with_references(image, bank, 4, kway, torch.Generator().manual_seed(1))
    assert mixtures.mixtures.shape == (4, 1, 20, 20, 20)
    assert mixtures.reference_probabilities().shape == (4, NUM_CLASSES, 20, 20, 20)
    assert mixtures.reference_weights.shape == (4, 3)
    assert len(mixtures.reference_indices) == 4 and all(len(set(refs)) == 3 for refs in mixtures.reference_indices)
    for k, (refs, weights, lam) in enumerate(zip(mixtures.reference_indices, mixtures.reference_weights,
                                                  mixtures.lambdas)):
        assert bool((weights >= 0).all()) and float(lam + (1 - lam) * weights.sum()) == pytest.approx(1, abs=1e-6)
        images, labels = zip(*(bank.get(i) for i in refs))
        expected = lam * image + (1 - lam) * sum(w * r for w, r in zip(weights, images))
        torch.testing.assert_close(mixtures.mixtures[k], expected)
        torch.testing.assert_close(mixtures.reference_probabilities(k), sum(w * y for w, y in zip(weights, labels)))
    # Given references and weights replay the mixtures exactly.
    replay = mix_with_references(image, bank, 4, kway, reference_indices=mixtures.reference_indices,
                                 lambdas=mixtures.lambdas, reference_weights=mixtures.reference_weights)
    assert torch.equal(replay.mixtures, mixtures.mixtures)
    again = mix_with_references(image, bank, 4, kway, torch.Generator().manual_seed(1))
    assert again.reference_indices == mixtures.reference_indices
    assert torch.equal(again.reference_weights, mixtures.reference_weights)


def test_kway_naive_unmixing_of_perfect_mixed_labels_recovers_the_target():
    bank = make_bank(4, shape=(12, 12, 12))
    target = one_hot(torch.randint(0, NUM_CLASSES, (1, 12, 12, 12), generator=torch.Generator().manual_seed(2)),
                     NUM_CLASSES)[0]
    mixtures = mix_with_references(torch.rand(1, 12, 12, 12), bank, 3, MixingSettings((0.6, 0.9), references_per_mix=3),
                                   torch.Generator().manual_seed(3))
    lambdas = mixtures.lambdas.reshape(-1, 1, 1, 1, 1)
    reference = mixtures.reference_probabilities()
    perfect = lambdas * target + (1 - lambdas) * reference  # what an exact server would return
    unmixed = naive_of(perfect, mixtures)
    torch.testing.assert_close(unmixed, target.expand(3, -1, -1, -1, -1), atol=1e-5, rtol=0)
    torch.testing.assert_close(naive_unmix(perfect, reference, mixtures.lambdas),
                               target.expand(3, -1, -1, -1, -1), atol=1e-5, rtol=0)


def test_mix_with_references_rejects_bad_kway_settings():
    bank = make_bank(3)
    image = torch.zeros(1, 20, 20, 20)
    with pytest.raises(InputError, match="between 1 and 2"):
        mix_with_references(image, bank, 2, MixingSettings(references_per_mix=3))
    with pytest.raises(InputError, match="at least 1"):
        MixingSettings(references_per_mix=0)
    with pytest.raises(InputError, match="dirichlet_alpha"):
        MixingSettings(references_per_mix=2, dirichlet_alpha=0)
    two = MixingSettings(references_per_mix=2)
    with pytest.raises(InputError, match="references_per_mix = 2 reference indices"):
        mix_with_references(image, bank, 2, two, reference_indices=[(0, 1), (2,)])
    with pytest.raises(InputError, match=r"shape \(2, 2\)"):
        mix_with_references(image, bank, 2, two, reference_indices=[(0, 1), (1, 2)], reference_weights=torch.ones(2, 1))
    with pytest.raises(InputError, match="distinct"):
        mix_with_references(image, bank, 2, two, reference_indices=[(0, 0), (1, 2)])


def test_segment_mixtures_sends_batches_of_patches_of_all_k_mixtures():
    k, shape, patch, overlap, batch_size = 3, (19, 21, 17), 8, 4, 2
    mixtures = torch.rand(k, 1, *shape, generator=torch.Generator().manual_seed(0))
    calls = []

    def segment(x):
        calls.append(tuple(x.shape))
        return torch.cat([x, x ** 2 + 1], 1)  # per voxel, two "classes"

    out = segment_mixtures(segment, mixtures, patch, overlap, batch_size)
    assert out.shape == (k, 2, *shape)
    n = n_grid_patches(shape, patch, overlap)
    assert len(calls) == math.ceil(n * k / batch_size)
    assert sum(c[0] for c in calls) == n * k
    assert all(c[0] <= batch_size and c[1:] == (1, patch, patch, patch) for c in calls)
    # Each mixture's output lands in its own slot: no mixing-up of the K axis and the class axis.
    torch.testing.assert_close(out[:, 0], mixtures[:, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[:, 1], mixtures[:, 0] ** 2 + 1, atol=1e-5, rtol=0)


def test_naive_unmixing_with_a_perfect_server_recovers_the_target():
    """The server returns exactly the mixed one-hot labels; naive unmixing must give back the target."""
    shape, k = (19, 21, 17), 3
    generator = torch.Generator().manual_seed(3)
    target = torch.randint(0, NUM_CLASSES, shape, generator=generator)
    # Reference k: zero image, constant label c_k. The target's intensity is its label value, so a
    # mixture voxel m = lam_k * y determines y; the server knows lam_k (it is "perfect"), and which
    # mixture it is looking at from its position in the batch (all K of a patch come together).
    reference_labels = [1, 3, 0]
    bank = ReferenceBank(torch.zeros(k, 1, *shape),
                         torch.stack([torch.full(shape, c) for c in reference_labels]), LABELS)
    lambdas = torch.tensor([0.9, 0.6, 0.75])
    mixtures = mix_with_references(target.float()[None], bank, k, reference_indices=[0, 1, 2], lambdas=lambdas)
    served = []

    def perfect_server(x):
        out = []
        for mixture in x:
            j = len(served) % k  # patches come position by position, the K mixtures of a position in order
            served.append(j)
            decoded = mixture[0] / lambdas[j]
            assert torch.allclose(decoded, decoded.round(), atol=1e-4), "mixture order within the batch is wrong"
            y = one_hot(decoded.round().long()[None], NUM_CLASSES)[0]
            y_r = torch.zeros_like(y)
            y_r[reference_labels[j]] = 1
            out.append(lambdas[j] * y + (1 - lambdas[j]) * y_r)
        return torch.stack(out)

    mixed = segment_mixtures(perfect_server, mixtures.mixtures, patch_size=8, overlap=4)
    expected_mixed = torch.stack([
        lambdas[j] * one_hot(target[None], NUM_CLASSES)[0] + (1 - lambdas[j]) * mixtures.reference_probabilities(j)
        for j in range(k)
    ])
    torch.testing.assert_close(mixed, expected_mixed, atol=1e-5, rtol=0)
    unmixed = naive_of(mixed, mixtures)
    assert unmixed.shape == (k, NUM_CLASSES, *shape)
    target_one_hot = one_hot(target[None], NUM_CLASSES)[0]
    for j in range(k):
        torch.testing.assert_close(unmixed[j], target_one_hot, atol=1e-4, rtol=0)
    result = PrivateSegmentation(unmixed)
    assert torch.equal(result.labels, target)
    assert float(result.variance.max()) < 1e-6


def test_remote_learned_unmixing_calls_the_unmixer_with_each_mixtures_reference_and_lambda():
    k, c, shape = 2, NUM_CLASSES, (10, 9, 12)
    generator = torch.Generator().manual_seed(4)
    mixed = torch.softmax(torch.randn(k, c, *shape, generator=generator), 1)
    labels = torch.randint(0, c, (k, 1, *shape), generator=generator).to(torch.uint8)
    reference = one_hot(labels[:, 0], c)
    lambdas = torch.tensor([0.7, 0.9])
    mixtures = Mixtures(torch.zeros(k, 1, *shape), labels, lambdas, [(0,), (1,)], torch.ones(k, 1), c)
    seen = []

    def unmixer(m, r, lam):
        seen.append(lam.clone())
        assert m.shape[0] == r.shape[0] == lam.shape[0]
        return m * lam.reshape(-1, 1, 1, 1, 1) + r  # depends on lambda and on both inputs, per voxel

    pipeline = PrivatePipeline(c, segment_volumes=lambda _: mixed, unmix=unmixer, patch_size=8, overlap=4)
    out = pipeline.run(mixtures)["learned"].per_reference
    assert out.shape == (k, c, *shape)
    expected = mixed * lambdas.reshape(-1, 1, 1, 1, 1) + reference
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    assert all(torch.equal(lam.reshape(-1, k), lambdas.expand(lam.numel() // k, k)) for lam in seen)
    with pytest.raises(InputError, match="needs an unmixer"):
        PrivatePipeline(c, segment_volumes=lambda _: mixed).run(mixtures)
    with pytest.raises(InputError, match="unknown unmixing method"):
        pipeline.run(mixtures, ("magic",))
    with pytest.raises(InputError, match="one segmenter"):
        PrivatePipeline(c)


def test_private_segmentation_mean_variance_first():
    per_reference = torch.softmax(torch.randn(5, 3, 4, 5, 6, generator=torch.Generator().manual_seed(5)), 1)
    result = PrivateSegmentation(per_reference)
    manual_mean = sum(per_reference[k] for k in range(5)) / 5
    manual_var = sum((per_reference[k] - manual_mean) ** 2 for k in range(5)) / 5
    torch.testing.assert_close(result.probabilities, manual_mean)
    torch.testing.assert_close(result.variance, manual_var)
    assert torch.equal(result.labels, manual_mean.argmax(0))
    first = result.first(2)
    assert first.per_reference.shape == (2, 3, 4, 5, 6)
    torch.testing.assert_close(first.probabilities, (per_reference[0] + per_reference[1]) / 2)
    torch.testing.assert_close(first.variance, (per_reference[0] - per_reference[1]) ** 2 / 4)
    single = result.first(1)
    torch.testing.assert_close(single.probabilities, per_reference[0])
    assert torch.equal(single.variance, torch.zeros(3, 4, 5, 6))


@pytest.fixture(scope="module")
def tiny_model() -> MixupPrivacyModule:
    torch.manual_seed(0)
    return MixupPrivacyModule(LABELS, TINY_SEGMENTER, TINY_UNMIXER, lambda_range=(0.6, 0.9), patch_size=16).eval()


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.slow
def test_tta_ensembler_shapes_and_variance(tiny_model, k):
    bank = make_bank(3, shape=(20, 20, 20))
    image = torch.from_numpy(phantom(0, (18, 20, 22))[0])[None]  # another shape than the bank: crop / pad
    ensembler = TTAEnsembler(tiny_model, bank, k=k, methods=("learned", "naive"), seed=0)
    server_calls = []
    original = tiny_model.segment_mixture

    def counting(x):
        server_calls.append(x.shape[0])
        return original(x)

    tiny_model.segment_mixture = counting
    try:
        results = ensembler(image)
    finally:
        del tiny_model.segment_mixture
    assert set(results) == {"learned", "naive"}
    # One server pass serves both unmixing methods, in batches of (at most) 2 patches of any mixture.
    n = n_grid_patches((18, 20, 22), 16, None)
    assert sum(server_calls) == n * k and max(server_calls) <= 2 and len(server_calls) <= math.ceil(n * k / 2) + 1
    for result in results.values():
        assert result.per_reference.shape == (k, NUM_CLASSES, 18, 20, 22)
        assert result.probabilities.shape == result.variance.shape == (NUM_CLASSES, 18, 20, 22)
        assert result.labels.shape == (18, 20, 22)
        torch.testing.assert_close(result.per_reference.sum(1), torch.ones(k, 18, 20, 22), atol=1e-4, rtol=0)
        assert bool((result.variance >= 0).all())
        if k == 1:
            assert torch.equal(result.variance, torch.zeros(NUM_CLASSES, 18, 20, 22))
        else:
            assert float(result.variance.max()) > 0
    again = TTAEnsembler(tiny_model, bank, k=k, methods=("learned", "naive"), seed=0)(image)
    torch.testing.assert_close(again["learned"].per_reference, results["learned"].per_reference)


def two_pass_private_segmentation(model, mixtures: Mixtures, patch_size: int, overlap: int) -> torch.Tensor:
    """mixpriv's pipeline before PrivatePipeline: TorchIO grid over the K mixtures, then a second grid to unmix."""
    k, c = len(mixtures), model.num_classes

    def segment(patches):
        return model.segment_mixture(patches.reshape(-1, 1, *patches.shape[2:])).reshape(patches.shape[0], -1,
                                                                                          *patches.shape[2:])

    with torch.no_grad():
        mixed = torchio_sliding_window(segment, mixtures.mixtures[:, 0], patch_size, overlap, "hann")
        stacked = torch.cat([mixed, mixtures.reference_probabilities().reshape(k * c, *mixed.shape[1:])])

        def unmix(patches):
            b, spatial = patches.shape[0], patches.shape[2:]
            m, r = patches[:, :k * c].reshape(b * k, c, *spatial), patches[:, k * c:].reshape(b * k, c, *spatial)
            return model.unmix(m, r, mixtures.lambdas.repeat(b)).reshape(b, k * c, *spatial)

        return torchio_sliding_window(unmix, stacked, patch_size, overlap, "hann").reshape(k, c, *mixed.shape[1:])


def test_fused_pipeline_equals_the_two_pass_pipeline_where_patches_do_not_overlap(tiny_model):
    """Without overlap, unmixing each patch's segmentation is unmixing the stitched one: equal to 1e-5.

    (With overlap the fused pipeline unmixes the segmenter's own patch output, as in training,
    while the two-pass one unmixed a blend of neighbouring patches: the benchmark
    ``benchmarks/private_inference.py --compare`` measures that difference in Dice.)
    """
    bank = make_bank(3, shape=(32, 16, 32))
    image = torch.from_numpy(phantom(2, (32, 16, 32))[0])[None]
    pipeline = PrivatePipeline.of_model(tiny_model, overlap=0, batch_size=3)
    mixtures = pipeline.mix(image, bank, 3, torch.Generator().manual_seed(0))
    fused = pipeline.run(mixtures, ("learned", "naive"))
    torch.testing.assert_close(fused["learned"].per_reference, two_pass_private_segmentation(tiny_model, mixtures, 16, 0),
                               atol=1e-5, rtol=0)
    remote = PrivatePipeline.of_model(tiny_model, overlap=0, segment_volumes=lambda m: segment_mixtures(
        tiny_model.segment_mixture, m, 16, overlap=0)).run(mixtures, ("learned", "naive"))
    for method in ("learned", "naive"):
        torch.testing.assert_close(remote[method].per_reference, fused[method].per_reference, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def context_model() -> MixupPrivacyModule:
    torch.manual_seed(0)
    unmixer = {"channels": [4, 8], "context_scale": 2, "refine_channels": 4}
    model = MixupPrivacyModule(LABELS, TINY_SEGMENTER, unmixer, lambda_range=(0.6, 0.9), patch_size=16).eval()
    with torch.no_grad():  # the zero-initialised heads would hide both stages
        for parameter in model.unmixer.parameters():
            parameter.normal_(0, 0.3)
    return model


def test_the_context_unmixer_on_one_patch_covering_the_volume_is_its_forward_pass(context_model):
    assert context_model.unmixes_whole_volumes
    pipeline = PrivatePipeline.of_model(context_model)
    assert pipeline.unmix is None and pipeline.unmix_volumes is not None
    mixtures = pipeline.mix(torch.from_numpy(phantom(1, (16, 16, 16))[0])[None], make_bank(2, shape=(16, 16, 16)), 2,
                            torch.Generator().manual_seed(0))
    with torch.no_grad():
        mixed = context_model.segment_mixture(mixtures.mixtures)
        expected = context_model.unmix(mixed, mixtures.reference_probabilities(), mixtures.lambdas)
    torch.testing.assert_close(pipeline.run(mixtures)["learned"].per_reference, expected, atol=1e-5, rtol=0)


def test_the_context_unmixer_runs_its_coarse_unet_per_coarse_patch_and_the_rest_once_per_volume(context_model):
    """Without overlap, each coarse patch's logits are the coarse U-Net on that patch alone (its instance norms
    see a training patch's field of view, not the volume's); they are stitched, upsampled and finished once."""
    unmixer = context_model.unmixer
    bank = make_bank(3, shape=(32, 16, 32))
    pipeline = PrivatePipeline.of_model(context_model, overlap=0, batch_size=3)
    mixtures = pipeline.mix(torch.from_numpy(phantom(2, (32, 16, 32))[0])[None], bank, 3, torch.Generator().manual_seed(0))
    with torch.no_grad():
        mixed = segment_mixtures(context_model.segment_mixture, mixtures.mixtures, 16, overlap=0)
        references, lambdas = mixtures.reference_probabilities(), mixtures.lambdas
        features = unmixer.coarse_features(mixed, references, lambdas)  # scale 2: coarse patches of 8
        coarse = torch.zeros(3, NUM_CLASSES, 16, 8, 16)
        for z in (0, 8):
            for x in (0, 8):
                coarse[..., z:z + 8, :, x:x + 8] = unmixer.coarse_logits(features[..., z:z + 8, :, x:x + 8], lambdas)
        expected = torch.softmax(unmixer.finish(mixed, references, lambdas, unmixer.upsample(coarse, (32, 16, 32))), 1)
    calls = []
    unmix = pipeline.unmix_volumes
    pipeline.unmix_volumes = lambda mixed, *rest: calls.append(mixed.shape) or unmix(mixed, *rest)
    run = pipeline.run(mixtures, ("learned", "naive"))  # outside no_grad, as the evaluation calls it
    torch.testing.assert_close(run["learned"].per_reference, expected, atol=1e-5, rtol=0)
    assert calls == [(3, NUM_CLASSES, 32, 16, 32)]  # once per request, on the whole volumes
    assert not any(t.requires_grad for t in (run.mixed_probabilities, run["learned"].per_reference))
    remote = PrivatePipeline.of_model(context_model, segment_volumes=lambda m: segment_mixtures(
        context_model.segment_mixture, m, 16))
    torch.testing.assert_close(remote.run(mixtures)["learned"].per_reference,
                               PrivatePipeline.of_model(context_model).run(mixtures)["learned"].per_reference)


def test_the_context_unmixer_takes_volumes_whose_sides_are_not_a_multiple_of_its_scale(context_model):
    pipeline = PrivatePipeline.of_model(context_model)
    mixtures = pipeline.mix(torch.from_numpy(phantom(3, (19, 16, 21))[0])[None], make_bank(2, shape=(19, 16, 21)), 2,
                            torch.Generator().manual_seed(0))
    probabilities = pipeline.run(mixtures)["learned"].per_reference
    assert probabilities.shape == (2, NUM_CLASSES, 19, 16, 21)
    torch.testing.assert_close(probabilities.sum(1), torch.ones(2, 19, 16, 21), atol=1e-5, rtol=0)


def test_tta_ensembler_rejects_bad_configuration(tiny_model):
    with pytest.raises(InputError, match="unknown unmixing method"):
        TTAEnsembler(tiny_model, make_bank(2), methods=("learned", "oracle"))
    three = ReferenceBank(torch.zeros(1, 1, 8, 8, 8), torch.zeros(1, 8, 8, 8, dtype=torch.long),
                          {"background": 0, "a": 1, "b": 2})
    with pytest.raises(InputError, match="3 labels but the model predicts 4"):
        TTAEnsembler(tiny_model, three)
    ensembler = TTAEnsembler(tiny_model, make_bank(2), k=2)
    assert ensembler.mixing.lambda_range == (0.6, 0.9) and ensembler.patch_size == 16


def test_tta_ensembler_mixes_kway_as_the_model_was_trained(monkeypatch):
    torch.manual_seed(0)
    model = MixupPrivacyModule(LABELS, TINY_SEGMENTER, TINY_UNMIXER, lambda_range=(0.6, 0.9), patch_size=16,
                               references_per_mix=2).eval()
    bank = make_bank(3, shape=(16, 16, 16))
    image = torch.from_numpy(phantom(0, (16, 16, 16))[0])[None]
    drawn = []
    original = pipeline_module.mix_with_references

    def recording(*args, **kwargs):
        drawn.append(original(*args, **kwargs))
        return drawn[-1]

    monkeypatch.setattr(pipeline_module, "mix_with_references", recording)
    ensembler = TTAEnsembler(model, bank, k=2, methods=("learned", "naive"), seed=0)
    assert (ensembler.mixing.references_per_mix, ensembler.mixing.dirichlet_alpha) == (2, 1.0)
    results = ensembler(image)
    assert [len(refs) for refs in drawn[0].reference_indices] == [2, 2]
    for result in results.values():
        assert result.per_reference.shape == (2, NUM_CLASSES, 16, 16, 16)
        torch.testing.assert_close(result.per_reference.sum(1), torch.ones(2, 16, 16, 16), atol=1e-4, rtol=0)
    single = MixingSettings.of_model(model.hparams, references_per_mix=1)
    assert TTAEnsembler(model, bank, k=2, seed=0, mixing=single).mixing.references_per_mix == 1
    with pytest.raises(InputError, match="between 1 and 2"):
        TTAEnsembler(model, bank, mixing=MixingSettings.of_model(model.hparams, references_per_mix=3))


def test_model_without_kway_hparams_loads_and_mixes_as_single_reference(tiny_model, tmp_path):
    """Checkpoints written before K-way mixing lack its hparams: they load as R = 1 and behave as before."""
    old_hparams = {k: v for k, v in tiny_model.hparams.items() if k not in ("references_per_mix", "dirichlet_alpha")}
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": tiny_model.state_dict(), "hyper_parameters": old_hparams,
                "pytorch-lightning_version": pl.__version__}, path)
    old = MixupPrivacyModule.load_from_checkpoint(path, map_location="cpu").eval()
    assert (old.hparams.references_per_mix, old.hparams.dirichlet_alpha) == (1, 1.0)
    bank = make_bank(3, shape=(16, 16, 16))
    image = torch.from_numpy(phantom(1, (16, 16, 16))[0])[None]
    ensembler = TTAEnsembler(old, bank, k=2, methods=("naive",), seed=4)
    assert ensembler.mixing.references_per_mix == 1
    result = ensembler(image)["naive"]
    # The pre-K-way pipeline, spelled out: the same draws, mixtures and unmixing.
    mixtures = mix_with_references(image, bank, 2, MixingSettings((0.6, 0.9)), torch.Generator().manual_seed(4))
    assert all(len(refs) == 1 for refs in mixtures.reference_indices)
    mixed = segment_mixtures(old.segment_mixture, mixtures.mixtures, 16)
    torch.testing.assert_close(result.per_reference, naive_of(mixed, mixtures), atol=1e-6, rtol=0)


def test_published_model_card_without_kway_hparams_loads_as_single_reference(tmp_path):
    published = Path(__file__).resolve().parents[1] / "checkpoints" / "tissue-mixpriv-2mm"
    if not (published / "metadata.json").is_file():
        pytest.skip("the published model is not in this checkout")
    old_card = tmp_path / "tissue-mixpriv-2mm"  # as cards were before K-way mixing: no such hparams
    shutil.copytree(published, old_card)
    card = json.loads((old_card / "metadata.json").read_text())
    for key in ("references_per_mix", "dirichlet_alpha"):
        card["hparams"].pop(key, None)
    (old_card / "metadata.json").write_text(json.dumps(card))
    model = from_pretrained(old_card, offline=True, progress=False)
    assert (model.hparams.references_per_mix, model.hparams.dirichlet_alpha) == (1, 1.0)


# ----------------------------------------------------------------------------- NIfTI I/O


def _affine(kind: str) -> np.ndarray:
    if kind == "lps":  # x and y flipped (DICOM-like LPS), 2 mm
        affine = np.diag([-2.0, -2.0, 2.0, 1.0])
    else:  # axes permuted and one flipped, anisotropic spacing
        affine = np.array([[0.0, 0.0, 2.0, 0.0], [-2.0, 0.0, 0.0, 0.0], [0.0, 2.5, 0.0, 0.0], [0, 0, 0, 1.0]])
    affine[:3, 3] = [30.0, -12.0, 7.0]
    return affine


@pytest.mark.parametrize("kind", ["lps", "permuted"])
def test_nifti_round_trip_keeps_the_input_grid(tmp_path, kind):
    shape = (20, 18, 22)
    image, label = phantom(7, shape)
    affine = _affine(kind)
    path = tmp_path / "scan.nii.gz"
    scan = nib.Nifti1Image(image * 1000, affine)
    scan.header.set_xyzt_units("mm", "sec")
    scan.header["descrip"] = b"mixpriv round trip"
    nib.save(scan, str(path))

    subject, original = load_scan(path)
    assert original.spatial_shape == shape
    np.testing.assert_allclose(original.affine, affine)
    assert subject[IMAGE].orientation == ("R", "A", "S")  # preprocessed in canonical orientation
    assert not np.allclose(subject[IMAGE].affine, affine)
    data = subject[IMAGE].data
    assert 0 <= float(data.min()) and float(data.max()) <= 1

    # A "segmentation" computed in the model's space, by a threshold on the preprocessed image.
    predicted = (data > 0.5).long() + (data > 0.8).long()
    back = to_original_grid(predicted, subject[IMAGE].affine, original, label=True)
    assert tuple(back.shape[1:]) == shape
    # The same threshold applied in the scan's own orientation gives the same map, voxel for voxel.
    rescaled = tio.RescaleIntensity(out_min_max=(0.0, 1.0), percentiles=(0.5, 99.5))(original).data
    expected = (rescaled > 0.5).long() + (rescaled > 0.8).long()
    assert torch.equal(back.long(), expected)

    out = save_like(back, path, tmp_path / "out" / "scan_seg.nii.gz")
    written = nib.load(str(out))
    assert written.shape == shape
    np.testing.assert_allclose(written.affine, affine)
    np.testing.assert_allclose(written.header.get_zooms()[:3], nib.load(str(path)).header.get_zooms()[:3])
    assert written.get_data_dtype() == np.uint8
    assert np.array_equal(np.asanyarray(written.dataobj), expected[0].numpy())
    assert nib.aff2axcodes(written.affine) == nib.aff2axcodes(affine)
    # The rest of the input's header travels with the output (units, description, qform/sform codes).
    assert written.header.get_xyzt_units() == ("mm", "sec")
    assert written.header["descrip"].tobytes().rstrip(b"\0") == b"mixpriv round trip"
    assert int(written.header["sform_code"]) == int(scan.header["sform_code"])
    assert int(written.header["qform_code"]) == int(scan.header["qform_code"])


def test_to_original_grid_resamples_from_another_spacing(tmp_path):
    shape = (20, 18, 22)
    image, _ = phantom(8, shape)
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(image, _affine("lps")), str(path))
    subject, original = load_scan(path, spacing=3.0)
    assert subject[IMAGE].spatial_shape != shape
    labels = (subject[IMAGE].data > 0.5).long()
    back = to_original_grid(labels, subject[IMAGE].affine, original, label=True)
    assert tuple(back.shape[1:]) == shape
    assert set(back.unique().tolist()) <= {0, 1}
    save_like(back, path, tmp_path / "seg.nii.gz")
    np.testing.assert_allclose(nib.load(str(tmp_path / "seg.nii.gz")).affine, original.affine)


def test_save_like_rejects_a_volume_of_another_shape(tmp_path):
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), _affine("lps")), str(path))
    with pytest.raises(InputError, match=r"volume shape \(8, 8, 7\) does not match"):
        save_like(np.zeros((8, 8, 7)), path, tmp_path / "out.nii.gz")


@pytest.mark.filterwarnings("ignore:Error loading image with SimpleITK")
def test_load_scan_rejects_bad_scans(tmp_path):
    affine = _affine("lps")
    image, _ = phantom(9, (12, 12, 12))
    image[3, 4, 5] = np.nan
    nan_path = tmp_path / "nan_scan.nii.gz"
    nib.save(nib.Nifti1Image(image, affine), str(nan_path))
    with pytest.raises(InputError, match=r"scan nan_scan.nii.gz contains 1 NaN or infinite voxel"):
        load_scan(nan_path)

    flat = tmp_path / "slice.nii.gz"
    nib.save(nib.Nifti1Image(np.random.rand(12, 12).astype(np.float32), affine), str(flat))
    with pytest.raises(InputError, match="scan slice.nii.gz .*2D"):
        load_scan(flat)

    two_channels = tmp_path / "two.nii.gz"
    nib.save(nib.Nifti1Image(np.random.rand(12, 12, 12, 2).astype(np.float32), affine), str(two_channels))
    with pytest.raises(InputError, match="two.nii.gz has 2 channels"):
        load_scan(two_channels)

    with pytest.raises(InputError, match="missing.nii.gz does not exist"):
        load_scan(tmp_path / "missing.nii.gz")

    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(b"not a nifti at all")
    with pytest.raises(InputError, match="cannot read .*garbage.nii.gz"):
        load_scan(garbage)


def test_preprocessing_is_shared_by_load_scan(tmp_path):
    image, _ = phantom(10, (12, 12, 12))
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(image, np.eye(4)), str(path))
    subject, _ = load_scan(path)
    expected = preprocessing()(tio.Subject(image=tio.ScalarImage(path)))[IMAGE].data
    torch.testing.assert_close(subject[IMAGE].data, expected)


def test_a_lone_last_patch_travels_with_a_copy_whose_output_is_dropped():
    x = torch.rand(2, 40, 16, 16)
    assert len(PatchGrid(x.shape[1:], 16).starts) == 3
    sizes = []

    def double(batch):
        sizes.append(batch["x"].shape[0])
        return batch["x"] * 2

    paired = sliding_window(double, {"x": x}, patch_size=16, batch_size=2)
    assert sizes == [2, 2]  # the third patch with a copy of itself
    sizes.clear()
    alone = sliding_window(double, {"x": x}, patch_size=16, batch_size=1)
    assert sizes == [1, 1, 1]  # calls of one patch each stay so
    torch.testing.assert_close(paired, alone)
    torch.testing.assert_close(paired, x * 2)
