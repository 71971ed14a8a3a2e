"""The blind-source-separation (BSS) attack on encoded scans, with its positive control (paper Fig. 4).

The client sends ``m = λ·x + (1 − λ)·r``: its scan ``x`` mixed with a secret reference ``r``. The
attacker trains a 3D score network on brain patches (:func:`train_score_prior`) and separates
patches of ``m`` with BASIS (:func:`~mixpriv.privacy.separation.basis_separate`), the same prior for
both sources, either knowing λ ("λ known", the strongest attacker) or estimating it by a grid
search (``"λ estimated"``, :func:`~mixpriv.privacy.separation.estimate_lambda`). An evaluator who
knows the truth pairs the outputs with the sources (:func:`~mixpriv.privacy.separation.match_sources`)
and scores the recovered target by 3D MS-SSIM against the true one.

Reading rule: the attack *recovers* the target only where its MS-SSIM clearly exceeds the trivial
baseline MS-SSIM(mixture, target): the mixture itself already resembles the target (λ ≥ 0.5).

Positive control ("control: brain + grating"): a brain patch mixed with a grating volume
(:mod:`mixpriv.privacy.control`), by default with equal weights (``control_lambda = 0.5``, both
sources clearly present), separated with the brain prior for source 1 and a grating prior for
source 2. A working attack must recover both sources there; if it does not, a low score on
brain + brain mixtures says nothing about privacy. (``control_lambda=None`` mixes with the
client's λ draws instead: there the grating has weight 1 − λ ≤ 0.35 and annealed Langevin
dynamics settle on a wrong grating early, at noise levels that hide it, which the brain source
then absorbs; the brain, the large-weight source, is still recovered.)

The privacy-utility sweep scores each mixing setting (λ range, number of references) with the
λ-known attack on the same target patches (:func:`attack_setting`).

A shared prior cannot tell λ from 1 − λ (swap the two sources), so the λ grid of
:class:`SeparationOptions` lies on one side of 0.5; the λ error is reported both as |λ̂ − λ| and
"folded" as |λ̂ − max(λ, 1 − λ)|, which is what a symmetric attack can at best achieve.

Example:
    >>> audit = audit_separation(test_images, bank_images, train_images, (0.65, 0.95),
    ...                          SeparationOptions(), out_dir="audit/bss")  # doctest: +SKIP
    >>> from mixpriv.privacy.report import separation_section
    >>> data, lines = separation_section(audit, Path("audit"))  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytorch_lightning as pl
import torch
from tqdm.auto import tqdm

from mixpriv.constants import DEFAULT_DIRICHLET_ALPHA
from mixpriv.files import write_text_atomically
from mixpriv.mixing.composite import draw_reference_weights
from mixpriv.privacy.control import control_loader, sample_control_volumes
from mixpriv.privacy.score_matching import (
    CARD_FILE,
    WEIGHTS_FILE,
    ScoreMatchingModule,
    load_score_network,
    patch_loader,
    read_score_network_card,
    save_score_network,
)
from mixpriv.privacy.score_network import ScoreFn, build_score_network, geometric_sigmas
from mixpriv.privacy.separation import (
    basis_separate,
    check_stability,
    estimate_lambda,
    match_sources,
)
from mixpriv.privacy.similarity import MSSSIMSettings, ms_ssim_3d, settings_for
from mixpriv.validation import (
    InputError,
    check_finite,
    check_lambda_range,
    check_spatial_dims,
)

log = logging.getLogger(__name__)

LAMBDA_KNOWN = "λ known"
LAMBDA_ESTIMATED = "λ estimated"
CONTROL = "control: brain + grating"
ATTACKS = (LAMBDA_KNOWN, LAMBDA_ESTIMATED, CONTROL)

#: File written next to a saved prior: how it was trained (reused only when this matches too).
TRAINING_FILE = "prior_training.json"
_UNIT_SLACK = 1e-4


def _default_candidates() -> tuple[float, ...]:
    return tuple(round(0.55 + 0.05 * k, 2) for k in range(9))


@dataclass
class SeparationOptions:
    """Sizes of the BSS attack (defaults: the audit's; BASIS's own defaults for the Langevin part).

    Attributes:
        patch_size: side of the cubic patches attacked and trained on.
        num_patches: patches attacked (one random test scan and reference each).
        inits: random initialisations of BASIS per patch.
        sweep_inits: random initialisations per patch of the privacy-utility sweep's attack, one
            per mixing setting (:func:`attack_setting`); 1 scores the attack as run once.
        score_steps: optimisation steps of each score network.
        batch_size: patches per score-matching batch.
        num_levels, sigma_max, sigma_min: the geometric noise levels (training and Langevin).
        steps_per_level: Langevin steps per noise level (T).
        delta: Langevin step size at the last level (needs ``delta / sigma_min² · (λ² + (1 − λ)²) < 2``).
        lambda_candidates: λ grid of the "λ estimated" attack. It lies on one side of 0.5 because
            the same prior for both sources cannot tell λ from 1 − λ (swapping the sources).
        lambda_steps_per_level: Langevin steps per level of each short separation of the λ search.
        control: also run the positive control (brain + grating, needs a second prior).
        control_lambda: weight of the brain patch in the control's mixtures (0.5: equal weights);
            ``None`` uses the attacked mixtures' λ.
        network: score network spec (``None``: :class:`~mixpriv.privacy.score_network.ScoreNetSpec` defaults).
        min_mean: smallest mean intensity of a patch counted as brain-containing.

    Raises:
        InputError: for a non-positive size, bad noise levels, an unstable ``delta`` or λ grid.

    Example:
        >>> SeparationOptions().lambda_candidates[:3]
        (0.55, 0.6, 0.65)
        >>> SeparationOptions(inits=0)
        Traceback (most recent call last):
        ...
        mixpriv.validation.InputError: inits must be a positive integer, got 0
    """

    patch_size: int = 32
    num_patches: int = 8
    inits: int = 3
    sweep_inits: int = 1
    score_steps: int = 2000
    batch_size: int = 8
    num_levels: int = 10
    sigma_max: float = 1.0
    sigma_min: float = 0.01
    steps_per_level: int = 100
    delta: float = 3e-5
    lambda_candidates: tuple[float, ...] = field(default_factory=_default_candidates)
    lambda_steps_per_level: int = 20
    control: bool = True
    control_lambda: float | None = 0.5
    network: dict | None = None
    min_mean: float = 0.05

    def __post_init__(self) -> None:
        for name in ("num_patches", "inits", "sweep_inits", "score_steps", "batch_size", "steps_per_level",
                     "lambda_steps_per_level"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.patch_size, bool) or not isinstance(self.patch_size, int) or self.patch_size < 3:
            raise InputError(f"patch_size must be an integer of at least 3 (MS-SSIM's window), got {self.patch_size!r}")
        self.sigmas()  # validates num_levels and the sigma range
        if self.num_levels < 2:
            raise InputError(f"num_levels must be at least 2, got {self.num_levels}")
        candidates = tuple(float(c) for c in self.lambda_candidates)
        if not candidates or not all(0 < c <= 1 for c in candidates):
            raise InputError(f"lambda_candidates must be a non-empty list of values in (0, 1], got {candidates}")
        if min(candidates) < 0.5 < max(candidates):
            raise InputError(f"lambda_candidates must lie on one side of 0.5 (the shared prior cannot tell λ from "
                             f"1 − λ), got {candidates}")
        self.lambda_candidates = candidates
        check_stability(self.delta, self.sigma_min, torch.tensor(candidates))
        if self.control_lambda is not None:
            if isinstance(self.control_lambda, bool) or not 0 < self.control_lambda < 1:
                raise InputError(f"control_lambda must lie in (0, 1) or be None, got {self.control_lambda!r}")
            self.control_lambda = float(self.control_lambda)
            check_stability(self.delta, self.sigma_min, torch.tensor([self.control_lambda]))
        depth = len(build_score_network(self.network).spec.channels)  # validates the spec
        if self.patch_size < 2 ** (depth - 1):
            raise InputError(f"patch_size {self.patch_size} is too small for a score network of {depth} levels "
                             f"(it halves the patch {depth - 1} times): take at least {2 ** (depth - 1)}")
        if self.min_mean < 0:
            raise InputError(f"min_mean must be non-negative, got {self.min_mean}")

    def sigmas(self) -> torch.Tensor:
        """The noise levels ``sigma_1 > ... > sigma_L``."""
        return geometric_sigmas(self.sigma_max, self.sigma_min, self.num_levels)


# --------------------------------------------------------------------------------------------- priors


def _fingerprint(images: Sequence[torch.Tensor] | None) -> str:
    """A cheap fingerprint of the training volumes (count, shapes, sums), to tell training sets apart."""
    if images is None:
        return "gratings"
    digest = hashlib.sha256()
    for image in images:
        digest.update(repr((tuple(image.shape), round(float(image.double().sum()), 6),
                            round(float(image.double().pow(2).sum()), 6))).encode())
    return f"{len(images)} volumes, sha256 {digest.hexdigest()[:16]}"


def _training_card(images: Sequence[torch.Tensor] | None, options: SeparationOptions, seed: int) -> dict:
    return {"prior": "control gratings" if images is None else "brain patches", "data": _fingerprint(images),
            "patch_size": options.patch_size, "score_steps": options.score_steps, "batch_size": options.batch_size,
            "min_mean": options.min_mean, "seed": seed}


def _same_sigmas(saved: list[float] | None, sigmas: list[float]) -> bool:
    """Whether a saved network's noise levels are ``sigmas`` (``None``: unknown, never the same)."""
    return saved is not None and len(saved) == len(sigmas) and all(
        math.isclose(a, b, rel_tol=1e-5) for a, b in zip(saved, sigmas))


