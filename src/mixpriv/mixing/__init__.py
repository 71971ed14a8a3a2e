"""Mixing: the Mix / RandomMix transforms, the mixing algebra and the secret reference bank."""

from mixpriv.mixing.bank import ReferenceBank
from mixpriv.mixing.functional import mix, naive_unmix, one_hot, probabilities_from_unmixed
from mixpriv.mixing.transforms import Mix, RandomMix

__all__ = ["Mix", "RandomMix", "ReferenceBank", "mix", "naive_unmix", "one_hot", "probabilities_from_unmixed"]
