"""Privacy-audit metrics: 3D MS-SSIM, re-identification by retrieval, test-retest ICC(A,1)."""

from __future__ import annotations

import functools
import itertools
import logging
import math

import numpy as np
import pytest
import pytorch_msssim
import torch
from sklearn.metrics import average_precision_score

from mixpriv.mixing.bank import ReferenceBank
from mixpriv.mixing.settings import MixingSettings
from mixpriv.privacy import reliability
from mixpriv.privacy.reidentification import encode_scans, reidentify, retrieval_metrics
from mixpriv.privacy.reliability import ICCResult, icc_a1
from mixpriv.privacy.similarity import (
    STANDARD_WEIGHTS,
    MSSSIMSettings,
    ms_ssim_3d,
    settings_for,
    similarity_matrix,
)
from mixpriv.validation import InputError


def smooth_volume(seed: int, shape=(16, 16, 16)) -> torch.Tensor:
    """A random volume with structure at several scales (noise blurred by repeated 3x3x3 averaging)."""
    g = torch.Generator().manual_seed(seed)
    volume = torch.rand(1, 1, *shape, generator=g)
    for _ in range(2):
        volume = torch.nn.functional.avg_pool3d(volume, 3, stride=1, padding=1, count_include_pad=False)
    return volume[0]


# --------------------------------------------------------------------------- MS-SSIM


@pytest.mark.parametrize("side, levels", [(3, 1), (5, 2), (8, 2), (9, 3), (16, 3), (17, 4), (32, 4), (33, 5), (48, 5)])
def test_settings_for_picks_the_most_scales_that_fit(side, levels):
    settings = settings_for((side + 7, side, side + 3))  # the smallest side decides
    assert settings.levels == levels
    assert settings.min_side <= side
    standard = np.array(STANDARD_WEIGHTS[:levels])
    if levels < 5:  # truncated standard weights, renormalised; all 5 are kept as published
        standard /= standard.sum()
        assert math.isclose(sum(settings.weights), 1.0)
    np.testing.assert_allclose(settings.weights, standard, rtol=1e-12)


def test_settings_for_whole_volumes_keeps_the_standard_weights():
    settings = settings_for((88, 104, 88))
    assert settings == MSSSIMSettings()
    assert "5 scales" in settings.describe() and "window 3 voxels" in settings.describe()


def test_settings_for_rejects_volumes_under_three_voxels():
    with pytest.raises(InputError, match="every side needs 3 voxels"):
        settings_for((16, 2, 16))


@pytest.mark.parametrize("kwargs, message", [({"win_size": 4}, "odd"), ({"win_size": 1}, "odd"),
                                             ({"win_sigma": 0.0}, "sigma"), ({"weights": ()}, "at least one scale"),
                                             ({"data_range": -1.0}, "data range")])
def test_settings_reject_invalid_values(kwargs, message):
    with pytest.raises(InputError, match=message):
        MSSSIMSettings(**kwargs)


def test_min_side_is_the_bound_pytorch_msssim_asserts_for_five_scales():
    settings = MSSSIMSettings()
    fits = torch.rand(1, 1, settings.min_side, settings.min_side, settings.min_side)
    pytorch_msssim.ms_ssim(fits, fits, data_range=1.0, win_size=3)
    too_small = fits[..., 1:, 1:]
    with pytest.raises(AssertionError):
        pytorch_msssim.ms_ssim(too_small, too_small, data_range=1.0, win_size=3)
    with pytest.raises(InputError, match=f"at least {settings.min_side} voxels"):
        ms_ssim_3d(too_small, too_small, settings)


