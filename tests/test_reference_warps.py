"""Fresh warps of the references (``MixingSettings.reference_warp``): no reference recurs exactly in the
traffic, each mixture is still ``λ·x + (1 − λ)·r`` of the reference it records, and its label map moves with it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import LABELS, phantom

from mixpriv.inference.mixtures import mix_with_references
from mixpriv.mixing.bank import ReferenceBank
from mixpriv.mixing.settings import MixingSettings
from mixpriv.mixing import warps
from mixpriv.mixing.warps import warp_references
from mixpriv.validation import InputError


def make_bank(n: int = 3) -> ReferenceBank:
    images, labels = zip(*(phantom(i) for i in range(n)))
    return ReferenceBank.from_arrays(images, labels, LABELS, ids=[f"ref-{i}" for i in range(n)])


def target() -> torch.Tensor:
    return torch.from_numpy(np.clip(phantom(50)[0], 0, 1)).float()[None]


def test_without_a_warp_the_draws_and_mixtures_are_unchanged():
    bank, image = make_bank(), target()
    plain = mix_with_references(image, bank, 4, MixingSettings((0.2, 0.5)), torch.Generator().manual_seed(3))
    zero = mix_with_references(image, bank, 4, MixingSettings((0.2, 0.5), reference_warp=0),
                               torch.Generator().manual_seed(3))
    assert torch.equal(plain.mixtures, zero.mixtures) and torch.equal(plain.reference_labels, zero.reference_labels)
    torch.testing.assert_close(plain.references[:, 0], bank.images[[i for (i,) in plain.reference_indices], 0])


def test_a_warped_reference_never_recurs_and_its_mixture_is_exact():
    bank, image = make_bank(1), target()  # one reference: every mixture uses it
    mixing = MixingSettings((0.2, 0.5), reference_warp=3.0)
    mixed = mix_with_references(image, bank, 3, mixing, torch.Generator().manual_seed(0))
    assert [entry for entry in mixed.reference_indices] == [(0,), (0,), (0,)]
    references = mixed.references[:, 0]
    for a in range(3):
        assert (references[a] - bank.images[0, 0]).abs().max() > 0.2  # not the key's reference ...
        for b in range(a):
            assert (references[a] - references[b]).abs().max() > 0.2  # ... nor another mixture's
    lam = mixed.lambdas.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(mixed.mixtures[:, 0], lam * image + (1 - lam) * references)


def test_the_label_map_moves_with_its_reference():
    images = torch.zeros(1, 24, 24, 24)
    images[:, 6:18, 8:16, 5:19] = 1.0  # a box, its own label map
    labels = images.to(torch.uint8)
    warped, warped_labels = warp_references(images, labels, 3.0, torch.Generator().manual_seed(1))
    assert warped_labels.dtype == torch.uint8 and set(warped_labels.unique().tolist()) <= {0, 1}
    assert (warped_labels != labels).float().mean() > 0.01  # the labels moved ...
    agree = (warped.round().to(torch.uint8) == warped_labels).float().mean()
    assert agree > 0.98  # ... with the image


def test_warping_in_chunks_changes_nothing(monkeypatch):
    images = torch.rand(5, 12, 12, 12)
    labels = (images > 0.5).to(torch.uint8)
    whole = warp_references(images, labels, 2.0, torch.Generator().manual_seed(2))
    monkeypatch.setattr(warps, "CHUNK", 2)  # three chunks: 2 + 2 + 1
    chunked = warp_references(images, labels, 2.0, torch.Generator().manual_seed(2))
    torch.testing.assert_close(chunked[0], whole[0])
    assert torch.equal(chunked[1], whole[1])


def test_warps_come_from_the_generator():
    bank, image = make_bank(), target()
    mixing = MixingSettings((0.2, 0.5), reference_warp=2.0)
    first, again, other = (mix_with_references(image, bank, 2, mixing, torch.Generator().manual_seed(seed))
                           for seed in (4, 4, 5))
    assert torch.equal(first.mixtures, again.mixtures)
    assert not torch.equal(first.mixtures, other.mixtures)


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_a_bad_warp_is_refused(bad):
    with pytest.raises(InputError, match="reference_warp must be a finite number of voxels >= 0"):
        MixingSettings(reference_warp=bad)


def test_a_warp_that_would_fold_says_what_to_change():
    with pytest.raises(ValueError, match="would fold the field"):
        warp_references(torch.rand(1, 16, 16, 16), torch.zeros(1, 16, 16, 16, dtype=torch.uint8), 200.0)


def test_the_setting_names_and_records_its_warp():
    mixing = MixingSettings((0.1, 0.3), reference_warp=4)
    assert mixing.name == "λ∈[0.1, 0.3], refs warped 4 vox"
    assert mixing.to_dict()["reference_warp"] == 4.0 and "reference_warp" not in MixingSettings().to_dict()
    assert MixingSettings.of_model({"lambda_range": [0.1, 0.3]}, reference_warp=4) == mixing


def test_training_refuses_the_clients_warp():
    from mixpriv.mixing.transforms import RandomMix

    with pytest.raises(InputError, match="reference_warp is a client setting"):
        RandomMix(make_bank(), mixing=MixingSettings(reference_warp=2.0))


def test_the_learned_attacker_mixes_with_warped_copies_against_a_warping_client(monkeypatch):
    import mixpriv.privacy.attackers.learned as learned

    banks = []

    def recording(images, bank, mixing, *args, **kwargs):
        banks.append((bank, mixing))
        return encode(images, bank, mixing, *args, **kwargs)

    encode = learned.encode_scans
    monkeypatch.setattr(learned, "encode_scans", recording)
    g = torch.Generator().manual_seed(0)
    scans = [torch.rand(1, 16, 16, 16, generator=g) for _ in range(6)]
    options = learned.LearnedAttackerOptions(steps=1, patients_per_step=2, channels=(4,), embedding_dim=8,
                                             downsample=1, warped_copies=2)
    for warp in (0.0, 2.0):
        banks.clear()
        learned.train_embedding(scans, ["a", "a", "b", "b", "c", "c"], MixingSettings((0.2, 0.5), reference_warp=warp),
                                2, options, progress=False)
        bank, mixing = banks[0]
        assert mixing.reference_warp == 0.0  # the pool's warps stand for the client's
        if warp:
            assert len(bank) == 12 and all("-warp" in i for i in bank.ids)
            assert not torch.equal(bank.images[0], scans[0])
        else:
            assert len(bank) == 6 and torch.equal(bank.images[0], scans[0])
