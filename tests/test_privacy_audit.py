"""The privacy audit end to end on a tiny folder with two scans per test patient."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import AFFINE, LABELS, TINY_SEGMENTER, TINY_UNMIXER, phantom

from mixpriv.cli import main
from mixpriv.inference import pipeline as pipeline_module
from mixpriv.lightning.baseline import BaselineSegmenter
from mixpriv.lightning.mixup import MixupPrivacyModule
from mixpriv.mixing.settings import MixingSettings
from mixpriv.privacy.attackers import ATTACKERS, VOLUME_ATTACKERS, AttackerOptions, LearnedAttackerOptions
from mixpriv.privacy.bss import SeparationOptions
from mixpriv.privacy.report import write_report
from mixpriv.privacy.runner import AuditOptions, run_audit
from mixpriv.validation import InputError

TEST_PATIENTS = 4
ATTACKER_PATIENTS = 2  # the attacker's own public scans (the val split), two per patient
TINY_ATTACKERS = AttackerOptions(k=2, learned=LearnedAttackerOptions(steps=2, patients_per_step=2, channels=(4, 8),
                                                                      embedding_dim=8, downsample=1))
TINY_SEPARATION = SeparationOptions(patch_size=16, num_patches=2, inits=2, score_steps=2, batch_size=2, num_levels=2,
                                    steps_per_level=2, lambda_candidates=(0.6, 0.8), lambda_steps_per_level=1,
                                    network={"channels": [4, 8], "embedding_dim": 8}, min_mean=0.01)


def write_patient_folder(root: Path, n_train: int = 4) -> Path:
    """nnU-Net folder whose test split (and val split, the attacker's own scans) holds two scans
    (same anatomy, other noise) of each patient."""
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    cases = {}
    for i in range(n_train):
        image, label = phantom(100 + i)
        nib.save(nib.Nifti1Image(image, AFFINE), str(root / "imagesTr" / f"train{i:02d}_0000.nii.gz"))
        nib.save(nib.Nifti1Image(label, AFFINE), str(root / "labelsTr" / f"train{i:02d}.nii.gz"))
        cases[f"train{i:02d}"] = {"patient": f"train{i:02d}", "split": "train"}
    rng = np.random.default_rng(0)
    for split, patients, folder in (("test", range(TEST_PATIENTS), "Ts"),
                                    ("val", range(200, 200 + ATTACKER_PATIENTS), "Tr")):
        for patient in patients:
            image, label = phantom(patient)
            for scan in range(2):
                case_id = f"p{patient}s{scan}"
                noisy = image + rng.normal(0, 0.02, image.shape).astype(np.float32)
                nib.save(nib.Nifti1Image(noisy, AFFINE), str(root / f"images{folder}" / f"{case_id}_0000.nii.gz"))
                nib.save(nib.Nifti1Image(label, AFFINE), str(root / f"labels{folder}" / f"{case_id}.nii.gz"))
                cases[case_id] = {"patient": f"patient{patient}", **({"split": split} if split == "val" else {})}
    meta = {"channel_names": {"0": "T1"}, "labels": LABELS, "numTraining": n_train + 2 * ATTACKER_PATIENTS,
            "file_ending": ".nii.gz",
            "mixpriv": {"cases": cases}}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


@pytest.fixture()
def patient_folder(tmp_path: Path) -> Path:
    return write_patient_folder(tmp_path / "Dataset002_Patients")


@pytest.fixture()
def tiny_model() -> MixupPrivacyModule:
    return MixupPrivacyModule(LABELS, TINY_SEGMENTER, TINY_UNMIXER, patch_size=16, input_spacing=2.0).eval()


def test_reidentification_and_test_retest_report(patient_folder, tiny_model, tmp_path):
    options = AuditOptions(parts=("reid", "icc"), reid_settings=(MixingSettings(), MixingSettings((0.5, 0.6))),
                           attackers=TINY_ATTACKERS)
    paths = run_audit(tiny_model, patient_folder, tmp_path / "audit", options, progress=False)
    report = json.loads(paths["json"].read_text())
    reid = report["reidentification"]
    assert reid["no_proxy"]["map"] == 1.0  # two noisy copies of one anatomy are each other's nearest
    assert reid["msssim_same_patient"] > reid["msssim_other_patient"]
    rows = {row["setting"]: row for row in reid["settings"]}
    assert list(rows) == ["λ∈[0.65, 0.95]", "λ∈[0.5, 0.6]"]
    for row in rows.values():
        assert list(row["attackers"]) == list(ATTACKERS)
        maps = {name: scores["map"] for name, scores in row["attackers"].items()}
        assert row["worst_case_map"] == max(maps.values()) and maps[row["worst_case_attacker"]] == row["worst_case_map"]
        assert set(row["msssim_estimate_vs_patient"]) == set(VOLUME_ATTACKERS)  # the attackers that estimate volumes
    assert set(report["test_retest"]["icc"]) == {"CSF", "GM", "WM"}
    assert len(report["test_retest"]["dice_first"]["GM"]) == 2 * TEST_PATIENTS
    markdown = paths["markdown"].read_text()
    assert "| No proxy (raw scans) | 1.000 |" in markdown and "ICC(A,1)" in markdown and "worst-case mAP" in markdown
    for png in ("attackers.png", "reidentification.png", "test_retest.png"):
        assert (tmp_path / "audit" / png).stat().st_size > 5_000


def test_audit_rejects_unknown_parts_and_baselines(patient_folder, tmp_path, caplog):
    with pytest.raises(InputError, match="unknown audit part"):
        AuditOptions(parts=("reid", "dice"))
    assert main(["audit", "--model", "tissue-baseline-2mm", "--data", str(patient_folder),
                 "--out", str(tmp_path / "a"), "--parts", "reid"]) == 2
    assert "the audit needs a Mixup-Privacy model" in caplog.text
    assert main(["audit", "--model", "tissue-mixpriv-2mm", "--data", str(patient_folder),
                 "--out", str(tmp_path / "b"), "--parts", "bss", "--bss-control-lambda", "1.5"]) == 2
    assert "control_lambda must lie in (0, 1)" in caplog.text
    assert not (tmp_path / "b").exists()


@pytest.mark.slow
def test_sweep_measures_each_setting_and_recommends_one(patient_folder, tiny_model, tmp_path):
    other = MixupPrivacyModule(LABELS, TINY_SEGMENTER, TINY_UNMIXER, patch_size=16, input_spacing=2.0,
                               lambda_range=(0.5, 0.8)).eval()
    baseline = BaselineSegmenter(LABELS, TINY_SEGMENTER, patch_size=16, input_spacing=2.0).eval()
    attackers = dataclasses.replace(TINY_ATTACKERS, designs=("request", "single"))
    options = AuditOptions(parts=("sweep",), sweep_settings=(MixingSettings((0.35, 0.65)),), sweep_models=(other,),
                           baseline=baseline, k=2, dice_cases=2, separation=TINY_SEPARATION, attackers=attackers)
    paths = run_audit(tiny_model, patient_folder, tmp_path / "audit", options, progress=False)
    report = json.loads(paths["json"].read_text())
    assert "reidentification" not in report  # the sweep alone: its re-identification runs, its section does not
    every = {row["setting"]: row for row in report["sweep"]["rows"]}
    assert list(every) == ["λ∈[0.65, 0.95]", "λ∈[0.65, 0.95] · single", "λ∈[0.5, 0.8]", "λ∈[0.5, 0.8] · single",
                           "λ∈[0.35, 0.65]", "λ∈[0.35, 0.65] · single"]
    rows = {name: row for name, row in every.items() if row["design"] == "request"}
    assert rows["λ∈[0.5, 0.8]"]["dice"] is not None and rows["λ∈[0.35, 0.65]"]["dice"] is None
    # one mixture per scan: the model's Dice without TTA, from the same evaluation
    aggregate = json.loads(next((tmp_path / "audit" / "sweep").glob("1-*/summary.json")).read_text())["aggregate"]
    assert every["λ∈[0.5, 0.8] · single"]["dice"] == pytest.approx(aggregate["Learned"]["mean"]["mean"])
    assert every["λ∈[0.5, 0.8]"]["dice"] == pytest.approx(aggregate["Learned+TTA"]["mean"]["mean"])
    assert all(0.0 <= row["worst_case_map"] <= 1.0 and row["worst_case_attacker"] in ATTACKERS for row in every.values())
    assert all(0.0 <= row["bss"] <= 1.0 and 0.0 <= row["bss_trivial"] <= 1.0 for row in every.values())
    assert all(0.0 <= row["bss_request"] <= 1.0 and 0.0 <= row["bss_request_trivial"] <= 1.0 for row in rows.values())
    assert all(row["bss_request"] is None for row in every.values() if row["design"] == "single")
    # the mixture resembles its target less as the target's weight falls
    assert rows["λ∈[0.35, 0.65]"]["bss_trivial"] < rows["λ∈[0.65, 0.95]"]["bss_trivial"]
    assert report["sweep"]["baseline_dice"] is not None and report["sweep"]["dice_cases"] == 2
    assert (tmp_path / "audit" / "privacy_utility.png").stat().st_size > 5_000
    assert "Recommended" in paths["markdown"].read_text()


@pytest.mark.slow
def test_separation_part_through_the_audit(patient_folder, tiny_model, tmp_path):
    paths = run_audit(tiny_model, patient_folder, tmp_path / "audit",
                      AuditOptions(parts=("bss",), separation=TINY_SEPARATION), progress=False)
    attacks = json.loads(paths["json"].read_text())["separation"]["attacks"]
    assert set(attacks) == {"λ known", "λ estimated", "control: brain + grating"}
    assert all(0.0 <= attack["msssim_mean"] <= 1.0 for attack in attacks.values())
    assert (tmp_path / "audit" / "bss" / "prior-brain").is_dir()


def test_report_json_is_strict_json_with_nan_as_null(tmp_path):
    sections = {"test_retest": ({"icc": float("nan"), "dice": [np.float32(0.5), np.float64("inf")]}, ["## ICC", ""])}
    paths = write_report(sections, {"model": "m"}, tmp_path)

    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    report = json.loads(paths["json"].read_text(), parse_constant=refuse)
    assert report["test_retest"] == {"icc": None, "dice": [0.5, None]}
    assert paths["markdown"].read_text().startswith("# Privacy audit")
    assert not list(tmp_path.glob(".*.tmp"))


def test_test_retest_mixes_like_the_model_and_never_with_the_scan_itself(patient_folder, monkeypatch):
    from mixpriv.data.datamodule import bank_from_cases
    from mixpriv.data.folder import DatasetFolder
    from mixpriv.privacy import audit as audit_module
    from mixpriv.privacy.scans import load_scans

    folder = DatasetFolder(patient_folder)
    scans = load_scans(folder, 2.0, "test", max_cases=4, progress=False)
    bank = bank_from_cases(folder, "test", 2.0, progress=False)  # the key holds the attacked scans themselves
    model = MixupPrivacyModule(LABELS, TINY_SEGMENTER, TINY_UNMIXER, patch_size=16, input_spacing=2.0,
                               references_per_mix=3, dirichlet_alpha=2.0).eval()
    calls = []
    original = pipeline_module.mix_with_references

    def recording(image, bank, k, mixing, *args, **kwargs):
        mixtures = original(image, bank, k, mixing, *args, **kwargs)
        calls.append((mixing.references_per_mix, mixing.dirichlet_alpha, mixtures.reference_indices))
        return mixtures

    monkeypatch.setattr(pipeline_module, "mix_with_references", recording)
    retest = audit_module.audit_test_retest(model, scans, bank, progress=False)
    assert len(calls) == 4 and all(r == 3 and alpha == 2.0 for r, alpha, _ in calls)
    for case_id, (_, _, indices) in zip(retest.case_ids, calls):
        used = [bank.ids[i] for entry in indices for i in entry]
        assert len(indices) == 2 and len(used) == 6 and case_id not in used
