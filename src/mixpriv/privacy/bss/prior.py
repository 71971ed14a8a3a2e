"""The attacker's score priors: trained on brain patches (or control gratings), saved, and reused when they match."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch

from mixpriv.files import write_text_atomically
from mixpriv.privacy.bss.options import SeparationOptions
from mixpriv.privacy.bss.patches import _check_images
from mixpriv.privacy.control import control_loader
from mixpriv.privacy.score_matching import (
    CARD_FILE,
    WEIGHTS_FILE,
    ScoreMatchingModule,
    load_score_network,
    patch_loader,
    read_score_network_card,
    save_score_network,
)
from mixpriv.privacy.score_network import ScoreFn, build_score_network
from mixpriv.validation import InputError

log = logging.getLogger(__name__)

#: File written next to a saved prior: how it was trained (reused only when this matches too).
TRAINING_FILE = "prior_training.json"


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


def _timed_prior(images: Sequence[torch.Tensor] | None, folder: Path, options: SeparationOptions, control: bool,
                 progress: bool, seed: int, seconds: dict[str, float], key: str) -> Path:
    """Train or reuse a prior; record its training time (0 when reused) under ``seconds[key]``."""
    before = (folder / WEIGHTS_FILE).stat().st_mtime_ns if (folder / WEIGHTS_FILE).exists() else None
    folder = train_score_prior(images, folder, options, control=control, progress=progress, seed=seed)
    after = (folder / WEIGHTS_FILE).stat().st_mtime_ns
    trained = json.loads((folder / TRAINING_FILE).read_text()).get("training_seconds", 0.0)
    seconds[key] = 0.0 if before == after else float(trained)
    return folder


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
