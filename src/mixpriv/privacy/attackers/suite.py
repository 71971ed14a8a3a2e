"""The attacker suite: every re-identification attacker against each mixing setting; the worst case leads.

For each setting the client's requests are drawn once (K mixtures per scan, references never of the
scan's own patient). Under the ``request`` design the server holds each scan's K mixtures together;
under ``shuffled`` it holds the mixtures of a whole batch in random order and first links them by
clustering (:mod:`~mixpriv.privacy.attackers.linking`). Every attacker of :mod:`~mixpriv.privacy.attackers.estimates` (MS-SSIM
retrieval of its estimate), the traffic attackers of :mod:`~mixpriv.privacy.attackers.traffic`
(correlation retrieval, and recovery of the key's references from the whole traffic) and the
learned attacker of :mod:`~mixpriv.privacy.attackers.learned` (cosine retrieval of its embedding,
of one mixture and of the request) then re-identify patients,
scored by F1, mAP and top-1 (:func:`~mixpriv.privacy.reidentification.retrieval_metrics`). A
setting's privacy is its **worst case**: the highest mAP over the attackers, and which one set it.

Next to it, MS-SSIM(estimate, the patient's own scan) of each estimating attacker against
MS-SSIM(another patient's scan, the patient's scan): the server's view protects the patient only
if the first is no higher than the second.

Example:
    >>> audit = audit_attackers(scans, bank, [MixingSettings((0.2, 0.5))], attacker_scans)  # doctest: +SKIP
    >>> row = audit.settings[0]  # doctest: +SKIP
    >>> row.worst_attacker, round(row.worst_case_map, 3)  # doctest: +SKIP
    ('request-population', 0.912)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from mixpriv.mixing.bank import ReferenceBank
from mixpriv.mixing.settings import MixingSettings
from mixpriv.privacy.attackers.estimates import VOLUME_ATTACKERS, Population
from mixpriv.privacy.attackers.learned import (
    EmbeddingNetwork,
    LearnedAttackerOptions,
    embedding_similarity,
    train_embedding,
)
from mixpriv.privacy.attackers.linking import link_by_clustering
from mixpriv.privacy.attackers.traffic import (
    KEY_RECOVERY,
    TRAFFIC_ATTACKERS,
    TrafficAttack,
    attack_traffic,
)
from mixpriv.privacy.reidentification import ReidResult, encode_scans, retrieval_metrics
from mixpriv.privacy.scans import AuditScans
from mixpriv.privacy.similarity import (
    MSSSIMSettings,
    ms_ssim_3d,
    settings_for,
    similarity_matrix,
)
from mixpriv.validation import InputError

__all__ = ["ATTACKERS", "REQUEST_DESIGNS", "AttackerAudit", "AttackerOptions", "SettingAttacks", "WorstCase",
           "audit_attackers", "msssim_attack", "pair_mean"]

PAPER = "paper"
LEARNED_SINGLE, LEARNED_REQUEST = "learned", "learned-request"
#: Every attacker of the suite, in report order.
ATTACKERS = (*VOLUME_ATTACKERS, *TRAFFIC_ATTACKERS, LEARNED_SINGLE, LEARNED_REQUEST)
#: How the client sends its mixtures: each scan's K in one request; the K of every scan of a batch
#: shuffled together (the server then links them by clustering, :mod:`~mixpriv.privacy.attackers.linking`);
#: or one mixture per scan, without test-time augmentation (what the paper attacks).
REQUEST_DESIGNS = ("request", "shuffled", "single")


@dataclass(frozen=True)
class AttackerOptions:
    """Which attackers run and how big they are.

    Attributes:
        attackers: names from :data:`ATTACKERS` (default: all).
        k: mixtures per scan, as the client sends them (its TTA K; 1 without TTA).
        designs: request designs attacked (:data:`REQUEST_DESIGNS`); each setting is attacked under each.
        learned: the learned attacker's network and training.
        key_neighbours: how many mixtures the key-recovery attacker averages into each mixture's
            reference (:func:`~mixpriv.privacy.attackers.traffic.deflate_references`); it is scored with
            each and reports the best, since the attacker can tune this on its own simulated traffic.
    """

    attackers: tuple[str, ...] = ATTACKERS
    k: int = 8
    designs: tuple[str, ...] = ("request",)
    learned: LearnedAttackerOptions = field(default_factory=LearnedAttackerOptions)
    key_neighbours: tuple[int, ...] = (1, 2, 4, 8)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.attackers) - set(ATTACKERS))
        if unknown or not self.attackers:
            raise InputError(f"unknown or no attacker(s) {unknown}; choose from {list(ATTACKERS)}")
        if self.k < 1:
            raise InputError(f"requests hold at least one mixture, got k = {self.k}")
        if not self.key_neighbours or min(self.key_neighbours) < 1:
            raise InputError(f"the key-recovery attacker averages at least one neighbour, got {self.key_neighbours}")
        unknown = sorted(set(self.designs) - set(REQUEST_DESIGNS))
        if unknown or not self.designs:
            raise InputError(f"unknown or no request design(s) {unknown}; choose from {list(REQUEST_DESIGNS)}")


class WorstCase:
    """What the server's view leaks is its worst case: the attacker of ``results`` with the highest mAP."""

    results: dict[str, ReidResult]

    @property
    def worst_attacker(self) -> str:
        """The attacker with the highest mAP (then F1; then report order)."""
        return max(self.results, key=lambda name: (self.results[name].mean_average_precision, self.results[name].f1))

    @property
    def worst_case_map(self) -> float:
        """The privacy of the view: the highest mAP of any attacker."""
        return self.results[self.worst_attacker].mean_average_precision


