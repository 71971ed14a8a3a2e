"""The private pipeline on whole volumes: mix (client), segment (server), unmix + TTA (client).

    m_k  = lam_k * x + (1 - lam_k) * r_k                 k = 1..K    (Eq. 5)
    p_mk = S(m_k)                                        server: the K mixtures in one pass over the grid
    p_k  = U(p_mk, y_rk, lam_k)  or naive Eq. 4           client
    p    = mean_k p_k,  variance = var_k p_k             (Eq. 6, uncertainty)

:class:`PrivatePipeline` is the one implementation that TTA, the evaluation, the audit, the
server's client and ``mixpriv predict`` share. With a local segmenter it segments and unmixes
each patch in one step (the way the unmixer was trained: on the segmenter's output for that
patch) and stitches both once; with a remote server (``segment_volumes``) it unmixes the
server's whole-volume answer over the same grid. The coarse-context unmixer unmixes the
stitched answer, local or remote alike (:mod:`mixpriv.inference.coarse_context`): its coarse
U-Net over a grid of coarse patches, the rest once per voxel, not once per overlapping patch
(3.7 times on the default grid). The naive unmixing always works on the stitched mixed
probabilities, so both methods come from one server pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch

from mixpriv.inference.coarse_context import unmix_volumes
from mixpriv.inference.grid import sliding_window
from mixpriv.inference.mixtures import Mixtures, mix_with_references
from mixpriv.mixing.bank import ReferenceBank
from mixpriv.mixing.composite import label_mixture
from mixpriv.mixing.functional import naive_unmix, probabilities_from_unmixed
from mixpriv.mixing.settings import DEFAULT_MIXING, MixingSettings
from mixpriv.validation import InputError

UNMIX_METHODS = ("learned", "naive")

PatchSegmenter = Callable[[torch.Tensor], torch.Tensor]
"""Class probabilities (N, C, p, p, p) of mixture patches (N, 1, p, p, p)."""
VolumeSegmenter = Callable[[torch.Tensor], torch.Tensor]
"""Class probabilities (K, C, D, H, W) of whole mixtures (K, 1, D, H, W): e.g. the remote server."""
Unmixer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""Target probabilities from (mixed probabilities, reference label distribution, lambda (N,))."""
VolumeUnmixer = Callable[[torch.Tensor, Mixtures, int, int | None], torch.Tensor]
"""Target probabilities (K, C, D, H, W) from the stitched mixed probabilities of K mixtures, the
mixtures, the grid's patch size and overlap: e.g. the coarse-context unmixer
(:func:`mixpriv.inference.coarse_context.unmix_volumes`)."""


@dataclass
class PrivateSegmentation:
    """Result of a private segmentation with K references.

    Attributes:
        per_reference: unmixed class probabilities for each reference (K, C, D, H, W).
        probabilities: TTA average over the K references (C, D, H, W) (Eq. 6).
        variance: per-voxel, per-class variance over the K references (C, D, H, W);
            zero when K = 1.
    """

    per_reference: torch.Tensor

    @property
    def probabilities(self) -> torch.Tensor:
        return self.per_reference.mean(0)

    @property
    def variance(self) -> torch.Tensor:
        if self.per_reference.shape[0] < 2:
            return torch.zeros_like(self.per_reference[0])
        return self.per_reference.var(0, unbiased=False)

    @property
    def labels(self) -> torch.Tensor:
        """Label map (D, H, W) of the averaged probabilities."""
        return self.probabilities.argmax(0)

    def first(self, k: int) -> PrivateSegmentation:
        """The ensemble of the first ``k`` references only (for Dice-versus-K curves)."""
        return PrivateSegmentation(self.per_reference[:k])


