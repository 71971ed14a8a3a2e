"""The compared systems (Privacy-Net, Deformation-Proxy) under the attacker suite's attackers, next to no proxy.

What the server holds of each scan (one :class:`~mixpriv.inference.proxies.ProxyPipeline` run per
scan, its client generator seeded by the audit's seed plus the scan's index):

* **No proxy** (the reference row): the scan itself;
* **Privacy-Net**: the encoded image ``E(x)``, and the segmentation it returns, ``S(E(x))``: on the
  scan's own grid it *is* the client's answer (nothing is read back), so the server holds the
  patient's anatomy (attacked as the view ``segmentation``, its argmax label map);
* **Deformation-Proxy**: the scan warped by the client's secret key (its answer lies in the same
  secret geometry, and only the client can warp it back, so the deformed scan is what it holds).

The suite's attackers where they apply, each scored by F1, mAP and top-1 of patient identity
(:func:`~mixpriv.privacy.reidentification.retrieval_metrics`), the worst case (highest mAP) first:

* ``paper``: 3D MS-SSIM retrieval of the view as it is (the suite's attacker of one mixture);
* ``learned``: the learned attacker's embedding (:mod:`~mixpriv.privacy.attackers.learned`), trained
  on views the attacker makes of its own scans with the published client half (the model is public
  in the zoo: the attacker runs Privacy-Net's encoder and segmenter, and draws its own deformation
  keys, ``views_per_scan`` of each of its scans), retrieved by cosine;
* the same two on Privacy-Net's returned segmentation (``paper · segmentation``, ``learned · segmentation``).

The others do not apply: the population and request attackers remove an expected reference or
average a request's K mixtures, and the traffic attackers look for the references a key reuses; a
compared system sends one view per scan and shares no key between scans.

Example:
    >>> audit = audit_compared(scans, [ComparedSystem.of_model(privacy_net)], attacker_scans)  # doctest: +SKIP
    >>> [(row.system, row.worst_attacker) for row in audit.systems]  # doctest: +SKIP
    [('No proxy', 'paper'), ('Privacy-Net', 'paper · segmentation')]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from mixpriv.evaluation.compared import system_name
from mixpriv.inference.proxies import ProxyPipeline
from mixpriv.lightning.privacy_net import PrivacyNetModule
from mixpriv.privacy.attackers.learned import (
    embedding_similarity,
    train_embedding_on_views,
)
from mixpriv.privacy.attackers.suite import (
    LEARNED_SINGLE,
    PAPER,
    AttackerOptions,
    WorstCase,
    msssim_attack,
    pair_mean,
)
from mixpriv.privacy.reidentification import ReidResult, retrieval_metrics
from mixpriv.privacy.scans import AuditScans
from mixpriv.privacy.similarity import MSSSIMSettings, settings_for, similarity_matrix
from mixpriv.validation import InputError

__all__ = ["COMPARED_ATTACKERS", "NO_PROXY", "ComparedAudit", "ComparedSystem", "SystemAttacks", "attacker_name",
           "audit_compared", "compared_attackers"]

NO_PROXY = "No proxy"
#: The suite's attackers that apply to a compared system's views.
COMPARED_ATTACKERS = (PAPER, LEARNED_SINGLE)
#: The main view of every system; Privacy-Net's server also holds its ``segmentation``.
VIEW, SEGMENTATION = "view", "segmentation"

ViewMaker = Callable[[torch.Tensor, torch.Generator], dict[str, torch.Tensor]]
"""A scan (1, D, H, W) and the client's generator -> what the server holds of it, by view (each (1, D, H, W))."""


def compared_attackers(options: AttackerOptions) -> list[str]:
    """The chosen attackers that apply to the compared systems.

    Raises:
        InputError: none of them is chosen.

    Example:
        >>> compared_attackers(AttackerOptions(attackers=("paper", "request-mean")))
        ['paper']
    """
    attackers = [name for name in COMPARED_ATTACKERS if name in options.attackers]
    if not attackers:
        raise InputError(f"the compared systems are attacked by {list(COMPARED_ATTACKERS)}; none of them is among "
                         f"the chosen attackers {list(options.attackers)}")
    return attackers


