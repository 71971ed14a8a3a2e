"""How a client mixes: the λ range, the references per mixture and their Dirichlet weights, as one value.

A model records its mixing in its ``hparams`` (``lambda_range``, ``references_per_mix``,
``dirichlet_alpha``); :meth:`MixingSettings.of_model` reads them back, with the defaults of the
single-reference scheme for models trained before K-way mixing. ``reference_warp`` is the client's
alone (no model records it): a fresh random diffeomorphism of each reference for each mixture
(:mod:`mixpriv.mixing.warps`), so that no reference recurs exactly in the server's traffic.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from mixpriv.constants import (
    DEFAULT_DIRICHLET_ALPHA,
    DEFAULT_LAMBDA_RANGE,
    DEFAULT_REFERENCES_PER_MIX,
)
from mixpriv.validation import InputError, check_lambda_range, check_references_per_mix


@dataclass(frozen=True)
class MixingSettings:
    """The mixing scheme: ``m = λ·x + (1 − λ)·Σ_j β_j·r_j`` with λ ~ U(lambda_range), β ~ Dirichlet(α·1_R).

    Attributes:
        lambda_range: (low, high) of the target's weight λ, 0 < low <= high <= 1.
        references_per_mix: R, distinct references in each mixture's composite (1: the paper's scheme).
        dirichlet_alpha: α, concentration of the references' weights β (unused when R = 1).
        reference_warp: peak displacement, in voxels of the key's grid, of the fresh random
            diffeomorphism applied to every reference (image and labels together) of every mixture;
            0 (the default): the references as the key holds them.

    Example:
        >>> MixingSettings()
        MixingSettings(lambda_range=(0.65, 0.95), references_per_mix=1, dirichlet_alpha=1.0, reference_warp=0.0)
        >>> MixingSettings.of_model({"lambda_range": [0.5, 0.8], "references_per_mix": 3})
        MixingSettings(lambda_range=(0.5, 0.8), references_per_mix=3, dirichlet_alpha=1.0, reference_warp=0.0)
        >>> MixingSettings((0.5, 0.8), references_per_mix=3).name
        'λ∈[0.5, 0.8], 3 refs'
        >>> MixingSettings((0.1, 0.3), reference_warp=4).name
        'λ∈[0.1, 0.3], refs warped 4 vox'
        >>> MixingSettings(lambda_range=(0.0, 0.5))
        Traceback (most recent call last):
        ...
        mixpriv.validation.InputError: lambda range must satisfy 0 < low <= high <= 1, got (0.0, 0.5)
    """

    lambda_range: tuple[float, float] = DEFAULT_LAMBDA_RANGE
    references_per_mix: int = DEFAULT_REFERENCES_PER_MIX
    dirichlet_alpha: float = DEFAULT_DIRICHLET_ALPHA
    reference_warp: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "lambda_range", check_lambda_range(self.lambda_range))
        if not (isinstance(self.reference_warp, (int, float)) and math.isfinite(self.reference_warp)
                and self.reference_warp >= 0):
            raise InputError(f"reference_warp must be a finite number of voxels >= 0, got {self.reference_warp!r}")
        object.__setattr__(self, "reference_warp", float(self.reference_warp))
        references, alpha = check_references_per_mix(self.references_per_mix, self.dirichlet_alpha)
        object.__setattr__(self, "references_per_mix", references)
        object.__setattr__(self, "dirichlet_alpha", alpha)

    @classmethod
    def of_model(cls, hparams: Mapping, **overrides) -> MixingSettings:
        """The settings a model was trained with (its ``hparams``), with ``overrides`` that are not ``None``."""
        values = {
            "lambda_range": tuple(hparams.get("lambda_range", DEFAULT_LAMBDA_RANGE)),
            "references_per_mix": hparams.get("references_per_mix", DEFAULT_REFERENCES_PER_MIX),
            "dirichlet_alpha": hparams.get("dirichlet_alpha", DEFAULT_DIRICHLET_ALPHA),
        }
        values.update({name: value for name, value in overrides.items() if value is not None})
        if isinstance(values["lambda_range"], Sequence):
            values["lambda_range"] = tuple(values["lambda_range"])
        return cls(**values)

    @property
    def name(self) -> str:
        """A short display name, e.g. ``λ∈[0.5, 0.8], 3 refs``."""
        low, high = self.lambda_range
        refs = f", {self.references_per_mix} refs" if self.references_per_mix > 1 else ""
        warped = f", refs warped {self.reference_warp:g} vox" if self.reference_warp > 0 else ""
        return f"λ∈[{low:g}, {high:g}]{refs}{warped}"

    def with_(self, **changes) -> MixingSettings:
        """A copy with some settings changed (``None`` keeps the current value)."""
        return replace(self, **{name: value for name, value in changes.items() if value is not None})

    def check_bank(self, bank_size: int) -> MixingSettings:
        """Check that a bank of ``bank_size`` references can serve R distinct references; return self."""
        check_references_per_mix(self.references_per_mix, self.dirichlet_alpha, bank_size)
        return self

    def to_dict(self) -> dict:
        """JSON-ready values, under the names the models' ``hparams`` use (``reference_warp`` only when set)."""
        values = {"lambda_range": list(self.lambda_range), "references_per_mix": self.references_per_mix,
                  "dirichlet_alpha": self.dirichlet_alpha}
        return values | ({"reference_warp": self.reference_warp} if self.reference_warp > 0 else {})


#: The paper's scheme with mixpriv's default λ range: one reference, λ ~ U(0.65, 0.95).
DEFAULT_MIXING = MixingSettings()
