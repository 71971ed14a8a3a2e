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


def hard_dice_per_class(probs: torch.Tensor, target_one_hot: torch.Tensor) -> torch.Tensor:
    """Dice of argmax predictions against the argmax of the target, per class (C,), batch-pooled."""
    num_classes = probs.shape[1]
    predicted = F.one_hot(probs.argmax(1), num_classes).movedim(-1, 1).float()
    truth = F.one_hot(target_one_hot.argmax(1), num_classes).movedim(-1, 1).float()
    return soft_dice_per_class(predicted, truth, eps=1e-8)
