"""A light 3D encoder registered with segmentation_models_pytorch_3d.

The package's smallest encoders (resnet18, efficientnet-b0) cost seconds per 32^3 batch on a
2-core CPU. This plain conv encoder (two 3x3x3 conv + norm + ReLU per stage, stride-2 stage
entry) follows the package's ``EncoderMixin`` contract, so the package's own U-Net++
decoder is used unchanged: ``smp.UnetPlusPlus(encoder_name="mixpriv-light-16", ...)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from segmentation_models_pytorch_3d.encoders import encoders as SMP_ENCODERS
from segmentation_models_pytorch_3d.encoders._base import EncoderMixin
from torch import nn


def conv_norm_relu(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    """3x3x3 convolution, batch normalisation and ReLU."""
    return nn.Sequential(
        nn.Conv3d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm3d(out_channels),
        nn.ReLU(inplace=True),
    )


class LightEncoder3d(nn.Module, EncoderMixin):
    """Plain 3D conv encoder: ``depth`` stride-2 stages of two conv blocks each.

    Args:
        out_channels: channels of each feature map, first entry = input channels.
        depth: number of downsampling stages used (smp passes it).
        strides: ignored beyond validation; every stage halves each spatial dimension.
    """

    def __init__(self, out_channels: Sequence[int], depth: int = 5, strides=None) -> None:
        super().__init__()
        if depth > len(out_channels) - 1:
            raise ValueError(f"depth {depth} needs {depth + 1} channel entries, got {tuple(out_channels)}")
        self._out_channels = tuple(out_channels)
        self._depth = depth
        self._in_channels = out_channels[0]
        self.stages = nn.ModuleList(
            nn.Sequential(conv_norm_relu(c_in, c_out, stride=2), conv_norm_relu(c_out, c_out))
            for c_in, c_out in zip(out_channels[:depth], out_channels[1 : depth + 1])
        )

    def set_in_channels(self, in_channels: int, pretrained: bool = True) -> None:
        """Rebuild the first convolution for ``in_channels`` inputs (no pretrained weights exist)."""
        if in_channels == self._in_channels:
            return
        self._in_channels = in_channels
        self._out_channels = (in_channels, *self._out_channels[1:])
        first = self.stages[0][0][0]
        self.stages[0][0][0] = nn.Conv3d(in_channels, first.out_channels, kernel_size=3, stride=2,
                                         padding=1, bias=False)

    def get_stages(self) -> list[nn.Module]:
        return [nn.Identity(), *self.stages]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = [x]
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


LIGHT_ENCODERS = {
    "mixpriv-light-8": (3, 8, 16, 32, 64, 128),
    "mixpriv-light-16": (3, 16, 32, 64, 128, 256),
}


def register_light_encoders() -> None:
    """Add the light encoders to smp-3d's registry (idempotent)."""
    for name, channels in LIGHT_ENCODERS.items():
        SMP_ENCODERS.setdefault(
            name, {"encoder": LightEncoder3d, "pretrained_settings": {}, "params": {"out_channels": channels}}
        )


register_light_encoders()
