"""Training the 3D score network by denoising score matching, its data and its files.

Intensity convention: the attacker works in [0, 1]. mixpriv's own preprocessing already
rescales every volume to [0, 1] (percentiles 0.5-99.5), so a mixture of two such volumes
is in [0, 1] too; volumes from elsewhere go through :func:`to_unit_range` (plain min-max
per volume) before they train a prior.

Denoising score matching (Song & Ermon 2019), one random noise level per sample::

    x~     = x + sigma * eps
    target = -(x~ - x) / sigma^2 = -eps / sigma
    loss   = mean over voxels and samples of 1/2 * sigma^2 * (s(x~, sigma) - target)^2

(The original sums over voxels; the mean differs by the constant voxel count only, and
keeps the loss near 0.5 for an untrained network whatever the patch size.)

Files: a network is saved as ``score_network.safetensors`` (weights) plus
``score_network.json`` (spec and the sigmas it was trained for); loading unpickles nothing.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mixpriv.privacy.score_network import (
    ScoreFn,
    ScoreNetSpec,
    ScoreNetwork3d,
    build_score_network,
    geometric_sigmas,
)
from mixpriv.safetensors_metadata import read_format_metadata
from mixpriv.validation import InputError, check_finite, check_spatial_dims

WEIGHTS_FILE = "score_network.safetensors"
CARD_FILE = "score_network.json"
_FORMAT = "mixpriv-score-network"
_FORMAT_VERSION = 1
_UNIT_RANGE_SLACK = 1e-4


def to_unit_range(volume: torch.Tensor) -> torch.Tensor:
    """Min-max rescale one volume (any shape) to [0, 1]; a constant volume becomes zeros.

    Example:
        >>> to_unit_range(torch.tensor([2.0, 4.0, 6.0]))
        tensor([0.0000, 0.5000, 1.0000])
    """
    check_finite(volume, "volume")
    low, high = volume.min(), volume.max()
    if high <= low:
        return torch.zeros_like(volume, dtype=torch.float32)
    return ((volume - low) / (high - low)).float()


def dsm_loss(
    net: torch.nn.Module, x: torch.Tensor, sigmas: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Denoising score-matching loss of ``net`` on clean samples ``x`` (N, C, D, H, W).

    Each sample gets one noise level drawn uniformly from ``sigmas``; ``generator`` (on
    ``x``'s device) draws the levels and the noise.

    Example:
        >>> net = build_score_network({"channels": [2, 4]})
        >>> loss = dsm_loss(net, torch.rand(2, 1, 4, 4, 4), torch.tensor([1.0, 0.1]))
        >>> loss.ndim, bool(loss > 0)
        (0, True)
    """
    levels = torch.randint(len(sigmas), (x.shape[0],), generator=generator, device=x.device)
    sigma = sigmas.to(device=x.device, dtype=x.dtype)[levels]
    sigma_b = sigma.reshape((-1,) + (1,) * (x.ndim - 1))
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    score = net(x + sigma_b * noise, sigma)
    # sigma^2 * (s + eps / sigma)^2 == (sigma * s + eps)^2
    return 0.5 * (sigma_b * score + noise).pow(2).mean()


def _patch_shape(patch_size: int | Sequence[int]) -> tuple[int, int, int]:
    shape = (patch_size,) * 3 if isinstance(patch_size, int) else tuple(int(s) for s in patch_size)
    if len(shape) != 3 or min(shape) < 1:
        raise InputError(f"patch_size must be a positive int or three positive ints, got {patch_size}")
    return shape


def _check_unit_images(images: Sequence[torch.Tensor], patch: tuple[int, int, int]) -> list[torch.Tensor]:
    if len(images) == 0:
        raise InputError("images is empty: the patch loader needs at least one volume")
    checked = []
    for index, image in enumerate(images):
        name = f"images[{index}]"
        check_spatial_dims(image, name)
        check_finite(image, name)
        if any(s < p for s, p in zip(image.shape[1:], patch)):
            raise InputError(f"{name} of shape {tuple(image.shape)} is smaller than the patch {patch}")
        if image.min() < -_UNIT_RANGE_SLACK or image.max() > 1 + _UNIT_RANGE_SLACK:
            raise InputError(f"{name} has values in [{float(image.min()):.4g}, {float(image.max()):.4g}], outside "
                             "[0, 1]; rescale it with to_unit_range first")
        checked.append(image.float())
    return checked


def worker_generator(seed: int) -> torch.Generator:
    """A generator seeded ``seed + worker id`` in a DataLoader worker (``seed`` in the main process),
    so parallel workers draw different samples and every run draws the same ones.

    Example:
        >>> worker_generator(3).initial_seed()
        3
    """
    worker = get_worker_info()
    return torch.Generator().manual_seed(seed + (worker.id if worker is not None else 0))


