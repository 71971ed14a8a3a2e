"""3D multi-scale structural similarity (MS-SSIM) for small volumes.

pytorch-msssim's ``ms_ssim`` is built for 2D images: with its default 11-voxel window and 5 scales a
volume needs more than 160 voxels per side, far more than our 48³ training patches, the 32³
patches of the separation attack or the 88×104×88 whole volumes at 2 mm. Its size check is also hard-coded to 5 scales (``side > (win_size - 1) * 2**4``,
whatever the number of weights), so fewer scales cannot be asked of it. This module therefore runs
the multi-scale pyramid itself, level by level, with pytorch-msssim's single-scale kernel
(``pytorch_msssim.ssim._ssim``: Gaussian window, K1 = 0.01, K2 = 0.03, valid convolution) and the
same pyramid as ``ms_ssim`` (contrast-structure terms clipped at zero, 2×2×2 average pooling,
weighted geometric mean). With 5 scales the scores equal ``pytorch_msssim.ms_ssim`` (tested).

The setting used here: a 3-voxel Gaussian window (sigma 1.5) and the standard 5 weights of Wang et
al. (2003) whenever the volume allows them (every side at least 33 voxels: true of 48³ patches and
whole volumes); smaller volumes, such as the separation attack's 32³ patches (4 scales), get the
largest number of scales that fits (see :func:`settings_for`). Scores computed with different settings are not comparable: report
:meth:`MSSSIMSettings.describe` with every number.

Intensities: MS-SSIM needs a known data range, and neither the pipeline's images (percentile
min-max normalised per volume) nor mixtures or an attack's outputs share one fixed range. By default (``data_range=None``) each pair of volumes is therefore min-max rescaled
*jointly* to [0, 1] (the same offset and scale for both volumes of a pair, so their relative
intensities are kept) and scored with a data range of 1. A fixed ``data_range`` skips the rescaling,
for inputs that already share a known range.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pytorch_msssim.ssim import _fspecial_gauss_1d, _ssim
from tqdm.auto import tqdm

from mixpriv.validation import InputError, check_finite

#: The 5 scale weights of Wang, Simoncelli & Bovik (2003), finest scale first (pytorch-msssim's default).
STANDARD_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
_VOLUME_LAYOUTS = "(D, H, W), (1, D, H, W) or (N, 1, D, H, W)"


@dataclass(frozen=True)
class MSSSIMSettings:
    """How MS-SSIM is computed: window, scales and data range.

    Args:
        win_size: width of the Gaussian window in voxels (odd, at least 3).
        win_sigma: standard deviation of the Gaussian window in voxels.
        weights: exponent of each scale, finest first; the number of weights is the number of scales.
        data_range: ``None`` to min-max rescale each pair jointly to [0, 1] (the default), or the fixed
            intensity range of inputs that are scored as they are.

    Example:
        >>> settings = MSSSIMSettings()
        >>> settings.levels, settings.min_side
        (5, 33)
        >>> settings.describe()
        '3D MS-SSIM: Gaussian window 3 voxels (sigma 1.5), 5 scales (weights 0.0448, 0.2856, 0.3001, 0.2363, 0.1333), data range 1 after joint per-pair min-max rescaling to [0, 1]'
    """

    win_size: int = 3
    win_sigma: float = 1.5
    weights: tuple[float, ...] = STANDARD_WEIGHTS
    data_range: float | None = None

    def __post_init__(self) -> None:
        if self.win_size < 3 or self.win_size % 2 == 0:
            raise InputError(f"the MS-SSIM window size must be odd and at least 3, got {self.win_size}")
        if self.win_sigma <= 0:
            raise InputError(f"the MS-SSIM window sigma must be positive, got {self.win_sigma}")
        if not self.weights or any(w <= 0 for w in self.weights):
            raise InputError(f"MS-SSIM needs at least one scale with positive weights, got {self.weights}")
        if self.data_range is not None and self.data_range <= 0:
            raise InputError(f"the MS-SSIM data range must be positive, got {self.data_range}")
        object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))

    @property
    def levels(self) -> int:
        """Number of scales."""
        return len(self.weights)

    @property
    def min_side(self) -> int:
        """Smallest spatial side accepted: the window must still fit after ``levels - 1`` halvings.

        This is pytorch-msssim's own check, ``side > (win_size - 1) * 2**(levels - 1)``, applied to every
        spatial side and to the actual number of scales.
        """
        return (self.win_size - 1) * 2 ** (self.levels - 1) + 1

    def describe(self) -> str:
        """One line stating the setting, for reports."""
        weights = ", ".join(f"{w:.4g}" for w in self.weights)
        scales = f"{self.levels} scale{'s' if self.levels > 1 else ''} (weights {weights})"
        if self.data_range is None:
            intensities = "data range 1 after joint per-pair min-max rescaling to [0, 1]"
        else:
            intensities = f"fixed data range {self.data_range:g} (no rescaling)"
        return f"3D MS-SSIM: Gaussian window {self.win_size} voxels (sigma {self.win_sigma:g}), {scales}, {intensities}"


def settings_for(shape: Sequence[int]) -> MSSSIMSettings:
    """The default setting for volumes of spatial shape ``shape``: a 3-voxel window, as many scales as fit.

    Uses the largest number of scales, at most 5, whose :attr:`~MSSSIMSettings.min_side` the smallest
    side reaches. With 5 scales these are the standard weights as published (pytorch-msssim's default;
    they sum to 1.0001), so the result equals ``MSSSIMSettings()``; with fewer, the first standard
    weights renormalised to sum to 1, which keeps the score a weighted geometric mean. Dropping the
    coarsest scales (rather than the finest) keeps the scales a volume of that size actually resolves.
    With one scale this is plain SSIM. 5 scales need sides of 33 voxels, 4 need 17, 3 need 9, 2 need 5
    and 1 needs 3.

    Args:
        shape: the spatial shape (D, H, W); a longer shape (a tensor's ``.shape``) uses its last three.

    Returns:
        The setting, with the joint per-pair rescaling to [0, 1].

    Raises:
        InputError: if a side is under 3 voxels (not even one scale fits).

    Example:
        >>> settings_for((48, 48, 48)).levels
        5
        >>> settings = settings_for((1, 1, 16, 24, 24))
        >>> settings.levels, round(sum(settings.weights), 6)
        (3, 1.0)
    """
    spatial = tuple(int(s) for s in shape[-3:])
    for levels in range(len(STANDARD_WEIGHTS), 0, -1):
        weights = STANDARD_WEIGHTS[:levels]
        if levels < len(STANDARD_WEIGHTS):
            weights = tuple(w / sum(weights) for w in weights)
        candidate = MSSSIMSettings(weights=weights)
        if min(spatial) >= candidate.min_side:
            return candidate
    raise InputError(f"volumes of spatial shape {spatial} are too small for MS-SSIM: every side needs 3 voxels")


def ms_ssim_3d(a: torch.Tensor, b: torch.Tensor, settings: MSSSIMSettings | None = None) -> torch.Tensor:
    """MS-SSIM of each pair of volumes ``(a[i], b[i])``.

    Args:
        a: volumes (D, H, W), (1, D, H, W) or (N, 1, D, H, W).
        b: volumes of the same shape as ``a``.
        settings: window, scales and data range; ``None`` for :func:`settings_for` the volumes' shape.

    Returns:
        Scores (N,) in [0, 1] (N = 1 for a single volume); 1 for identical volumes.

    Raises:
        InputError: for different shapes, another layout, a NaN or infinite voxel, or a side under
            ``settings.min_side``.

    Example:
        >>> volume = torch.rand(20, 20, 20, generator=torch.Generator().manual_seed(0))
        >>> ms_ssim_3d(volume, volume)
        tensor([1.])
        >>> noise = torch.rand(20, 20, 20, generator=torch.Generator().manual_seed(1))
        >>> bool(ms_ssim_3d(volume, volume + 0.1 * noise) > ms_ssim_3d(volume, volume + 0.5 * noise))
        True
    """
    x, y = _as_batch(a, "a"), _as_batch(b, "b")
    if x.shape != y.shape:
        raise InputError(f"a has shape {tuple(a.shape)} but b has shape {tuple(b.shape)}; they must match")
    check_finite(x, "a")
    check_finite(y, "b")
    settings = settings or settings_for(x.shape)
    _check_size(x.shape[2:], settings)
    return _scores(x, y, settings)


@torch.no_grad()
def similarity_matrix(
    volumes: Sequence[torch.Tensor] | torch.Tensor,
    settings: MSSSIMSettings | None = None,
    progress: bool = True,
    batch_size: int = 8,
) -> torch.Tensor:
    """Pairwise MS-SSIM (N, N) of N volumes of one shape.

    Each unordered pair is scored once, ``batch_size`` pairs at a time, on the volumes' device; the
    matrix is symmetric with ones on the diagonal.

    Args:
        volumes: a sequence of volumes (D, H, W) or (1, D, H, W), or a stack (N, D, H, W) or (N, 1, D, H, W).
        settings: as for :func:`ms_ssim_3d`.
        progress: show a tqdm progress bar over the pairs.
        batch_size: pairs scored together (memory grows with it: about 15 volumes' worth per pair).

    Returns:
        A float32 CPU tensor (N, N).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> base = torch.rand(12, 12, 12, generator=g)
        >>> volumes = [base, base + 0.05 * torch.rand(12, 12, 12, generator=g), torch.rand(12, 12, 12, generator=g)]
        >>> matrix = similarity_matrix(volumes, progress=False)
        >>> matrix.shape, bool(torch.equal(matrix, matrix.T)), matrix.diagonal().tolist()
        (torch.Size([3, 3]), True, [1.0, 1.0, 1.0])
        >>> bool(matrix[0, 1] > matrix[0, 2])
        True
    """
    stack = _as_stack(volumes)
    check_finite(stack, "volumes")
    settings = settings or settings_for(stack.shape)
    _check_size(stack.shape[2:], settings)
    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, got {batch_size}")
    n = stack.shape[0]
    matrix = torch.eye(n)
    rows, cols = torch.triu_indices(n, n, offset=1)
    with tqdm(total=len(rows), desc="MS-SSIM pairs", unit="pair", disable=not progress) as bar:
        for start in range(0, len(rows), batch_size):
            i, j = rows[start:start + batch_size], cols[start:start + batch_size]
            scores = _scores(stack[i], stack[j], settings).float().cpu()
            matrix[i, j] = scores
            matrix[j, i] = scores
            bar.update(len(i))
    return matrix


def _as_batch(volume: torch.Tensor, name: str) -> torch.Tensor:
    """A volume or batch as a floating (N, 1, D, H, W) tensor."""
    if volume.ndim == 3:
        volume = volume[None, None]
    elif volume.ndim == 4 and volume.shape[0] == 1:
        volume = volume[None]
    if volume.ndim != 5 or volume.shape[1] != 1:
        raise InputError(f"{name} must have shape {_VOLUME_LAYOUTS}, got {tuple(volume.shape)}")
    return volume if volume.dtype == torch.float64 else volume.float()


def _as_stack(volumes: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """N volumes as one (N, 1, D, H, W) tensor."""
    if isinstance(volumes, torch.Tensor):
        if volumes.ndim == 4:
            volumes = volumes[:, None]
        if volumes.ndim != 5 or volumes.shape[1] != 1:
            raise InputError(f"a stack of volumes must have shape (N, D, H, W) or (N, 1, D, H, W), "
                             f"got {tuple(volumes.shape)}")
        return volumes if volumes.dtype == torch.float64 else volumes.float()
    if len(volumes) == 0:
        raise InputError("similarity_matrix needs at least one volume")
    batches = [_as_batch(volume, f"volume {index}") for index, volume in enumerate(volumes)]
    for index, batch in enumerate(batches):
        if batch.shape != batches[0].shape:
            raise InputError(f"volume {index} has spatial shape {tuple(batch.shape[2:])} but volume 0 has "
                             f"{tuple(batches[0].shape[2:])}; all volumes must share one shape")
    return torch.cat(batches)


def _check_size(spatial: Sequence[int], settings: MSSSIMSettings) -> None:
    if min(spatial) < settings.min_side:
        raise InputError(
            f"volumes of spatial shape {tuple(spatial)} are too small for MS-SSIM with {settings.levels} scales and "
            f"a {settings.win_size}-voxel window: every side needs at least {settings.min_side} voxels "
            f"(settings_for(shape) picks fewer scales)"
        )


def _rescale_pairs(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max rescale each pair (x[i], y[i]) to [0, 1] with one offset and scale for both volumes."""
    dims = tuple(range(1, x.ndim))
    low = torch.minimum(x.amin(dim=dims, keepdim=True), y.amin(dim=dims, keepdim=True))
    high = torch.maximum(x.amax(dim=dims, keepdim=True), y.amax(dim=dims, keepdim=True))
    span = torch.where(high > low, high - low, torch.ones_like(high))  # a constant pair maps to zeros
    return (x - low) / span, (y - low) / span


@contextmanager
def _without_onednn() -> Iterator[None]:
    """Run convolutions with PyTorch's native CPU kernels instead of oneDNN's.

    The Gaussian window is a grouped 1-voxel-thin Conv3d, which oneDNN runs slowly: on the 2-core CPU,
    8 pairs of 88×104×88 volumes took 6.6 s with it and 1.6 s without. The switch is process-wide
    while it lasts.
    """
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = enabled


def _scores(x: torch.Tensor, y: torch.Tensor, settings: MSSSIMSettings) -> torch.Tensor:
    """MS-SSIM (N,) of validated batches (N, 1, D, H, W), as pytorch_msssim.ms_ssim computes it."""
    with _without_onednn():
        return _pyramid_scores(x, y, settings)


def _pyramid_scores(x: torch.Tensor, y: torch.Tensor, settings: MSSSIMSettings) -> torch.Tensor:
    if settings.data_range is None:
        x, y = _rescale_pairs(x, y)
    data_range = 1.0 if settings.data_range is None else settings.data_range
    window = _fspecial_gauss_1d(settings.win_size, settings.win_sigma)[None, None]  # (1, 1, 1, 1, win)
    factors = []
    for level in range(settings.levels):
        ssim, contrast_structure = _ssim(x, y, data_range=data_range, win=window, size_average=False)
        if level < settings.levels - 1:
            factors.append(torch.relu(contrast_structure))
            padding = [side % 2 for side in x.shape[2:]]
            x = F.avg_pool3d(x, kernel_size=2, padding=padding)
            y = F.avg_pool3d(y, kernel_size=2, padding=padding)
    factors.append(torch.relu(ssim))
    weights = x.new_tensor(settings.weights).view(-1, 1, 1)
    return torch.prod(torch.stack(factors) ** weights, dim=0)[:, 0]