@dataclass
class SettingAttacks(WorstCase):
    """Every attacker's re-identification of the scans encoded by one setting.

    Attributes:
        setting: the client's mixing.
        design: the client's request design.
        results: per attacker, its retrieval scores.
        similarities: per attacker, the (N, N) matrix it ranked.
        patient_msssim: per estimating attacker, the mean MS-SSIM of its estimate of each scan
            against that scan.
        linking_ari: with the shuffled design, how well the server's clusters found the scans
            (adjusted Rand index); ``None`` otherwise.
        key_recovery_ari: the same for the key-recovery attacker's clusters (of the mixtures without
            their estimated references).
        key_recovery_neighbours: the number of neighbours of the key-recovery attacker's best score.
    """

    setting: MixingSettings
    design: str
    results: dict[str, ReidResult]
    similarities: dict[str, torch.Tensor]
    patient_msssim: dict[str, float]
    linking_ari: float | None = None
    key_recovery_ari: float | None = None
    key_recovery_neighbours: int | None = None

    @property
    def name(self) -> str:
        """The setting's name, with the design unless it is the plain request."""
        return self.setting.name if self.design == "request" else f"{self.setting.name} · {self.design}"


@dataclass
class AttackerAudit:
    """The suite's results over the settings, with the unencoded scans for calibration.

    Attributes:
        no_proxy: retrieval over the raw scans (what the server would learn without privacy).
        no_proxy_similarity: its (N, N) MS-SSIM matrix.
        settings: one entry per mixing setting and request design.
        patient_ids: the patient of each scan.
        k: mixtures per request.
        msssim: the MS-SSIM setting used.
        attacker_data: what the population and learned attackers learnt from.
    """

    no_proxy: ReidResult
    no_proxy_similarity: torch.Tensor
    settings: list[SettingAttacks]
    patient_ids: list[str]
    k: int
    msssim: MSSSIMSettings
    attacker_data: str

    @property
    def other_patient_msssim(self) -> float:
        """Mean MS-SSIM of a scan against the scans of *other* patients: what no information looks like."""
        return pair_mean(self.no_proxy_similarity, self.patient_ids, same=False)

    @property
    def same_patient_msssim(self) -> float:
        """Mean MS-SSIM of a scan against its patient's other scans (another acquisition)."""
        return pair_mean(self.no_proxy_similarity, self.patient_ids, same=True)


def pair_mean(similarity: torch.Tensor, patient_ids: Sequence[str], same: bool) -> float:
    """Mean similarity of the pairs of distinct scans of one patient (``same``) or of two patients (NaN: none).

    Example:
        >>> similarity = torch.tensor([[1.0, 0.8, 0.2], [0.8, 1.0, 0.4], [0.2, 0.4, 1.0]])
        >>> round(pair_mean(similarity, ["a", "a", "b"], same=True), 3), round(pair_mean(similarity, ["a", "a", "b"], False), 3)
        (0.8, 0.3)
    """
    ids = list(patient_ids)
    values = [float(similarity[i, j]) for i in range(len(ids)) for j in range(len(ids))
              if i != j and (ids[i] == ids[j]) == same]
    return sum(values) / len(values) if values else math.nan


def msssim_attack(estimates: Sequence[torch.Tensor], images: Sequence[torch.Tensor],
                  msssim: MSSSIMSettings) -> tuple[torch.Tensor, float]:
    """MS-SSIM retrieval of one estimate (1, D, H, W) per scan: the (N, N) matrix it ranks, and the mean
    MS-SSIM of each estimate against its own scan (1, D, H, W).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> scans = [torch.rand(1, 12, 12, 12, generator=g) for _ in range(3)]
        >>> matrix, own = msssim_attack(scans, scans, settings_for((12, 12, 12)))
        >>> tuple(matrix.shape), round(own, 4)
        ((3, 3), 1.0)
    """
    similarity = similarity_matrix(list(estimates), msssim, progress=False)
    own = torch.cat([ms_ssim_3d(estimate[None], image[None], msssim) for estimate, image in zip(estimates, images)])
    return similarity, float(own.mean())


