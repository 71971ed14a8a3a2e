"""The compared systems (Privacy-Net, Deformation-Proxy) next to Mixup-Privacy: their Dice rows in the evaluation
and their re-identification in the privacy audit, on tiny folders with tiny models."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import LABELS, TINY_SEGMENTER, TINY_UNMIXER
from test_privacy_audit import TINY_ATTACKERS, write_patient_folder

from mixpriv.cli import main
from mixpriv.constants import IMAGE, LABEL, TEST
from mixpriv.data.datamodule import bank_from_cases
from mixpriv.data.folder import DatasetFolder
from mixpriv.data.preprocessing import preprocessing
from mixpriv.evaluation.compared import compared_systems
from mixpriv.evaluation.dice import dice_per_class
from mixpriv.evaluation.runner import evaluate_models
from mixpriv.geometry import subject_into
from mixpriv.inference.proxies import ProxyPipeline
from mixpriv.lightning.deformation_proxy import DeformationProxyModule
from mixpriv.lightning.mixup import MixupPrivacyModule
from mixpriv.lightning.privacy_net import PrivacyNetModule
from mixpriv.privacy.attackers.compared import ComparedSystem, audit_compared
from mixpriv.privacy.runner import AuditOptions, run_audit
from mixpriv.privacy.scans import load_scans
from mixpriv.validation import InputError

DEFORMATION = {"magnitude": 3.0, "control_spacing": 8.0, "channels": [4, 8]}
DISCRIMINATOR = {"channels": [4, 8]}


def privacy_net() -> PrivacyNetModule:
    return PrivacyNetModule(LABELS, TINY_SEGMENTER, TINY_SEGMENTER, DISCRIMINATOR, patch_size=16).eval()


def deformation_proxy() -> DeformationProxyModule:
    return DeformationProxyModule(LABELS, TINY_SEGMENTER, DEFORMATION, DISCRIMINATOR, patch_size=16).eval()


def mixup() -> MixupPrivacyModule:
    return MixupPrivacyModule(LABELS, TINY_SEGMENTER, TINY_UNMIXER, patch_size=16, input_spacing=2.0).eval()


def test_the_evaluation_scores_the_compared_systems_on_the_same_scans(tiny_folder, tmp_path):
    folder, private = DatasetFolder(tiny_folder), mixup()
    bank = bank_from_cases(folder, "train", 2.0, progress=False)
    systems = compared_systems([deformation_proxy(), privacy_net()])
    result = evaluate_models(None, private, folder, bank, tmp_path / "eval", k=2, seed=3, progress=False,
                             compared=systems)
    assert result.table.methods == ["Privacy-Net", "Deformation-Proxy", "Naive", "Naive+TTA", "Learned",
                                    "Learned+TTA"]
    assert {"Privacy-Net", "Deformation-Proxy"} <= set(result.seconds)
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert list(summary["per_case"])[:2] == ["Privacy-Net", "Deformation-Proxy"]
    # the same preprocessing and grid as the other rows, one client generator per system seeded by the evaluation's
    generators = {name: torch.Generator().manual_seed(3) for name in systems}
    for case in folder.cases(TEST):
        subject = subject_into(preprocessing(2.0)(case.to_subject()), bank.space)
        for name, model in systems.items():
            run = ProxyPipeline.of_model(model)(subject[IMAGE].data.float(), generators[name])
            expected = dice_per_class(run.labels, subject[LABEL].data[0], LABELS)
            assert result.table.per_case[name][case.case_id] == pytest.approx(expected, nan_ok=True)
    assert "| Privacy-Net |" in (tmp_path / "eval" / "table.md").read_text()
    with pytest.raises(InputError, match="not a compared system"):
        compared_systems([private])
    with pytest.raises(InputError, match="two Privacy-Net models"):
        compared_systems([privacy_net(), privacy_net()])


def test_the_audit_attacks_each_compared_systems_views_next_to_no_proxy_and_mixup(tmp_path):
    data = write_patient_folder(tmp_path / "Dataset002_Patients")
    attackers = dataclasses.replace(TINY_ATTACKERS, attackers=("paper", "request-mean", "learned"))
    options = AuditOptions(parts=("reid",), attackers=attackers, compared=(privacy_net(), deformation_proxy()),
                           compared_views=2)
    paths = run_audit(mixup(), data, tmp_path / "audit", options, progress=False)
    report = json.loads(paths["json"].read_text())
    rows = {row["system"]: row for row in report["compared"]["systems"]}
    assert list(rows) == ["No proxy", "Privacy-Net", "Deformation-Proxy", "Mixup-Privacy (λ∈[0.65, 0.95])"]
    assert list(rows["Privacy-Net"]["attackers"]) == ["paper", "learned", "paper · segmentation",
                                                      "learned · segmentation"]
    assert list(rows["Deformation-Proxy"]["attackers"]) == ["paper", "learned"]
    for row in rows.values():
        maps = {name: scores["map"] for name, scores in row["attackers"].items()}
        assert all(0.0 <= value <= 1.0 for value in maps.values())
        assert row["worst_case_map"] == max(maps.values()) and maps[row["worst_case_attacker"]] == row["worst_case_map"]
    # the reference row is the suite's No proxy, and the Mixup-Privacy row its worst case of the model's setting
    assert rows["No proxy"]["attackers"]["paper"] == report["reidentification"]["no_proxy"]
    assert rows["Mixup-Privacy (λ∈[0.65, 0.95])"]["worst_case_map"] == report["reidentification"]["settings"][0][
        "worst_case_map"]
    assert 0.0 <= rows["Deformation-Proxy"]["msssim_view_vs_patient"]["view"] <= 1.0
    assert set(rows["Privacy-Net"]["msssim_view_vs_patient"]) == {"view", "segmentation"}
    assert report["compared"]["msssim_same_patient"] > report["compared"]["msssim_other_patient"]
    markdown = paths["markdown"].read_text()
    assert "## Compared systems: re-identification (paper Table 2)" in markdown and "| Deformation-Proxy |" in markdown
    assert (tmp_path / "audit" / "compared_reidentification.png").stat().st_size > 5_000


def test_a_view_equal_to_the_scan_scores_as_no_proxy_and_noise_does_not(tmp_path):
    folder = DatasetFolder(write_patient_folder(tmp_path / "Dataset002_Patients"))
    scans, attacker = (load_scans(folder, 2.0, split, progress=False) for split in ("test", "val"))
    noise = ComparedSystem("Noise", lambda image, generator: {"view": torch.rand(image.shape, generator=generator)},
                           random=True)
    identity = ComparedSystem("Identity", lambda image, generator: {"view": image.clone()})
    audit = audit_compared(scans, [identity, noise], attacker, TINY_ATTACKERS, views_per_scan=2, progress=False)
    no_proxy, same, random = audit.systems
    # the identity's views go through the generic MS-SSIM path; no proxy reuses the raw scans' matrix
    torch.testing.assert_close(same.similarities["paper"], no_proxy.similarities["paper"])
    assert same.results["paper"].mean_average_precision == no_proxy.results["paper"].mean_average_precision == 1.0
    assert same.patient_msssim["paper"] == pytest.approx(1.0)
    assert random.results["paper"].mean_average_precision < 0.9 and random.patient_msssim["paper"] < 0.5


def test_the_audit_refuses_a_mixup_model_as_a_compared_system(tmp_path, caplog):
    data = write_patient_folder(tmp_path / "Dataset002_Patients")
    with pytest.raises(InputError, match="MixupPrivacyModule, not a compared system"):
        run_audit(mixup(), data, tmp_path / "audit", AuditOptions(parts=("reid",), compared=(mixup(),)),
                  progress=False)
    with pytest.raises(InputError, match="none of them is among the chosen attackers"):
        AuditOptions(compared=("x",), attackers=dataclasses.replace(TINY_ATTACKERS, attackers=("request-mean",)))
    assert main(["audit", "--model", "m", "--out", str(tmp_path / "a"), "--compared", "p", "--attackers",
                 "correlation"]) == 2
    assert "none of them is among the chosen attackers" in caplog.text
