"""TorchIO-style mixing transforms: ``RandomMix`` draws, ``Mix`` applies and records.

As with TorchIO's ``RandomNoise`` -> ``Noise``, the random transform only draws its
parameters (the weight lambda and a reference of the bank) and delegates to the
deterministic ``Mix``, which records them on the subject so a result reproduces.

The subject's ``image`` is replaced by the mixture; the reference's one-hot label is added
as ``reference_label`` (a ``uint8`` label map of C channels: a quarter of the float one-hot's
memory for the queue to hold and the sampler to crop) and the weight and reference index as
subject attributes. The reference is moved onto the subject's grid by world coordinates (the
bank records its space), so both must be in one world space (e.g. registered to MNI space); a
bank that does not record its space (saved by an older mixpriv) is centre-cropped or padded to
the subject's shape instead.

K-way mixing (``references_per_mix`` R > 1) mixes the target with a composite of R distinct
references (see :mod:`mixpriv.mixing.composite`): ``reference_label`` is then the weighted
mixture of their one-hot labels (float32), and the R indices and weights are recorded.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torchio as tio
from torchio.transforms.augmentation.random_transform import RandomTransform

from mixpriv.constants import (
    IMAGE,
    MIX_LAMBDA,
    MIX_REFERENCE_ID,
    MIX_REFERENCE_WEIGHTS,
    REFERENCE_LABEL,
)
from mixpriv.geometry import GridSpace, probabilities_onto, resample_into
from mixpriv.mixing.bank import ReferenceBank
from mixpriv.mixing.composite import (
    check_composite,
    composite_reference,
    draw_reference_weights,
)
from mixpriv.mixing.functional import fit_one_hot_to_shape, fit_to_shape, mix
from mixpriv.mixing.settings import MixingSettings
from mixpriv.validation import InputError, check_lambda


class Mix(tio.Transform):
    """Mix the subject's image with reference ``reference_index`` of ``bank`` at weight ``lam``.

    Args:
        lam: mixing weight of the target, in (0, 1].
        reference_index: which reference of the bank to mix with; or, for a K-way mix, a
            list (or tuple) of R distinct indices whose weighted sum is the reference.
        bank: the client's reference bank. It is not recorded in the subject's history (it
            is a secret), so a transform rebuilt from the history needs the bank again.
        reference_weights: with a list of indices, the references' weights (non-negative,
            summing to 1); equal weights by default.

    The subject gets ``mix_lambda``, ``mix_reference_id`` (``reference_index`` as given: an int,
    or the list of R indices) and, for a K-way mix, ``mix_reference_weights`` (list of R floats).
    Its ``reference_label`` is the reference's one-hot label as a ``uint8`` label map, or for a
    K-way mix the weighted mixture of the R one-hot labels (float32) as a scalar image.

    Example:
        >>> import torch, torchio as tio
        >>> bank = ReferenceBank(torch.zeros(2, 1, 4, 4, 4), torch.zeros(2, 4, 4, 4, dtype=torch.long),
        ...                      {"background": 0, "fg": 1})
        >>> subject = tio.Subject(image=tio.ScalarImage(tensor=torch.ones(1, 4, 4, 4)))
        >>> mixed = Mix(lam=0.8, reference_index=0, bank=bank)(subject)
        >>> round(float(mixed["image"].data.mean()), 4), mixed["mix_lambda"]
        (0.8, 0.8)
        >>> mixed["reference_label"].data.dtype, tuple(mixed["reference_label"].shape)
        (torch.uint8, (2, 4, 4, 4))
        >>> kway = Mix(lam=0.8, reference_index=[1, 0], bank=bank, reference_weights=[0.75, 0.25])(subject)
        >>> kway["mix_reference_id"], kway["mix_reference_weights"]
        ([1, 0], [0.75, 0.25])
    """

    def __init__(
        self,
        lam: float,
        reference_index: int | Sequence[int],
        bank: ReferenceBank | None = None,
        reference_weights: Sequence[float] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        check_lambda(lam)
        kway = isinstance(reference_index, Sequence)
        if kway:
            indices = list(reference_index)
            weights = torch.ones(len(indices)) / len(indices) if reference_weights is None else reference_weights
        elif reference_weights is not None:
            raise InputError("reference_weights go with a list of reference indices (a K-way mix)")
        else:
            indices, weights = [reference_index], [1.0]
        indices, weights = check_composite(indices, weights, len(bank) if bank is not None else None)
        self.bank = bank
        self.lam = float(lam)
        self.reference_index = indices if kway else indices[0]
        self.reference_weights = weights.tolist() if kway else None
        # The bank itself is a secret: keep it out of the transform's recorded arguments.
        self.args_names = ["lam", "reference_index"] + (["reference_weights"] if kway else [])

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        if self.bank is None:
            raise InputError("Mix needs the reference bank (the client's key) to be applied")
        image = subject[IMAGE]
        kway = self.reference_weights is not None
        if kway:
            reference_image, reference_label = composite_reference(self.bank, self.reference_index,
                                                                   self.reference_weights)
            image_class = tio.ScalarImage  # a per-voxel distribution: interpolated linearly if resampled
        else:  # one reference: its one-hot label needs no float copy of the volume
            reference_image = self.bank.images[self.reference_index]
            reference_label = one_hot_uint8(self.bank.labels[self.reference_index], self.bank.num_classes)
            image_class = tio.LabelMap
        reference_image, reference_label = self._onto(image, reference_image, reference_label)
        image.set_data(mix(image.data.float(), reference_image, self.lam))
        records = {MIX_LAMBDA: self.lam, MIX_REFERENCE_ID: self.reference_index}
        if kway:
            records[MIX_REFERENCE_WEIGHTS] = self.reference_weights
        # A new Subject, so that the patch samplers' crops keep the recorded attributes.
        mixed = tio.Subject({
            **subject,
            REFERENCE_LABEL: image_class(tensor=reference_label, affine=image.affine),
            **records,
        })
        mixed.applied_transforms = subject.applied_transforms
        return mixed

    def _onto(self, image: tio.ScalarImage, reference_image: torch.Tensor,
              reference_label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference image and its one-hot (or mixed) label moved onto the subject's grid.

        By world coordinates when the bank knows its space (labels outside the bank's grid are
        background); by array index (centre crop or pad) for a bank that does not.
        """
        if self.bank.space is None:
            return (fit_to_shape(reference_image, image.spatial_shape),
                    fit_one_hot_to_shape(reference_label, image.spatial_shape))
        grid = GridSpace.of(image)
        moved_image = resample_into(reference_image, self.bank.space, grid, label=False)
        if reference_label.dtype == torch.uint8:  # one reference: a one-hot map, moved by nearest neighbour
            moved_label = resample_into(reference_label, self.bank.space, grid, label=True)
            moved_label[0][moved_label.sum(0) == 0] = 1
        else:
            moved_label = probabilities_onto(reference_label, self.bank.space, grid)
        return moved_image, moved_label

    def is_invertible(self) -> bool:
        return False