@pytest.mark.parametrize("side", [33, 40])
def test_five_scales_equal_pytorch_msssim(side):
    a = smooth_volume(0, (side, side, side + 2))[None]
    b = (a + 0.1 * torch.rand(a.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    expected = pytorch_msssim.ms_ssim(a, b, data_range=1.0, win_size=3, win_sigma=1.5, size_average=False)
    actual = ms_ssim_3d(a, b, MSSSIMSettings(data_range=1.0))
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(3, 3, 3), (16, 16, 16), (20, 17, 24), (33, 33, 33)])
def test_a_volume_is_identical_to_itself(shape):
    volume = smooth_volume(2, shape)
    assert ms_ssim_3d(volume, volume).item() == pytest.approx(1.0, abs=1e-6)


def test_similarity_decreases_with_noise():
    volume = smooth_volume(3, (20, 20, 20))
    noise = torch.randn(volume.shape, generator=torch.Generator().manual_seed(4))
    levels = torch.tensor([0.0, 0.02, 0.05, 0.1, 0.3]).view(-1, 1, 1, 1, 1)
    scores = ms_ssim_3d(volume.expand(5, 1, 20, 20, 20), volume + levels * noise).tolist()
    assert scores[0] == pytest.approx(1.0, abs=1e-6)
    assert all(later < earlier for earlier, later in itertools.pairwise(scores)), scores
    assert scores[-1] < 0.8


def test_scores_each_pair_of_a_batch_and_accepts_three_layouts():
    a = torch.stack([smooth_volume(seed) for seed in (5, 6, 7)])  # (3, 1, 16, 16, 16)
    b = torch.stack([smooth_volume(seed) for seed in (5, 8, 9)])
    batch = ms_ssim_3d(a, b)
    assert batch.shape == (3,)
    assert batch[0].item() == pytest.approx(1.0, abs=1e-6) and bool((batch[1:] < 0.99).all())
    for i in range(3):
        torch.testing.assert_close(ms_ssim_3d(a[i], b[i]), batch[i:i + 1])  # (1, D, H, W)
        torch.testing.assert_close(ms_ssim_3d(a[i, 0], b[i, 0]), batch[i:i + 1])  # (D, H, W)


def test_joint_rescaling_ignores_a_shared_affine_change_of_intensities():
    a, b = smooth_volume(10), smooth_volume(11)
    torch.testing.assert_close(ms_ssim_3d(5.0 * a - 2.0, 5.0 * b - 2.0), ms_ssim_3d(a, b))
    # but it is joint: rescaling only one volume of the pair lowers the score
    assert ms_ssim_3d(a, 3.0 * a).item() < 0.99


def test_a_fixed_data_range_scores_the_intensities_as_given():
    a = smooth_volume(12) * 0.5
    b = (a + 0.05 * torch.rand(a.shape, generator=torch.Generator().manual_seed(13))).clamp(0, 1)
    fixed = ms_ssim_3d(a, b, MSSSIMSettings(weights=settings_for(a.shape).weights, data_range=1.0))
    rescaled = ms_ssim_3d(a, b)
    assert not torch.allclose(fixed, rescaled)
    assert "fixed data range 1" in MSSSIMSettings(data_range=1.0).describe()


@pytest.mark.parametrize("a_shape, b_shape, message", [
    ((16, 16, 16), (16, 16, 17), "must match"),
    ((2, 16, 16, 16), (2, 16, 16, 16), "must have shape"),
    ((2, 2, 16, 16, 16), (2, 2, 16, 16, 16), "must have shape"),
    ((16, 16), (16, 16), "must have shape"),
])
def test_ms_ssim_rejects_bad_shapes(a_shape, b_shape, message):
    with pytest.raises(InputError, match=message):
        ms_ssim_3d(torch.rand(a_shape), torch.rand(b_shape))


def test_ms_ssim_rejects_non_finite_and_too_small_volumes():
    volume = torch.rand(16, 16, 16)
    broken = volume.clone()
    broken[3, 4, 5] = float("nan")
    with pytest.raises(InputError, match="b contains 1 NaN"):
        ms_ssim_3d(volume, broken)
    with pytest.raises(InputError, match="too small for MS-SSIM with 5 scales"):
        ms_ssim_3d(volume, volume, MSSSIMSettings())
    with pytest.raises(InputError, match="every side needs 3 voxels"):
        ms_ssim_3d(torch.rand(2, 8, 8), torch.rand(2, 8, 8))


