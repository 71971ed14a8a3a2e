"""mixpriv: privacy-preserving 3D medical image segmentation with Mixup-Privacy."""

__version__ = "0.1.0"