@dataclass
class PrivateRun:
    """One private segmentation: what was sent, what came back, and the unmixed results.

    Attributes:
        mixtures: the K mixtures with their secrets (client side).
        mixed_probabilities: the server's answer, stitched (K, C, D, H, W).
        results: one :class:`PrivateSegmentation` per unmixing method asked for.
    """

    mixtures: Mixtures
    mixed_probabilities: torch.Tensor
    results: dict[str, PrivateSegmentation]

    def __getitem__(self, method: str) -> PrivateSegmentation:
        return self.results[method]


def check_methods(methods: Sequence[str]) -> tuple[str, ...]:
    """Check unmixing method names (``learned``, ``naive``); return them as a tuple."""
    unknown = sorted(set(methods) - set(UNMIX_METHODS))
    if unknown or not methods:
        raise InputError(f"unknown unmixing method(s) {unknown or list(methods)}; choose from {UNMIX_METHODS}")
    return tuple(methods)


def segment_mixtures(
    segment: PatchSegmenter,
    mixtures: torch.Tensor,
    patch_size: int,
    overlap: int | None = None,
    batch_size: int = 2,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> torch.Tensor:
    """Server side: class probabilities (K, C, D, H, W) of K mixtures (K, 1, D, H, W).

    ``batch_size`` patches (of any of the K mixtures) go through ``segment`` at once.
    """
    return _grid_pass(segment, None, mixtures, None, patch_size, overlap, batch_size, device, progress)[0]


class PrivatePipeline:
    """Mix a scan with K references, segment the mixtures, unmix them (naive and/or learned), average.

    Args:
        num_classes: C, the label channels of the segmenter's output.
        segment_patches: the local segmenter on patches; segmentation and learned unmixing then
            run fused, patch by patch.
        segment_volumes: or the remote server, on whole mixtures (e.g.
            :meth:`mixpriv.server.PrivateClient.segment_mixtures`).
        unmix: the learned unmixer run per patch, fused with the local segmenter;
        unmix_volumes: or one that unmixes the stitched mixed probabilities of whole volumes
            (one of the two is needed for the ``learned`` method).
        mixing: how to mix (λ range, references per mixture, Dirichlet α).
        patch_size: grid patch side (the model's training patch size).
        overlap: least overlap of the grid's patches (default :func:`~mixpriv.inference.grid.default_overlap`).
        batch_size: patches per call of the networks.
        device: where the networks run and the results accumulate.
        progress: show a progress bar over the grid.

    Example:
        >>> pipeline = PrivatePipeline.of_model(model)  # doctest: +SKIP
        >>> run = pipeline(image, key, k=8, methods=("learned", "naive"))  # doctest: +SKIP
        >>> run["learned"].labels.shape, run["learned"].variance.shape  # doctest: +SKIP
    """

    def __init__(
        self,
        num_classes: int,
        *,
        segment_patches: PatchSegmenter | None = None,
        segment_volumes: VolumeSegmenter | None = None,
        unmix: Unmixer | None = None,
        unmix_volumes: VolumeUnmixer | None = None,
        mixing: MixingSettings = DEFAULT_MIXING,
        patch_size: int = 48,
        overlap: int | None = None,
        batch_size: int = 2,
        device: torch.device | str = "cpu",
        progress: bool = False,
    ) -> None:
        if (segment_patches is None) == (segment_volumes is None):
            raise InputError("give the pipeline one segmenter: segment_patches (local) or segment_volumes (remote)")
        if unmix is not None and unmix_volumes is not None:
            raise InputError("give the pipeline one learned unmixer: unmix (per patch) or unmix_volumes (whole volumes)")
        if batch_size < 1:
            raise InputError(f"batch_size must be at least 1, got {batch_size}")
        self.num_classes = num_classes
        self.segment_patches = segment_patches
        self.segment_volumes = segment_volumes
        self.unmix = unmix
        self.unmix_volumes = unmix_volumes
        self.mixing = mixing
        self.patch_size = patch_size
        self.overlap = overlap
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.progress = progress

    @classmethod
    def of_model(cls, model, *, segment_volumes: VolumeSegmenter | None = None, mixing: MixingSettings | None = None,
                 **options) -> PrivatePipeline:
        """The pipeline of a trained :class:`~mixpriv.lightning.mixup.MixupPrivacyModule`.

        It mixes as the model was trained (unless ``mixing`` is given), on the model's patch
        size and device, with the model's segmenter unless ``segment_volumes`` (a server) is given.
        """
        model.eval()
        options.setdefault("patch_size", model.hparams.patch_size)
        options.setdefault("device", model.device)
        whole = model.unmixes_whole_volumes
        return cls(model.num_classes, segment_patches=None if segment_volumes else model.segment_mixture,
                   segment_volumes=segment_volumes, unmix=None if whole else model.unmix,
                   unmix_volumes=partial(unmix_volumes, model.unmixer) if whole else None,
                   mixing=mixing or MixingSettings.of_model(model.hparams), **options)

    def mix(self, image: torch.Tensor, bank: ReferenceBank, k: int, generator: torch.Generator | None = None,
            **fixed) -> Mixtures:
        """Mix ``image`` (1, D, H, W) with K references of ``bank`` (``fixed``: see :func:`mix_with_references`)."""
        if bank.num_classes != self.num_classes:
            raise InputError(f"the key has {bank.num_classes} labels but the model predicts {self.num_classes}")
        return mix_with_references(image, bank, k, self.mixing, generator, **fixed)

    def __call__(self, image: torch.Tensor, bank: ReferenceBank, k: int = 8, methods: Sequence[str] = ("learned",),
                 generator: torch.Generator | None = None) -> PrivateRun:
        """Privately segment a preprocessed image (1, D, H, W) with K references of ``bank``."""
        return self.run(self.mix(image, bank, k, generator), methods)

    @torch.no_grad()
    def run(self, mixtures: Mixtures, methods: Sequence[str] = ("learned",)) -> PrivateRun:
        """Segment the mixtures once and unmix them with each method (no gradients are kept)."""
        methods = self._checked(methods)
        if self.segment_volumes is not None:
            return self.unmix_answer(mixtures, self.segment_volumes(mixtures.mixtures), methods)
        if self.unmix_volumes is not None or "learned" not in methods:
            mixed = segment_mixtures(self.segment_patches, mixtures.mixtures, *self._grid_options())
            return self.unmix_answer(mixtures, mixed, methods)
        mixed, unmixed = _grid_pass(self.segment_patches, self.unmix, mixtures.mixtures, mixtures,
                                    *self._grid_options())
        return self._results(mixtures, mixed, unmixed, methods)

    @torch.no_grad()
    def unmix_answer(self, mixtures: Mixtures, mixed: torch.Tensor, methods: Sequence[str] = ("learned",)) -> PrivateRun:
        """Unmix the server's class probabilities ``mixed`` (K, C, D, H, W) of ``mixtures`` with each method.

        The client half of a remote run, for answers that came back some other way than through
        ``segment_volumes`` (e.g. :meth:`mixpriv.server.PrivateClient.segment_batch`, which sends
        the mixtures of several scans shuffled together).
        """
        methods = self._checked(methods)
        mixed = mixed.float().to(self.device)
        unmixed = None
        if "learned" in methods and self.unmix_volumes is not None:
            unmixed = self.unmix_volumes(mixed, mixtures, self.patch_size, self.overlap)
        elif "learned" in methods:
            unmixed = _grid_pass(None, self.unmix, mixed, mixtures, *self._grid_options())[1]
        return self._results(mixtures, mixed, unmixed, methods)

    def _checked(self, methods: Sequence[str]) -> tuple[str, ...]:
        methods = check_methods(methods)
        if "learned" in methods and self.unmix is None and self.unmix_volumes is None:
            raise InputError("learned unmixing needs an unmixer")
        return methods

    def _grid_options(self) -> tuple:
        return self.patch_size, self.overlap, self.batch_size, self.device, self.progress

    def _results(self, mixtures: Mixtures, mixed: torch.Tensor, unmixed: torch.Tensor | None,
                 methods: Sequence[str]) -> PrivateRun:
        results = {}
        for method in methods:
            per_reference = unmixed if method == "learned" else _naive(mixed.to(self.device), mixtures)
            results[method] = PrivateSegmentation(per_reference)
        return PrivateRun(mixtures, mixed, results)


def _naive(mixed: torch.Tensor, mixtures: Mixtures) -> torch.Tensor:
    """Eq. 4 on the stitched mixed probabilities, one mixture at a time (projected onto the simplex)."""
    out = torch.empty_like(mixed)
    for k in range(len(mixtures)):
        reference = mixtures.reference_probabilities(k).to(mixed.device)
        out[k] = probabilities_from_unmixed(naive_unmix(mixed[k:k + 1], reference[None], mixtures.lambdas[k:k + 1]))[0]
    return out


def _grid_pass(
    segment: PatchSegmenter | None,
    unmix: Unmixer | None,
    inputs: torch.Tensor,
    mixtures: Mixtures | None,
    patch_size: int,
    overlap: int | None,
    batch_size: int,
    device: torch.device | str,
    progress: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """One pass over the grid of K volumes: segment patches of mixtures (``segment``), unmix them, or both.

    ``inputs`` are the mixtures (K, 1, ...) when ``segment`` is given, else already segmented
    mixtures (K, C, ...). Returns the stitched (mixed probabilities, unmixed probabilities), each
    ``None`` where not computed. Every patch of every mixture is one item; ``batch_size`` items
    go through the networks at once.
    """
    k, channels = inputs.shape[:2]
    parts = (segment is not None) + (unmix is not None)  # outputs per item: [mixed C | unmixed C]
    volumes = {"inputs": inputs.reshape(k * channels, *inputs.shape[2:])}
    if unmix is not None:
        r = mixtures.reference_labels.shape[1]
        volumes["labels"] = mixtures.reference_labels.reshape(k * r, *inputs.shape[2:])
        lambdas = mixtures.lambdas.to(device)
        weights = mixtures.reference_weights.to(device)

    def per_patch(patches: dict[str, torch.Tensor]) -> torch.Tensor:
        positions = patches["inputs"].shape[0]
        spatial = patches["inputs"].shape[2:]
        items = patches["inputs"].reshape(positions * k, channels, *spatial)
        which = torch.arange(k, device=items.device).repeat(positions)  # the mixture of each item
        out = None  # (items, parts x C), written chunk by chunk: no concatenation passes
        for first in range(0, items.shape[0], batch_size):
            chunk = slice(first, first + batch_size)
            probabilities = segment(items[chunk].float()) if segment is not None else items[chunk].float()
            classes = probabilities.shape[1]
            if out is None:
                out = torch.empty((items.shape[0], parts * classes, *spatial), device=items.device)
            if segment is not None:
                out[chunk, :classes] = probabilities
            if unmix is not None:
                labels = patches["labels"].reshape(positions * k, r, *spatial)[chunk]
                mixture = which[chunk]
                reference = label_mixture(labels, weights[mixture], classes)
                out[chunk, -classes:] = unmix(probabilities, reference, lambdas[mixture])
        return out.reshape(positions, -1, *spatial)

    positions_per_call = batch_size // math.gcd(batch_size, k)  # whole network batches where possible
    stitched = sliding_window(per_patch, volumes, patch_size, overlap, positions_per_call, device, progress)
    stitched = stitched.reshape(k, -1, *stitched.shape[1:])
    num_classes = stitched.shape[1] // parts
    mixed = stitched[:, :num_classes] if segment is not None else None
    unmixed = stitched[:, -num_classes:] if unmix is not None else None
    return mixed, unmixed
