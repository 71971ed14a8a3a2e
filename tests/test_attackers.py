"""The attacker suite: each attacker does what it claims on small synthetic problems, the worst case leads."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from mixpriv.inference.mixtures import client_generator
from mixpriv.mixing.bank import ReferenceBank
from mixpriv.mixing.settings import MixingSettings
from mixpriv.privacy.attackers import (
    ATTACKERS,
    VOLUME_ATTACKERS,
    AttackerOptions,
    LearnedAttackerOptions,
    Population,
    audit_attackers,
    link_by_clustering,
)
from mixpriv.privacy.attackers.estimates import rank_one
from mixpriv.privacy.attackers.learned import nt_xent, train_embedding
from mixpriv.privacy.attackers.traffic import (
    CORRELATION,
    KEY_RECOVERY,
    attack_traffic,
    deflate_references,
)
from mixpriv.privacy.reidentification import encode_scans, retrieval_metrics
from mixpriv.privacy.scans import AuditScans
from mixpriv.validation import InputError

SHAPE = (16, 16, 16)


def smooth_volume(seed: int) -> torch.Tensor:
    """A random smooth 'anatomy' in [0, 1] (1, D, H, W): coarse noise upsampled."""
    coarse = torch.rand(1, 1, 4, 4, 4, generator=torch.Generator().manual_seed(seed))
    return F.interpolate(coarse, size=SHAPE, mode="trilinear", align_corners=False)[0]


def scans_of(patients: range, prefix: str, noise: float = 0.01) -> AuditScans:
    """Two noisy scans of each patient's anatomy."""
    scans = AuditScans([], [], [], [])
    generator = torch.Generator().manual_seed(patients.start)
    for patient in patients:
        anatomy = smooth_volume(patient)
        for scan in range(2):
            scans.images.append((anatomy + noise * torch.randn(anatomy.shape, generator=generator)).clamp(0, 1))
            scans.labels.append(None)
            scans.case_ids.append(f"{prefix}{patient}s{scan}")
            scans.patient_ids.append(f"{prefix}{patient}")
    return scans


def bank_of(patients: range) -> ReferenceBank:
    images = torch.stack([smooth_volume(p) for p in patients])
    return ReferenceBank(images, torch.zeros(len(images), *SHAPE, dtype=torch.uint8), {"background": 0},
                         ids=[f"key{p}" for p in patients], patient_ids=[f"key{p}" for p in patients])


def test_population_removal_and_rank_one_recover_the_target_exactly_when_the_model_holds():
    x = smooth_volume(0)[0]
    mean = smooth_volume(1)[0]
    population = Population(mean, lambda_guess=0.4)
    assert torch.allclose(population.remove_from(0.4 * x + 0.6 * mean), x, atol=1e-6)
    lam = torch.tensor([0.3, 0.4, 0.5]).reshape(-1, 1, 1, 1)
    request = lam * x + (1 - lam) * mean  # every reference is the population mean
    assert torch.allclose(rank_one(request, population), x, atol=1e-4)


def test_request_estimates_resemble_the_target_more_than_one_mixture():
    x = smooth_volume(0)[0]
    references = torch.stack([smooth_volume(100 + k)[0] for k in range(16)])
    lam = torch.linspace(0.2, 0.5, 16).reshape(-1, 1, 1, 1)
    request = lam * x + (1 - lam) * references
    population = Population(torch.stack([smooth_volume(500 + i)[0] for i in range(32)]).mean(0), 0.35)
    error = {name: float((F.normalize((attack(request, population) - attack(request, population).mean()).flatten(),
                                      dim=0) - F.normalize((x - x.mean()).flatten(), dim=0)).norm())
             for name, attack in VOLUME_ATTACKERS.items()}
    assert error["request-mean"] < error["paper"]
    assert error["request-rank1"] < error["paper"]


def test_the_suite_reports_every_attacker_and_the_worst_case(caplog):
    scans, attacker = scans_of(range(4), "p"), scans_of(range(50, 53), "a")
    bank = bank_of(range(100, 106))
    options = AttackerOptions(k=4, learned=LearnedAttackerOptions(steps=3, patients_per_step=3, channels=(4, 8),
                                                                  embedding_dim=8, downsample=1))
    audit = audit_attackers(scans, bank, [MixingSettings((0.2, 0.5)), MixingSettings((0.9, 0.95))], attacker,
                            options, progress=False)
    assert audit.no_proxy.mean_average_precision == 1.0
    assert audit.same_patient_msssim > audit.other_patient_msssim
    low, high = audit.settings
    for row in audit.settings:
        assert list(row.results) == list(ATTACKERS)
        assert row.worst_case_map == max(r.mean_average_precision for r in row.results.values())
        assert row.results[row.worst_attacker].mean_average_precision == row.worst_case_map
        assert set(row.patient_msssim) == set(VOLUME_ATTACKERS)
    # a target weighing 0.9 stays recognisable to the paper's attacker; more reference makes it harder
    assert high.results["paper"].mean_average_precision == 1.0
    assert high.patient_msssim["paper"] > low.patient_msssim["paper"]