class RandomPatchDataset(IterableDataset):
    """An endless stream of random crops (C, *patch) that contain tissue.

    A crop whose mean |x| is below ``min_mean`` (mostly background) is rejected and
    another is drawn; ``max_tries`` rejections in a row raise :class:`InputError`.
    Each data-loader worker draws from its own stream (seed + worker id).

    Args:
        images: volumes (C, D, H, W) in [0, 1], each at least as large as the patch.
        patch_size: crop size (an int for a cube, or three ints).
        seed: seed of the crop positions.
        min_mean: smallest accepted mean |x| of a crop.
        max_tries: rejections in a row before giving up.

    Example:
        >>> data = RandomPatchDataset([torch.rand(1, 8, 8, 8)], 4, seed=0)
        >>> next(iter(data)).shape
        torch.Size([1, 4, 4, 4])
    """

    def __init__(
        self,
        images: Sequence[torch.Tensor],
        patch_size: int | Sequence[int],
        seed: int,
        min_mean: float = 0.05,
        max_tries: int = 100,
    ) -> None:
        super().__init__()
        self.patch = _patch_shape(patch_size)
        self.images = _check_unit_images(images, self.patch)
        self.seed = int(seed)
        self.min_mean = float(min_mean)
        self.max_tries = int(max_tries)

    def __iter__(self) -> Iterator[torch.Tensor]:
        generator = worker_generator(self.seed)
        while True:
            yield self.sample(generator)

    def sample(self, generator: torch.Generator) -> torch.Tensor:
        """One accepted crop, drawn with ``generator``."""
        for _ in range(self.max_tries):
            image = self.images[int(torch.randint(len(self.images), (1,), generator=generator))]
            corner = [int(torch.randint(s - p + 1, (1,), generator=generator)) for s, p in zip(image.shape[1:], self.patch)]
            crop = image[:, corner[0]:corner[0] + self.patch[0], corner[1]:corner[1] + self.patch[1],
                         corner[2]:corner[2] + self.patch[2]]
            if float(crop.abs().mean()) >= self.min_mean:
                return crop.clone()
        raise InputError(f"no crop with mean |x| >= {self.min_mean} in {self.max_tries} tries: are the images "
                         "mostly background, or is min_mean too high?")


def patch_loader(
    images: Sequence[torch.Tensor],
    patch_size: int | Sequence[int],
    batch_size: int,
    generator: torch.Generator | None = None,
    min_mean: float = 0.05,
    num_workers: int = 0,
) -> DataLoader:
    """Endless batches (batch_size, C, *patch) of tissue-containing random crops.

    The stream is endless: train with ``Trainer(max_steps=...)``. ``generator`` seeds it
    (the global RNG when ``None``).

    Example:
        >>> loader = patch_loader([torch.rand(1, 8, 8, 8)], 4, batch_size=2, generator=torch.Generator().manual_seed(0))
        >>> next(iter(loader)).shape
        torch.Size([2, 1, 4, 4, 4])
    """
    if batch_size < 1:
        raise InputError(f"batch_size must be positive, got {batch_size}")
    seed = int(torch.randint(2**62, (1,), generator=generator))
    dataset = RandomPatchDataset(images, patch_size, seed=seed, min_mean=min_mean)
    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)