def test_similarity_matrix_matches_the_pairwise_scores():
    volumes = [smooth_volume(seed) for seed in range(5)]
    matrix = similarity_matrix(volumes, progress=False, batch_size=3)
    assert matrix.shape == (5, 5) and matrix.dtype == torch.float32
    assert torch.equal(matrix, matrix.T)
    assert torch.equal(matrix.diagonal(), torch.ones(5))
    stack = torch.stack(volumes)  # (N, 1, D, H, W)
    rows, cols = torch.triu_indices(5, 5, offset=1)
    torch.testing.assert_close(matrix[rows, cols], ms_ssim_3d(stack[rows], stack[cols]))
    torch.testing.assert_close(similarity_matrix(stack[:, 0], progress=False, batch_size=100), matrix)  # (N, D, H, W)


def test_similarity_matrix_rejects_mixed_shapes_and_bad_batches():
    with pytest.raises(InputError, match="volume 1 has spatial shape"):
        similarity_matrix([torch.rand(8, 8, 8), torch.rand(8, 8, 9)], progress=False)
    with pytest.raises(InputError, match="at least one volume"):
        similarity_matrix([], progress=False)
    with pytest.raises(InputError, match="batch_size"):
        similarity_matrix([torch.rand(8, 8, 8)] * 2, progress=False, batch_size=0)


# --------------------------------------------------------------------------- re-identification


def test_retrieval_metrics_against_a_hand_computed_example():
    # patients a, a, b, b, c (c has one scan: a distractor, not a query)
    similarity = torch.tensor([
        [1.0, 0.2, 0.9, 0.1, 0.3],  # q0 (a): ranks 2(b) 4(c) 1(a) 3(b) -> AP 1/3, predicts b
        [0.2, 1.0, 0.1, 0.4, 0.8],  # q1 (a): ranks 4(c) 3(b) 0(a) 2(b) -> AP 1/3, predicts c
        [0.9, 0.1, 1.0, 0.7, 0.0],  # q2 (b): ranks 0(a) 3(b) 1(a) 4(c) -> AP 1/2, predicts a
        [0.1, 0.4, 0.7, 1.0, 0.2],  # q3 (b): ranks 2(b) 1(a) 4(c) 0(a) -> AP 1,   predicts b
        [0.3, 0.8, 0.0, 0.2, 1.0],
    ])
    result = retrieval_metrics(similarity, ["a", "a", "b", "b", "c"])
    assert result.num_queries == 4 and result.num_skipped == 1
    assert [q.predicted_id for q in result.per_query] == ["b", "c", "a", "b"]
    assert [q.average_precision for q in result.per_query] == pytest.approx([1 / 3, 1 / 3, 1 / 2, 1.0])
    assert result.mean_average_precision == pytest.approx((1 / 3 + 1 / 3 + 1 / 2 + 1) / 4)
    assert result.top1_accuracy == pytest.approx(0.25)
    # a: TP 0 -> F1 0; b: TP 1, FP 1 (q0), FN 1 (q2) -> P = R = 1/2 -> F1 1/2; macro over {a, b}
    assert result.f1 == pytest.approx(0.25)


def test_average_precision_matches_scikit_learn_without_ties():
    rng = np.random.default_rng(0)
    ids = [f"p{i // 3}" for i in range(12)]  # 4 patients with 3 scans each
    similarity = torch.as_tensor(rng.random((12, 12)))
    result = retrieval_metrics(similarity, ids)
    for query in result.per_query:
        others = [j for j in range(12) if j != query.index]
        expected = average_precision_score([ids[j] == ids[query.index] for j in others],
                                            similarity[query.index, others].numpy())
        assert query.average_precision == pytest.approx(expected)
        assert query.num_relevant == 2


