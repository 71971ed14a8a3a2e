"""The compared systems (Privacy-Net, Deformation-Proxy) as rows of the evaluation, next to Mixup-Privacy.

Each system segments the evaluation's own test scans, prepared as for the other rows (the private
model's voxel size, the key's grid), through :class:`~mixpriv.inference.proxies.ProxyPipeline`: the
client makes the server's view, the server segments it, the client reads the answer back onto the
scan's grid; its label map is scored like every other row. Deformation-Proxy draws one fresh key per
scan from a generator seeded by the evaluation's seed (one generator per system, so its draws never
change the Mixup-Privacy rows').

Example:
    >>> from mixpriv.lightning.privacy_net import PrivacyNetModule
    >>> tiny = {"encoder_name": "mixpriv-light-8", "encoder_depth": 3, "decoder_channels": [16, 8, 8]}
    >>> model = PrivacyNetModule({"background": 0, "fg": 1}, tiny, tiny, {"channels": [4, 8]}, patch_size=16).eval()
    >>> rows = ComparedRows(compared_systems([model]), spacing=None, seed=0)
    >>> labels = rows(torch.rand(1, 20, 24, 18))
    >>> list(labels), tuple(labels["Privacy-Net"].shape), list(rows.seconds)
    (['Privacy-Net'], (20, 24, 18), ['Privacy-Net'])
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence

import torch

from mixpriv.hub.pretrained import kind_of_module
from mixpriv.inference.proxies import ProxyPipeline
from mixpriv.kinds import KINDS
from mixpriv.lightning.deformation_proxy import DeformationProxyModule
from mixpriv.lightning.privacy_net import PrivacyNetModule
from mixpriv.validation import InputError

CompareModel = PrivacyNetModule | DeformationProxyModule


def system_name(model: torch.nn.Module, source: object = None) -> str:
    """The row name of a compared-system model ("Privacy-Net" or "Deformation-Proxy").

    Raises:
        InputError: another kind of model (a Mixup-Privacy model or a baseline).

    Example:
        >>> system_name(torch.nn.Linear(1, 1), "my.ckpt")
        Traceback (most recent call last):
        ...
        mixpriv.validation.InputError: my.ckpt is a Linear, not a compared system: give a Privacy-Net or a Deformation-Proxy model
    """
    kind = kind_of_module(model)
    if kind is not None and KINDS[kind].compared:
        return KINDS[kind].system
    raise InputError(f"{source if source is not None else 'the model'} is a {type(model).__name__}, not a compared "
                     "system: give a Privacy-Net or a Deformation-Proxy model")


def compared_systems(models: Iterable[torch.nn.Module]) -> dict[str, CompareModel]:
    """Row name -> model of compared-system models, at most one of each system.

    Example:
        >>> compared_systems([])
        {}
    """
    systems: dict[str, CompareModel] = {}
    for model in models:
        name = system_name(model)
        if name in systems:
            raise InputError(f"two {name} models given: the table holds one row per compared system")
        systems[name] = model
    return systems


def check_spacing(model: torch.nn.Module, spacing: float | Sequence[float] | None, name: str) -> None:
    """Refuse a compared system trained at another voxel size than the scans are prepared at (None: unrecorded).

    Example:
        >>> check_spacing(torch.nn.Linear(1, 1), 2.0, "Privacy-Net")  # no recorded spacing: nothing to compare
    """
    own = model.hparams.get("input_spacing") if hasattr(model, "hparams") else None
    if own is not None and spacing is not None and _per_axis(own) != _per_axis(spacing):
        raise InputError(f"the {name} model expects {own} mm voxels but the scans are prepared at {spacing} mm "
                         "(the Mixup-Privacy model's): compare models trained at one voxel size")


def _per_axis(spacing: float | Sequence[float]) -> tuple[float, float, float]:
    values = [float(spacing)] * 3 if isinstance(spacing, (int, float)) else [float(s) for s in spacing]
    return tuple(values)


class ComparedRows:
    """Each compared system on each evaluated scan: its client label map, and its whole-volume seconds.

    Args:
        compared: row name -> model (:func:`compared_systems`).
        spacing: the voxel size the scans are prepared at (checked against each model's).
        seed: seed of the clients' draws (Deformation-Proxy's keys), one generator per system.
    """

    def __init__(self, compared: Mapping[str, CompareModel], spacing: float | Sequence[float] | None,
                 seed: int) -> None:
        for name, model in compared.items():
            check_spacing(model, spacing, name)
        self.pipelines = {name: ProxyPipeline.of_model(model.eval()) for name, model in compared.items()}
        self.generators = {name: torch.Generator().manual_seed(seed) for name in compared}
        self.seconds: dict[str, list[float]] = {name: [] for name in compared}

    def __call__(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """Row name -> the client's label map (D, H, W) of one scan (1, D, H, W)."""
        labels = {}
        for name, pipeline in self.pipelines.items():
            start = time.perf_counter()
            labels[name] = pipeline(image, self.generators[name]).labels.cpu()
            self.seconds[name].append(time.perf_counter() - start)
        return labels