def test_shuffled_mixtures_are_linked_by_clustering_and_attacked_as_requests():
    scans, attacker = scans_of(range(4), "p"), scans_of(range(50, 53), "a")
    options = AttackerOptions(attackers=("paper", "request-mean"), k=4, designs=("request", "shuffled", "single"))
    audit = audit_attackers(scans, bank_of(range(100, 106)), [MixingSettings((0.8, 0.9))], attacker, options,
                            progress=False)
    request, shuffled, single = audit.settings
    # one mixture per scan: the request attacker has nothing to average, it is the paper's attacker
    assert torch.equal(single.similarities["request-mean"], single.similarities["paper"])
    assert (request.design, request.linking_ari, shuffled.design) == ("request", None, "shuffled")
    assert shuffled.name == "λ∈[0.8, 0.9] · shuffled"
    # a dominant target: clusters hold a scan's mixtures, merged with its patient's other scan (nearly the same)
    assert 0.3 < shuffled.linking_ari <= 1.0
    assert shuffled.results["request-mean"].mean_average_precision == 1.0
    # the paper's attacker sees one mixture under either design
    assert torch.equal(shuffled.similarities["paper"], request.similarities["paper"])


def test_linking_regroups_mixtures_whose_target_dominates():
    targets = [smooth_volume(i)[0] for i in range(4)]
    requests = [torch.stack([0.85 * x + 0.15 * smooth_volume(100 + 4 * i + k)[0] for k in range(4)])
                for i, x in enumerate(targets)]
    linked = link_by_clustering(requests, torch.stack(targets).mean(0), downsample=1)
    assert linked.adjusted_rand_index == 1.0
    assert all(torch.equal(request[0], mine[0]) for request, mine in zip(linked.requests, requests))


def test_linking_fails_when_the_references_dominate():
    """With λ small, mixtures that share a reference look more alike than mixtures that share a target."""
    targets = [smooth_volume(i)[0] for i in range(4)]
    references = [smooth_volume(100 + i)[0] for i in range(4)]
    requests = [torch.stack([0.15 * x + 0.85 * references[(i + k) % 4] for k in range(4)])
                for i, x in enumerate(targets)]
    linked = link_by_clustering(requests, torch.stack(references).mean(0), downsample=1)
    assert linked.adjusted_rand_index < 0.2


def test_the_suite_refuses_an_attacker_who_owns_the_key_or_the_attacked_scans():
    scans, bank = scans_of(range(2), "p"), bank_of(range(100, 103))
    with pytest.raises(InputError, match="must not include"):
        audit_attackers(scans, bank, [MixingSettings()], scans, AttackerOptions(attackers=("paper",)), progress=False)
    with pytest.raises(InputError, match="unknown or no attacker"):
        AttackerOptions(attackers=("oracle",))
    with pytest.raises(InputError, match="unknown or no request design"):
        AttackerOptions(designs=("carrier pigeon",))


def test_the_learned_attacker_learns_to_pair_scans_of_one_patient():
    attacker = scans_of(range(50, 56), "a")
    options = LearnedAttackerOptions(steps=60, patients_per_step=6, channels=(8, 16), embedding_dim=16, downsample=1,
                                     lr=3e-3)
    setting = MixingSettings((0.6, 0.9))
    network = train_embedding(attacker.images, attacker.patient_ids, setting, 2, options, seed=0, progress=False)
    untrained = train_embedding(attacker.images, attacker.patient_ids, setting, 2,
                                LearnedAttackerOptions(steps=1, patients_per_step=6, channels=(8, 16),
                                                       embedding_dim=16, downsample=1, lr=1e-12),
                                seed=0, progress=False)
    views = torch.stack([image[0] for image in attacker.images])[:, None]
    first, second = views[0::2], views[1::2]
    with torch.no_grad():
        trained_loss = nt_xent(network(first), network(second), 0.1)
        untrained_loss = nt_xent(untrained(first), untrained(second), 0.1)
    assert trained_loss < untrained_loss


def test_requests_never_mix_a_scan_with_its_own_patient():
    bank = ReferenceBank(torch.stack([torch.zeros(1, *SHAPE), torch.ones(1, *SHAPE)]),
                         torch.zeros(2, *SHAPE, dtype=torch.uint8), {"background": 0},
                         ids=["p0s1", "other"], patient_ids=["p0", "q"])
    encoded = encode_scans([torch.full((1, *SHAPE), 0.5)], bank, MixingSettings((0.5, 0.5)),
                           torch.Generator().manual_seed(0), 6, case_ids=["p0s0"], patient_ids=["p0"])[0]
    assert torch.allclose(encoded, torch.full_like(encoded, 0.75))  # always the other patient's reference (ones)