def test_ties_rank_the_lower_index_first():
    result = retrieval_metrics(torch.ones(4, 4), ["a", "b", "b", "a"])
    assert [q.predicted_id for q in result.per_query] == ["b", "a", "a", "a"]
    assert [q.average_precision for q in result.per_query] == pytest.approx([1 / 3, 1 / 2, 1 / 2, 1.0])


def test_perfectly_separated_patients_are_fully_reidentified():
    ids = ["p0", "p0", "p1", "p1", "p1", "p2", "p2"]
    same = torch.tensor([[a == b for b in ids] for a in ids], dtype=torch.float32)
    result = retrieval_metrics(0.2 + 0.7 * same, ids)
    assert (result.f1, result.mean_average_precision, result.top1_accuracy) == (1.0, 1.0, 1.0)


def test_random_similarities_give_a_low_map():
    ids = [f"p{i // 2}" for i in range(60)]
    similarity = torch.rand(60, 60, generator=torch.Generator().manual_seed(0))
    result = retrieval_metrics(similarity, ids)
    assert result.mean_average_precision < 0.25  # chance: about H(59)/59 = 0.08
    assert result.f1 < 0.2


@pytest.mark.parametrize("similarity, ids, message", [
    (torch.ones(3, 4), ["a", "a", "b"], "square"),
    (torch.ones(3, 3), ["a", "a"], "2 patient ids"),
    (torch.ones(3, 3), ["a", "b", "c"], "no patient has two scans"),
    (torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), ["a", "a"], "NaN"),
])
def test_retrieval_metrics_rejects_bad_inputs(similarity, ids, message):
    with pytest.raises(InputError, match=message):
        retrieval_metrics(similarity, ids)


def constant_bank(values, ids, shape=(8, 8, 8)) -> ReferenceBank:
    images = torch.stack([torch.full((1, *shape), float(v)) for v in values])
    return ReferenceBank(images, torch.zeros(len(values), *shape, dtype=torch.long), {"background": 0}, ids=ids)


def test_encode_scans_never_mixes_a_scan_with_itself():
    bank = constant_bank([10.0, -10.0], ["case0", "case1"])  # the sign of a mixture tells the reference
    scans = [torch.zeros(1, 8, 8, 8)] * 20
    encoded = encode_scans(scans, bank, MixingSettings((0.65, 0.95)), torch.Generator().manual_seed(0), case_ids=["case0"] * 20)
    for mixture in encoded:
        assert mixture.shape == (1, 8, 8, 8)
        assert bool((mixture <= -0.5 + 1e-5).all() & (mixture >= -3.5 - 1e-5).all())  # (1 - lambda) * -10
    others = encode_scans(scans, bank, MixingSettings((0.65, 0.95)), torch.Generator().manual_seed(0), case_ids=["new"] * 20)
    assert {float(torch.sign(m[0, 0, 0, 0])) for m in others} == {-1.0, 1.0}  # both references are drawn


