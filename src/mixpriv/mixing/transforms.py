"""TorchIO-style mixing transforms: ``RandomMix`` draws, ``Mix`` applies and records.

As with TorchIO's ``RandomNoise`` -> ``Noise``, the random transform only draws its
parameters (the weight lambda and a reference of the bank) and delegates to the
deterministic ``Mix``, which records them on the subject so a result reproduces.

The subject's ``image`` is replaced by the mixture; the reference's one-hot label is added
as ``reference_label`` and the weight and reference index as subject attributes. Both
volumes must live on the same grid (e.g. registered to MNI space): a reference of another
shape is centre-cropped or padded to the target's shape.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torchio as tio
from torchio.transforms.augmentation.random_transform import RandomTransform

from mixpriv.constants import DEFAULT_LAMBDA_RANGE, IMAGE, MIX_LAMBDA, MIX_REFERENCE_ID, REFERENCE_LABEL
from mixpriv.mixing.bank import ReferenceBank
from mixpriv.mixing.functional import mix
from mixpriv.validation import InputError, check_lambda, check_lambda_range


def _fit_to_shape(volume: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Centre-crop or zero-pad a (C, D, H, W) tensor to the spatial ``shape``."""
    if tuple(volume.shape[1:]) == tuple(shape):
        return volume
    return tio.CropOrPad(tuple(shape))(tio.ScalarImage(tensor=volume)).data


def _fit_one_hot_to_shape(one_hot: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """As :func:`_fit_to_shape` for a one-hot (C, D, H, W) label: padded voxels are background (channel 0)."""
    fitted = _fit_to_shape(one_hot, shape)
    if fitted is one_hot:
        return fitted
    fitted = fitted.clone()
    fitted[0][fitted.sum(0) == 0] = 1
    return fitted


class Mix(tio.Transform):
    """Mix the subject's image with reference ``reference_index`` of ``bank`` at weight ``lam``.

    Args:
        lam: mixing weight of the target, in (0, 1].
        reference_index: which reference of the bank to mix with.
        bank: the client's reference bank. It is not recorded in the subject's history (it
            is a secret), so a transform rebuilt from the history needs the bank again.

    Example:
        >>> import torch, torchio as tio
        >>> bank = ReferenceBank(torch.zeros(1, 1, 4, 4, 4), torch.zeros(1, 4, 4, 4, dtype=torch.long),
        ...                      {"background": 0, "fg": 1})
        >>> subject = tio.Subject(image=tio.ScalarImage(tensor=torch.ones(1, 4, 4, 4)))
        >>> mixed = Mix(lam=0.8, reference_index=0, bank=bank)(subject)
        >>> round(float(mixed["image"].data.mean()), 4), mixed["mix_lambda"]
        (0.8, 0.8)
    """

    def __init__(self, lam: float, reference_index: int, bank: ReferenceBank | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        check_lambda(lam)
        if bank is not None and not 0 <= reference_index < len(bank):
            raise InputError(f"reference index {reference_index} outside a bank of {len(bank)} references")
        self.bank = bank
        self.lam = float(lam)
        self.reference_index = int(reference_index)
        # The bank itself is a secret: keep it out of the transform's recorded arguments.
        self.args_names = ["lam", "reference_index"]

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        if self.bank is None:
            raise InputError("Mix needs the reference bank (the client's key) to be applied")
        image = subject[IMAGE]
        reference_image, reference_label = self.bank.get(self.reference_index)
        reference_image = _fit_to_shape(reference_image, image.spatial_shape).to(image.data.dtype)
        reference_label = _fit_one_hot_to_shape(reference_label, image.spatial_shape)
        image.set_data(mix(image.data.float(), reference_image.float(), self.lam))
        # A new Subject, so that the patch samplers' crops keep the recorded attributes.
        mixed = tio.Subject({
            **subject,
            REFERENCE_LABEL: tio.ScalarImage(tensor=reference_label, affine=image.affine),
            MIX_LAMBDA: self.lam,
            MIX_REFERENCE_ID: self.reference_index,
        })
        mixed.applied_transforms = subject.applied_transforms
        return mixed

    def is_invertible(self) -> bool:
        return False


class RandomMix(RandomTransform):
    """Draw lambda ~ U(low, high) and a reference of ``bank``, then apply :class:`Mix`.

    Args:
        bank: the client's reference bank.
        lambda_range: (low, high) bounds of the uniform weight, 0 < low <= high <= 1.
        exclude_same_id: skip references whose id equals the subject's ``case_id``
            attribute (never mix a scan with itself during training).

    Example:
        >>> import torch, torchio as tio
        >>> bank = ReferenceBank(torch.zeros(3, 1, 4, 4, 4), torch.zeros(3, 4, 4, 4, dtype=torch.long),
        ...                      {"background": 0, "fg": 1})
        >>> subject = tio.Subject(image=tio.ScalarImage(tensor=torch.ones(1, 4, 4, 4)))
        >>> torch.manual_seed(0) and None
        >>> lam = RandomMix(bank, (0.6, 0.9))(subject)["mix_lambda"]
        >>> 0.6 <= lam <= 0.9
        True
    """

    def __init__(
        self,
        bank: ReferenceBank,
        lambda_range: Sequence[float] = DEFAULT_LAMBDA_RANGE,
        exclude_same_id: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.bank = bank
        self.lambda_range = check_lambda_range(lambda_range)
        self.exclude_same_id = exclude_same_id
        self.args_names = ["lambda_range", "exclude_same_id"]

    def get_params(self, case_id: str | None) -> tuple[float, int]:
        """Draw (lambda, reference index) from torch's global generator (seedable)."""
        low, high = self.lambda_range
        lam = low + (high - low) * torch.rand(1).item()
        candidates = [i for i, ref_id in enumerate(self.bank.ids)
                      if not (self.exclude_same_id and case_id is not None and ref_id == case_id)]
        if not candidates:
            raise InputError("the reference bank has no reference other than the subject itself")
        index = candidates[int(torch.randint(len(candidates), (1,)).item())]
        return lam, index

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        lam, index = self.get_params(subject.get("case_id"))
        return Mix(lam, index, self.bank, **self._get_base_args())(subject)
