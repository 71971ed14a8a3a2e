"""The learned attacker: a small 3D embedding network trained contrastively on mixtures it makes itself.

The attacker owns public scans with known patients (two or more scans per patient; never the key).
It mixes them as the client would (the model's published λ range, R references and Dirichlet α),
with references drawn from its own scans of other patients, and trains an embedding (of the views
minus its population mean) so that two
scans of one patient land close together whatever they were mixed with (NT-Xent, Chen et al. 2020).
Half of its training views are single mixtures, half the mean of a K-mixture request, so one
network attacks both. At audit time it embeds what the server received and retrieves by cosine
similarity. :func:`train_embedding_on_views` trains the same network on views made otherwise (a
compared system's encoded or deformed scans).

Example:
    >>> import torch
    >>> from mixpriv.mixing.settings import MixingSettings
    >>> g = torch.Generator().manual_seed(0)
    >>> scans = [torch.rand(1, 16, 16, 16, generator=g) for _ in range(6)]
    >>> options = LearnedAttackerOptions(steps=2, patients_per_step=2, channels=(4, 8), embedding_dim=16, downsample=1)
    >>> network = train_embedding(scans, ["a", "a", "b", "b", "c", "c"], MixingSettings((0.2, 0.5)), 2,
    ...                           options, seed=0, progress=False)
    >>> tuple(embed(network, [torch.rand(2, 16, 16, 16)] * 3, options.downsample).shape)
    (3, 16)
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from mixpriv.mixing.bank import ReferenceBank
from mixpriv.mixing.settings import MixingSettings
from mixpriv.mixing.warps import warp_references
from mixpriv.privacy.reidentification import encode_scans
from mixpriv.validation import InputError

__all__ = ["EmbeddingNetwork", "LearnedAttackerOptions", "ViewOfScan", "embed", "embedding_similarity",
           "train_embedding", "train_embedding_on_views"]

log = logging.getLogger(__name__)

ViewOfScan = Callable[[int, torch.Generator], torch.Tensor]
"""The index of one of the attacker's scans and a generator -> one view (D, H, W) of it, as the server would see it."""


@dataclass(frozen=True)
class LearnedAttackerOptions:
    """Size and training of the learned attacker.

    Attributes:
        steps: optimisation steps.
        patients_per_step: patients per step (two scans each: 2× this many views).
        channels: channels of the strided convolutions (each halves the grid).
        embedding_dim: size of the embedding.
        downsample: average-pool the views by this factor first (2: a 2 mm scan seen at 4 mm).
        temperature: of the NT-Xent loss.
        lr: Adam's learning rate.
        request_fraction: fraction of training views that are a request's mean rather than one mixture.
        warped_copies: against a client that warps its references afresh (``reference_warp``), the
            attacker mixes with a pool of this many warped copies of each of its scans, drawn once
            (fresh warps for each of its training views would cost minutes per step on a CPU).
    """

    steps: int = 600
    patients_per_step: int = 8
    channels: tuple[int, ...] = (16, 32, 64, 64)
    embedding_dim: int = 64
    downsample: int = 2
    temperature: float = 0.1
    lr: float = 1e-3
    request_fraction: float = 0.5
    warped_copies: int = 4

    def __post_init__(self) -> None:
        if self.warped_copies < 1:
            raise InputError(f"learned attacker: warped_copies >= 1, got {self.warped_copies}")
        if self.steps < 1 or self.patients_per_step < 2 or self.downsample < 1 or not self.channels:
            raise InputError("learned attacker: steps >= 1, patients_per_step >= 2, downsample >= 1 and at least "
                             f"one convolution are needed, got {self}")
        if not 0 <= self.request_fraction <= 1 or self.temperature <= 0:
            raise InputError(f"learned attacker: request_fraction in [0, 1] and temperature > 0, got {self}")


