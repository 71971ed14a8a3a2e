"""Mixing: the Mix / RandomMix transforms, the mixing algebra and the secret reference bank."""

from mixpriv.mixing.bank import ReferenceBank
from mixpriv.mixing.composite import composite_reference, draw_reference_weights
from mixpriv.mixing.functional import mix, naive_unmix, one_hot, probabilities_from_unmixed
from mixpriv.mixing.settings import MixingSettings
from mixpriv.mixing.transforms import Mix, RandomMix

__all__ = ["Mix", "MixingSettings", "RandomMix", "ReferenceBank", "composite_reference", "draw_reference_weights", "mix",
           "naive_unmix", "one_hot", "probabilities_from_unmixed"]
