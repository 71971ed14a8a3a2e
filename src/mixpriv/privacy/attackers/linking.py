"""The linking attacker: regroup mixtures that the client sent shuffled, then attack the groups as requests.

With the ``shuffled`` request design (:meth:`mixpriv.server.PrivateClient.segment_batch`) the
client mixes each of B scans K times and sends the B·K mixtures in random order, so no request
holds the K mixtures of one scan. The server, knowing B and K (the worst case), clusters what it
received by content and treats each cluster as if it were one scan's request: the mean of a
cluster averages its references away exactly as a request's would, if the clustering found the
scans. Mixtures are compared after removing the population mean and pooling to a coarse grid
(:func:`traffic_features`), by Pearson correlation, and grouped by average-linkage agglomerative
clustering into B clusters (:func:`cluster_traffic`, SciPy); how well the clusters match the scans
is reported as the adjusted Rand index.

Example:
    >>> import torch
    >>> x = [torch.rand(8, 8, 8) for _ in range(3)]
    >>> requests = [torch.stack([0.9 * t + 0.1 * torch.rand(8, 8, 8) for _ in range(4)]) for t in x]
    >>> linked = link_by_clustering(requests, torch.full((8, 8, 8), 0.5), downsample=1)
    >>> linked.adjusted_rand_index, [tuple(r.shape) for r in linked.requests]
    (1.0, [(4, 8, 8, 8), (4, 8, 8, 8), (4, 8, 8, 8)])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform
from sklearn.metrics import adjusted_rand_score

from mixpriv.validation import InputError

__all__ = ["LinkedRequests", "cluster_traffic", "link_by_clustering", "traffic_features"]


@dataclass
class LinkedRequests:
    """What the linking attacker made of shuffled mixtures.

    Attributes:
        requests: per scan, the cluster holding the scan's first mixture, that mixture first
            (K', D, H, W): what the request attackers then see in place of the true request.
        adjusted_rand_index: agreement of the clusters with the scans (1: every scan found; ~0: chance).
    """

    requests: list[torch.Tensor]
    adjusted_rand_index: float


def traffic_features(mixtures: torch.Tensor, population_mean: torch.Tensor, downsample: int = 2) -> torch.Tensor:
    """What the server compares mixtures (M, D, H, W) by: each minus the population mean, average-pooled
    by ``downsample``, flattened, centred and scaled to unit norm (M, P), so that a dot product is a
    Pearson correlation.

    Example:
        >>> features = traffic_features(torch.rand(3, 4, 4, 4), torch.zeros(4, 4, 4))
        >>> tuple(features.shape), torch.allclose(features.norm(dim=1), torch.ones(3, dtype=torch.float64))
        ((3, 8), True)
    """
    features = (mixtures.float() - population_mean)[:, None]
    if downsample > 1:
        features = F.avg_pool3d(features, downsample)
    features = features.flatten(1).double()
    return F.normalize(features - features.mean(1, keepdim=True), dim=1)


def cluster_traffic(features: torch.Tensor, n_clusters: int) -> np.ndarray:
    """Average-linkage clusters of the centred unit-norm rows of ``features`` (M, P) by correlation
    distance ``1 − fᵢ·fⱼ`` (a row of zeros is at distance 1 from every row): one label per row.

    Example:
        >>> rows = traffic_features(torch.tensor([[1.0, 0, -1], [0.9, 0.1, -1], [-1, 0, 1]]).reshape(3, 1, 1, 3), torch.zeros(1, 1, 3), 1)
        >>> labels = cluster_traffic(rows, 2)
        >>> bool(labels[0] == labels[1] != labels[2])
        True
    """
    if n_clusters < 1:
        raise InputError(f"the linking attacker needs at least one cluster, got {n_clusters}")
    if len(features) == 1 or n_clusters == 1:
        return np.ones(len(features), dtype=int)
    distance = (1 - features @ features.T).clamp_min(0).fill_diagonal_(0).numpy()
    return fcluster(linkage(squareform(distance, checks=False), method="average"), n_clusters, criterion="maxclust")


def first_mixture_clusters(labels: np.ndarray, sizes: Sequence[int]) -> list[list[int]]:
    """Per true request of ``sizes`` mixtures (stacked in order), the indices of the cluster holding its
    first mixture, that mixture first."""
    starts = np.cumsum([0, *sizes[:-1]]).tolist()
    return [[start] + [j for j in np.flatnonzero(labels == labels[start]).tolist() if j != start] for start in starts]


def request_adjusted_rand_index(labels: np.ndarray, sizes: Sequence[int]) -> float:
    """How well cluster ``labels`` of stacked requests of ``sizes`` mixtures found the requests."""
    return float(adjusted_rand_score(np.repeat(np.arange(len(sizes)), sizes), labels))


def link_by_clustering(requests: Sequence[torch.Tensor], population_mean: torch.Tensor,
                       n_clusters: int | None = None, downsample: int = 2) -> LinkedRequests:
    """Cluster the B·K mixtures of B true requests (K, D, H, W) as a server that never saw the requests would.

    Args:
        requests: the client's true requests, used only to pool the mixtures (and to score the clustering).
        population_mean: the attacker's mean public scan (D, H, W), removed before comparing.
        n_clusters: clusters to form (default B: the attacker knows how many scans the batch holds).
        downsample: average-pool by this factor before comparing.

    Raises:
        InputError: no requests, requests of different shapes, or fewer than one cluster.
    """
    if not requests or len({tuple(r.shape[1:]) for r in requests}) != 1:
        raise InputError("linking needs at least one request, all of one volume shape")
    sizes = [r.shape[0] for r in requests]
    mixtures = torch.cat(list(requests)).float()
    labels = cluster_traffic(traffic_features(mixtures, population_mean, downsample), n_clusters or len(requests))
    linked = [mixtures[members] for members in first_mixture_clusters(labels, sizes)]
    return LinkedRequests(linked, request_adjusted_rand_index(labels, sizes))