class EmbeddingNetwork(nn.Module):
    """Strided 3D convolutions, a 2×2×2 adaptive pool (it keeps coarse layout), a linear head, L2-normalised.

    ``centre`` (1, 1, D, H, W), when given, is subtracted from every input first: the attacker's
    population mean, so that the network sees how a view departs from the average brain.

    Example:
        >>> EmbeddingNetwork((4, 8), 16)(torch.rand(3, 1, 12, 12, 12)).norm(dim=1).round(decimals=4).tolist()
        [1.0, 1.0, 1.0]
    """

    def __init__(self, channels: Sequence[int] = (16, 32, 64, 64), embedding_dim: int = 64,
                 centre: torch.Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("centre", centre if centre is not None else torch.zeros(()))
        layers, previous = [], 1
        for width in channels:
            layers += [nn.Conv3d(previous, width, 3, stride=2, padding=1), nn.InstanceNorm3d(width, affine=True),
                       nn.LeakyReLU(0.1)]
            previous = width
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool3d(2), nn.Flatten())
        self.head = nn.Linear(previous * 8, embedding_dim)

    def forward(self, volumes: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.features(volumes - self.centre)), dim=1)


def _prepare(views: torch.Tensor, downsample: int) -> torch.Tensor:
    """Views (N, D, H, W) as the network's input (N, 1, D', H', W')."""
    views = views[:, None].float()
    return F.avg_pool3d(views, downsample) if downsample > 1 else views