def _saved_prior_matches(folder: Path, spec: dict, sigmas: list[float], training: dict) -> bool:
    """Whether ``folder`` holds a network with this spec and sigmas, trained this way."""
    if not ((folder / WEIGHTS_FILE).is_file() and (folder / CARD_FILE).is_file() and (folder / TRAINING_FILE).is_file()):
        return False
    try:
        card = read_score_network_card(folder)
        saved = json.loads((folder / TRAINING_FILE).read_text())
    except (InputError, json.JSONDecodeError, OSError):
        return False
    saved_training = {k: v for k, v in saved.items() if k != "training_seconds"}
    return card["spec"] == spec and _same_sigmas(card["sigmas"], sigmas) and saved_training == training


def _precision() -> str:
    return "bf16-mixed" if torch.cuda.is_available() else "32"


def train_score_prior(
    images: Sequence[torch.Tensor] | None,
    out_dir: str | Path,
    options: SeparationOptions | None = None,
    control: bool = False,
    progress: bool = True,
    seed: int = 0,
) -> Path:
    """Train a score network on brain patches (or on control gratings) and save it; reuse a matching one.

    A folder that already holds a network with the same spec and noise levels, trained the same way
    (``prior_training.json``: data fingerprint, patch size, steps, batch size, ``min_mean``, seed), is
    reused without training, so rerunning the audit does not retrain. Otherwise the network is trained with a
    Lightning ``Trainer(max_steps=options.score_steps)`` (bf16-mixed on a GPU, 32-bit on a CPU) and
    saved (EMA weights) with :func:`~mixpriv.privacy.score_matching.save_score_network`.

    Args:
        images: volumes (1, D, H, W) in [0, 1] for the brain prior; ``None`` with ``control=True``.
        out_dir: folder of the saved network.
        options: sizes (patch size, steps, noise levels, network spec).
        control: train on gratings (:func:`~mixpriv.privacy.control.control_loader`) instead.
        progress: show Lightning's progress bar.
        seed: seed of the patch stream and of the initial weights.

    Returns:
        The folder, for :func:`~mixpriv.privacy.score_matching.load_score_network`.

    Raises:
        InputError: ``images`` given with ``control=True`` or missing without it, or bad images.

    Example:
        >>> folder = train_score_prior(images, "audit/bss/prior-brain", SeparationOptions())  # doctest: +SKIP
    """
    options = options or SeparationOptions()
    if control != (images is None):
        raise InputError("give images for the brain prior (control=False), or None with control=True")
    folder = Path(out_dir)
    if images is not None:  # fingerprint the images as trained on, whoever calls
        images = _check_images(images, "images", options.patch_size)
    spec = build_score_network(options.network).spec.to_dict()
    sigmas = options.sigmas().tolist()
    training = _training_card(images, options, seed)
    if _saved_prior_matches(folder, spec, sigmas, training):
        log.info("reusing the %s prior saved in %s", training["prior"], folder)
        return folder
    generator = torch.Generator().manual_seed(seed)
    shape = (options.patch_size,) * 3
    loader = (control_loader(shape, options.batch_size, generator) if control else
              patch_loader(list(images), options.patch_size, options.batch_size, generator, min_mean=options.min_mean))
    trainer = pl.Trainer(max_steps=options.score_steps, logger=False, enable_checkpointing=False,
                         accelerator="auto", devices=1, precision=_precision(), enable_progress_bar=progress,
                         enable_model_summary=False)
    devices = range(torch.cuda.device_count())
    with torch.random.fork_rng(devices=devices):  # seeded weights and noise, without touching the caller's RNG
        torch.manual_seed(seed)
        module = ScoreMatchingModule(options.network, options.sigma_max, options.sigma_min, options.num_levels)
        start = time.perf_counter()
        trainer.fit(module, train_dataloaders=loader)
        seconds = time.perf_counter() - start
    log.info("trained the %s prior (%d steps, batch %d, patch %d³, %s) in %.1f s", training["prior"],
             options.score_steps, options.batch_size, options.patch_size, _precision(), seconds)
    (folder / TRAINING_FILE).unlink(missing_ok=True)  # written last: an interrupted save is never reused
    save_score_network(module.cpu(), folder, overwrite=True)
    card = {**training, "training_seconds": seconds}
    write_text_atomically(folder / TRAINING_FILE, json.dumps(card, indent=2) + "\n")
    return folder