def test_client_draws_are_fresh_unless_a_seed_reproduces_them_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        fresh = [torch.rand(4, generator=client_generator()) for _ in range(2)]
        assert "fixed seed" not in caplog.text
        seeded = [torch.rand(4, generator=client_generator(7)) for _ in range(2)]
    assert not torch.equal(*fresh)
    assert torch.equal(*seeded)
    assert "fixed seed 7" in caplog.text and "cancel the key" in caplog.text


def recurring_key_requests(k: int, key_size: int, lam: float = 0.1) -> tuple[list[torch.Tensor], AuditScans,
                                                                          torch.Tensor]:
    """Two scans of each of 8 patients (fine random anatomy), each mixed with K distinct references of a
    small key whose references dominate and recur, and the key's mean."""
    generator = torch.Generator().manual_seed(0)
    scans = AuditScans([], [], [], [])
    for patient in range(8):
        anatomy = torch.rand(SHAPE, generator=generator)
        for scan in range(2):
            scans.images.append((anatomy + 0.05 * torch.randn(SHAPE, generator=generator))[None])
            scans.labels.append(None)
            scans.case_ids.append(f"p{patient}s{scan}")
            scans.patient_ids.append(f"p{patient}")
    references = torch.rand(key_size, *SHAPE, generator=generator)
    requests = [lam * image + (1 - lam) * references[torch.randperm(key_size, generator=generator)[:k]]
                for image in scans.images]
    return requests, scans, references.mean(0)


@pytest.mark.parametrize(("design", "k", "key_size", "gain"), [("request", 2, 4, 0.3), ("shuffled", 2, 4, 0.3),
                                                               ("single", 1, 2, 0.05)])
def test_key_recovery_removes_recurring_references_that_hide_the_patient(design, k, key_size, gain):
    requests, scans, mean = recurring_key_requests(k, key_size)
    plain = attack_traffic(requests, design, mean, CORRELATION, downsample=1)
    recovered = attack_traffic(requests, design, mean, KEY_RECOVERY, neighbours=4, downsample=1)
    plain_map = retrieval_metrics(plain.similarity, scans.patient_ids).mean_average_precision
    recovered_map = retrieval_metrics(recovered.similarity, scans.patient_ids).mean_average_precision
    assert recovered_map > plain_map + gain
    assert recovered_map > 0.9
    if design == "shuffled":  # without their references the mixtures link to their scans
        assert recovered.linking_ari > plain.linking_ari + 0.2
    else:
        assert plain.linking_ari is None and recovered.linking_ari is None


def test_deflation_never_explains_a_mixture_by_its_own_request():
    rows = F.normalize(torch.randn(6, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(0)), dim=1)
    rows[1] = F.normalize(rows[0] + 0.01 * rows[1], dim=0)  # rows 0 and 1 nearly equal
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    free = deflate_references(rows, neighbours=1)
    grouped = deflate_references(rows, neighbours=1, groups=groups)
    assert float(free[0] @ rows[0]) < 0.2  # explained by its twin
    assert float(grouped[0] @ rows[0]) > 0.5  # the twin is of its own request: not used
    with pytest.raises(InputError, match="at least one neighbour"):
        deflate_references(rows, neighbours=0)


def test_the_suite_runs_the_traffic_attackers_under_every_design():
    scans, attacker = scans_of(range(4), "p"), scans_of(range(50, 53), "a")
    options = AttackerOptions(attackers=("paper", "correlation", "key-recovery"), k=3,
                              designs=("request", "shuffled", "single"))
    audit = audit_attackers(scans, bank_of(range(100, 103)), [MixingSettings((0.2, 0.3))], attacker, options,
                            progress=False)
    for row in audit.settings:
        assert set(row.results) == {"paper", "correlation", "key-recovery"}
        assert row.similarities["key-recovery"].shape == (8, 8)
        assert (row.key_recovery_ari is None) == (row.design != "shuffled")
        assert row.key_recovery_neighbours in (1, 2, 4, 8)
    with pytest.raises(InputError, match="at least one neighbour"):
        AttackerOptions(key_neighbours=(0, 2))


def test_composites_stay_distinct_when_a_request_asks_more_references_than_the_bank_allows():
    scans = scans_of(range(2), "p")
    requests = encode_scans(scans.images, bank_of(range(100, 104)), MixingSettings((0.2, 0.5), 3),
                            torch.Generator().manual_seed(0), 4, case_ids=scans.case_ids, patient_ids=scans.patient_ids)
    assert [tuple(r.shape) for r in requests] == [(4, *SHAPE)] * 4  # 12 references from a key of 4
