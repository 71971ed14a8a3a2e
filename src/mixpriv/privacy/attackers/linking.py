"""The linking attacker: regroup mixtures that the client sent shuffled, then attack the groups as requests.

With the ``shuffled`` request design (:meth:`mixpriv.server.PrivateClient.segment_batch`) the
client mixes each of B scans K times and sends the B·K mixtures in random order, so no request
holds the K mixtures of one scan. The server, knowing B and K (the worst case), clusters what it
received by content and treats each cluster as if it were one scan's request: the mean of a
cluster averages its references away exactly as a request's would, if the clustering found the
scans. Mixtures are compared after removing the population mean and pooling to a coarse grid, by
Pearson correlation, and grouped by average-linkage agglomerative clustering into B clusters
(SciPy); how well the clusters match the scans is reported as the adjusted Rand index.

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
from sklearn.metrics import adjusted_rand_score

from mixpriv.validation import InputError

__all__ = ["LinkedRequests", "link_by_clustering"]


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
    n_clusters = n_clusters or len(requests)
    if n_clusters < 1:
        raise InputError(f"the linking attacker needs at least one cluster, got {n_clusters}")
    sizes = [r.shape[0] for r in requests]
    mixtures = torch.cat(list(requests)).float()
    features = (mixtures - population_mean)[:, None]
    if downsample > 1:
        features = F.avg_pool3d(features, downsample)
    features = features.flatten(1).double()
    features = features - features.mean(1, keepdim=True)
    features = F.normalize(features, dim=1).numpy()
    if len(mixtures) == 1 or n_clusters == 1:
        labels = np.ones(len(mixtures), dtype=int)
    else:
        labels = fcluster(linkage(features, method="average", metric="correlation"), n_clusters, criterion="maxclust")
    scans = np.repeat(np.arange(len(requests)), sizes)
    starts = np.cumsum([0, *sizes[:-1]])
    linked = []
    for start in starts:
        members = [int(start)] + [j for j in np.flatnonzero(labels == labels[start]).tolist() if j != start]
        linked.append(mixtures[members])
    return LinkedRequests(linked, float(adjusted_rand_score(scans, labels)))
