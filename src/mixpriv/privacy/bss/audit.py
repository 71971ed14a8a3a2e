"""The BSS attack run end to end: the audit's three attacks (:func:`audit_separation`) and the sweep's (:func:`attack_setting`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mixpriv.privacy.bss.options import SeparationOptions
from mixpriv.privacy.bss.patches import (
    _check_images,
    draw_mixtures,
    draw_request_mixtures,
)
from mixpriv.privacy.bss.prior import (
    _same_sigmas,
    _score_fn,
    _timed_prior,
    denoising_check,
)
from mixpriv.privacy.bss.results import (
    CONTROL,
    LAMBDA_ESTIMATED,
    LAMBDA_KNOWN,
    REQUEST_KNOWN,
    AttackResult,
    SeparationAudit,
)
from mixpriv.privacy.control import sample_control_volumes
from mixpriv.privacy.lambda_search import estimate_lambda
from mixpriv.privacy.score_matching import read_score_network_card
from mixpriv.privacy.score_network import ScoreFn
from mixpriv.privacy.separation import (
    basis_separate,
    basis_separate_request,
    check_stability,
    match_sources,
)
from mixpriv.privacy.similarity import MSSSIMSettings, ms_ssim_3d, settings_for
from mixpriv.validation import InputError, check_lambda_range

log = logging.getLogger(__name__)

def _finite(volumes: torch.Tensor, name: str) -> torch.Tensor:
    """Replace non-finite voxels of a diverged separation (0.5), so that it is scored, not raised."""
    bad = ~torch.isfinite(volumes)
    if bool(bad.any()):
        log.warning("%s: %d non-finite voxels in the separation (diverged); set to 0.5", name, int(bad.sum()))
        volumes = torch.where(bad, torch.full_like(volumes, 0.5), volumes)
    return volumes


def _run_basis(
    name: str, target: torch.Tensor, reference: torch.Tensor, mixture: torch.Tensor, lam: torch.Tensor,
    lam_used: torch.Tensor, score_1: ScoreFn, score_2: ScoreFn, options: SeparationOptions,
    msssim: MSSSIMSettings, generator: torch.Generator, device: torch.device, match: bool, progress: bool,
    inits: int, estimated: bool = False,
) -> AttackResult:
    """BASIS with ``inits`` random starts per patch, matched and scored against the truth."""
    repeat = lambda t: t.repeat_interleave(inits, dim=0)
    separation = basis_separate(repeat(mixture).to(device), score_1, score_2, repeat(lam_used).to(device),
                                options.sigmas(), options.steps_per_level, options.delta, generator,
                                progress=progress)
    recovered_1 = _finite(separation.source_1.float().cpu(), name)
    recovered_2 = _finite(separation.source_2.float().cpu(), name)
    similarity = lambda a, b: ms_ssim_3d(a, b, msssim)
    if match:  # one prior for both sources: the evaluator pairs the outputs with the truth
        matched = match_sources(recovered_1, recovered_2, repeat(target), repeat(reference), similarity)
        recovered_1, recovered_2 = matched.source_1, matched.source_2
    scores = similarity(recovered_1, repeat(target)).reshape(-1, inits)
    reference_scores = similarity(recovered_2, repeat(reference)).reshape(-1, inits)
    patches = target.shape[0]
    return AttackResult(name, scores, similarity(mixture, target), lam, lam_used, target, reference, mixture,
                        recovered_1.reshape(patches, inits, *target.shape[1:]), reference_scores,
                        similarity(mixture, reference), estimated)


def audit_separation(
    scans_images: Sequence[torch.Tensor],
    bank_images: Sequence[torch.Tensor],
    train_images: Sequence[torch.Tensor],
    lambda_range: tuple[float, float],
    options: SeparationOptions | None = None,
    out_dir: str | Path = "bss",
    seed: int = 0,
    progress: bool = True,
    references_per_mix: int = 1,
) -> SeparationAudit:
    """Attack encoded scans by blind source separation: λ known, λ estimated, and the positive control.

    Draws ``options.num_patches`` brain-containing patches (target from a test scan, reference at the
    same location of a random reference), λ ~ U(lambda_range), mixture = λ·x + (1 − λ)·r, and separates
    each with ``options.inits`` random starts. The priors are trained (or reused) under
    ``out_dir/prior-brain`` and ``out_dir/prior-control``. A poor attack is reported, not raised.

    Args:
        scans_images: the attacked test volumes (1, D, H, W) in [0, 1].
        bank_images: the references (1, D, H, W) in [0, 1], shaped like the scans.
        train_images: the attacker's brain volumes for the prior (1, D, H, W) in [0, 1].
        lambda_range: the client's (low, high) range of the target's weight.
        options: attack sizes.
        out_dir: folder of the priors.
        seed: seed of the patches, λ, gratings, training and initialisations.
        progress: show progress bars.
        references_per_mix: references per mixture (K-way mixing: BASIS separates the target from
            their weighted sum, one composite second source).

    Raises:
        InputError: malformed images, ``lambda_range`` or options (or a λ range making BASIS unstable).

    Example:
        >>> audit = audit_separation(scans, bank, train, (0.65, 0.95), SeparationOptions())  # doctest: +SKIP
        >>> audit.attacks["λ known"].mean, audit.attacks["λ known"].trivial_mean  # doctest: +SKIP
        (0.41, 0.78)
    """
    options = options or SeparationOptions()
    low, high = check_lambda_range(lambda_range)
    check_stability(options.delta, options.sigma_min, torch.tensor([low, high]))
    patch = options.patch_size
    scans = _check_images(scans_images, "scans_images", patch)
    bank = _check_images(bank_images, "bank_images", patch)
    train = _check_images(train_images, "train_images", patch)
    out_dir = Path(out_dir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    msssim = settings_for((patch,) * 3)

    target, reference, lam, mixture = draw_mixtures(scans, bank, (low, high), options, seed, references_per_mix)

    seconds = {}
    brain_dir = _timed_prior(train, out_dir / "prior-brain", options, False, progress, seed, seconds, "brain")
    brain = _score_fn(brain_dir, device)
    check_generator = torch.Generator().manual_seed(seed + 3)
    denoising = {"brain": denoising_check(brain, target.to(device), options.sigmas().tolist(), check_generator)}
    attacks = {}
    steps = tqdm(total=3 if options.control else 2, desc="BSS attacks", disable=not progress)
    basis_generator = torch.Generator(device=device).manual_seed(seed + 1)
    attacks[LAMBDA_KNOWN] = _run_basis(LAMBDA_KNOWN, target, reference, mixture, lam, lam, brain, brain, options,
                                       msssim, basis_generator, device, True, progress, options.inits)
    steps.update()
    estimate = estimate_lambda(mixture.to(device), brain, brain, options.sigmas(), options.lambda_candidates,
                               options.lambda_steps_per_level, options.delta, generator=basis_generator,
                               progress=progress)
    lam_hat = estimate.lam.float().cpu()
    log.info("λ estimated: true %s, estimate %s", [round(v, 3) for v in lam.tolist()],
             [round(v, 3) for v in lam_hat.tolist()])
    attacks[LAMBDA_ESTIMATED] = _run_basis(LAMBDA_ESTIMATED, target, reference, mixture, lam, lam_hat, brain, brain,
                                           options, msssim, basis_generator, device, True, progress, options.inits,
                                           estimated=True)
    steps.update()
    if options.control:
        control_dir = _timed_prior(None, out_dir / "prior-control", options, True, progress, seed, seconds, "control")
        grating = sample_control_volumes(options.num_patches, (patch,) * 3, torch.Generator().manual_seed(seed + 2))
        control_prior = _score_fn(control_dir, device)
        denoising["control"] = denoising_check(control_prior, grating.to(device), options.sigmas().tolist(),
                                               check_generator)
        control_lam = lam if options.control_lambda is None else torch.full_like(lam, options.control_lambda)
        weight = control_lam.reshape(-1, 1, 1, 1, 1)
        control_mixture = weight * target + (1 - weight) * grating
        attacks[CONTROL] = _run_basis(CONTROL, target, grating, control_mixture, control_lam, control_lam, brain,
                                      control_prior, options, msssim, basis_generator, device, False, progress,
                                      options.inits)
        steps.update()
    steps.close()
    return SeparationAudit(attacks, msssim, options, (low, high), seconds, denoising, references_per_mix)


def attack_setting(
    scans_images: Sequence[torch.Tensor],
    bank_images: Sequence[torch.Tensor],
    prior: str | Path,
    lambda_range: tuple[float, float],
    references_per_mix: int = 1,
    options: SeparationOptions | None = None,
    seed: int = 0,
    progress: bool = True,
) -> AttackResult:
    """The "λ known" attack on mixtures of one mixing setting, with a trained brain prior.

    The privacy-utility sweep's separation score: the patches of :func:`audit_separation` with the
    same ``seed`` (the same targets), mixed with ``references_per_mix`` references (one composite
    second source for BASIS) at λ ~ U(lambda_range), separated with ``options.sweep_inits``
    random starts each.

    Args:
        scans_images: the attacked test volumes (1, D, H, W) in [0, 1].
        bank_images: the references (1, D, H, W) in [0, 1], shaped like the scans.
        prior: folder of the brain score network (:func:`~mixpriv.privacy.bss.prior.train_score_prior`).
        lambda_range: the setting's (low, high) range of the target's weight.
        references_per_mix: references per mixture (K-way mixing).
        options: attack sizes (their noise levels must be the prior's).
        seed: seed of the patches, λ and initialisations.
        progress: show progress bars.

    Raises:
        InputError: malformed images, range or options, or a prior trained for other noise levels.

    Example:
        >>> result = attack_setting(scans, bank, "audit/bss/prior-brain", (0.35, 0.65))  # doctest: +SKIP
        >>> result.mean > result.trivial_mean  # doctest: +SKIP
        True
    """
    options = options or SeparationOptions()
    scans, bank, lambda_range = _sweep_inputs(scans_images, bank_images, prior, lambda_range, options)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    target, reference, lam, mixture = draw_mixtures(scans, bank, lambda_range, options, seed, references_per_mix)
    brain = _score_fn(Path(prior), device)
    return _run_basis(LAMBDA_KNOWN, target, reference, mixture, lam, lam, brain, brain, options,
                      settings_for((options.patch_size,) * 3), torch.Generator(device=device).manual_seed(seed + 1),
                      device, True, progress, options.sweep_inits)


def attack_requests(
    scans_images: Sequence[torch.Tensor],
    bank_images: Sequence[torch.Tensor],
    prior: str | Path,
    lambda_range: tuple[float, float],
    k: int,
    references_per_mix: int = 1,
    options: SeparationOptions | None = None,
    seed: int = 0,
    progress: bool = True,
) -> AttackResult:
    """The "λ known" separation attack on whole requests: each target patch with its K mixtures.

    The K mixtures share the target, so BASIS separates them jointly (one target, K references:
    :func:`~mixpriv.privacy.separation.basis_separate_request`); the target needs no matching,
    it is the one source all mixtures share. The targets are those of :func:`attack_setting` with
    the same ``seed``. In the result, ``mixture`` is the request's mean and ``trivial`` its
    MS-SSIM against the target (what averaging alone already gives); ``reference`` is the first
    mixture's reference, ``lam`` the request's mean λ.

    Example:
        >>> result = attack_requests(scans, bank, "audit/bss/prior-brain", (0.2, 0.5), k=8)  # doctest: +SKIP
        >>> result.mean, result.trivial_mean  # doctest: +SKIP
        (0.83, 0.90)
    """
    options = options or SeparationOptions()
    scans, bank, lambda_range = _sweep_inputs(scans_images, bank_images, prior, lambda_range, options)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    target, references, lam, mixtures = draw_request_mixtures(scans, bank, lambda_range, options, seed, k,
                                                              references_per_mix)
    separation = basis_separate_request(mixtures.to(device), _score_fn(Path(prior), device), lam.to(device),
                                        options.sigmas(), options.steps_per_level, options.delta,
                                        torch.Generator(device=device).manual_seed(seed + 1), progress=progress)
    recovered = _finite(separation.source_1.float().cpu(), REQUEST_KNOWN)
    first_reference = _finite(separation.source_2[:, 0].float().cpu(), REQUEST_KNOWN)
    msssim = settings_for((options.patch_size,) * 3)
    mean = mixtures.mean(1)
    reference = references[:, 0]
    return AttackResult(REQUEST_KNOWN, ms_ssim_3d(recovered, target, msssim)[:, None], ms_ssim_3d(mean, target, msssim),
                        lam.mean(1), lam.mean(1), target, reference, mean, recovered[:, None],
                        ms_ssim_3d(first_reference, reference, msssim)[:, None], ms_ssim_3d(mean, reference, msssim))


def _sweep_inputs(scans_images: Sequence[torch.Tensor], bank_images: Sequence[torch.Tensor], prior: str | Path,
                  lambda_range: tuple[float, float],
                  options: SeparationOptions) -> tuple[list[torch.Tensor], list[torch.Tensor], tuple[float, float]]:
    """Checked scans, references and λ range of a sweep attack with a trained prior of the options' noise levels."""
    low, high = check_lambda_range(lambda_range)
    check_stability(options.delta, options.sigma_min, torch.tensor([low, high]))
    card = read_score_network_card(Path(prior))
    sigmas = options.sigmas().tolist()
    if not _same_sigmas(card["sigmas"], sigmas):
        raise InputError(f"the prior in {prior} was trained for noise levels {card['sigmas']}, not the options' {sigmas}")
    return (_check_images(scans_images, "scans_images", options.patch_size),
            _check_images(bank_images, "bank_images", options.patch_size), (low, high))
