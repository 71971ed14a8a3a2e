"""Cross-entropy + soft Dice (paper: both networks are trained with this sum), on soft targets.

Targets are per-voxel distributions (one-hot for a target, a lambda-mixture for the
server's mixed labels), so the cross-entropy is the soft-target form.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_dice_per_class(probs: torch.Tensor, target: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Soft Dice of each class over the whole batch (N, C, ...) -> (C,)."""
    dims = (0, *range(2, probs.ndim))
    intersection = (probs * target).sum(dims)
    denominator = probs.sum(dims) + target.sum(dims)
    return (2 * intersection + eps) / (denominator + eps)


def ce_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Soft-target cross-entropy plus (1 - mean soft Dice over classes).

    Example:
        >>> target = torch.nn.functional.one_hot(torch.randint(0, 3, (2, 4, 4, 4)), 3).movedim(-1, 1).float()
        >>> float(ce_dice_loss(target * 50, target)) < 0.01
        True
    """
    logits = logits.float()
    cross_entropy = -(target * F.log_softmax(logits, dim=1)).sum(1).mean()
    dice = soft_dice_per_class(torch.softmax(logits, dim=1), target).mean()
    return cross_entropy + (1 - dice)


def hard_dice_per_class(probs: torch.Tensor, target_one_hot: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Dice of argmax predictions against the argmax of the target, per class (C,), batch-pooled.

    Counted from label maps (``max(1).indices``, then ``bincount``): on a CPU, ``argmax(1)`` and
    one-hot maps of a training batch cost 8x more than the whole rest of the metric.

    Example:
        >>> target = torch.nn.functional.one_hot(torch.tensor([[0, 1, 1, 2]]), 3).movedim(-1, 1).float()
        >>> hard_dice_per_class(target.roll(1, dims=2), target).round(decimals=3)
        tensor([0.0000, 0.5000, 0.0000])
    """
    num_classes = probs.shape[1]
    predicted = probs.max(1).indices.reshape(-1)
    truth = target_one_hot.max(1).indices.reshape(-1)
    agreed = torch.bincount(truth[predicted == truth], minlength=num_classes)
    denominator = torch.bincount(predicted, minlength=num_classes) + torch.bincount(truth, minlength=num_classes)
    return (2 * agreed + eps) / (denominator + eps)