class ScoreMatchingModule(pl.LightningModule):
    """A score network trained by denoising score matching, with an EMA copy for sampling.

    Batches are clean patches (N, C, D, H, W) in [0, 1] (as :func:`patch_loader` yields).

    Args:
        spec: score network spec (dict; ``None`` for the defaults of :class:`ScoreNetSpec`).
        sigma_max, sigma_min, num_levels: the geometric noise levels trained on.
        lr: Adam learning rate.
        ema_decay: decay of the exponential moving average of the weights.

    Example:
        >>> module = ScoreMatchingModule({"channels": [2, 4]}, num_levels=3)
        >>> module.sigmas
        tensor([1.0000, 0.1000, 0.0100])
        >>> module.score_fn()(torch.rand(1, 1, 4, 4, 4), 0.1).shape
        torch.Size([1, 1, 4, 4, 4])
    """

    def __init__(
        self,
        spec: dict | None = None,
        sigma_max: float = 1.0,
        sigma_min: float = 0.01,
        num_levels: int = 10,
        lr: float = 1e-3,
        ema_decay: float = 0.999,
    ) -> None:
        super().__init__()
        if not 0 <= ema_decay < 1:
            raise InputError(f"ema_decay must lie in [0, 1), got {ema_decay}")
        self.save_hyperparameters()
        self.net = build_score_network(spec)
        self.ema = AveragedModel(self.net, multi_avg_fn=get_ema_multi_avg_fn(ema_decay))
        self.ema.requires_grad_(False)
        self.register_buffer("sigmas", geometric_sigmas(sigma_max, sigma_min, num_levels), persistent=False)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = dsm_loss(self.net, batch.float(), self.sigmas)
        self.log("train/dsm_loss", loss, batch_size=batch.shape[0], prog_bar=True)
        return loss

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        """DSM loss of the EMA weights, with noise fixed per batch index (comparable across epochs)."""
        generator = torch.Generator(device=batch.device).manual_seed(batch_idx)
        loss = dsm_loss(self.ema.module, batch.float(), self.sigmas, generator)
        self.log("val/dsm_loss", loss, batch_size=batch.shape[0], prog_bar=True, sync_dist=True)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        self.ema.update_parameters(self.net)

    def configure_optimizers(self):
        return torch.optim.Adam(self.net.parameters(), lr=self.hparams.lr)

    def score_fn(self) -> ScoreFn:
        """The EMA network as a plain function ``(x, sigma) -> score`` (eval mode, no gradients).

        The network is conditioned on the noise level itself, not on its index: ``sigma`` is
        a float or one value per sample, ideally inside the trained range.
        """
        network = self.ema.module.eval()

        def score(x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return network(x, sigma)

        return score


def save_score_network(
    module_or_net: ScoreMatchingModule | ScoreNetwork3d, folder: str | Path, overwrite: bool = False
) -> Path:
    """Write a score network to ``folder`` as safetensors weights + a JSON card; returns the folder.

    A :class:`ScoreMatchingModule` saves its EMA weights (the ones used for sampling) and
    its sigmas; a bare network saves its weights and no sigmas. Existing files are only
    replaced with ``overwrite``.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     folder = save_score_network(build_score_network({"channels": [2]}), tmp)
        ...     sorted(p.name for p in folder.iterdir())
        ['score_network.json', 'score_network.safetensors']
    """
    from safetensors.torch import save_file

    if isinstance(module_or_net, ScoreMatchingModule):
        net, sigmas = module_or_net.ema.module, module_or_net.sigmas.tolist()
    elif isinstance(module_or_net, ScoreNetwork3d):
        net, sigmas = module_or_net, None
    else:
        raise InputError(f"expected a ScoreMatchingModule or a ScoreNetwork3d, got {type(module_or_net).__name__}")
    folder = Path(folder)
    targets = [folder / WEIGHTS_FILE, folder / CARD_FILE]
    if not overwrite and any(path.exists() for path in targets):
        raise FileExistsError(f"{folder} already holds a score network; pass overwrite=True to replace it")
    folder.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().cpu().contiguous() for key, value in net.state_dict().items()}
    save_file(state, str(targets[0]), metadata={"format": _FORMAT})
    card = {"format": _FORMAT, "format_version": _FORMAT_VERSION, "spec": net.spec.to_dict(), "sigmas": sigmas}
    targets[1].write_text(json.dumps(card, indent=2) + "\n")
    return folder


def read_score_network_card(folder: str | Path) -> dict:
    """The JSON card of a saved score network: ``spec`` and ``sigmas`` (``None`` when unknown).

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     card = read_score_network_card(save_score_network(ScoreMatchingModule({"channels": [2]}, num_levels=2), tmp))
        >>> card["spec"]["channels"], [round(sigma, 4) for sigma in card["sigmas"]]
        ([2], [1.0, 0.01])
    """
    path = Path(folder) / CARD_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {folder} a saved score network?")
    try:
        card = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise InputError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(card, dict) or card.get("format") != _FORMAT:
        raise InputError(f"{path} is not a mixpriv score network card")
    if not isinstance(card.get("spec"), dict) or "sigmas" not in card:
        raise InputError(f"{path} is an incomplete score network card: it needs 'spec' (a dict) and 'sigmas'")
    return card


def load_score_network(folder: str | Path, device: str | torch.device = "cpu") -> ScoreNetwork3d:
    """Rebuild a network saved by :func:`save_score_network` (eval mode); nothing is unpickled.

    Example:
        >>> import tempfile
        >>> net = build_score_network({"channels": [2]})
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     loaded = load_score_network(save_score_network(net, tmp))
        >>> x = torch.rand(1, 1, 4, 4, 4)
        >>> torch.equal(loaded(x, 0.5), net(x, 0.5))
        True
    """
    from safetensors.torch import load_file

    card = read_score_network_card(folder)
    path = Path(folder) / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    read_format_metadata(path, _FORMAT, "mixpriv score network weights")
    net = build_score_network(ScoreNetSpec.from_dict(card["spec"]))
    try:
        net.load_state_dict(load_file(str(path)), strict=True)
    except RuntimeError as error:
        raise InputError(f"{path} does not fit the spec in {CARD_FILE}: {error}") from error
    return net.to(device).eval()
