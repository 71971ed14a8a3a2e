"""End to end through the command line on a tiny folder: train, keygen, evaluate, predict."""

from __future__ import annotations

import json
import os
import platform
import stat
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from mixpriv.cli import main
from mixpriv.memory import GLIBC_MALLOC_ENV
from mixpriv.recipe import RecipeError, apply_overrides, load_recipe

TINY_OVERRIDES = [
    "data.patch_size=16", "data.batch_size=2", "data.samples_per_volume=2", "data.queue_length=4",
    "data.num_workers=0", "data.val_samples_per_volume=1", "trainer.max_steps=4", "trainer.check_val_every_n_epoch=1",
    "model.segmenter={encoder_name: mixpriv-light-8, encoder_depth: 3, decoder_channels: [16, 8, 8]}",
]
MIXPRIV_OVERRIDES = [*TINY_OVERRIDES, "model.unmixer={channels: [4, 8]}"]


def test_help_lists_the_commands():
    result = subprocess.run([sys.executable, "-m", "mixpriv.cli", "--help"], capture_output=True, text=True, check=True)
    for command in ("build-cohort", "train", "evaluate", "keygen", "predict", "predict-baseline", "demo"):
        assert command in result.stdout


def test_recipe_overrides_and_errors():
    recipe = load_recipe("tissue-mixpriv", ["trainer.max_steps=7", "model.lambda_range=[0.7, 0.8]"])
    assert recipe["trainer"]["max_steps"] == 7
    assert recipe["model"]["lambda_range"] == [0.7, 0.8]
    with pytest.raises(RecipeError, match="unknown section"):
        apply_overrides(recipe, ["bogus.key=1"])
    with pytest.raises(RecipeError, match="section.key=value"):
        apply_overrides(recipe, ["trainer.max_steps"])
    with pytest.raises(RecipeError, match="known recipes"):
        load_recipe("no-such-recipe")


def test_a_resumed_run_gets_its_time_cap_anew(tmp_path):
    from datetime import timedelta

    import torch

    from mixpriv.training import segment_time_cap

    checkpoint = tmp_path / "last.ckpt"
    torch.save({"callbacks": {"Timer": {"time_elapsed": {"train": 100.0, "validate": 5.0}}}}, checkpoint)
    assert segment_time_cap("00:02:00:00", checkpoint) == timedelta(hours=2, seconds=100)
    assert segment_time_cap({"minutes": 1}, checkpoint) == timedelta(minutes=1, seconds=100)
    assert segment_time_cap(timedelta(hours=1), tmp_path / "none.ckpt") == timedelta(hours=1)
    with pytest.raises(RecipeError, match="not DD:HH:MM:SS"):
        segment_time_cap("02:00:00", checkpoint)