def attacker_name(attacker: str, view: str) -> str:
    """An attacker's name on a view: plain on the main view, ``"paper · segmentation"`` on another.

    Example:
        >>> attacker_name("paper", "view"), attacker_name("learned", "segmentation")
        ('paper', 'learned · segmentation')
    """
    return attacker if view == VIEW else f"{attacker} · {view}"


@dataclass(frozen=True)
class ComparedSystem:
    """A system the server sees the scans through.

    Attributes:
        name: the report's row name.
        make_views: the client (and, for a view the server computes, the server): scan -> views.
        random: whether the views depend on the client's draws (the attacker then draws several views of each
            of its own scans to train on).
        model: the model's name, for the report.
    """

    name: str
    make_views: ViewMaker
    random: bool = False
    model: str = "—"

    @classmethod
    def no_proxy(cls) -> ComparedSystem:
        """The reference: the server sees the scans themselves."""
        return cls(NO_PROXY, lambda image, generator: {VIEW: image})

    @classmethod
    def of_model(cls, model: torch.nn.Module, source: object = None) -> ComparedSystem:
        """The system of a Privacy-Net or Deformation-Proxy model, run through its :class:`ProxyPipeline`.

        Raises:
            InputError: another kind of model (``source`` names it in the message).
        """
        name = system_name(model, source)
        pipeline = ProxyPipeline.of_model(model.eval())
        card = getattr(model, "model_card", {}).get("name", str(source) if source is not None else name)
        if isinstance(model, PrivacyNetModule):
            def views(image: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
                run = pipeline(image, generator)
                return {VIEW: run.view.cpu(), SEGMENTATION: run.answer.argmax(0, keepdim=True).float().cpu()}
            return cls(name, views, random=False, model=card)
        return cls(name, lambda image, generator: {VIEW: pipeline.make_view(image, generator)[0].cpu()}, random=True,
                   model=card)


@dataclass
class SystemAttacks(WorstCase):
    """Every applicable attacker's re-identification of one system's views.

    Attributes:
        system: the system's name.
        model: its model's name.
        results: per attacker (:func:`attacker_name`), its retrieval scores.
        similarities: per attacker, the (N, N) matrix it ranked.
        patient_msssim: per MS-SSIM attacker, the mean MS-SSIM of the view of each scan against that scan.
    """

    system: str
    model: str
    results: dict[str, ReidResult]
    similarities: dict[str, torch.Tensor]
    patient_msssim: dict[str, float]


@dataclass
class ComparedAudit:
    """The systems' attacks (No proxy first), with what calibrates them.

    Attributes:
        systems: one entry per system, the reference first.
        patient_ids: the patient of each attacked scan.
        msssim: the MS-SSIM setting used.
        other_patient_msssim: mean MS-SSIM of a scan against the scans of other patients.
        same_patient_msssim: mean MS-SSIM of a scan against its patient's other scans.
        attacker_data: what the learned attacker learnt from.
        views_per_scan: views the attacker drew of each of its scans for a system with random views.
    """

    systems: list[SystemAttacks]
    patient_ids: list[str]
    msssim: MSSSIMSettings
    other_patient_msssim: float
    same_patient_msssim: float
    attacker_data: str
    views_per_scan: int


def audit_compared(
    scans: AuditScans,
    systems: Sequence[ComparedSystem],
    attacker_scans: AuditScans,
    options: AttackerOptions | None = None,
    seed: int = 0,
    views_per_scan: int = 4,
    progress: bool = True,
    no_proxy_similarity: torch.Tensor | None = None,
) -> ComparedAudit:
    """Attack the views of ``scans`` through each system (and the raw scans, first) with the applicable attackers.

    Args:
        scans: the attacked scans (two or more per patient for some patients).
        systems: the compared systems (:meth:`ComparedSystem.of_model`).
        attacker_scans: the attacker's own scans with their patients (the learned attacker's training data).
        options: which attackers (those of :data:`COMPARED_ATTACKERS` among ``options.attackers``) and
            the learned attacker's sizes.
        seed: the client's generator of scan ``i`` is seeded ``seed + i``; the attacker's of its scan ``j``
            ``seed + len(scans) + j``; the learned attacker's training ``seed``.
        views_per_scan: views the attacker draws of each of its scans when the views are random.
        progress: show progress bars.
        no_proxy_similarity: the raw scans' MS-SSIM matrix if already computed (the attacker suite's).

    Raises:
        InputError: no applicable attacker chosen, attacker scans of an attacked patient, or as the parts raise.
    """
    options = options or AttackerOptions()
    attackers = compared_attackers(options)
    if views_per_scan < 1:
        raise InputError(f"the attacker draws at least one view of each of its scans, got {views_per_scan}")
    leaked = set(attacker_scans.patient_ids) & set(scans.patient_ids)
    if leaked:
        raise InputError(f"the attacker's own scans must not include the attacked patients: {sorted(leaked)[:5]} "
                         "are shared")
    msssim = settings_for(scans.images[0].shape[1:])
    raw = no_proxy_similarity if no_proxy_similarity is not None else similarity_matrix(
        list(scans.images), msssim, progress=progress)
    rows = [_attack_system(system, scans, attacker_scans, attackers, options, msssim, seed, views_per_scan,
                           progress, raw if system.name == NO_PROXY else None)
            for system in (ComparedSystem.no_proxy(), *systems)]
    data = (f"the attacker's own {len(attacker_scans)} scans of {len(set(attacker_scans.patient_ids))} patients "
            "(no attacked patient), through the published client")
    return ComparedAudit(rows, list(scans.patient_ids), msssim, pair_mean(raw, scans.patient_ids, same=False),
                         pair_mean(raw, scans.patient_ids, same=True), data, views_per_scan)


def _attack_system(system: ComparedSystem, scans: AuditScans, attacker_scans: AuditScans, attackers: Sequence[str],
                   options: AttackerOptions, msssim: MSSSIMSettings, seed: int, views_per_scan: int, progress: bool,
                   raw: torch.Tensor | None) -> SystemAttacks:
    """Every attacker on every view the server holds through ``system`` (``raw``: the scans' own MS-SSIM matrix,
    the paper attacker's on the raw scans)."""
    held = [system.make_views(image, torch.Generator().manual_seed(seed + index))
            for index, image in enumerate(tqdm(scans.images, desc=f"{system.name}: the server's views",
                                               disable=not progress))]
    pool = _attacker_views(system, attacker_scans, seed + len(scans), views_per_scan) if LEARNED_SINGLE in attackers \
        else None
    results, similarities, patient_msssim = {}, {}, {}
    for view in held[0]:
        views = [scan_views[view] for scan_views in held]
        for attacker in attackers:
            name = attacker_name(attacker, view)
            if attacker == PAPER and raw is not None and view == VIEW:
                similarities[name], patient_msssim[name] = raw, 1.0  # the view is the scan
            elif attacker == PAPER:
                similarities[name], patient_msssim[name] = msssim_attack(views, scans.images, msssim)
            else:
                similarities[name] = _learned(pool[view], attacker_scans.patient_ids, views, options, seed, progress)
            results[name] = retrieval_metrics(similarities[name], scans.patient_ids)
    return SystemAttacks(system.name, system.model, results, similarities, patient_msssim)


def _attacker_views(system: ComparedSystem, attacker_scans: AuditScans, seed: int,
                    views_per_scan: int) -> dict[str, list[list[torch.Tensor]]]:
    """View -> for each of the attacker's scans, the views (D, H, W) it makes of it through the public client."""
    draws = views_per_scan if system.random else 1
    pool: dict[str, list[list[torch.Tensor]]] = {}
    for index, image in enumerate(attacker_scans.images):
        generator = torch.Generator().manual_seed(seed + index)
        for _ in range(draws):
            for view, volume in system.make_views(image, generator).items():
                scan_views = pool.setdefault(view, [[] for _ in attacker_scans.images])[index]
                scan_views.append(volume[0])
    return pool


def _learned(pool: list[list[torch.Tensor]], patient_ids: Sequence[str], views: Sequence[torch.Tensor],
             options: AttackerOptions, seed: int, progress: bool) -> torch.Tensor:
    """The learned attacker trained on the attacker's own ``pool`` of views, its cosine similarities of ``views``."""
    def draw(index: int, generator: torch.Generator) -> torch.Tensor:
        return pool[index][int(torch.randint(len(pool[index]), (), generator=generator))]

    centre = torch.stack([volume for scan_views in pool for volume in scan_views]).mean(0)
    network = train_embedding_on_views(patient_ids, draw, centre, options.learned, seed, progress)
    return embedding_similarity(network, views, options.learned.downsample, use_mean=False)
