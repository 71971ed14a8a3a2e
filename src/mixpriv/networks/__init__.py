"""Networks: the U-Net++ segmenter (smp-3d, built from a spec) and the AdaIN unmixer."""

from mixpriv.networks.segmenter import SegmenterSpec, build_segmenter
from mixpriv.networks.unmixer import (
    AdaINUnmixer,
    ContextAdaINUnmixer,
    UnmixerSpec,
    build_unmixer,
)

__all__ = ["AdaINUnmixer", "ContextAdaINUnmixer", "SegmenterSpec", "UnmixerSpec", "build_segmenter", "build_unmixer"]