def one_hot_uint8(label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """One-hot ``uint8`` (C, D, H, W) of an integer label map (D, H, W), without an int64 or float copy.

    Example:
        >>> one_hot_uint8(torch.tensor([[[0, 2]]]), 3)[:, 0, 0].tolist()
        [[1, 0], [0, 0], [0, 1]]
    """
    classes = torch.arange(num_classes, dtype=label.dtype).reshape(-1, *([1] * label.ndim))
    return (label.unsqueeze(0) == classes).view(torch.uint8)


class RandomMix(RandomTransform):
    """Draw lambda ~ U(low, high) and a reference of ``bank``, then apply :class:`Mix`.

    Args:
        bank: the client's reference bank.
        lambda_range: (low, high) bounds of the uniform weight, 0 < low <= high <= 1
            (default: that of ``mixing``).
        exclude_same_patient: skip references that are the subject (their id is its ``case_id``)
            or another scan of its patient (their patient is its ``patient_id``): training never
            mixes a scan with itself or with its patient's other scans.
        references_per_mix: R, the number of distinct references mixed with each subject
            (K-way mixing); 1 is the paper's scheme, with the same draws as before K-way mixing.
        dirichlet_alpha: concentration of the symmetric Dirichlet that splits ``1 - lambda``
            over the R references (1: uniform over the simplex; unused when R = 1).
        mixing: the three settings above as one :class:`~mixpriv.mixing.settings.MixingSettings`
            (default: the single-reference scheme); the separate arguments, where given, override it.
            Its ``reference_warp`` must be 0: the fresh warps are the client's.

    Example:
        >>> import torch, torchio as tio
        >>> bank = ReferenceBank(torch.zeros(3, 1, 4, 4, 4), torch.zeros(3, 4, 4, 4, dtype=torch.long),
        ...                      {"background": 0, "fg": 1})
        >>> subject = tio.Subject(image=tio.ScalarImage(tensor=torch.ones(1, 4, 4, 4)))
        >>> torch.manual_seed(0) and None
        >>> lam = RandomMix(bank, (0.6, 0.9))(subject)["mix_lambda"]
        >>> 0.6 <= lam <= 0.9
        True
        >>> mixed = RandomMix(bank, (0.6, 0.9), references_per_mix=2)(subject)
        >>> len(set(mixed["mix_reference_id"])), round(sum(mixed["mix_reference_weights"]), 5)
        (2, 1.0)
        >>> RandomMix(bank, mixing=MixingSettings((0.6, 0.9), references_per_mix=2)).mixing
        MixingSettings(lambda_range=(0.6, 0.9), references_per_mix=2, dirichlet_alpha=1.0, reference_warp=0.0)
    """

    def __init__(
        self,
        bank: ReferenceBank,
        lambda_range: Sequence[float] | None = None,
        exclude_same_patient: bool = True,
        references_per_mix: int | None = None,
        dirichlet_alpha: float | None = None,
        mixing: MixingSettings | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.bank = bank
        mixing = (mixing or MixingSettings()).with_(lambda_range=lambda_range, references_per_mix=references_per_mix,
                                                    dirichlet_alpha=dirichlet_alpha)
        if mixing.reference_warp > 0:
            raise InputError("RandomMix (training) mixes the references as the key holds them: reference_warp is a "
                             "client setting (mixpriv.inference.mixtures.mix_with_references)")
        self.mixing = mixing.check_bank(len(bank))
        self.exclude_same_patient = exclude_same_patient
        self.args_names = ["lambda_range", "exclude_same_patient", "references_per_mix", "dirichlet_alpha"]

    @property
    def lambda_range(self) -> tuple[float, float]:
        return self.mixing.lambda_range

    @property
    def references_per_mix(self) -> int:
        return self.mixing.references_per_mix

    @property
    def dirichlet_alpha(self) -> float:
        return self.mixing.dirichlet_alpha

    def get_params(self, case_id: str | None, patient_id: str | None = None,
                   ) -> tuple[float, int | list[int], list[float] | None]:
        """Draw lambda, the reference(s) and their weights from torch's global generator (seedable),
        among the references that are neither the case ``case_id`` nor of the patient ``patient_id``.

        Returns ``(lambda, index, None)`` with one reference per mix, else ``(lambda, indices,
        weights)``: R distinct indices and their Dirichlet weights.
        """
        low, high = self.lambda_range
        lam = low + (high - low) * torch.rand(1).item()
        candidates = list(range(len(self.bank)))
        if self.exclude_same_patient:
            excluded = {case_id, patient_id} - {None}  # a bank without patients has each case its own patient
            candidates = [i for i in candidates
                          if self.bank.ids[i] not in excluded and self.bank.patient_ids[i] not in excluded]
        if len(candidates) < self.references_per_mix:
            found = f"only {len(candidates)} references" if candidates else "no reference"
            raise InputError(f"the reference bank has {found} other than the subject itself and its patient's "
                             f"other scans (references_per_mix = {self.references_per_mix})")
        if self.references_per_mix == 1:
            return lam, candidates[int(torch.randint(len(candidates), (1,)).item())], None
        chosen = torch.randperm(len(candidates))[: self.references_per_mix].tolist()
        weights = draw_reference_weights(self.references_per_mix, self.dirichlet_alpha)
        return lam, [candidates[i] for i in chosen], weights.tolist()

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        lam, index, weights = self.get_params(subject.get("case_id"), subject.get("patient_id"))
        # This transform copied the subject already (unless told not to): Mix need not copy it again.
        base_args = {**self._get_base_args(), "copy": False}
        return Mix(lam, index, self.bank, reference_weights=weights, **base_args)(subject)
