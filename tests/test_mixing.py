"""Mixing algebra, Mix / RandomMix transforms and the secret ReferenceBank."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest
import torch
import torchio as tio
from conftest import LABELS, phantom
from safetensors.torch import save_file

from mixpriv.constants import (
    IMAGE,
    LABEL,
    MIN_UNMIX_LAMBDA,
    MIX_LAMBDA,
    MIX_REFERENCE_ID,
    MIX_REFERENCE_WEIGHTS,
    REFERENCE_LABEL,
)
from mixpriv.mixing import (
    Mix,
    RandomMix,
    ReferenceBank,
    composite_reference,
    draw_reference_weights,
    mix,
    naive_unmix,
    one_hot,
    probabilities_from_unmixed,
)
from mixpriv.mixing.settings import MixingSettings
from mixpriv.mixing.transforms import one_hot_uint8
from mixpriv.validation import InputError

SMALL = (10, 12, 8)
NUM_CLASSES = len(LABELS)


def make_bank(n: int = 3, shape=SMALL, ids=None) -> ReferenceBank:
    images, labels = zip(*[phantom(100 + i, shape) for i in range(n)])
    return ReferenceBank.from_arrays(images, labels, LABELS, ids=ids)


def make_subject(seed: int = 0, shape=SMALL, case_id: str | None = "target") -> tio.Subject:
    image, label = phantom(seed, shape)
    extra = {} if case_id is None else {"case_id": case_id}
    return tio.Subject(
        image=tio.ScalarImage(tensor=torch.from_numpy(image)[None]),
        label=tio.LabelMap(tensor=torch.from_numpy(label.astype(np.int64))[None]),
        **extra,
    )


def random_labels(n: int, shape=SMALL, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, NUM_CLASSES, (n, *shape), generator=generator)


# ----------------------------------------------------------------------------- functional


@pytest.mark.parametrize("lam", [1.0, 0.95, 0.7, 0.5, 0.3, 0.1])
def test_naive_unmix_recovers_exactly_mixed_one_hot_target(lam):
    target = one_hot(random_labels(2, seed=1), NUM_CLASSES)
    reference = one_hot(random_labels(2, seed=2), NUM_CLASSES)
    mixed = mix(target, reference, lam)
    recovered = naive_unmix(mixed, reference, lam)
    assert recovered.shape == target.shape
    torch.testing.assert_close(recovered, target, atol=1e-5, rtol=0)
    assert torch.equal(recovered.argmax(1), target.argmax(1))


def test_naive_unmix_recovers_target_with_per_sample_lambdas():
    target = one_hot(random_labels(4, seed=3), NUM_CLASSES)
    reference = one_hot(random_labels(4, seed=4), NUM_CLASSES)
    lam = torch.tensor([0.95, 0.6, 0.2, 1.0])
    mixed = mix(target, reference, lam)
    # Each sample is mixed with its own weight (not a broadcast of the first one).
    for i in range(4):
        torch.testing.assert_close(mixed[i], lam[i] * target[i] + (1 - lam[i]) * reference[i])
    torch.testing.assert_close(naive_unmix(mixed, reference, lam), target, atol=1e-5, rtol=0)
    # Unmixing with the wrong (permuted) weights does not recover the target.
    wrong = naive_unmix(mixed, reference, lam.flip(0))
    assert not torch.allclose(wrong, target, atol=1e-3)


def test_mix_matches_formula_for_images_and_labels():
    generator = torch.Generator().manual_seed(5)
    image = torch.rand(3, 1, *SMALL, generator=generator)
    reference = torch.rand(3, 1, *SMALL, generator=generator)
    lam = torch.tensor([0.9, 0.7, 0.55])
    expected = torch.stack([lam[i] * image[i] + (1 - lam[i]) * reference[i] for i in range(3)])
    torch.testing.assert_close(mix(image, reference, lam), expected)
    torch.testing.assert_close(mix(image, reference, 0.8), 0.8 * image + 0.2 * reference)

    target = one_hot(random_labels(3, seed=6), NUM_CLASSES)
    reference_label = one_hot(random_labels(3, seed=7), NUM_CLASSES)
    mixed_label = mix(target, reference_label, lam)
    # A mixture of two one-hot maps is a distribution: sums to 1, values in {0, 1-lam, lam, 1}.
    torch.testing.assert_close(mixed_label.sum(1), torch.ones(3, *SMALL))
    for i in range(3):
        allowed = torch.tensor([0.0, float(1 - lam[i]), float(lam[i]), 1.0])
        values = mixed_label[i].unique()
        assert all(torch.isclose(v, allowed, atol=1e-6).any() for v in values)


def test_mix_rejects_bad_lambda_and_shapes():
    a, b = torch.rand(1, 1, 4, 4, 4), torch.rand(1, 1, 4, 4, 4)
    for bad in (0.0, -0.2, 1.5, float("nan")):
        with pytest.raises(InputError, match="lambda"):
            mix(a, b, bad)
    with pytest.raises(InputError, match="shape"):
        mix(a, torch.rand(1, 1, 4, 4, 5), 0.7)


def test_one_hot_shapes():
    label = random_labels(2)
    encoded = one_hot(label, NUM_CLASSES)
    assert encoded.shape == (2, NUM_CLASSES, *SMALL)
    torch.testing.assert_close(one_hot(label[:, None], NUM_CLASSES), encoded)
    assert torch.equal(encoded.argmax(1), label)
    with pytest.raises(InputError, match="one channel"):
        one_hot(torch.zeros(1, 2, 4, 4, 4), NUM_CLASSES)


def test_probabilities_from_unmixed_is_a_distribution():
    generator = torch.Generator().manual_seed(8)
    unmixed = torch.randn(2, NUM_CLASSES, *SMALL, generator=generator) * 2  # values well outside [0, 1]
    unmixed[0, :, 0, 0, 0] = -1.0  # a voxel with no positive value at all
    probs = probabilities_from_unmixed(unmixed)
    assert probs.shape == unmixed.shape
    assert bool((probs >= 0).all())
    torch.testing.assert_close(probs.sum(1), torch.ones(2, *SMALL))
    torch.testing.assert_close(probs[0, :, 0, 0, 0], torch.full((NUM_CLASSES,), 1 / NUM_CLASSES))
    # Where values are a valid distribution already, the projection leaves them unchanged.
    valid = torch.softmax(unmixed, 1)
    torch.testing.assert_close(probabilities_from_unmixed(valid), valid)


def test_naive_unmix_refuses_small_lambda():
    target = one_hot(random_labels(2), NUM_CLASSES)
    small = MIN_UNMIX_LAMBDA / 2
    with pytest.raises(InputError, match="unstable"):
        naive_unmix(target, target, small)
    with pytest.raises(InputError, match="unstable"):
        naive_unmix(target, target, torch.tensor([0.9, small]))
    with pytest.raises(InputError, match="lambda"):
        naive_unmix(target, target, 0.0)
    # At the threshold itself it still works.
    naive_unmix(target, target, MIN_UNMIX_LAMBDA)


# ----------------------------------------------------------------------------- transforms


def test_mix_transform_matches_formula_and_records():
    bank = make_bank()
    subject = make_subject()
    original = subject[IMAGE].data.clone()
    mixed = Mix(lam=0.8, reference_index=2, bank=bank)(subject)
    reference_image, reference_one_hot = bank.get(2)
    torch.testing.assert_close(mixed[IMAGE].data, 0.8 * original + 0.2 * reference_image)
    # One reference: its one-hot label, as uint8 (no float copy of the volume), in a label map.
    assert mixed[REFERENCE_LABEL].data.dtype == torch.uint8 and isinstance(mixed[REFERENCE_LABEL], tio.LabelMap)
    assert torch.equal(mixed[REFERENCE_LABEL].data.float(), reference_one_hot)
    assert torch.equal(mixed[LABEL].data, subject[LABEL].data)  # the target label is untouched
    assert mixed[MIX_LAMBDA] == pytest.approx(0.8)
    assert mixed[MIX_REFERENCE_ID] == 2
    # The input subject is not modified (the transform copies).
    assert torch.equal(subject[IMAGE].data, original)


def test_mix_transform_rejects_bad_arguments():
    bank = make_bank(2)
    with pytest.raises(InputError, match="reference index"):
        Mix(lam=0.8, reference_index=2, bank=bank)
    with pytest.raises(InputError, match="lambda"):
        Mix(lam=1.3, reference_index=0, bank=bank)
    with pytest.raises(InputError, match="bank"):
        Mix(lam=0.8, reference_index=0)(make_subject())


def _draw(seed: int, bank: ReferenceBank, subject: tio.Subject):
    torch.manual_seed(seed)
    return RandomMix(bank, (0.6, 0.9))(subject)


def test_random_mix_is_reproducible_by_seed():
    bank = make_bank(5)
    subject = make_subject()
    first, again = _draw(3, bank, subject), _draw(3, bank, subject)
    assert first[MIX_LAMBDA] == again[MIX_LAMBDA]
    assert first[MIX_REFERENCE_ID] == again[MIX_REFERENCE_ID]
    assert torch.equal(first[IMAGE].data, again[IMAGE].data)
    assert torch.equal(first[REFERENCE_LABEL].data, again[REFERENCE_LABEL].data)

    others = [_draw(seed, bank, subject) for seed in (4, 5, 6)]
    assert all(other[MIX_LAMBDA] != first[MIX_LAMBDA] for other in others)
    assert all(not torch.equal(other[IMAGE].data, first[IMAGE].data) for other in others)

    # The recorded parameters reproduce the mixture with the deterministic transform.
    replay = Mix(first[MIX_LAMBDA], first[MIX_REFERENCE_ID], bank)(subject)
    torch.testing.assert_close(replay[IMAGE].data, first[IMAGE].data)


def test_random_mix_single_reference_draws_are_pinned():
    """Values recorded before K-way mixing existed: the single-reference random stream must not change."""
    bank = make_bank(5)
    subject = make_subject()
    mixed = _draw(3, bank, subject)
    assert mixed[MIX_LAMBDA] == 0.6316708087921142 and mixed[MIX_REFERENCE_ID] == 2
    assert torch.rand(1).item() == 0.47161436080932617  # no extra draw from the global generator
    image, one_hot_label = bank.get(2)
    assert torch.equal(mixed[IMAGE].data, mix(subject[IMAGE].data.float(), image, mixed[MIX_LAMBDA]))
    assert torch.equal(mixed[REFERENCE_LABEL].data.float(), one_hot_label)
    assert MIX_REFERENCE_WEIGHTS not in mixed  # the single-reference subject carries what it always did
    # Spelling out R = 1 changes nothing, whatever alpha (unused with one reference).
    torch.manual_seed(3)
    explicit = RandomMix(bank, (0.6, 0.9), references_per_mix=1, dirichlet_alpha=7.0)(subject)
    assert (explicit[MIX_LAMBDA], explicit[MIX_REFERENCE_ID]) == (mixed[MIX_LAMBDA], mixed[MIX_REFERENCE_ID])
    assert torch.equal(explicit[IMAGE].data, mixed[IMAGE].data)


def test_random_mix_records_lambda_and_reference_in_history():
    bank = make_bank(4)
    subject = make_subject()
    lambdas = []
    for seed in range(20):
        mixed = _draw(seed, bank, subject)
        lam, index = mixed[MIX_LAMBDA], mixed[MIX_REFERENCE_ID]
        assert 0.6 <= lam <= 0.9
        assert 0 <= index < len(bank)
        lambdas.append(lam)
        history = mixed.history
        assert len(history) == 1
        recorded = history[0]
        assert recorded.name == "Mix"
        assert recorded.lam == pytest.approx(lam)
        assert recorded.reference_index == index
        # The secret bank is not part of the recorded arguments.
        assert "bank" not in recorded._get_reproducing_arguments()
        image, _ = bank.get(index)
        torch.testing.assert_close(mixed[IMAGE].data, lam * subject[IMAGE].data + (1 - lam) * image)
    assert max(lambdas) - min(lambdas) > 0.1  # really drawn, not a constant


def test_random_mix_rejects_bad_lambda_range():
    bank = make_bank(2)
    for bad in ((0.0, 0.5), (0.5, 1.2), (0.9, 0.6)):
        with pytest.raises(InputError, match="lambda range"):
            RandomMix(bank, bad)


def test_random_mix_never_mixes_a_subject_with_itself():
    bank = make_bank(3, ids=["case_a", "case_b", "case_c"])
    subject = make_subject(case_id="case_b")
    indices = {int(_draw(seed, bank, subject)[MIX_REFERENCE_ID]) for seed in range(30)}
    assert indices == {0, 2}

    including = set()
    for seed in range(30):
        torch.manual_seed(seed)
        including.add(int(RandomMix(bank, (0.6, 0.9), exclude_same_patient=False)(subject)[MIX_REFERENCE_ID]))
    assert including == {0, 1, 2}

    alone = make_bank(1, ids=["case_b"])
    with pytest.raises(InputError, match="no reference other"):
        RandomMix(alone, (0.6, 0.9))(subject)


def _draw_kway(seed: int, bank: ReferenceBank, subject: tio.Subject, references_per_mix: int = 3,
               dirichlet_alpha: float = 1.0):
    torch.manual_seed(seed)
    return RandomMix(bank, (0.6, 0.9), references_per_mix=references_per_mix, dirichlet_alpha=dirichlet_alpha)(subject)


def test_kway_mix_is_the_weighted_sum_of_distinct_references():
    bank = make_bank(6, ids=[f"case_{i}" for i in range(6)])
    subject = make_subject(case_id="case_4")
    seen = set()
    for seed in range(12):
        mixed = _draw_kway(seed, bank, subject)
        lam, indices, weights = mixed[MIX_LAMBDA], mixed[MIX_REFERENCE_ID], mixed[MIX_REFERENCE_WEIGHTS]
        assert len(indices) == len(set(indices)) == 3 and 4 not in indices  # distinct, never the subject itself
        assert all(w >= 0 for w in weights)
        assert lam + (1 - lam) * sum(weights) == pytest.approx(1.0, abs=1e-6)
        references = [bank.get(i) for i in indices]
        expected_image = lam * subject[IMAGE].data + (1 - lam) * sum(w * r for w, (r, _) in zip(weights, references))
        torch.testing.assert_close(mixed[IMAGE].data, expected_image)
        expected_label = sum(w * y for w, (_, y) in zip(weights, references))
        torch.testing.assert_close(mixed[REFERENCE_LABEL].data, expected_label)
        torch.testing.assert_close(mixed[REFERENCE_LABEL].data.sum(0), torch.ones(SMALL))
        # The history records indices and weights (not the bank); replaying them reproduces the mixture.
        recorded = mixed.history[0]
        assert (recorded.reference_index, recorded.reference_weights) == (indices, weights)
        assert "bank" not in recorded._get_reproducing_arguments()
        replay = Mix(lam, indices, bank, reference_weights=weights)(subject)
        assert torch.equal(replay[IMAGE].data, mixed[IMAGE].data)
        seen.add(tuple(sorted(indices)))
    assert len(seen) > 1  # the reference sets are drawn, not fixed
    assert _draw_kway(5, bank, subject)[MIX_REFERENCE_WEIGHTS] == _draw_kway(5, bank, subject)[MIX_REFERENCE_WEIGHTS]


def test_kway_naive_unmix_is_exact_on_one_hot_inputs():
    bank = make_bank(4)
    target = one_hot(random_labels(1, seed=9), NUM_CLASSES)[0]
    for seed in range(5):
        weights = draw_reference_weights(3, 1.0, torch.Generator().manual_seed(seed))
        _, composite_label = composite_reference(bank, [3, 0, 2], weights)
        lam = 0.6 + 0.05 * seed
        recovered = naive_unmix(mix(target, composite_label, lam), composite_label, lam)
        torch.testing.assert_close(recovered, target, atol=1e-5, rtol=0)


def test_kway_draws_only_among_the_others_and_follows_alpha():
    bank = make_bank(4, ids=["case_a", "case_b", "case_c", "case_d"])
    subject = make_subject(case_id="case_b")
    for seed in range(5):  # R = N - 1 with the subject in the bank: always all the others
        assert sorted(_draw_kway(seed, bank, subject)[MIX_REFERENCE_ID]) == [0, 2, 3]
    # A small alpha puts the weight on one reference, a large one spreads it evenly.
    peaked = [max(_draw_kway(s, bank, subject, 3, 0.05)[MIX_REFERENCE_WEIGHTS]) for s in range(20)]
    even = [max(_draw_kway(s, bank, subject, 3, 200.0)[MIX_REFERENCE_WEIGHTS]) for s in range(20)]
    assert np.mean(peaked) > 0.8 and np.mean(even) < 0.4
    duplicated = make_bank(4, ids=["case_a", "case_b", "case_b", "case_d"])
    with pytest.raises(InputError, match="only 2 references other than the subject itself and its patient"):
        _draw_kway(0, duplicated, subject)


def test_draw_reference_weights_uses_the_given_generator():
    generator = torch.Generator().manual_seed(1)
    state = generator.get_state()
    assert torch.equal(draw_reference_weights(1, 0.5, generator), torch.ones(1))
    assert torch.equal(generator.get_state(), state)  # one reference: nothing drawn
    first = draw_reference_weights(4, 0.5, torch.Generator().manual_seed(2))
    assert torch.equal(first, draw_reference_weights(4, 0.5, torch.Generator().manual_seed(2)))
    assert not torch.equal(first, draw_reference_weights(4, 0.5, torch.Generator().manual_seed(3)))
    assert first.dtype == torch.float32 and float(first.sum()) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("references_per_mix, alpha, message", [
    (0, 1.0, "at least 1"), (-2, 1.0, "at least 1"), (4, 1.0, "between 1 and 3"), (2.0, 1.0, "integer"),
    (2, 0.0, "dirichlet_alpha"), (2, -1.0, "dirichlet_alpha"), (2, float("nan"), "dirichlet_alpha"),
    (2, "1", "dirichlet_alpha"),
])
def test_kway_rejects_bad_settings(references_per_mix, alpha, message):
    with pytest.raises(InputError, match=message):
        RandomMix(make_bank(4), (0.6, 0.9), references_per_mix=references_per_mix, dirichlet_alpha=alpha)


def test_kway_mix_rejects_bad_references():
    bank = make_bank(4)
    with pytest.raises(InputError, match="distinct"):
        Mix(0.8, [1, 1], bank)
    with pytest.raises(InputError, match="reference index 4 outside"):
        Mix(0.8, [1, 4], bank)
    with pytest.raises(InputError, match="sum to 1"):
        Mix(0.8, [0, 1], bank, reference_weights=[0.5, 0.6])
    with pytest.raises(InputError, match="non-negative"):
        Mix(0.8, [0, 1], bank, reference_weights=[1.5, -0.5])
    with pytest.raises(InputError, match="2 references need 2 weights"):
        Mix(0.8, [0, 1], bank, reference_weights=[1.0])
    with pytest.raises(InputError, match="list of reference indices"):
        Mix(0.8, 1, bank, reference_weights=[1.0])
    equal = Mix(0.8, (0, 3), bank)(make_subject())  # equal weights by default
    assert equal[MIX_REFERENCE_WEIGHTS] == [0.5, 0.5] and equal[MIX_REFERENCE_ID] == [0, 3]


def test_mix_crops_and_pads_a_reference_of_another_shape():
    bank = make_bank(1, shape=(12, 12, 12))
    subject = make_subject(shape=(10, 14, 12))
    mixed = Mix(lam=0.7, reference_index=0, bank=bank)(subject)
    assert mixed[IMAGE].spatial_shape == (10, 14, 12)
    assert mixed[REFERENCE_LABEL].spatial_shape == (10, 14, 12)
    reference_image, reference_one_hot = bank.get(0)
    # Centre crop along D (12 -> 10), centre zero-pad along H (12 -> 14), W unchanged.
    expected_image = torch.zeros(1, 10, 14, 12)
    expected_image[:, :, 1:13, :] = reference_image[:, 1:11, :, :]
    torch.testing.assert_close(mixed[IMAGE].data, 0.7 * subject[IMAGE].data + 0.3 * expected_image)
    torch.testing.assert_close(mixed[REFERENCE_LABEL].data[:, :, 1:13, :].float(), reference_one_hot[:, 1:11])
    # The padded reference is background there, and the reference label stays a valid one-hot map.
    assert torch.equal(mixed[REFERENCE_LABEL].data.sum(0), torch.ones(10, 14, 12, dtype=torch.long))
    assert bool((mixed[REFERENCE_LABEL].data[0, :, [0, 13], :] == 1).all())


def test_one_hot_uint8_matches_the_float_one_hot():
    labels = random_labels(1, seed=5)[0].to(torch.uint8)
    encoded = one_hot_uint8(labels, NUM_CLASSES)
    assert encoded.dtype == torch.uint8 and encoded.shape == (NUM_CLASSES, *SMALL)
    assert torch.equal(encoded.float(), one_hot(labels[None].long(), NUM_CLASSES)[0])


def test_kway_reference_label_is_a_float_scalar_image():
    mixed = _draw_kway(0, make_bank(4), make_subject())
    assert mixed[REFERENCE_LABEL].data.dtype == torch.float32 and isinstance(mixed[REFERENCE_LABEL], tio.ScalarImage)


@pytest.mark.parametrize("references_per_mix", [1, 3])
def test_random_mix_takes_mixing_settings_with_the_same_draws(references_per_mix):
    bank = make_bank(5)
    subject = make_subject()
    settings = MixingSettings((0.6, 0.9), references_per_mix=references_per_mix, dirichlet_alpha=0.5)
    torch.manual_seed(3)
    from_settings = RandomMix(bank, mixing=settings)(subject)
    after_settings = torch.rand(1).item()
    torch.manual_seed(3)
    from_keywords = RandomMix(bank, (0.6, 0.9), references_per_mix=references_per_mix, dirichlet_alpha=0.5)(subject)
    assert torch.rand(1).item() == after_settings  # as many draws from the global generator
    assert from_settings[MIX_LAMBDA] == from_keywords[MIX_LAMBDA]
    assert from_settings[MIX_REFERENCE_ID] == from_keywords[MIX_REFERENCE_ID]
    assert torch.equal(from_settings[IMAGE].data, from_keywords[IMAGE].data)
    assert torch.equal(from_settings[REFERENCE_LABEL].data, from_keywords[REFERENCE_LABEL].data)


def test_random_mix_keywords_override_its_mixing_settings_and_the_bank_is_checked():
    bank = make_bank(4)
    transform = RandomMix(bank, (0.7, 0.8), mixing=MixingSettings((0.6, 0.9), references_per_mix=2))
    assert transform.mixing == MixingSettings((0.7, 0.8), references_per_mix=2)
    assert (transform.lambda_range, transform.references_per_mix, transform.dirichlet_alpha) == ((0.7, 0.8), 2, 1.0)
    assert RandomMix(bank).mixing == MixingSettings()  # the single-reference scheme by default
    with pytest.raises(InputError, match="between 1 and 3 for a bank of 4"):
        RandomMix(bank, mixing=MixingSettings(references_per_mix=4))


def test_random_mix_copies_its_input_once():
    """Mix inside RandomMix works on RandomMix's copy: the caller's subject stays as it was."""
    bank = make_bank(3)
    subject = make_subject()
    original = subject[IMAGE].data.clone()
    torch.manual_seed(0)
    mixed = RandomMix(bank, (0.6, 0.9))(subject)
    assert torch.equal(subject[IMAGE].data, original) and REFERENCE_LABEL not in subject
    assert not torch.equal(mixed[IMAGE].data, original)
    assert mixed[IMAGE].data.data_ptr() != subject[IMAGE].data.data_ptr()


def test_random_mix_records_survive_patch_sampling():
    bank = make_bank(3)
    torch.manual_seed(11)
    mixed = RandomMix(bank, (0.6, 0.9))(make_subject())
    sampler = tio.UniformSampler((6, 6, 6))
    patches = list(sampler(mixed, num_patches=3))
    assert len(patches) == 3
    for patch in patches:
        assert patch[MIX_LAMBDA] == mixed[MIX_LAMBDA]
        assert patch[MIX_REFERENCE_ID] == mixed[MIX_REFERENCE_ID]
        assert patch[IMAGE].spatial_shape == (6, 6, 6)
        assert patch[REFERENCE_LABEL].spatial_shape == (6, 6, 6)
        assert [t.name for t in patch.history][0] == "Mix"
        i, j, k = (int(v) for v in patch[tio.LOCATION][:3])
        torch.testing.assert_close(patch[IMAGE].data, mixed[IMAGE].data[:, i:i + 6, j:j + 6, k:k + 6])


def test_random_mix_works_in_a_queue_batch():
    """Through tio.Queue + SubjectsLoader, lambda arrives as one value per patch of the batch."""
    bank = make_bank(3)
    subjects = [make_subject(seed) for seed in range(2)]
    dataset = tio.SubjectsDataset(subjects, transform=RandomMix(bank, (0.6, 0.9)))
    queue = tio.Queue(dataset, max_length=4, samples_per_volume=2, sampler=tio.UniformSampler(6),
                      num_workers=0, shuffle_subjects=False, shuffle_patches=False)
    batch = next(iter(tio.SubjectsLoader(queue, batch_size=4)))
    lam = torch.as_tensor(batch[MIX_LAMBDA])
    assert lam.shape == (4,)
    assert bool(((lam >= 0.6) & (lam <= 0.9)).all())
    assert batch[REFERENCE_LABEL][tio.DATA].shape == (4, NUM_CLASSES, 6, 6, 6)


# ----------------------------------------------------------------------------- reference bank


def test_bank_save_is_owner_only_and_round_trips(tmp_path):
    ids = ["sub-007_ses-1", "sub-042_ses-2", "sub-099_ses-1"]
    bank = make_bank(3, ids=ids)
    path = bank.save(tmp_path / "keys" / "bank.safetensors")
    assert path.is_file()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    loaded = ReferenceBank.load(path)
    assert torch.equal(loaded.images, bank.images)
    assert torch.equal(loaded.labels.long(), bank.labels.long())
    assert loaded.ids == ids
    assert loaded.label_names == LABELS
    assert len(loaded) == 3 and loaded.spatial_shape == SMALL
    for index in range(3):
        for a, b in zip(loaded.get(index), bank.get(index)):
            assert torch.equal(a, b)
    # No temporary file is left next to the key.
    assert [p.name for p in path.parent.iterdir()] == ["bank.safetensors"]


def test_bank_save_refuses_to_overwrite(tmp_path):
    path = tmp_path / "bank.safetensors"
    make_bank(2, ids=["a", "b"]).save(path)
    other = make_bank(3, ids=["x", "y", "z"])
    with pytest.raises(FileExistsError, match="overwrite"):
        other.save(path)
    assert ReferenceBank.load(path).ids == ["a", "b"]  # untouched
    other.save(path, overwrite=True)
    assert ReferenceBank.load(path).ids == ["x", "y", "z"]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_bank_repr_leaks_neither_ids_nor_voxels():
    ids = ["patient-secret-1234", "patient-secret-5678"]
    images = torch.full((2, 1, 4, 4, 4), 0.123456)
    bank = ReferenceBank(images, torch.ones(2, 4, 4, 4, dtype=torch.long), LABELS, ids=ids)
    for text in (repr(bank), str(bank), f"{bank}"):
        assert "secret" not in text and "1234" not in text
        assert "0.123" not in text and "tensor" not in text
        assert "2 references" in text


def test_bank_load_rejects_garbage_and_foreign_files(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(256))
    with pytest.raises(InputError, match="not readable as a mixpriv reference bank"):
        ReferenceBank.load(garbage)

    text = tmp_path / "notes.txt"
    text.write_text("hello, not a bank")
    with pytest.raises(InputError, match="reference bank"):
        ReferenceBank.load(text)

    foreign = tmp_path / "model.safetensors"
    save_file({"weight": torch.zeros(3)}, str(foreign), metadata={"format": "pt"})
    with pytest.raises(InputError, match="not a mixpriv reference bank"):
        ReferenceBank.load(foreign)

    no_metadata = tmp_path / "plain.safetensors"
    save_file({"images": torch.zeros(1, 1, 2, 2, 2)}, str(no_metadata))
    with pytest.raises(InputError, match="not a mixpriv reference bank"):
        ReferenceBank.load(no_metadata)

    with pytest.raises(FileNotFoundError):
        ReferenceBank.load(tmp_path / "missing.safetensors")


def test_bank_load_rejects_a_truncated_bank(tmp_path):
    """A file tagged as a bank but without its tensors or metadata fails with a clear error."""
    path = tmp_path / "forged.safetensors"
    save_file({"images": torch.zeros(1, 1, 2, 2, 2)}, str(path),
              metadata={"format": "mixpriv-reference-bank", "format_version": "1"})
    with pytest.raises(InputError, match="reference bank"):
        ReferenceBank.load(path)


def test_bank_rejects_bad_inputs():
    labels = torch.zeros(2, 4, 4, 4, dtype=torch.long)
    images = torch.rand(2, 1, 4, 4, 4)
    nan_images = images.clone()
    nan_images[1, 0, 2, 2, 2] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        ReferenceBank(nan_images, labels, LABELS)
    inf_images = images.clone()
    inf_images[0, 0, 0, 0, 0] = float("inf")
    with pytest.raises(InputError, match="NaN or infinite"):
        ReferenceBank(inf_images, labels, LABELS)
    bad_labels = labels.clone()
    bad_labels[0, 1, 1, 1] = 7
    with pytest.raises(InputError, match=r"values \[7\] that are not in the label set"):
        ReferenceBank(images, bad_labels, LABELS)
    with pytest.raises(InputError, match="do not match"):
        ReferenceBank(images, torch.zeros(2, 4, 4, 5, dtype=torch.long), LABELS)
    with pytest.raises(InputError, match="do not match"):
        ReferenceBank(images, torch.zeros(3, 4, 4, 4, dtype=torch.long), LABELS)
    with pytest.raises(InputError, match=r"\(N, 1, D, H, W\)"):
        ReferenceBank(torch.rand(2, 4, 4, 4), labels, LABELS)
    with pytest.raises(InputError, match="ids"):
        ReferenceBank(images, labels, LABELS, ids=["only-one"])
    with pytest.raises(InputError, match="at least one"):
        ReferenceBank(torch.rand(0, 1, 4, 4, 4), torch.zeros(0, 4, 4, 4, dtype=torch.long), LABELS)


def test_bank_sample_indices():
    bank = make_bank(4)
    generator = torch.Generator().manual_seed(0)
    indices = bank.sample_indices(3, generator)
    assert len(set(indices)) == 3 and all(0 <= i < 4 for i in indices)
    assert bank.sample_indices(3, torch.Generator().manual_seed(0)) == indices
    assert len(bank.sample_indices(6, generator)) == 6  # with replacement beyond the bank size
