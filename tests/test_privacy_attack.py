"""The BSS attack audit: priors (trained once, then reused), three attacks, the Fig. 4 section."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import phantom

from mixpriv.privacy.bss import (
    ATTACKS,
    TRAINING_FILE,
    SeparationOptions,
    attack_setting,
    audit_separation,
    draw_patches,
    train_score_prior,
)
from mixpriv.privacy.report import separation_section
from mixpriv.privacy.score_matching import WEIGHTS_FILE
from mixpriv.validation import InputError

TINY = {"patch_size": 16, "num_patches": 2, "inits": 2, "score_steps": 3, "batch_size": 2, "num_levels": 2,
        "steps_per_level": 2, "lambda_candidates": (0.6, 0.8), "lambda_steps_per_level": 1,
        "network": {"channels": [4, 8], "embedding_dim": 8}}


def _volumes(seeds) -> list[torch.Tensor]:
    return [torch.from_numpy(phantom(seed)[0]).clamp(0, 1).unsqueeze(0) for seed in seeds]


@pytest.fixture(scope="module")
def attacked(tmp_path_factory):
    out = tmp_path_factory.mktemp("bss")
    options = SeparationOptions(**TINY)
    audit = audit_separation(_volumes([0, 1]), _volumes([2, 3]), _volumes([4, 5]), (0.65, 0.95), options, out,
                             seed=0, progress=False)
    return audit, out, options


def test_audit_reports_finite_numbers_for_three_attacks(attacked):
    audit, _, options = attacked
    assert list(audit.attacks) == list(ATTACKS)
    for result in audit.attacks.values():
        assert result.scores.shape == (options.num_patches, options.inits)
        assert result.recovered.shape == (options.num_patches, options.inits, 1, 16, 16, 16)
        assert result.reference_scores.shape == result.scores.shape and result.reference_trivial.shape == (2,)
        for value in (result.mean, result.std, result.best_init_mean, result.trivial_mean, result.trivial_std,
                      result.reference_mean, result.reference_trivial_mean):
            assert math.isfinite(value)
        assert result.best_init_mean >= result.mean - 1e-6
    for name in ("λ known", "λ estimated"):
        lam = audit.attacks[name].lam
        assert bool(((lam >= 0.65) & (lam <= 0.95)).all())
    control = audit.attacks["control: brain + grating"]  # equal weights by default
    assert control.lam.tolist() == [0.5, 0.5] and control.lam_used.tolist() == [0.5, 0.5]
    estimated = audit.attacks["λ estimated"]
    assert math.isfinite(estimated.lambda_error) and estimated.lambda_error_folded is not None
    assert {round(v, 4) for v in estimated.lam_used.tolist()} <= {0.6, 0.8}
    assert audit.attacks["λ known"].lambda_error is None
    assert audit.msssim.levels == 3  # settings_for a 16³ patch
    assert set(audit.training_seconds) == {"brain", "control"}
    assert set(audit.denoising) == {"brain", "control"}
    assert [row["sigma"] for row in audit.denoising["brain"]] == pytest.approx(options.sigmas().tolist())
    assert all(math.isfinite(row["denoised_rmse"]) for row in audit.denoising["control"])


def test_section_writes_figures_and_table(attacked, tmp_path):
    audit, _, _ = attacked
    data, lines = separation_section(audit, tmp_path)
    text = "\n".join(lines)
    for name in ATTACKS:
        assert (tmp_path / data["attacks"][name]["figure"]).stat().st_size > 0
        assert f"| {name} |" in text
    assert "MS-SSIM mixture vs target (trivial)" in text and "Reading rule" in text and "second source" in text
    assert audit.msssim.describe() in text and "16³" in text and "2 noise levels × 2 steps" in text
    assert data["attacks"]["λ known"]["lambda_error"] is None
    assert "| σ | brain prior | control prior |" in text
    assert "grating (brain weight 0.5, grating weight 0.5)" in text


def test_second_call_reuses_saved_priors_and_control_can_mix_at_the_clients_lambda(attacked):
    audit, out, options = attacked
    weights = {name: (out / name / WEIGHTS_FILE).stat().st_mtime_ns for name in ("prior-brain", "prior-control")}
    again = audit_separation(_volumes([0, 1]), _volumes([2, 3]), _volumes([4, 5]), (0.65, 0.95),
                             SeparationOptions(**{**TINY, "control_lambda": None}), out, seed=0, progress=False)
    assert {name: (out / name / WEIGHTS_FILE).stat().st_mtime_ns for name in weights} == weights
    assert again.training_seconds == {"brain": 0.0, "control": 0.0}
    torch.testing.assert_close(again.attacks["λ known"].trivial, audit.attacks["λ known"].trivial)
    torch.testing.assert_close(again.attacks["λ known"].scores, audit.attacks["λ known"].scores)  # same seed
    torch.testing.assert_close(again.attacks["control: brain + grating"].lam, audit.attacks["λ known"].lam)


def test_prior_retrains_when_the_training_differs(tmp_path):
    options = SeparationOptions(**TINY)
    folder = train_score_prior(None, tmp_path, options, control=True, progress=False)
    first = (folder / WEIGHTS_FILE).stat().st_mtime_ns
    assert train_score_prior(None, tmp_path, options, control=True, progress=False) == folder
    assert (folder / WEIGHTS_FILE).stat().st_mtime_ns == first
    train_score_prior(None, tmp_path, SeparationOptions(**{**TINY, "score_steps": 4}), control=True, progress=False)
    assert (folder / WEIGHTS_FILE).stat().st_mtime_ns != first
    assert '"score_steps": 4' in (folder / TRAINING_FILE).read_text()


def test_kway_patches_share_targets_and_mix_distinct_references():
    scans = _volumes([0, 1])
    levels = (0.2, 0.5, 0.8)
    bank = [torch.full_like(scans[0], level) for level in levels]  # constant references: the crop is the level
    single = draw_patches(scans, bank, 4, 16, torch.Generator().manual_seed(5), min_mean=0.05)
    kway = draw_patches(scans, bank, 4, 16, torch.Generator().manual_seed(5), min_mean=0.05, references_per_mix=3)
    torch.testing.assert_close(kway[0], single[0])  # one seed, the same targets whatever the references
    for one, composite in zip(single[1], kway[1]):
        assert min(abs(float(one.mean()) - level) for level in levels) < 1e-6
        # all three distinct references, Dirichlet weights summing to 1: a convex combination of the levels
        assert float(composite.std()) < 1e-6 and levels[0] < float(composite.mean()) < levels[-1]
    with pytest.raises(InputError, match="3 needed"):
        draw_patches(scans, bank[:2], 1, 16, torch.Generator().manual_seed(0), references_per_mix=3)


def test_attack_setting_scores_one_setting_with_a_saved_prior(attacked):
    audit, out, options = attacked
    result = attack_setting(_volumes([0, 1]), _volumes([2, 3]), out / "prior-brain", (0.65, 0.95), 1, options,
                            seed=0, progress=False)
    assert result.scores.shape == (options.num_patches, options.sweep_inits)
    # the same seed draws the same patches and λ as the audit's λ-known attack
    torch.testing.assert_close(result.trivial, audit.attacks["λ known"].trivial)
    torch.testing.assert_close(result.lam, audit.attacks["λ known"].lam)
    kway = attack_setting(_volumes([0, 1]), _volumes([2, 3, 4]), out / "prior-brain", (0.2, 0.5), 3, options,
                          seed=0, progress=False)
    assert bool(((kway.lam >= 0.2) & (kway.lam <= 0.5)).all()) and math.isfinite(kway.mean)
    with pytest.raises(InputError, match="noise levels"):
        attack_setting(_volumes([0]), _volumes([2]), out / "prior-brain", (0.65, 0.95), 1,
                       SeparationOptions(**{**TINY, "num_levels": 3}), progress=False)


@pytest.mark.parametrize("bad", [{"inits": 0}, {"sweep_inits": 0}, {"patch_size": 2}, {"num_patches": -1}, {"score_steps": 0},
                                 {"num_levels": 1}, {"sigma_min": 2.0}, {"delta": 1e-3}, {"delta": 0.0},
                                 {"lambda_candidates": ()}, {"lambda_candidates": (0.5, 1.5)},
                                 {"network": {"channels": []}}, {"steps_per_level": 0}, {"control_lambda": 1.0},
                                 {"control_lambda": 0.0}, {"lambda_candidates": (0.3, 0.7)},
                                 {"patch_size": 4, "network": {"channels": [4, 8, 16, 32]}}])
def test_bad_options_raise(bad):
    with pytest.raises(InputError):
        SeparationOptions(**{**TINY, **bad})


def test_bad_inputs_raise(tmp_path):
    options = SeparationOptions(**TINY)
    good = _volumes([0])
    with pytest.raises(InputError):
        audit_separation(good, good, good, (0.0, 0.5), options, tmp_path, progress=False)
    with pytest.raises(InputError):
        audit_separation([], good, good, (0.65, 0.95), options, tmp_path, progress=False)
    with pytest.raises(InputError):
        audit_separation([2 * good[0]], good, good, (0.65, 0.95), options, tmp_path, progress=False)
    with pytest.raises(InputError):
        audit_separation(good, [torch.rand(1, 20, 20, 20)], good, (0.65, 0.95), options, tmp_path, progress=False)
    with pytest.raises(InputError):
        train_score_prior(good, tmp_path, options, control=True)
