"""The mixing algebra of Mixup-Privacy (paper Eq. 2-4), on tensors.

``lam`` is a float or a tensor broadcastable to the batch: shape (N,) is expanded over
the channel and spatial axes of (N, C, D, H, W) inputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torchio as tio

from mixpriv.constants import MIN_UNMIX_LAMBDA
from mixpriv.validation import InputError, check_lambda


def _broadcast(lam: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    lam = torch.as_tensor(lam, dtype=like.dtype, device=like.device)
    if lam.ndim == 1 and like.ndim > 1:
        lam = lam.reshape(-1, *([1] * (like.ndim - 1)))
    return lam


def mix(target: torch.Tensor, reference: torch.Tensor, lam: float | torch.Tensor) -> torch.Tensor:
    """Mix a target with a reference: ``lam * target + (1 - lam) * reference`` (Eq. 2 and 3).

    Works for intensity images and for one-hot (or probability) label maps alike.

    Example:
        >>> mix(torch.ones(2), torch.zeros(2), 0.75)
        tensor([0.7500, 0.7500])
    """
    check_lambda(lam)
    if target.shape != reference.shape:
        raise InputError(f"target shape {tuple(target.shape)} does not match reference shape {tuple(reference.shape)}")
    lam = _broadcast(lam, target)
    return lam * target + (1 - lam) * reference


def naive_unmix(
    mixed: torch.Tensor,
    reference: torch.Tensor,
    lam: float | torch.Tensor,
    min_lambda: float = MIN_UNMIX_LAMBDA,
) -> torch.Tensor:
    """Recover the target from a mixture by reversing the mixing (Eq. 4).

    ``(mixed - (1 - lam) * reference) / lam``. Dividing by a small ``lam`` amplifies any
    error of the server's prediction by ``1 / lam``, so weights below ``min_lambda`` are
    refused rather than silently returning noise.

    Example:
        >>> y = torch.tensor([0., 1.]); r = torch.tensor([1., 0.])
        >>> naive_unmix(mix(y, r, 0.7), r, 0.7)
        tensor([0., 1.])
    """
    check_lambda(lam)
    lam_t = _broadcast(lam, mixed)
    if bool((lam_t < min_lambda).any()):
        raise InputError(f"lambda below {min_lambda} makes naive unmixing unstable (it divides by lambda)")
    return (mixed - (1 - lam_t) * reference) / lam_t


def probabilities_from_unmixed(unmixed: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Project a naively unmixed map onto the probability simplex (clip at 0, renormalise).

    Naive unmixing of a noisy prediction leaves values outside [0, 1]; clipping and
    renormalising gives a valid per-voxel distribution to average (TTA) or argmax.
    """
    clipped = unmixed.clamp_min(0)
    total = clipped.sum(dim=dim, keepdim=True)
    uniform = torch.full_like(clipped, 1.0 / clipped.shape[dim])
    return torch.where(total > 0, clipped / total.clamp_min(1e-12), uniform)


def one_hot(label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """One-hot encode an integer label map of shape (N, 1, D, H, W) or (N, D, H, W) to (N, C, D, H, W)."""
    if label.ndim == 5:
        if label.shape[1] != 1:
            raise InputError(f"label must have one channel to be one-hot encoded, got shape {tuple(label.shape)}")
        label = label[:, 0]
    return F.one_hot(label.long(), num_classes).movedim(-1, 1).float()


def fit_to_shape(volume: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Centre-crop or zero-pad a (C, D, H, W) tensor to the spatial ``shape`` (TorchIO's ``CropOrPad``).

    The volume is returned as it is when it already has that shape. Integer label maps can be
    fitted too: padded voxels get value 0, the background.

    Example:
        >>> fit_to_shape(torch.ones(1, 2, 4, 4), (4, 4, 2)).shape
        torch.Size([1, 4, 4, 2])
    """
    if tuple(volume.shape[1:]) == tuple(shape):
        return volume
    return tio.CropOrPad(tuple(shape))(tio.ScalarImage(tensor=volume)).data


def fit_one_hot_to_shape(one_hot: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """As :func:`fit_to_shape` for a one-hot (C, D, H, W) label: padded voxels are background (channel 0)."""
    fitted = fit_to_shape(one_hot, shape)
    if fitted is one_hot:
        return fitted
    fitted = fitted.clone()
    fitted[0][fitted.sum(0) == 0] = 1
    return fitted
