"""mixpriv: privacy-preserving 3D medical image segmentation with Mixup-Privacy."""

__version__ = "0.1.0"

# Public shortcuts, imported on first use so that ``import mixpriv`` stays fast.
_LAZY = {"from_pretrained": "mixpriv.hub", "list_models": "mixpriv.hub"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mixpriv' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