@pytest.mark.slow
def test_train_evaluate_predict_round_trip(tiny_folder, tmp_path):
    data = [f"data.data_dir={tiny_folder}"]
    assert main(["train", "--recipe", "tissue-mixpriv", "--out", str(tmp_path / "mp"), *data, *MIXPRIV_OVERRIDES]) == 0
    assert main(["train", "--recipe", "tissue-baseline", "--out", str(tmp_path / "bl"), *data, *TINY_OVERRIDES,
                 "logger.kind=csv"]) == 0
    stats = json.loads((tmp_path / "mp" / "train_stats.json").read_text())
    assert stats["steps"] == 4 and stats["patches_per_second"] > 0
    assert (tmp_path / "mp" / "wandb").is_dir()  # offline wandb run, no network
    assert main(["train", "--recipe", "tissue-baseline", "--out", str(tmp_path / "bl"), "--resume", *data,
                 *TINY_OVERRIDES, "logger.kind=csv", "trainer.max_steps=6"]) == 0
    resumed = json.loads((tmp_path / "bl" / "train_stats.json").read_text())
    assert (resumed["resumed_from_step"], resumed["steps"]) == (4, 6)
    assert [segment["steps"] for segment in resumed["earlier_segments"]] == [4]
    assert main(["train", "--recipe", "tissue-baseline", "--out", str(tmp_path / "new"), "--resume", *data,
                 *TINY_OVERRIDES]) == 2  # nothing to resume: a clear error, not a fresh run

    key = tmp_path / "key.mpk"
    assert main(["keygen", "--data", str(tiny_folder), "--out", str(key)]) == 0
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert main(["keygen", "--data", str(tiny_folder), "--out", str(key)]) == 2  # never overwrites a key silently

    evaluation = tmp_path / "eval"
    assert main(["evaluate", "--mixpriv", str(tmp_path / "mp/checkpoints/last.ckpt"),
                 "--baseline", str(tmp_path / "bl/checkpoints/last.ckpt"), "--data", str(tiny_folder),
                 "--key", str(key), "--k", "2", "--out", str(evaluation)]) == 0
    summary = json.loads((evaluation / "summary.json").read_text())
    assert set(summary["aggregate"]) == {"Baseline", "Naive", "Naive+TTA", "Learned", "Learned+TTA"}
    for png in ("private_segmentation.png", "dice_vs_k.png", "tta_variance.png"):
        assert (evaluation / png).stat().st_size > 10_000

    scan = tiny_folder / "imagesTs" / "case004_0000.nii.gz"
    out = tmp_path / "seg.nii.gz"
    assert main(["predict", str(scan), "--model", str(tmp_path / "mp/checkpoints/last.ckpt"), "--key", str(key),
                 "--out", str(out), "--k", "2", "--variance", str(tmp_path / "var.nii.gz")]) == 0
    written, original = nib.load(str(out)), nib.load(str(scan))
    assert written.shape == original.shape
    np.testing.assert_allclose(written.affine, original.affine)
    assert set(np.unique(np.asarray(written.dataobj))) <= {0, 1, 2, 3}
    assert main(["predict", str(tmp_path / "missing.nii.gz"), "--model", str(tmp_path / "mp/checkpoints/last.ckpt"),
                 "--key", str(key), "--out", str(tmp_path / "x.nii.gz")]) == 2

    # A copy in "scanner space": rotated 12 degrees, moved 20 mm, stored in another orientation.
    angle = np.deg2rad(12)
    motion = np.eye(4)
    motion[:3, :3] = [[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]]
    motion[:3, 3] = [20.0, -6.0, 4.0]
    moved = nib.as_closest_canonical(original)
    flipped = nib.Nifti1Image(np.asarray(moved.dataobj)[::-1].copy(), motion @ moved.affine @ np.array(
        [[-1, 0, 0, moved.shape[0] - 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]))
    native = tmp_path / "native.nii.gz"
    nib.save(flipped, str(native))
    for command in (["predict", str(native), "--model", str(tmp_path / "mp/checkpoints/last.ckpt"), "--key", str(key),
                     "--k", "2"],
                    ["predict-baseline", str(native), "--model", str(tmp_path / "bl/checkpoints/last.ckpt"),
                     "--template-data", str(tiny_folder)]):
        out = tmp_path / f"{command[0]}-native.nii.gz"
        assert main([*command, "--register", "--out", str(out), "--probabilities", str(tmp_path / "p.nii.gz")]) == 0
        written = nib.load(str(out))
        assert written.shape == flipped.shape and np.allclose(written.affine, flipped.affine)
        probabilities = np.asarray(nib.load(str(tmp_path / "p.nii.gz")).dataobj)
        assert probabilities.shape == (*flipped.shape, 4) and np.allclose(probabilities.sum(-1), 1, atol=1e-4)
        (tmp_path / "p.nii.gz").unlink()


FRESH_BLOCK_FAULTS = """
import resource
from mixpriv.memory import keep_freed_memory
kept = keep_freed_memory()
def faults_of_a_fresh_block():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = bytearray(64 << 20)
    block[::4096] = bytes(len(block[::4096]))
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults_of_a_fresh_block()  # the first one is faulted in either way
print(kept, faults_of_a_fresh_block())
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
@pytest.mark.parametrize("environment", [{}, {"MIXPRIV_KEEP_FREED_MEMORY": "0"},
                                         {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}])
def test_freed_memory_is_kept_mapped_unless_the_environment_says_no(environment):
    """A freed 64 MiB block, allocated again, costs no page faults when glibc keeps it; 16 k otherwise."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("MIXPRIV_KEEP_FREED_MEMORY", *GLIBC_MALLOC_ENV)} | environment
    kept, faults = subprocess.run([sys.executable, "-c", FRESH_BLOCK_FAULTS], env=env, capture_output=True, text=True,
                                  check=True).stdout.split()
    if environment:
        assert kept == "False" and int(faults) > 10_000
    else:
        assert kept == "True" and int(faults) < 1_000


@pytest.mark.parametrize(("environment", "expected"), [({}, "True 1"), ({"THP_MEM_ALLOC_ENABLE": "0"}, "False 0")])
def test_huge_pages_are_asked_for_before_torch_unless_the_environment_says_no(environment, expected):
    code = ("import os; from mixpriv.memory import prefer_huge_pages; print(prefer_huge_pages(), "
            "os.environ['THP_MEM_ALLOC_ENABLE'])")
    env = {key: value for key, value in os.environ.items() if key != "THP_MEM_ALLOC_ENABLE"} | environment
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == expected.split()
    late = subprocess.run([sys.executable, "-c", "import torch; from mixpriv.memory import prefer_huge_pages; "
                           "import os; print(prefer_huge_pages(), os.environ.get('THP_MEM_ALLOC_ENABLE'))"],
                          env=env, capture_output=True, text=True, check=True).stdout
    assert late.split()[0] == "False"  # too late: PyTorch has read its setting