def nt_xent(first: torch.Tensor, second: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent loss of N positive pairs (``first[i]``, ``second[i]``) of unit embeddings; the rest are negatives.

    Example:
        >>> z = F.normalize(torch.eye(3), dim=1)
        >>> bool(nt_xent(z, z, 0.1) < nt_xent(z, z.roll(1, 0), 0.1))
        True
    """
    embeddings = torch.cat([first, second])
    similarity = embeddings @ embeddings.T / temperature
    similarity.fill_diagonal_(float("-inf"))
    n = first.shape[0]
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return F.cross_entropy(similarity, targets)


def train_embedding(
    images: Sequence[torch.Tensor],
    patient_ids: Sequence[str],
    setting: MixingSettings,
    k: int,
    options: LearnedAttackerOptions | None = None,
    seed: int = 0,
    progress: bool = True,
) -> EmbeddingNetwork:
    """Train the attacker's embedding on mixtures of its own scans (1, D, H, W) of known patients.

    Args:
        images: the attacker's scans, on the key's grid.
        patient_ids: their patients; those with two or more scans give the positive pairs.
        setting: how the client mixes (the model's published mixing).
        k: mixtures per request (the client's K).
        options: network and training sizes.
        seed: seed of the draws and of the initialisation.
        progress: show a progress bar.

    Raises:
        InputError: fewer than two patients with two scans, or too few other patients to mix with.
    """
    options = options or LearnedAttackerOptions()
    if len(images) != len(patient_ids):
        raise InputError(f"{len(patient_ids)} patient ids given for {len(images)} attacker scans")
    stack = torch.stack([image.reshape(1, *image.shape[-3:]).float() for image in images])
    own = _attacker_bank(stack, [f"attacker{i}" for i in range(len(images))], [str(p) for p in patient_ids])
    references, view_setting = own, setting
    if setting.reference_warp > 0:  # a pool of warped copies stands for the client's fresh warps
        copies = options.warped_copies
        warped, _ = warp_references(stack[:, 0].repeat(copies, 1, 1, 1), None, setting.reference_warp,
                                    torch.Generator().manual_seed(seed))
        references = _attacker_bank(warped[:, None], [f"{i}-warp{c}" for c in range(copies) for i in own.ids],
                                    list(own.patient_ids) * copies)
        view_setting = setting.with_(reference_warp=0.0)

    def mixed_view(index: int, generator: torch.Generator) -> torch.Tensor:
        """One mixture of the attacker's scan ``index``, or a K-mixture request's mean."""
        request = float(torch.rand((), generator=generator)) < options.request_fraction
        mixtures = encode_scans([own.images[index]], references, view_setting, generator, k if request else 1,
                                case_ids=[own.ids[index]], patient_ids=[own.patient_ids[index]])[0]
        return mixtures.mean(0)

    # the centre is the attacker's population mean: the mixtures' expected value
    return train_embedding_on_views(patient_ids, mixed_view, stack[:, 0].mean(0), options, seed, progress)


def _attacker_bank(images: torch.Tensor, ids: list[str], patient_ids: list[str]) -> ReferenceBank:
    """The attacker's scans (N, 1, D, H, W) as a bank to draw references from (no labels: one class)."""
    return ReferenceBank(images, torch.zeros(images.shape[0], *images.shape[2:], dtype=torch.uint8),
                         {"background": 0}, ids=ids, patient_ids=patient_ids)


def train_embedding_on_views(
    patient_ids: Sequence[str],
    make_view: ViewOfScan,
    centre: torch.Tensor,
    options: LearnedAttackerOptions | None = None,
    seed: int = 0,
    progress: bool = True,
) -> EmbeddingNetwork:
    """Train the attacker's embedding on views of its own scans of known patients, whatever makes the views.

    Each step draws ``options.patients_per_step`` patients with two or more scans, two of each
    patient's scans, one view of each (``make_view``), and pulls the two views of a patient together
    (NT-Xent). :func:`train_embedding` makes the views by mixing; a compared system's client makes them
    otherwise (:mod:`mixpriv.privacy.attackers.compared`).

    Args:
        patient_ids: the patient of each of the attacker's scans (indexed as ``make_view`` takes them).
        make_view: the attacker's scan index and a generator -> one view (D, H, W) of that scan.
        centre: the mean view (D, H, W), subtracted from every input of the network.
        options: network and training sizes.
        seed: seed of the draws (passed to ``make_view``) and of the initialisation.
        progress: show a progress bar.

    Raises:
        InputError: fewer than two patients with two scans.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> scans = [torch.rand(12, 12, 12, generator=g) for _ in range(4)]
        >>> options = LearnedAttackerOptions(steps=2, patients_per_step=2, channels=(4,), embedding_dim=8, downsample=1)
        >>> network = train_embedding_on_views(["a", "a", "b", "b"], lambda i, generator: scans[i],
        ...                                    torch.stack(scans).mean(0), options, progress=False)
        >>> tuple(embed(network, [s[None] for s in scans], options.downsample).shape)
        (4, 8)
    """
    options = options or LearnedAttackerOptions()
    by_patient: dict[str, list[int]] = defaultdict(list)
    for index, patient in enumerate(patient_ids):
        by_patient[str(patient)].append(index)
    repeated = [scans for scans in by_patient.values() if len(scans) >= 2]
    if len(repeated) < 2:
        raise InputError(f"the learned attacker needs two patients with two scans each, got {len(repeated)}")
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    network = EmbeddingNetwork(options.channels, options.embedding_dim, _prepare(centre[None], options.downsample))
    optimiser = torch.optim.Adam(network.parameters(), lr=options.lr)
    per_step = min(options.patients_per_step, len(repeated))
    network.train()
    losses = []
    for _ in tqdm(range(options.steps), desc="learned attacker: training", disable=not progress):
        chosen = torch.randperm(len(repeated), generator=generator)[:per_step].tolist()
        pairs = [[repeated[c][j] for j in torch.randperm(len(repeated[c]), generator=generator)[:2].tolist()]
                 for c in chosen]
        views = [torch.stack([make_view(p[side], generator) for p in pairs]) for side in (0, 1)]
        first, second = (network(_prepare(v, options.downsample)) for v in views)
        loss = nt_xent(first, second, options.temperature)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
    tail = losses[-max(1, len(losses) // 10):]
    log.info("learned attacker: NT-Xent %.3f at the start, %.3f over the last tenth of %d steps",
             losses[0], sum(tail) / len(tail), options.steps)
    return network.eval()


@torch.no_grad()
def embed(network: EmbeddingNetwork, requests: Sequence[torch.Tensor], downsample: int,
          use_mean: bool = True) -> torch.Tensor:
    """Embeddings (N, E) of N requests (K, D, H, W): of their mean, or (``use_mean=False``) of their first mixture."""
    views = torch.stack([request.mean(0) if use_mean else request[0] for request in requests])
    return torch.cat([network(_prepare(views[i:i + 8], downsample)) for i in range(0, len(views), 8)])


def embedding_similarity(network: EmbeddingNetwork, requests: Sequence[torch.Tensor], downsample: int,
                         use_mean: bool = True) -> torch.Tensor:
    """The cosine similarities (N, N) of the :func:`embed` embeddings of N requests, which the attacker ranks."""
    embeddings = embed(network, requests, downsample, use_mean)
    return embeddings @ embeddings.T
