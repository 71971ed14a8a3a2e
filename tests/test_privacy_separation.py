"""Blind-source-separation attack: 3D score network, score matching, BASIS, lambda search, control."""

from __future__ import annotations

import json

import pytest
import pytorch_lightning as pl
import torch
from safetensors import safe_open

from mixpriv.privacy.control import sample_control_volumes
from mixpriv.privacy.score_matching import (
    CARD_FILE,
    WEIGHTS_FILE,
    ScoreMatchingModule,
    dsm_loss,
    load_score_network,
    patch_loader,
    save_score_network,
    to_unit_range,
)
from mixpriv.privacy.score_network import build_score_network, geometric_sigmas
from mixpriv.privacy.lambda_search import estimate_lambda
from mixpriv.privacy.separation import (
    Separation,
    basis_separate,
    basis_separate_request,
    match_sources,
)
from mixpriv.validation import InputError

SIGMAS = geometric_sigmas(1.0, 0.01, 10)
TINY_SPEC = {"channels": [4, 8], "embedding_dim": 8}


def gaussian_score(mean: float, std: float):
    """Exact noise-conditional score of N(mean, std^2) per voxel: the prior blurred by N(0, sigma^2)."""
    return lambda x, sigma: -(x - mean) / (std**2 + sigma**2)


def gaussian_posterior(mixture: torch.Tensor, lam: float, prior_1, prior_2, sigma: float):
    """Exact posterior means and stds of (x1, x2) per voxel given m, lam, Gaussian priors and noise sigma.

    This is the target of BASIS's last level: priors N(mu_i, s_i^2 + sigma^2) (the blurred priors) and
    likelihood N(m; lam x1 + (1 - lam) x2, sigma^2).
    """
    (mu_1, s_1), (mu_2, s_2) = prior_1, prior_2
    v_1, v_2 = s_1**2 + sigma**2, s_2**2 + sigma**2
    a, b = lam, 1 - lam
    precision = torch.tensor([[1 / v_1 + a * a / sigma**2, a * b / sigma**2],
                              [a * b / sigma**2, 1 / v_2 + b * b / sigma**2]], dtype=torch.float64)
    covariance = torch.linalg.inv(precision)
    m = mixture.flatten().double()
    means = covariance @ torch.stack([mu_1 / v_1 + a * m / sigma**2, mu_2 / v_2 + b * m / sigma**2])
    return means, covariance.diag().sqrt()


def draw_mixture(lam: float, prior_1, prior_2, shape, generator: torch.Generator) -> torch.Tensor:
    x1 = prior_1[0] + prior_1[1] * torch.randn(shape, generator=generator)
    x2 = prior_2[0] + prior_2[1] * torch.randn(shape, generator=generator)
    return lam * x1 + (1 - lam) * x2


# --- BASIS with analytic Gaussian priors ----------------------------------------------------------

def test_basis_matches_exact_gaussian_posterior():
    prior_1, prior_2, lam, chains = (0.3, 0.1), (0.6, 0.15), 0.7, 256
    generator = torch.Generator().manual_seed(0)
    mixture = draw_mixture(lam, prior_1, prior_2, (1, 1, 4, 4, 4), generator)
    # 300 steps per level: with the default 100, the chains lag behind the last level's posterior along the
    # mixture constraint (a bias up to ~0.02 that grows with |m - E m|, seen with 4096 chains)
    out = basis_separate(mixture.repeat(chains, 1, 1, 1, 1), gaussian_score(*prior_1), gaussian_score(*prior_2), lam,
                         SIGMAS, steps_per_level=300, generator=generator, clamp=None, progress=False)
    means, stds = gaussian_posterior(mixture, lam, prior_1, prior_2, float(SIGMAS[-1]))
    for k, source in enumerate(out):
        error = source.mean(0).flatten().double() - means[k]
        tolerance = 4 * stds[k] / chains**0.5 + 0.004  # Monte Carlo error of 256 chains + the remaining lag
        assert error.abs().max() < tolerance, f"source {k + 1}: posterior mean off by {error.abs().max()}"
        spread = source.std(0).mean().double() / stds[k]
        assert 0.9 < spread < 1.1, f"source {k + 1}: posterior std off by a factor {spread}"


def test_basis_is_not_the_prior_mean():
    """Sanity check of the test above: the posterior differs from the priors, and BASIS follows it."""
    prior_1, prior_2, lam = (0.3, 0.1), (0.6, 0.15), 0.5
    mixture = torch.full((64, 1, 2, 2, 2), 0.3)  # far below lam * 0.3 + (1 - lam) * 0.6 = 0.45
    out = basis_separate(mixture, gaussian_score(*prior_1), gaussian_score(*prior_2), lam, SIGMAS, clamp=None,
                         progress=False, generator=torch.Generator().manual_seed(1))
    means, _ = gaussian_posterior(mixture[0], lam, prior_1, prior_2, float(SIGMAS[-1]))
    assert float(means[1].mean()) < 0.5
    assert abs(float(out.source_2.mean()) - float(means[1].mean())) < 0.02