def audit_attackers(
    scans: AuditScans,
    bank: ReferenceBank,
    settings: Sequence[MixingSettings],
    attacker_scans: AuditScans,
    options: AttackerOptions | None = None,
    seed: int = 0,
    progress: bool = True,
) -> AttackerAudit:
    """Run the suite on ``scans`` encoded with ``bank`` by each setting.

    Args:
        scans: the attacked scans (two or more per patient for some patients).
        bank: the client's key.
        settings: the mixing settings attacked.
        attacker_scans: the attacker's own public scans of the same kind with their patients
            (never the key's): the population mean and the learned attacker's training data.
        options: attackers and sizes.
        seed: seed of the client's draws and of the learned attacker.
        progress: show progress bars.

    Raises:
        InputError: attacker scans that share a patient with the key or the attacked scans, or as
            the parts raise.
    """
    options = options or AttackerOptions()
    leaked = set(attacker_scans.patient_ids) & (set(bank.patient_ids) | set(scans.patient_ids))
    if leaked:
        raise InputError(f"the attacker's own scans must not include the key's or the attacked patients: "
                         f"{sorted(leaked)[:5]} are shared")
    msssim = settings_for(scans.images[0].shape[1:])
    no_proxy_similarity = similarity_matrix(list(scans.images), msssim, progress=progress)
    rows = []
    for index, setting in enumerate(settings):
        generator = torch.Generator().manual_seed(seed + index)
        requests = encode_scans(scans.images, bank, setting, generator, options.k, case_ids=scans.case_ids,
                                patient_ids=scans.patient_ids)
        population = Population.of_scans(attacker_scans.images, setting.lambda_range)
        network = None  # the learned attacker of this setting, trained on first use
        for design in options.designs:
            linked = link_by_clustering(requests, population.mean) if design == "shuffled" else None
            seen = linked.requests if linked else [r[:1] for r in requests] if design == "single" else requests
            row, network = _attack_setting(setting, design, requests, seen, scans, attacker_scans, population,
                                           network, options, msssim, seed, progress)
            row.linking_ari = linked.adjusted_rand_index if linked else None
            rows.append(row)
    data = (f"the attacker's own {len(attacker_scans)} scans of {len(set(attacker_scans.patient_ids))} patients "
            "(no patient of the key or of the attacked scans)")
    return AttackerAudit(retrieval_metrics(no_proxy_similarity, scans.patient_ids), no_proxy_similarity, rows,
                         list(scans.patient_ids), options.k, msssim, data)


def _attack_setting(setting: MixingSettings, design: str, requests: list[torch.Tensor], seen: list[torch.Tensor],
                    scans: AuditScans, attacker_scans: AuditScans, population: Population,
                    network: EmbeddingNetwork | None, options: AttackerOptions, msssim: MSSSIMSettings, seed: int,
                    progress: bool) -> tuple[SettingAttacks, EmbeddingNetwork | None]:
    """Every chosen attacker on what the server holds of each scan (``seen``: its request, the cluster it
    linked, or its first mixture), the traffic attackers on all of the client's ``requests`` as ``design`` sends them."""
    results, similarities, patient_msssim = {}, {}, {}
    key_recovery = (None, None)
    chosen = [name for name in ATTACKERS if name in options.attackers]
    for name in tqdm(chosen, desc=f"attackers on {setting.name} ({design})", disable=not progress):
        if name == KEY_RECOVERY:
            attack, neighbours = _best_key_recovery(requests, design, population, scans.patient_ids,
                                                    options.key_neighbours)
            similarities[name], key_recovery = attack.similarity, (attack.linking_ari, neighbours)
        elif name in TRAFFIC_ATTACKERS:
            similarities[name] = attack_traffic(requests, design, population.mean, name).similarity
        elif name in VOLUME_ATTACKERS:
            estimates = [VOLUME_ATTACKERS[name](request, population)[None] for request in seen]
            similarities[name], patient_msssim[name] = msssim_attack(estimates, scans.images, msssim)
        else:
            if network is None:
                network = train_embedding(attacker_scans.images, attacker_scans.patient_ids, setting, options.k,
                                          options.learned, seed, progress)
            similarities[name] = embedding_similarity(network, seen, options.learned.downsample,
                                                      use_mean=name == LEARNED_REQUEST)
        results[name] = retrieval_metrics(similarities[name], scans.patient_ids)
    return SettingAttacks(setting, design, results, similarities, patient_msssim, key_recovery_ari=key_recovery[0],
                          key_recovery_neighbours=key_recovery[1]), network


def _best_key_recovery(requests: list[torch.Tensor], design: str, population: Population, patient_ids: Sequence[str],
                       choices: Sequence[int]) -> tuple[TrafficAttack, int]:
    """The key-recovery attack with the number of neighbours (of ``choices``) that re-identifies best."""
    attacks = {n: attack_traffic(requests, design, population.mean, KEY_RECOVERY, n) for n in choices}
    best = max(attacks, key=lambda n: retrieval_metrics(attacks[n].similarity, patient_ids).mean_average_precision)
    return attacks[best], best

