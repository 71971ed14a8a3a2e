"""The kinds of model mixpriv trains, publishes and serves, in one table.

A model's *kind* (``"baseline"``, ``"mixpriv"``, ``"privacynet"``, ``"deformproxy"``) is what its
recipe's ``model.kind`` and its card's ``kind`` say. Everything that depends on the kind reads it
from :data:`KINDS`: the LightningModule class (an import path, so that reading a card imports no
deep-learning code), how messages and tables name it, the card's default description and outputs,
the init argument that tells a checkpoint's kind, and whether it trains on patient pairs.

Example:
    >>> KINDS["privacynet"].system, KINDS["privacynet"].paired
    ('Privacy-Net', True)
    >>> kind_of_hparams({"segmenter": {}, "unmixer": {}})
    'mixpriv'
    >>> [kind.name for kind in compared_kinds()]
    ['privacynet', 'deformproxy']
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelKind:
    """One kind of model.

    Attributes:
        name: the kind, as recipes and cards spell it.
        module_class: import path of its LightningModule.
        system: the method's name in tables (``"Mixup-Privacy"``, ``"Privacy-Net"``, ...).
        described: how messages name a model of the kind.
        description: a card's default description.
        outputs: what its networks return (a card's ``outputs.kind``).
        marker: the init argument only this kind's module takes (``None``: the default kind).
        compared: one of the paper's compared systems.
        paired: trained on same-or-different-patient patch pairs (a Siamese discriminator needs them).
    """

    name: str
    module_class: str
    system: str
    described: str
    description: str
    outputs: str
    marker: str | None = None
    compared: bool = False
    paired: bool = False

    @property
    def message_name(self) -> str:
        """How an error message names it, e.g. ``a Privacy-Net model (kind 'privacynet')``."""
        return f"{self.described} (kind {self.name!r})"


KINDS: dict[str, ModelKind] = {kind.name: kind for kind in (
    ModelKind("baseline", "mixpriv.lightning.baseline.BaselineSegmenter", "Baseline",
              "a non-private baseline model", "non-private U-Net++ baseline segmenter",
              "logits (N, C, D, H, W)"),
    ModelKind("mixpriv", "mixpriv.lightning.mixup.MixupPrivacyModule", "Mixup-Privacy",
              "a Mixup-Privacy model", "Mixup-Privacy U-Net++ segmenter with its learned AdaIN unmixer",
              "server: mixed class probabilities; client: unmixed class probabilities", marker="unmixer"),
    ModelKind("privacynet", "mixpriv.lightning.privacy_net.PrivacyNetModule", "Privacy-Net",
              "a Privacy-Net model", "Privacy-Net: client-side U-Net encoder, server-side U-Net++ segmenter "
              "(adversarially trained against a Siamese identity discriminator)",
              "server: class probabilities of the encoded image, returned as the segmentation (no decoding)",
              marker="encoder", compared=True, paired=True),
    ModelKind("deformproxy", "mixpriv.lightning.deformation_proxy.DeformationProxyModule", "Deformation-Proxy",
              "a Deformation-Proxy model", "Deformation-Proxy: client-side key-seeded diffeomorphic flow-field "
              "generator, server-side U-Net++ segmenter (adversarially trained against a Siamese identity "
              "discriminator)",
              "server: class probabilities on the warped grid; client: warped back by the key's inverse",
              marker="deformation", compared=True, paired=True),
)}


def kind_of_hparams(hparams: Mapping) -> str:
    """The kind of a module from its init arguments (a checkpoint's ``hyper_parameters``): the kind
    whose marker argument they hold, else ``"baseline"``."""
    return next((kind.name for kind in KINDS.values() if kind.marker and kind.marker in hparams), "baseline")


def compared_kinds() -> list[ModelKind]:
    """The paper's compared systems, in table order."""
    return [kind for kind in KINDS.values() if kind.compared]