def test_basis_is_deterministic_by_generator_and_clamps():
    mixture = torch.rand(2, 1, 3, 3, 3, generator=torch.Generator().manual_seed(0))
    score = gaussian_score(0.5, 0.2)
    runs = [basis_separate(mixture, score, score, torch.tensor([0.6, 0.8]), SIGMAS[:3], steps_per_level=5,
                           generator=torch.Generator().manual_seed(3), progress=False) for _ in range(2)]
    assert torch.equal(runs[0].source_1, runs[1].source_1) and torch.equal(runs[0].source_2, runs[1].source_2)
    assert float(runs[0].source_1.min()) >= 0 and float(runs[0].source_1.max()) <= 1


def test_unstable_delta_raises():
    mixture = torch.rand(1, 1, 2, 2, 2)
    score = gaussian_score(0.5, 0.2)
    with pytest.raises(InputError, match="unstable BASIS step"):
        basis_separate(mixture, score, score, 0.5, SIGMAS, delta=5e-4, progress=False)
    # at lam = 0.5, a^2 + b^2 = 0.5: delta / sigma_L^2 = 3.9 is still stable
    basis_separate(mixture, score, score, 0.5, SIGMAS[-2:], steps_per_level=1, delta=3.9e-4, progress=False)


@pytest.mark.parametrize("kwargs, message", [
    ({"lam": 0.0}, "lam must lie in"),
    ({"lam": torch.tensor([0.5, 0.6, 0.7])}, "one value per mixture"),
    ({"sigmas": [0.01, 1.0]}, "decrease"),
    ({"sigmas": [1.0, -0.1]}, "positive"),
    ({"clamp": (1.0, 0.0)}, "clamp"),
    ({"steps_per_level": 0}, "steps_per_level"),
])
def test_basis_rejects_bad_arguments(kwargs, message):
    arguments = {"lam": 0.7, "sigmas": SIGMAS, **kwargs}
    score = gaussian_score(0.5, 0.2)
    with pytest.raises(InputError, match=message):
        basis_separate(torch.rand(2, 1, 2, 2, 2), score, score, progress=False, **arguments)


def test_basis_rejects_a_volume_without_batch_axis():
    score = gaussian_score(0.5, 0.2)
    with pytest.raises(InputError, match=r"\(N, C, D, H, W\)"):
        basis_separate(torch.rand(1, 4, 4, 4), score, score, 0.7, SIGMAS, progress=False)


@pytest.mark.parametrize("true_lam", [0.35, 0.7])
def test_estimate_lambda_finds_an_identifiable_weight(true_lam):
    prior_1, prior_2 = (0.2, 0.05), (0.8, 0.05)
    generator = torch.Generator().manual_seed(2)
    mixture = draw_mixture(true_lam, prior_1, prior_2, (2, 1, 6, 6, 6), generator)
    candidates = torch.linspace(0.1, 0.9, 17)
    estimate = estimate_lambda(mixture, gaussian_score(*prior_1), gaussian_score(*prior_2), SIGMAS,
                               candidates=candidates, generator=generator)
    assert estimate.energy.shape == (2, 17)
    assert torch.allclose(estimate.lam, torch.full((2,), true_lam), atol=0.051), estimate.lam
    far = (candidates - true_lam).abs() > 0.2
    assert bool((estimate.energy[:, far].min(1).values > estimate.energy.min(1).values).all())


def test_match_sources_swaps_per_mixture():
    true_1, true_2 = torch.zeros(2, 1, 2, 2, 2), torch.ones(2, 1, 2, 2, 2)
    recovered_1 = torch.stack([true_1[0] + 0.1, true_2[1] - 0.1])  # mixture 0 in order, mixture 1 swapped
    recovered_2 = torch.stack([true_2[0] - 0.1, true_1[1] + 0.1])
    similarity = lambda a, b: -(a - b).abs().flatten(1).mean(1)
    matched = match_sources(recovered_1, recovered_2, true_1, true_2, similarity)
    assert isinstance(matched, Separation)
    assert torch.allclose(matched.source_1, true_1 + 0.1) and torch.allclose(matched.source_2, true_2 - 0.1)


# --- score network and score matching ------------------------------------------------------------------

