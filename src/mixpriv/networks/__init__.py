"""Networks: the U-Net++ segmenter (smp-3d, built from a spec) and the AdaIN unmixer."""

import warnings

with warnings.catch_warnings():
    # timm (imported by segmentation_models_pytorch_3d) decorates dozens of functions with
    # torch.jit.script/interface, each a "`torch.jit.*` is deprecated" FutureWarning at import.
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning)
    import segmentation_models_pytorch_3d  # noqa: F401

from mixpriv.networks.segmenter import SegmenterSpec, build_segmenter
from mixpriv.networks.unmixer import (
    AdaINUnmixer,
    ContextAdaINUnmixer,
    UnmixerSpec,
    build_unmixer,
)

__all__ = ["AdaINUnmixer", "ContextAdaINUnmixer", "SegmenterSpec", "UnmixerSpec", "build_segmenter", "build_unmixer"]
