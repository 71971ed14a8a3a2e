"""Attackers that read the server's whole traffic: correlation retrieval, and recovering the key from it.

The estimating attackers (:mod:`~mixpriv.privacy.attackers.estimates`) look at one scan's request at
a time. A server holds every request it ever received, and two facts make that traffic stronger
than any single request:

* **correlation**: the coarse features the linking attacker compares
  (:func:`~mixpriv.privacy.attackers.linking.traffic_features`: minus the population mean, pooled,
  unit norm) retrieve patients by Pearson correlation, each scan represented by the mean of its
  request's features (one mixture under the ``single`` design; the linked cluster under ``shuffled``).
* **key-recovery**: the key is finite, so its references recur across scans. Where the reference
  dominates a mixture (small λ), the mixtures most correlated with it are those that share its
  reference, mixed with other patients. Removing from each mixture its least-squares projection on
  its ``neighbours`` most correlated mixtures of *other* requests (:func:`deflate_references`) takes
  out the server's estimate of the reference and leaves the patient; the residuals are then linked
  (``shuffled``: clustered again, :func:`~mixpriv.privacy.attackers.linking.cluster_traffic`),
  averaged per request and retrieved by correlation. The more traffic, the better the estimate: an
  audit on a few dozen scans understates this attacker against a server that serves a hospital for
  months.

Example:
    >>> import torch
    >>> x = [torch.rand(6, 6, 6) for _ in range(3)]
    >>> requests = [torch.stack([0.5 * t + 0.5 * torch.rand(6, 6, 6) for _ in range(2)]) for t in x]
    >>> attack = attack_traffic(requests, "request", torch.full((6, 6, 6), 0.5), KEY_RECOVERY, downsample=1)
    >>> tuple(attack.similarity.shape), attack.linking_ari
    ((3, 3), None)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

import torch
import torch.nn.functional as F

from mixpriv.privacy.attackers.linking import (
    cluster_traffic,
    first_mixture_clusters,
    request_adjusted_rand_index,
    traffic_features,
)
from mixpriv.validation import InputError

__all__ = ["CORRELATION", "KEY_RECOVERY", "TRAFFIC_ATTACKERS", "TrafficAttack", "attack_traffic",
           "deflate_references"]

CORRELATION, KEY_RECOVERY = "correlation", "key-recovery"
#: The traffic attackers of the suite, in report order.
TRAFFIC_ATTACKERS = (CORRELATION, KEY_RECOVERY)


@dataclass
class TrafficAttack:
    """One traffic attacker's retrieval.

    Attributes:
        similarity: (N, N) correlation of the scans' estimates (higher = more alike).
        linking_ari: with the shuffled design, how well its clusters found the scans; ``None`` otherwise.
    """

    similarity: torch.Tensor
    linking_ari: float | None = None


def deflate_references(features: torch.Tensor, neighbours: int = 2,
                       groups: torch.Tensor | None = None) -> torch.Tensor:
    """Each row of unit-norm ``features`` (M, P) minus its least-squares multiple of the mean of its
    ``neighbours`` most correlated rows of other groups (the server's estimate of its reference), rescaled
    to unit norm.

    The mean, not a fit on each neighbour: a neighbour that shares the patient as well as the reference
    (the patient's other scan) would explain the patient away; in a mean of n it weighs 1/n.

    Args:
        features: unit-norm rows (:func:`~mixpriv.privacy.attackers.linking.traffic_features`).
        neighbours: rows averaged per row (the attacker's guess of how often a reference recurs).
        groups: (M,) ids of rows known to share a patient (the mixtures of one request), never used
            to explain each other; ``None``: only a row itself is excluded.

    Example:
        >>> shared = F.normalize(torch.randn(1, 50, dtype=torch.float64), dim=1)
        >>> own = F.normalize(torch.randn(2, 50, dtype=torch.float64), dim=1)
        >>> rows = F.normalize(torch.cat([shared + 0.2 * own[:1], shared + 0.2 * own[1:]]), dim=1)
        >>> residual = deflate_references(rows, neighbours=1)
        >>> bool((residual[0] @ own[0]).abs() > (rows[0] @ own[0]).abs())  # the shared part is gone
        True
    """
    if neighbours < 1:
        raise InputError(f"the key-recovery attacker averages at least one neighbour, got {neighbours}")
    excluded = torch.eye(len(features), dtype=torch.bool)
    if groups is not None:
        excluded |= groups[:, None] == groups[None, :]
    candidates = int((~excluded).sum(1).min())
    if candidates == 0:
        return features.clone()
    correlation = (features @ features.T).masked_fill(excluded, -torch.inf)
    nearest = correlation.topk(min(neighbours, candidates), dim=1).indices
    reference = F.normalize(features[nearest].mean(1), dim=1)
    return F.normalize(features - (features * reference).sum(1, keepdim=True) * reference, dim=1)


def attack_traffic(requests: Sequence[torch.Tensor], design: str, population_mean: torch.Tensor, attacker: str,
                   neighbours: int = 2, downsample: int = 2) -> TrafficAttack:
    """Re-identify the scans of ``requests`` (K, D, H, W each) from the traffic of one request ``design``.

    Args:
        requests: each scan's K mixtures as the client drew them, in scan order.
        design: ``request`` (the server knows which mixtures form a request), ``shuffled`` (it receives
            all mixtures of the batch without order and clusters them into one group per scan) or
            ``single`` (it receives only each scan's first mixture).
        population_mean: the attacker's mean public scan (D, H, W).
        attacker: :data:`CORRELATION` or :data:`KEY_RECOVERY`.
        neighbours: the key-recovery attacker's rows fitted per mixture.
        downsample: pooling before comparing.

    Raises:
        InputError: an unknown design or attacker, or no requests.
    """
    if attacker not in TRAFFIC_ATTACKERS:
        raise InputError(f"unknown traffic attacker {attacker!r}; choose from {list(TRAFFIC_ATTACKERS)}")
    if design not in ("request", "shuffled", "single"):
        raise InputError(f"unknown request design {design!r}")
    if not requests:
        raise InputError("the traffic attackers need at least one request")
    seen = [request[:1] for request in requests] if design == "single" else list(requests)
    sizes = [request.shape[0] for request in seen]
    features = traffic_features(torch.cat(seen), population_mean, downsample)
    groups = torch.arange(len(seen)).repeat_interleave(torch.tensor(sizes)) if design == "request" else None
    if attacker == KEY_RECOVERY:
        features = deflate_references(features, neighbours, groups)
    linking_ari = None
    if design == "shuffled":
        labels = cluster_traffic(features, len(seen))
        members = first_mixture_clusters(labels, sizes)
        linking_ari = request_adjusted_rand_index(labels, sizes)
    else:
        starts = torch.tensor([0, *sizes]).cumsum(0).tolist()
        members = [list(range(start, stop)) for start, stop in pairwise(starts)]
    estimates = F.normalize(torch.stack([features[rows].mean(0) for rows in members]), dim=1)
    return TrafficAttack((estimates @ estimates.T).float(), linking_ari)