def test_score_network_shape_and_conditioning():
    net = build_score_network(TINY_SPEC)
    x = torch.rand(2, 1, 9, 10, 12)  # odd sizes: decoder upsamples to the skip's size
    out = net(x, torch.tensor([0.5, 0.05]))
    assert out.shape == x.shape
    # the output is divided by sigma; beyond that, sigma must change what the network computes
    scaled = [sigma * net(x, sigma) for sigma in (1.0, 0.05)]
    assert not torch.allclose(scaled[0], scaled[1], atol=1e-4)


def test_default_score_network_runs_on_32_cubed_patches():
    net = build_score_network()
    out = net(torch.rand(1, 1, 32, 32, 32), 0.1)
    out.pow(2).mean().backward()
    assert out.shape == (1, 1, 32, 32, 32)
    assert all(p.grad is not None for p in net.parameters())


def test_geometric_sigmas_and_bad_specs():
    sigmas = geometric_sigmas(1.0, 0.01, 10)
    assert sigmas[0] == pytest.approx(1.0) and sigmas[-1] == pytest.approx(0.01)
    ratios = sigmas[1:] / sigmas[:-1]
    assert torch.allclose(ratios, ratios[0].expand_as(ratios))
    with pytest.raises(InputError):
        geometric_sigmas(0.01, 1.0, 10)
    with pytest.raises(InputError, match="unknown score network spec keys"):
        build_score_network({"chanels": [4]})
    with pytest.raises(InputError, match="channels"):
        build_score_network({"channels": []})


def test_dsm_steps_lower_the_loss():
    torch.manual_seed(0)
    net = build_score_network(TINY_SPEC)
    data = sample_control_volumes(8, (8, 8, 8), torch.Generator().manual_seed(0))
    sigmas = geometric_sigmas(1.0, 0.05, 4)

    def held_out_loss() -> float:
        with torch.no_grad():
            return float(dsm_loss(net, data, sigmas, torch.Generator().manual_seed(123)))

    before = held_out_loss()
    optimizer = torch.optim.Adam(net.parameters(), lr=5e-3)
    generator = torch.Generator().manual_seed(1)
    for _ in range(20):
        optimizer.zero_grad()
        dsm_loss(net, data, sigmas, generator).backward()
        optimizer.step()
    after = held_out_loss()
    assert after < 0.8 * before, (before, after)


def test_lightning_training_updates_the_ema_copy():
    images = [torch.rand(1, 10, 10, 10) for _ in range(2)]
    module = ScoreMatchingModule(TINY_SPEC, num_levels=4, ema_decay=0.5)
    initial = [p.detach().clone() for p in module.ema.module.parameters()]
    trainer = pl.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(module, train_dataloaders=patch_loader(images, 6, 2, torch.Generator().manual_seed(0)))
    assert trainer.global_step == 3
    ema, raw = list(module.ema.module.parameters()), list(module.net.parameters())
    assert any(not torch.equal(e, i) for e, i in zip(ema, initial)), "EMA weights never moved"
    assert any(not torch.equal(e, r) for e, r in zip(ema, raw)), "EMA weights are a plain copy"
    x = torch.rand(1, 1, 6, 6, 6)
    assert torch.equal(module.score_fn()(x, 0.1), module.ema.module(x, 0.1))


def test_validation_logs_the_dsm_loss_of_the_ema_weights():
    module = ScoreMatchingModule(TINY_SPEC, num_levels=4)
    with torch.no_grad():
        for p in module.ema.module.parameters():
            p.add_(0.01 * torch.randn_like(p))  # EMA weights differ from the raw ones: validation uses the EMA copy
    held_out = sample_control_volumes(2, (6, 6, 6), torch.Generator().manual_seed(9))
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    loader = torch.utils.data.DataLoader([held_out], batch_size=None)  # one batch of two volumes
    logged = trainer.validate(module, dataloaders=loader, verbose=False)[0]["val/dsm_loss"]
    with torch.no_grad():
        ema = dsm_loss(module.ema.module, held_out, module.sigmas, torch.Generator().manual_seed(0))
        raw = dsm_loss(module.net, held_out, module.sigmas, torch.Generator().manual_seed(0))
    assert logged == pytest.approx(float(ema), rel=1e-5)
    assert logged != pytest.approx(float(raw), rel=1e-5)


def test_save_load_round_trip_without_pickle(tmp_path):
    module = ScoreMatchingModule(TINY_SPEC, num_levels=3)
    with torch.no_grad():
        for p in module.ema.module.parameters():
            p.add_(0.01 * torch.randn_like(p))  # EMA weights differ from the raw ones: the EMA copy is saved
    folder = save_score_network(module, tmp_path / "prior")
    assert sorted(p.name for p in folder.iterdir()) == sorted([WEIGHTS_FILE, CARD_FILE])
    with safe_open(str(folder / WEIGHTS_FILE), framework="pt") as weights:  # a safetensors file, not a pickle
        assert set(weights.keys()) == set(module.ema.module.state_dict())
    card = json.loads((folder / CARD_FILE).read_text())
    assert card["spec"]["channels"] == TINY_SPEC["channels"] and len(card["sigmas"]) == 3
    loaded = load_score_network(folder)
    x = torch.rand(2, 1, 6, 6, 6)
    assert torch.equal(loaded(x, 0.2), module.score_fn()(x, 0.2))
    with pytest.raises(FileExistsError):
        save_score_network(module, folder)


