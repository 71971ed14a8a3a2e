"""Networks: the U-Net++ segmenter (smp-3d, built from a spec) and the AdaIN unmixer."""

from mixpriv.networks.segmenter import SegmenterSpec, build_segmenter
from mixpriv.networks.unmixer import AdaINUnmixer, UnmixerSpec

__all__ = ["AdaINUnmixer", "SegmenterSpec", "UnmixerSpec", "build_segmenter"]