def _score_fn(folder: Path, device: torch.device) -> ScoreFn:
    network = load_score_network(folder, device)

    def score(x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return network(x, sigma)

    return score


# --------------------------------------------------------------------------------------------- result


@dataclass
class AttackResult:
    """One attack on ``P`` patches with ``I`` random initialisations each.

    Attributes:
        name: the attack (:data:`ATTACKS`).
        scores: (P, I) MS-SSIM of the recovered target against the true target.
        trivial: (P,) MS-SSIM of the mixture against the target (the no-attack baseline).
        lam: (P,) the true λ (weight of the target).
        lam_used: (P,) the λ given to BASIS (the true one, or the estimate).
        target, reference, mixture: (P, 1, D, H, W) patches (for the control, ``reference`` is the grating).
        recovered: (P, I, 1, D, H, W) the recovered target per init.
        reference_scores: (P, I) MS-SSIM of the recovered second source (the secret reference, or
            the grating) against the true one: the separation works only if both sources come out.
        reference_trivial: (P,) MS-SSIM of the mixture against the second source.
        estimated: whether ``lam_used`` was estimated.
    """

    name: str
    scores: torch.Tensor
    trivial: torch.Tensor
    lam: torch.Tensor
    lam_used: torch.Tensor
    target: torch.Tensor
    reference: torch.Tensor
    mixture: torch.Tensor
    recovered: torch.Tensor
    reference_scores: torch.Tensor
    reference_trivial: torch.Tensor
    estimated: bool = False

    @property
    def mean(self) -> float:
        """Mean MS-SSIM over all patches and inits (the attack as run once)."""
        return float(self.scores.mean())

    @property
    def std(self) -> float:
        """Standard deviation of the MS-SSIM over all patches and inits."""
        return float(self.scores.std(unbiased=False))

    @property
    def best_init_mean(self) -> float:
        """Mean over patches of the best init's MS-SSIM: an oracle that picks the init using the truth."""
        return float(self.scores.max(dim=1).values.mean())

    @property
    def trivial_mean(self) -> float:
        """Mean MS-SSIM(mixture, target)."""
        return float(self.trivial.mean())

    @property
    def trivial_std(self) -> float:
        """Standard deviation of MS-SSIM(mixture, target)."""
        return float(self.trivial.std(unbiased=False))

    @property
    def reference_mean(self) -> float:
        """Mean MS-SSIM of the recovered second source over all patches and inits."""
        return float(self.reference_scores.mean())

    @property
    def reference_trivial_mean(self) -> float:
        """Mean MS-SSIM(mixture, second source)."""
        return float(self.reference_trivial.mean())

    @property
    def lambda_error(self) -> float | None:
        """Mean |λ̂ − λ| (``None`` when λ was known)."""
        return float((self.lam_used - self.lam).abs().mean()) if self.estimated else None

    @property
    def lambda_error_folded(self) -> float | None:
        """Mean |λ̂ − max(λ, 1 − λ)|: the error up to the λ ↔ 1 − λ swap a shared prior cannot see."""
        if not self.estimated:
            return None
        return float((self.lam_used - torch.maximum(self.lam, 1 - self.lam)).abs().mean())

    def figure_patch(self) -> int:
        """The patch shown in the figure: the one whose mean score over inits is the median (a typical one)."""
        means = self.scores.mean(dim=1)
        return int(means.argsort()[(len(means) - 1) // 2])


@dataclass
class SeparationAudit:
    """The BSS attack's results (paper Fig. 4) with the settings needed to read them.

    Attributes:
        attacks: per attack name (:data:`ATTACKS`, the control only if run), its result.
        msssim: the MS-SSIM setting of every score.
        options: the attack's sizes.
        lambda_range: the client's λ range the mixtures were drawn from.
        training_seconds: per prior (``"brain"``, ``"control"``), its training time (0 when reused).
        denoising: per prior, its one-step denoising check on held-out volumes (:func:`denoising_check`).
        references_per_mix: references per attacked mixture (K-way mixing).
    """

    attacks: dict[str, AttackResult]
    msssim: MSSSIMSettings
    options: SeparationOptions
    lambda_range: tuple[float, float]
    training_seconds: dict[str, float] = field(default_factory=dict)
    denoising: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    references_per_mix: int = 1


def denoising_check(score: ScoreFn, clean: torch.Tensor, sigmas: Sequence[float],
                    generator: torch.Generator) -> list[dict[str, float]]:
    """How well a prior denoises held-out volumes in one step, per noise level (is it trained enough?).

    For each σ: RMSE of ``x + σ·ε`` against ``x`` and of Tweedie's estimate ``x̃ + σ²·s(x̃, σ)``
    against ``x``. A useful prior brings the second well below the first at every level.

    Example:
        >>> exact = lambda x, sigma: -(x - 0.5) / sigma ** 2  # the score of a point mass at 0.5
        >>> rows = denoising_check(exact, torch.full((2, 1, 4, 4, 4), 0.5), [0.1], torch.Generator().manual_seed(0))
        >>> round(rows[0]["denoised_rmse"], 6)
        0.0
    """
    rmse = lambda x: float((x - clean).pow(2).mean().sqrt())
    rows = []
    for sigma in sigmas:
        noisy = clean + float(sigma) * torch.randn(clean.shape, generator=generator).to(clean)
        denoised = noisy + float(sigma) ** 2 * score(noisy, float(sigma))
        rows.append({"sigma": float(sigma), "noisy_rmse": rmse(noisy), "denoised_rmse": rmse(denoised)})
    return rows


# --------------------------------------------------------------------------------------------- attack


def _check_images(images: Sequence[torch.Tensor], name: str, patch: int) -> list[torch.Tensor]:
    if len(images) == 0:
        raise InputError(f"{name} is empty")
    checked = []
    for index, image in enumerate(images):
        label = f"{name}[{index}]"
        check_spatial_dims(image, label)
        check_finite(image, label)
        if image.ndim != 4 or image.shape[0] != 1:
            raise InputError(f"{label} must be one volume (1, D, H, W), got shape {tuple(image.shape)}")
        if min(image.shape[1:]) < patch:
            raise InputError(f"{label} of shape {tuple(image.shape)} is smaller than the {patch}³ patch")
        if image.min() < -_UNIT_SLACK or image.max() > 1 + _UNIT_SLACK:
            raise InputError(f"{label} has values in [{float(image.min()):.4g}, {float(image.max()):.4g}], "
                             "outside [0, 1]")
        checked.append(image.float().clamp(0, 1))
    return checked


def _crop(image: torch.Tensor, corner: Sequence[int], patch: int) -> torch.Tensor:
    d, h, w = corner
    return image[:, d:d + patch, h:h + patch, w:w + patch]


def draw_patches(
    scans: Sequence[torch.Tensor], bank: Sequence[torch.Tensor], num_patches: int, patch: int,
    generator: torch.Generator, min_mean: float = 0.05, references_per_mix: int = 1,
    dirichlet_alpha: float = DEFAULT_DIRICHLET_ALPHA, max_tries: int = 1000,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Brain-containing target patches and reference patches at the same location, (P, 1, p, p, p) each.

    Each patch takes a random scan and a random corner where the target's mean intensity reaches
    ``min_mean``; then ``references_per_mix`` distinct random references of the scan's shape,
    cropped at that corner and summed with Dirichlet weights (the composite reference of K-way
    mixing, :mod:`mixpriv.mixing.composite`; a single reference as it is). The client mixes whole
    volumes voxel by voxel, so a patch of the mixture is the mixture of the patches. The targets
    are drawn first: one seed gives the same targets whatever the number of references.

    Example:
        >>> targets, refs = draw_patches([torch.rand(1, 8, 8, 8)], [torch.rand(1, 8, 8, 8)], 2, 4,
        ...                              torch.Generator().manual_seed(0))
        >>> targets.shape, refs.shape
        (torch.Size([2, 1, 4, 4, 4]), torch.Size([2, 1, 4, 4, 4]))
    """
    located = []
    for _ in range(num_patches):
        for _ in range(max_tries):
            scan = scans[int(torch.randint(len(scans), (1,), generator=generator))]
            corner = [int(torch.randint(s - patch + 1, (1,), generator=generator)) for s in scan.shape[1:]]
            target = _crop(scan, corner, patch)
            if float(target.mean()) >= min_mean:
                located.append((scan.shape, corner, target.clone()))
                break
        else:
            raise InputError(f"no {patch}³ patch with mean intensity >= {min_mean} in {max_tries} tries: "
                             "are the scans mostly background?")
    references = []
    for shape, corner, _ in located:
        compatible = [r for r in bank if r.shape == shape]
        if len(compatible) < references_per_mix:
            raise InputError(f"{len(compatible)} reference(s) of the scan's shape {tuple(shape)}, "
                             f"{references_per_mix} needed: the client mixes volumes of one shape")
        chosen = torch.randperm(len(compatible), generator=generator)[:references_per_mix].tolist()
        weights = draw_reference_weights(references_per_mix, dirichlet_alpha, generator)
        references.append(sum(w * _crop(compatible[i], corner, patch) for i, w in zip(chosen, weights.tolist())))
    return torch.stack([target for *_, target in located]), torch.stack(references)


def draw_mixtures(
    scans: Sequence[torch.Tensor], bank: Sequence[torch.Tensor], lambda_range: tuple[float, float],
    options: SeparationOptions, seed: int, references_per_mix: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The attacked patches: target, (composite) reference, λ ~ U(lambda_range) and their mixture.

    The draw depends on ``seed`` only (not on the attack that follows), so every attack and mixing
    setting with one seed sees the same target patches.

    Example:
        >>> target, reference, lam, mixture = draw_mixtures(
        ...     [torch.rand(1, 8, 8, 8)], [torch.rand(1, 8, 8, 8)], (0.6, 0.8),
        ...     SeparationOptions(patch_size=4, num_patches=2, min_mean=0.0), seed=0)
        >>> torch.allclose(mixture, lam.reshape(-1, 1, 1, 1, 1) * target
        ...                + (1 - lam.reshape(-1, 1, 1, 1, 1)) * reference)
        True
    """
    low, high = lambda_range
    generator = torch.Generator().manual_seed(seed)
    target, reference = draw_patches(scans, bank, options.num_patches, options.patch_size, generator,
                                     options.min_mean, references_per_mix)
    lam = low + (high - low) * torch.rand(options.num_patches, generator=generator)
    weight = lam.reshape(-1, 1, 1, 1, 1)
    return target, reference, lam, weight * target + (1 - weight) * reference


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
        prior: folder of the brain score network (:func:`train_score_prior`).
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
    low, high = check_lambda_range(lambda_range)
    check_stability(options.delta, options.sigma_min, torch.tensor([low, high]))
    prior = Path(prior)
    card = read_score_network_card(prior)
    sigmas = options.sigmas().tolist()
    if not _same_sigmas(card["sigmas"], sigmas):
        raise InputError(f"the prior in {prior} was trained for noise levels {card['sigmas']}, not the options' {sigmas}")
    scans = _check_images(scans_images, "scans_images", options.patch_size)
    bank = _check_images(bank_images, "bank_images", options.patch_size)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    target, reference, lam, mixture = draw_mixtures(scans, bank, (low, high), options, seed, references_per_mix)
    brain = _score_fn(prior, device)
    return _run_basis(LAMBDA_KNOWN, target, reference, mixture, lam, lam, brain, brain, options,
                      settings_for((options.patch_size,) * 3), torch.Generator(device=device).manual_seed(seed + 1),
                      device, True, progress, options.sweep_inits)


def _timed_prior(images: Sequence[torch.Tensor] | None, folder: Path, options: SeparationOptions, control: bool,
                 progress: bool, seed: int, seconds: dict[str, float], key: str) -> Path:
    """Train or reuse a prior; record its training time (0 when reused) under ``seconds[key]``."""
    before = (folder / WEIGHTS_FILE).stat().st_mtime_ns if (folder / WEIGHTS_FILE).exists() else None
    folder = train_score_prior(images, folder, options, control=control, progress=progress, seed=seed)
    after = (folder / WEIGHTS_FILE).stat().st_mtime_ns
    trained = json.loads((folder / TRAINING_FILE).read_text()).get("training_seconds", 0.0)
    seconds[key] = 0.0 if before == after else float(trained)
    return folder
