"""Client-side proxies of compared systems: Deformation-Proxy's key-dependent reversible deformation."""

from mixpriv.proxies.deformation import (
    DeformationKey,
    gaussian_smooth,
    integrate_velocity,
    jacobian_determinant,
    key_fields,
    key_velocities,
    warp,
    warp_probabilities,
)
from mixpriv.proxies.deformation_network import DeformationSpec, FlowFieldGenerator

__all__ = ["DeformationKey", "DeformationSpec", "FlowFieldGenerator", "gaussian_smooth", "integrate_velocity",
           "jacobian_determinant", "key_fields", "key_velocities", "warp", "warp_probabilities"]
