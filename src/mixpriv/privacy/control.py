"""Positive control of the separation attack: a source distribution unlike brain MRI.

A low MS-SSIM on brain + brain mixtures could mean that mixing hides the patient, or
that the attack is broken. The control separates a mixture of a brain patch and a volume
from this distribution, with two priors (the brain score network and one trained on the
control distribution): a working attack must recover both sources well.

The control distribution: oriented 3D sinusoidal gratings in [0, 1],

    v(p) = 0.5 + 0.5 * sin(2 pi f (u . p) + phi)

with ``p`` the voxel position scaled to [0, 1) along each axis, ``u`` a uniformly random
unit direction, ``f`` uniform in ``frequency_range`` (cycles across the volume) and
``phi`` uniform in [0, 2 pi). The volumes are smooth, periodic and fill the whole patch,
with no background: nothing like a brain patch, and a four-parameter family that a
small score network learns quickly.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset

from mixpriv.privacy.score_matching import worker_generator
from mixpriv.validation import InputError


def _check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise InputError(f"shape must be three positive ints (D, H, W), got {shape}")
    return shape


def sample_control_volumes(
    n: int,
    shape: Sequence[int],
    generator: torch.Generator | None = None,
    frequency_range: tuple[float, float] = (1.0, 4.0),
) -> torch.Tensor:
    """Draw ``n`` random gratings (n, 1, D, H, W) in [0, 1] (see the module docstring).

    Args:
        n: number of volumes.
        shape: spatial shape (D, H, W).
        generator: CPU random generator; the same seed gives the same volumes.
        frequency_range: (low, high) cycles across the volume, ``0 < low <= high``.

    Example:
        >>> volumes = sample_control_volumes(2, (8, 8, 8), torch.Generator().manual_seed(0))
        >>> volumes.shape, bool(volumes.min() >= 0), bool(volumes.max() <= 1)
        (torch.Size([2, 1, 8, 8, 8]), True, True)
    """
    shape = _check_shape(shape)
    if n < 1:
        raise InputError(f"n must be positive, got {n}")
    low, high = frequency_range
    if not 0 < low <= high:
        raise InputError(f"frequency_range must satisfy 0 < low <= high, got {frequency_range}")
    direction = torch.randn(n, 3, generator=generator)
    direction = direction / direction.norm(dim=1, keepdim=True).clamp_min(1e-12)
    frequency = low + (high - low) * torch.rand(n, generator=generator)
    phase = 2 * math.pi * torch.rand(n, generator=generator)
    axes = [torch.arange(size, dtype=torch.float32) / size for size in shape]
    position = torch.stack(torch.meshgrid(*axes, indexing="ij"))  # (3, D, H, W)
    projection = torch.einsum("nk,kdhw->ndhw", direction, position)
    angle = 2 * math.pi * frequency.reshape(-1, 1, 1, 1) * projection + phase.reshape(-1, 1, 1, 1)
    return (0.5 + 0.5 * torch.sin(angle)).unsqueeze(1)


class ControlVolumeDataset(IterableDataset):
    """An endless stream of control batches (batch_size, 1, D, H, W), for training the control prior.

    Each data-loader worker draws from its own stream (seed + worker id).

    Example:
        >>> next(iter(ControlVolumeDataset((4, 4, 4), batch_size=3, seed=0))).shape
        torch.Size([3, 1, 4, 4, 4])
    """

    def __init__(self, shape: Sequence[int], batch_size: int, seed: int) -> None:
        super().__init__()
        if batch_size < 1:
            raise InputError(f"batch_size must be positive, got {batch_size}")
        self.shape = _check_shape(shape)
        self.batch_size = int(batch_size)
        self.seed = int(seed)

    def __iter__(self) -> Iterator[torch.Tensor]:
        generator = worker_generator(self.seed)
        while True:
            yield sample_control_volumes(self.batch_size, self.shape, generator)


def control_loader(
    shape: Sequence[int], batch_size: int, generator: torch.Generator | None = None, num_workers: int = 0
) -> DataLoader:
    """Endless batches of control volumes (train with ``Trainer(max_steps=...)``).

    Example:
        >>> next(iter(control_loader((4, 4, 4), 2, torch.Generator().manual_seed(0)))).shape
        torch.Size([2, 1, 4, 4, 4])
    """
    seed = int(torch.randint(2**62, (1,), generator=generator))
    return DataLoader(ControlVolumeDataset(shape, batch_size, seed), batch_size=None, num_workers=num_workers)