def test_load_rejects_weights_that_do_not_fit(tmp_path):
    folder = save_score_network(build_score_network(TINY_SPEC), tmp_path / "prior")
    card = json.loads((folder / CARD_FILE).read_text())
    card["spec"]["channels"] = [4, 16]
    (folder / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(InputError, match="does not fit"):
        load_score_network(folder)


def test_patch_loader_rejects_background_and_out_of_range():
    brain = torch.zeros(1, 16, 16, 16)
    brain[:, 4:12, 4:12, 4:12] = 0.8
    batch = next(iter(patch_loader([brain], 6, 16, torch.Generator().manual_seed(0))))
    assert batch.shape == (16, 1, 6, 6, 6)
    assert bool((batch.abs().flatten(1).mean(1) >= 0.05).all())
    with pytest.raises(InputError, match="no crop"):
        next(iter(patch_loader([torch.zeros(1, 8, 8, 8)], 4, 1)))
    with pytest.raises(InputError, match="to_unit_range"):
        patch_loader([torch.full((1, 8, 8, 8), 300.0)], 4, 1)
    unit = to_unit_range(torch.full((1, 8, 8, 8), 300.0) + torch.arange(8.0))
    assert float(unit.min()) == 0 and float(unit.max()) == 1


# --- positive control --------------------------------------------------------------------------------

def test_control_volumes_are_structured_and_reproducible():
    volumes = sample_control_volumes(6, (16, 16, 16), torch.Generator().manual_seed(0))
    again = sample_control_volumes(6, (16, 16, 16), torch.Generator().manual_seed(0))
    other = sample_control_volumes(6, (16, 16, 16), torch.Generator().manual_seed(1))
    assert volumes.shape == (6, 1, 16, 16, 16)
    assert torch.equal(volumes, again) and not torch.equal(volumes, other)
    assert float(volumes.min()) >= 0 and float(volumes.max()) <= 1
    assert float(volumes.std()) > 0.2, "not a near-constant volume"
    # smooth, unlike white noise: neighbouring voxels are strongly correlated along every axis
    for axis in (2, 3, 4):
        a = volumes.narrow(axis, 0, 15).flatten() - 0.5
        b = volumes.narrow(axis, 1, 15).flatten() - 0.5
        assert float((a * b).mean() / (a.std() * b.std())) > 0.6
    noise = torch.rand(6, 1, 16, 16, 16)
    a, b = noise.narrow(2, 0, 15).flatten() - 0.5, noise.narrow(2, 1, 15).flatten() - 0.5
    assert abs(float((a * b).mean() / (a.std() * b.std()))) < 0.1  # the check above would fail on noise


def test_separating_a_whole_request_recovers_the_shared_target_better_than_one_mixture():
    """Gaussian sources (the exact score): K mixtures of one target pin it down better than one."""
    mean, std = 0.5, 0.1
    gaussian = lambda x, sigma: -(x - mean) / (std**2 + sigma**2)
    generator = torch.Generator().manual_seed(0)
    target = mean + std * torch.randn(4, 1, 4, 4, 4, generator=generator)
    references = mean + std * torch.randn(4, 8, 1, 4, 4, 4, generator=generator)
    lam = 0.2 + 0.3 * torch.rand(4, 8, generator=generator)
    weight = lam.reshape(4, 8, 1, 1, 1, 1)
    mixtures = weight * target[:, None] + (1 - weight) * references
    levels = [1.0, 0.3, 0.1, 0.03, 0.01]
    joint = basis_separate_request(mixtures, gaussian, lam, levels, steps_per_level=100, progress=False,
                                   generator=torch.Generator().manual_seed(1))
    single = basis_separate(mixtures[:, 0], gaussian, gaussian, lam[:, 0], levels, steps_per_level=100,
                            progress=False, generator=torch.Generator().manual_seed(1))
    joint_error = (joint.source_1 - target).square().mean()
    single_error = (single.source_1 - target).square().mean()
    assert joint.source_2.shape == references.shape
    assert joint_error < 0.5 * single_error
    with pytest.raises(InputError, match="one weight per mixture"):
        basis_separate_request(mixtures, gaussian, lam[:, :3], levels, progress=False)
