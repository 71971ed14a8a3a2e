"""The Siamese discriminator of Privacy-Net and Deformation-Proxy: are two images of one patient?

Both compared systems train their client-side transform against this network: it embeds each image
with one shared 3D convolutional encoder and scores the pair from the absolute difference of the two
embeddings (a logit, positive for "same patient"). The transform is trained to make that score
useless while the server's segmenter keeps its accuracy.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class SiameseDiscriminator(nn.Module):
    """Same-patient logit of two (N, C, D, H, W) images through one shared encoder.

    Args:
        in_channels: channels of each image (1 for an encoded or deformed T1).
        channels: width of each stride-2 stage of the encoder (its depth is their number).

    Example:
        >>> net = SiameseDiscriminator(channels=(4, 8))
        >>> a, b = torch.zeros(2, 1, 16, 16, 16), torch.ones(2, 1, 16, 16, 16)
        >>> net(a, b).shape, net.embed(a).shape
        (torch.Size([2]), torch.Size([2, 8]))
    """

    def __init__(self, in_channels: int = 1, channels: Sequence[int] = (8, 16, 32, 64)) -> None:
        super().__init__()
        if not channels:
            raise ValueError("channels must name at least one encoder stage")
        stages, previous = [], in_channels
        for width in channels:
            stages += [nn.Conv3d(previous, width, 3, stride=2, padding=1),
                       nn.InstanceNorm3d(width, affine=True), nn.LeakyReLU(0.2, inplace=True)]
            previous = width
        self.encoder = nn.Sequential(*stages, nn.AdaptiveAvgPool3d(1), nn.Flatten())
        self.head = nn.Linear(previous, 1)

    def embed(self, image: torch.Tensor) -> torch.Tensor:
        """The (N, channels[-1]) embedding of each image."""
        return self.encoder(image)

    def forward(self, image_a: torch.Tensor, image_b: torch.Tensor) -> torch.Tensor:
        """Logits (N,) that each pair shows one patient."""
        return self.head((self.embed(image_a) - self.embed(image_b)).abs()).squeeze(1)