def test_encode_scans_is_reproducible_and_draws_distinct_references():
    bank = constant_bank([1.0, 10.0, 100.0], ["r0", "r1", "r2"])  # (1 - lambda) * value: disjoint ranges
    scans = [torch.zeros(1, 8, 8, 8)] * 3
    encode = functools.partial(encode_scans, bank=bank, references_per_scan=2, case_ids=["r0", "x", "y"])
    first = encode(scans, generator=torch.Generator().manual_seed(1))
    again = encode(scans, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert first[0].shape == (2, 8, 8, 8)
    # scan 0 (case r0) is mixed with r1 and with r2: one mixture in [0.5, 3.5], the other in [5, 35]
    levels = sorted(float(mixture[0, 0, 0]) for mixture in first[0])
    assert 0.5 - 1e-5 <= levels[0] <= 3.5 + 1e-5 and 5.0 - 1e-5 <= levels[1] <= 35.0 + 1e-5


def test_encode_scans_k_way_mixes_distinct_other_references():
    bank = constant_bank([1.0, 10.0, 100.0, 1000.0], ["r0", "r1", "r2", "r3"])
    scans = [torch.zeros(1, 8, 8, 8)] * 10
    encoded = encode_scans(scans, bank, MixingSettings((0.7, 0.7), references_per_mix=3), torch.Generator().manual_seed(0),
                           case_ids=["r3"] * 10)
    # the composite of r0, r1, r2 (never r3) with Dirichlet weights: 0.3 * (w0 + 10 w1 + 100 w2), w summing to 1
    values = [float(mixture[0, 0, 0, 0]) for mixture in encoded]
    assert all(0.3 - 1e-4 < v < 30.0 + 1e-4 for v in values)
    assert len({round(v, 4) for v in values}) == 10  # the weights are drawn per scan


@pytest.mark.parametrize("kwargs, message", [
    ({"case_ids": ["r0"]}, "no reference other than case 'r0'"),
    ({"case_ids": ["r0", "r1"]}, "2 case ids given for 1 scans"),
    ({"case_ids": ["x"], "references_per_scan": 0}, "at least 1"),
])
def test_encode_scans_rejects_bad_inputs(kwargs, message):
    with pytest.raises(InputError, match=message):
        encode_scans([torch.zeros(1, 8, 8, 8)], constant_bank([1.0], ["r0"]), **kwargs)


def scans_of_patients(num_patients: int, scans_each: int = 2, noise: float = 0.02):
    """Scans of distinct patients; the scans of one patient differ by a little noise."""
    g = torch.Generator().manual_seed(42)
    scans, ids = [], []
    for patient in range(num_patients):
        anatomy = smooth_volume(100 + patient, (12, 12, 12))
        for _ in range(scans_each):
            scans.append(anatomy + noise * torch.rand(anatomy.shape, generator=g))
            ids.append(f"patient{patient}")
    return scans, ids


def test_reidentify_raw_scans_of_the_same_patients():
    scans, ids = scans_of_patients(3)
    result = reidentify(scans, ids, progress=False)
    assert (result.mean_average_precision, result.f1) == (1.0, 1.0)


def test_reidentify_attacks_the_encoded_scans_only():
    scans, ids = scans_of_patients(3)
    seen = []

    def scramble(images):  # an encoder that destroys identity: fresh noise per scan
        seen.append(len(images))
        g = torch.Generator().manual_seed(7)
        return [torch.rand(image.shape, generator=g) for image in images]

    result = reidentify(scans, ids, encoder=scramble, progress=False)
    assert seen == [6]
    assert result.mean_average_precision < 0.9
    with pytest.raises(InputError, match="returned 5 volumes for 6 scans"):
        reidentify(scans, ids, encoder=lambda images: list(images)[:5], progress=False)


def test_reidentify_with_the_mixing_encoder():
    scans, ids = scans_of_patients(3)
    bank = ReferenceBank(torch.stack([smooth_volume(200 + i, (12, 12, 12)) for i in range(4)]),
                         torch.zeros(4, 12, 12, 12, dtype=torch.long), {"background": 0})
    encoder = functools.partial(encode_scans, bank=bank, generator=torch.Generator().manual_seed(0),
                                case_ids=[f"case{i}" for i in range(len(scans))])
    result = reidentify(scans, ids, encoder=encoder, progress=False)
    assert result.num_queries == 6
    assert 0.0 < result.mean_average_precision <= 1.0


# --------------------------------------------------------------------------- test-retest ICC


def icc_a1_by_hand(first, second) -> float:
    """McGraw & Wong ICC(A,1) from the mean squares of the two-way ANOVA without replication."""
    ratings = np.column_stack([first, second]).astype(float)
    n, k = ratings.shape
    grand = ratings.mean()
    rows, cols = ratings.mean(1, keepdims=True), ratings.mean(0, keepdims=True)
    msr = k * ((rows - grand) ** 2).sum() / (n - 1)
    msc = n * ((cols - grand) ** 2).sum() / (k - 1)
    mse = ((ratings - rows - cols + grand) ** 2).sum() / ((n - 1) * (k - 1))
    return (msr - mse) / (msr + (k - 1) * mse + k * (msc - mse) / n)


FIRST = [0.81, 0.77, 0.90, 0.62, 0.85, 0.70, 0.88, 0.74]
SECOND = [0.79, 0.80, 0.86, 0.66, 0.84, 0.65, 0.90, 0.78]


def test_icc_matches_the_hand_computed_anova_formula():
    result = icc_a1(FIRST, SECOND)
    assert result.icc == pytest.approx(icc_a1_by_hand(FIRST, SECOND), abs=1e-12)
    assert result.n == 8 and result.n_dropped == 0
    assert result.ci_low < result.icc < result.ci_high <= 1.0
    assert result.ci_low != round(result.ci_low, 2)  # pingouin's default 2-decimal rounding is off


def test_icc_is_absolute_agreement_not_consistency():
    shifted = [value + 0.1 for value in SECOND]  # as consistent with FIRST as SECOND is, but 0.1 higher
    result = icc_a1(FIRST, shifted)
    assert result.icc == pytest.approx(icc_a1_by_hand(FIRST, shifted))
    assert result.icc < icc_a1(FIRST, SECOND).icc - 0.3


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
def test_identical_ratings_agree_perfectly():  # pingouin's CI divides by the residual mean square, here 0
    assert icc_a1(FIRST, FIRST).icc == pytest.approx(1.0)


def test_icc_drops_nan_cases_and_says_so(caplog):
    first, second = FIRST + [float("nan"), 0.5], SECOND + [0.6, float("nan")]
    with caplog.at_level(logging.WARNING, logger="mixpriv.privacy.reliability"):
        result = icc_a1(first, second, name="GM")
    assert result.n == 8 and result.n_dropped == 2
    assert result.icc == pytest.approx(icc_a1_by_hand(FIRST, SECOND))
    assert "GM: 2 of 10 cases dropped" in caplog.text


def test_icc_of_constant_ratings_is_nan():
    result = icc_a1([0.5] * 4, [0.5] * 4)
    assert math.isnan(result.icc) and math.isnan(result.ci_low) and result.n == 4


def test_icc_leaves_pingouin_options_as_they_were():
    import pingouin

    before = dict(pingouin.options)
    icc_a1(FIRST, SECOND)
    assert pingouin.options == before


@pytest.mark.parametrize("first, second, message", [
    ([0.1, 0.2, 0.3], [0.1, 0.2], "3 cases but the second have 2"),
    ([0.1, 0.2, float("nan")], [0.1, 0.2, 0.3], "at least 3 cases with two ratings, got 2 \\(1 dropped"),
    ([0.1, 0.2], [0.1, 0.2], "at least 3 cases"),
    ([0.1, 0.2, float("inf")], [0.1, 0.2, 0.3], "infinite"),
    ([[0.1, 0.2, 0.3]], [[0.1, 0.2, 0.3]], "one value per case"),
])
def test_icc_rejects_bad_inputs(first, second, message):
    with pytest.raises(InputError, match=message):
        icc_a1(first, second)


def test_test_retest_per_class():
    first = {"GM": FIRST, "WM": SECOND}
    second = {"GM": SECOND, "WM": [value + 0.1 for value in FIRST]}
    results = reliability.test_retest(first, second)
    assert list(results) == ["GM", "WM"]
    assert all(isinstance(result, ICCResult) for result in results.values())
    assert results["GM"].icc == pytest.approx(icc_a1_by_hand(FIRST, SECOND))
    assert results["WM"].icc < results["GM"].icc
    with pytest.raises(InputError, match="CSF"):
        reliability.test_retest({**first, "CSF": [0.1, 0.2]}, {**second, "CSF": [0.1]})
    with pytest.raises(InputError, match=r"\['WM'\] only in the first"):
        reliability.test_retest(first, {"GM": SECOND})
