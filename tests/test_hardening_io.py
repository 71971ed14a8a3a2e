"""Hardening of the command line's files (issue 14): outputs never over an input and written all or none,
no code run by a checkpoint, models by name, folder or checkpoint, a baseline command, blank scans and
damaged keys refused with a clear message."""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from conftest import AFFINE, LABELS, TINY_SEGMENTER, TINY_UNMIXER, phantom
from safetensors.torch import load_file, save_file

from mixpriv import files as files_module
from mixpriv.cli import main
from mixpriv.files import OutputError, OutputFiles
from mixpriv.hub import export_pretrained, update_registry
from mixpriv.inference.volume import load_scan, save_like
from mixpriv.lightning.baseline import BaselineSegmenter
from mixpriv.lightning.mixup import MixupPrivacyModule
from mixpriv.mixing.bank import ReferenceBank, content_sha256
from mixpriv.training import load_model
from mixpriv.validation import InputError

SRC = Path(__file__).resolve().parents[1] / "src"


def save_lightning_checkpoint(module: pl.LightningModule, path: Path) -> Path:
    """A real Lightning checkpoint of an untrained module (what `mixpriv train` writes, minus the training)."""
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu")
    trainer.strategy.connect(module)
    trainer.save_checkpoint(path)
    return path


def write_scan(path: Path, image: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(image.astype(np.float32), AFFINE), str(path))
    return path


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    """A scan, a key, Mixup-Privacy and baseline checkpoints and folders, and a registry naming the folders."""
    root = tmp_path_factory.mktemp("zoo")
    torch.manual_seed(0)
    private = MixupPrivacyModule(LABELS, TINY_SEGMENTER, TINY_UNMIXER, patch_size=16, input_spacing=2.0)
    baseline = BaselineSegmenter(LABELS, TINY_SEGMENTER, patch_size=16, input_spacing=2.0)
    export_pretrained(private, root / "zoo", "tiny-mixpriv", dtype=torch.float32)
    export_pretrained(baseline, root / "zoo", "tiny-baseline", dtype=torch.float32)
    for name in ("tiny-mixpriv", "tiny-baseline"):
        update_registry(root / "zoo" / name, root / "zoo" / "registry.json")
    references = [phantom(seed) for seed in (1, 2)]
    key = ReferenceBank.from_arrays([image for image, _ in references], [label for _, label in references],
                                    LABELS).save(root / "key.mpk")
    return {"scan": write_scan(root / "scan.nii.gz", phantom(0)[0]), "key": key,
            "mixpriv_ckpt": save_lightning_checkpoint(private, root / "mixpriv.ckpt"),
            "baseline_ckpt": save_lightning_checkpoint(baseline, root / "baseline.ckpt"),
            "mixpriv_folder": root / "zoo" / "tiny-mixpriv", "baseline_folder": root / "zoo" / "tiny-baseline",
            "registry": root / "zoo" / "registry.json"}


@pytest.fixture()
def registry(zoo, monkeypatch) -> Path:
    monkeypatch.setenv("MIXPRIV_REGISTRY", str(zoo["registry"]))
    return zoo["registry"]


def predict(zoo, out, *extra: str, model: str | None = None) -> int:
    return main(["predict", str(zoo["scan"]), "--model", model or str(zoo["mixpriv_ckpt"]), "--key", str(zoo["key"]),
                 "--out", str(out), "--k", "2", "--seed", "0", *extra])


def contents(*paths: Path) -> list[bytes]:
    return [path.read_bytes() for path in paths]


def no_temporaries(folder: Path) -> bool:
    return not [p.name for p in folder.iterdir() if p.name.startswith(".tmp-")]


@pytest.fixture()
def never_computes(monkeypatch):
    """Fail the test if a command gets as far as loading its model."""
    def forbidden(*args, **kwargs):
        raise AssertionError("the model was loaded: the outputs were not checked first")

    monkeypatch.setattr("mixpriv.training.load_model", forbidden)


# ----------------------------------------------------------------------------- 1. never over an input


@pytest.mark.parametrize("option", ["--out", "--variance", "--probabilities"])
@pytest.mark.parametrize("victim", ["scan", "key", "mixpriv_ckpt"])
def test_predict_never_writes_over_an_input(zoo, tmp_path, caplog, never_computes, option, victim):
    before = contents(zoo["scan"], zoo["key"], zoo["mixpriv_ckpt"])
    extra = [] if option == "--out" else [option, str(zoo[victim])]
    out = zoo[victim] if option == "--out" else tmp_path / "seg.nii.gz"
    assert predict(zoo, out, *extra) == 2
    assert f"is the input {zoo[victim]}: refusing to write over an input" in caplog.text
    assert contents(zoo["scan"], zoo["key"], zoo["mixpriv_ckpt"]) == before
    assert no_temporaries(zoo["scan"].parent)


def test_save_like_never_writes_over_its_scan_even_through_a_link(tmp_path):
    scan = write_scan(tmp_path / "scan.nii.gz", phantom(0)[0])
    (tmp_path / "link.nii.gz").symlink_to(scan)
    before = scan.read_bytes()
    for out in (scan, tmp_path / "link.nii.gz", tmp_path / "." / "scan.nii.gz"):
        with pytest.raises(OutputError, match="refusing to write over an input"):
            save_like(np.zeros(phantom(0)[0].shape), scan, out)
    assert scan.read_bytes() == before


# ----------------------------------------------------------------------------- 2. atomic, all or none


@pytest.fixture()
def previous_outputs(tmp_path) -> tuple[Path, Path]:
    """A label map and a variance map from an earlier run, which a failed run must leave as they are."""
    out, variance = tmp_path / "out" / "seg.nii.gz", tmp_path / "out" / "variance.nii.gz"
    out.parent.mkdir()
    write_scan(out, phantom(5)[1])
    write_scan(variance, np.random.default_rng(0).random((24, 24, 24)))
    return out, variance


def test_an_unwritable_output_folder_fails_before_computing_and_changes_nothing(
        zoo, tmp_path, previous_outputs, caplog, never_computes, monkeypatch):
    out, variance = previous_outputs
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: refuse this folder as a read-only mount would
        mkstemp = tempfile.mkstemp

        def read_only(*args, dir=None, **kwargs):
            if dir is not None and Path(dir) == locked:
                raise PermissionError(13, "Permission denied")
            return mkstemp(*args, dir=dir, **kwargs)

        monkeypatch.setattr(files_module.tempfile, "mkstemp", read_only)
    before = contents(out, variance)
    assert predict(zoo, out, "--variance", str(locked / "variance.nii.gz")) == 2
    assert f"cannot write --variance {locked / 'variance.nii.gz'}: folder {locked} is not writable" in caplog.text
    assert contents(out, variance) == before
    assert no_temporaries(out.parent)


def test_segment_checks_every_output_before_anything_is_sent(zoo, tmp_path, previous_outputs, caplog):
    out, variance = previous_outputs
    before = contents(out, variance, zoo["key"])
    nowhere = "http://127.0.0.1:9"  # nothing listens: reaching it would fail with "cannot reach"
    segment = ["segment", str(zoo["scan"]), "--server", nowhere, "--key", str(zoo["key"]),
               "--model", str(zoo["mixpriv_folder"]), "--k", "1"]
    assert main([*segment, "--out", str(out), "--variance", str(tmp_path / "variance.txt")]) == 2
    assert "--variance" in caplog.text and ".nii" in caplog.text and "cannot reach" not in caplog.text
    assert main([*segment, "--out", str(zoo["key"])]) == 2
    assert "refusing to write over an input" in caplog.text and "cannot reach" not in caplog.text
    assert contents(out, variance, zoo["key"]) == before
    assert no_temporaries(out.parent) and no_temporaries(zoo["key"].parent)


@pytest.mark.slow
def test_a_full_disk_keeps_every_previous_output(zoo, previous_outputs):
    """`ulimit -f`: the run fails while writing, with a message; the earlier outputs stay whole."""
    import resource

    out, variance = previous_outputs
    before = contents(out, variance)
    limit = 16 * 1024  # room for the label map, not for the variance map

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    environment = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mixpriv.cli", "predict", str(zoo["scan"]), "--model", str(zoo["mixpriv_ckpt"]),
         "--key", str(zoo["key"]), "--out", str(out), "--variance", str(variance), "--k", "2"],
        check=False, capture_output=True, text=True, env=environment, preexec_fn=limit_file_size, timeout=300)
    assert result.returncode == 2, result.stderr
    assert "cannot write --variance" in result.stderr and "no output was changed" in result.stderr
    assert "Traceback" not in result.stderr
    assert contents(out, variance) == before
    assert no_temporaries(out.parent)


def no_space(temporary: Path) -> None:
    raise OSError(28, "No space left on device")


def test_output_files_appear_together_or_not_at_all(tmp_path):
    first, second = tmp_path / "new" / "deeper" / "a.nii.gz", tmp_path / "new" / "b.nii.gz"
    with OutputFiles({"a": first, "b": second}) as outputs:
        outputs.write(first, lambda tmp: tmp.write_text("a"))
        assert not first.exists()  # only its temporary, named with the output's ending
        assert [p.name.endswith("-a.nii.gz") for p in first.parent.iterdir()] == [True]
        with pytest.raises(OutputError, match="cannot write b .*No space left"):
            outputs.write(second, no_space)
    assert not (tmp_path / "new").exists()  # the folders it made for them are gone too
    with OutputFiles({"a": first, "b": second}) as outputs:
        outputs.write(first, lambda tmp: tmp.write_text("a"))
        with pytest.raises(RuntimeError, match="never written"):
            outputs.commit()
        outputs.write(second, lambda tmp: tmp.write_text("b"))
        assert outputs.commit() == {"a": first, "b": second}
    assert (first.read_text(), second.read_text()) == ("a", "b")
    with pytest.raises(OutputError, match="b and a are the same file"):
        OutputFiles({"a": first, "b": tmp_path / "new" / "deeper" / ".." / "deeper" / "a.nii.gz"})


# ----------------------------------------------------------------------------- 8. clear messages for outputs


@pytest.mark.parametrize("out, message", [
    ("seg.txt", "--out {out} must end in .nii or .nii.gz"),
    ("folder", "--out {out} is a folder; give a file name, e.g. {out}/output.nii.gz"),
    ("scan_copy.nii.gz/seg.nii.gz", "cannot write --out {out}: {tmp}/scan_copy.nii.gz is a file, not a folder"),
])
def test_bad_output_paths_are_refused_before_computing(zoo, tmp_path, caplog, never_computes, out, message):
    (tmp_path / "folder").mkdir()
    shutil.copy(zoo["scan"], tmp_path / "scan_copy.nii.gz")
    assert predict(zoo, tmp_path / out) == 2
    assert message.format(out=tmp_path / out, tmp=tmp_path) in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "scan_copy.nii.gz"]  # no DIR.nii written


def test_truncated_and_blank_scans_are_clear_errors(tmp_path, zoo, caplog):
    whole = zoo["scan"].read_bytes()
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(InputError, match="cannot read .*truncated.nii.gz as a medical image"):
        load_scan(truncated)
    zeros = write_scan(tmp_path / "zeros.nii.gz", np.zeros((24, 24, 24)))
    with pytest.raises(InputError, match="scan zeros.nii.gz is blank: all its 13824 voxels are 0"):
        load_scan(zeros)
    constant = write_scan(tmp_path / "constant.nii.gz", np.full((24, 24, 24), 0.7))
    with pytest.raises(InputError, match="scan constant.nii.gz is blank: all its 13824 voxels are 0.7"):
        load_scan(constant)
    out = tmp_path / "seg.nii.gz"
    assert main(["predict-baseline", str(constant), "--model", str(zoo["baseline_folder"]), "--out", str(out)]) == 2
    assert "is blank" in caplog.text and not out.exists()


# ----------------------------------------------------------------------------- 3. no code run by a checkpoint


class _RunsCode:
    """Unpickling this runs ``open(marker, "w")``: what a crafted checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_crafted_checkpoint_is_refused_and_runs_nothing(zoo, tmp_path, caplog):
    marker = tmp_path / "code-ran"
    crafted = tmp_path / "crafted.ckpt"
    checkpoint = torch.load(zoo["mixpriv_ckpt"], weights_only=True)
    checkpoint["hyper_parameters"]["payload"] = _RunsCode(marker)
    torch.save(checkpoint, crafted)
    with pytest.raises(InputError, match=r"was not loaded: it holds Python objects beyond tensors and plain data"):
        load_model(crafted)
    out = tmp_path / "seg.nii.gz"
    assert predict(zoo, out, model=str(crafted)) == 2
    assert main(["evaluate", "--mixpriv", str(crafted), "--out", str(tmp_path / "eval")]) == 2
    assert main(["publish", str(crafted), "--name", "crafted", "--out", str(tmp_path / "zoo")]) == 2
    assert not marker.exists()
    assert "unpickling them could run code" in caplog.text and not out.exists()


def test_checkpoints_load_without_unpickling_and_match_the_module(zoo):
    module = load_model(zoo["mixpriv_ckpt"])
    expected = torch.load(zoo["mixpriv_ckpt"], weights_only=True)["state_dict"]
    assert type(module) is MixupPrivacyModule and not module.training
    assert all(torch.equal(module.state_dict()[name], tensor) for name, tensor in expected.items())
    assert type(load_model(zoo["baseline_ckpt"])) is BaselineSegmenter


def test_wrong_model_files_are_clear_errors(zoo, tmp_path, caplog):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a model")
    out = tmp_path / "seg.nii.gz"
    assert predict(zoo, out, model=str(notes)) == 2
    assert f"{notes} is not a PyTorch checkpoint" in caplog.text
    assert predict(zoo, out, model=str(zoo["baseline_ckpt"])) == 2
    assert "is a non-private baseline model (kind 'baseline'), but a Mixup-Privacy model" in caplog.text
    assert main(["predict-baseline", str(zoo["scan"]), "--model", str(zoo["mixpriv_folder"]), "--out", str(out)]) == 2
    assert "is a Mixup-Privacy model (kind 'mixpriv'), but a non-private baseline model" in caplog.text
    assert not out.exists()


# ----------------------------------------------------------------------------- 9. names, folders, checkpoints


@pytest.mark.slow
def test_predict_takes_a_name_a_folder_and_a_checkpoint(zoo, tmp_path, registry, capsys):
    for index, model in enumerate(("tiny-mixpriv", str(zoo["mixpriv_folder"]), str(zoo["mixpriv_ckpt"]))):
        out, variance = tmp_path / f"seg{index}.nii.gz", tmp_path / f"var{index}.nii.gz"
        assert predict(zoo, out, "--variance", str(variance), model=model) == 0
        assert f"wrote {out}\nwrote {variance}" in capsys.readouterr().out
        written = nib.load(str(out))
        assert written.shape == (24, 24, 24) and written.get_data_dtype() == np.uint8
        assert set(np.unique(np.asanyarray(written.dataobj))) <= set(LABELS.values())
        assert nib.load(str(variance)).get_data_dtype() == np.float32


def test_predict_baseline_takes_a_name_a_folder_and_a_checkpoint(zoo, tmp_path, registry):
    maps = []
    for index, model in enumerate(("tiny-baseline", str(zoo["baseline_folder"]), str(zoo["baseline_ckpt"]))):
        out, probabilities = tmp_path / f"seg{index}.nii.gz", tmp_path / f"probabilities{index}.nii.gz"
        assert main(["predict-baseline", str(zoo["scan"]), "--model", model, "--out", str(out),
                     "--probabilities", str(probabilities)]) == 0
        labels, probs = np.asanyarray(nib.load(str(out)).dataobj), nib.load(str(probabilities)).get_fdata()
        assert probs.shape == (24, 24, 24, 4)
        np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
        assert np.array_equal(labels, probs.argmax(-1))
        maps.append(labels)
    assert all(np.array_equal(maps[0], other) for other in maps[1:])  # the same model, however it is named


@pytest.mark.slow
def test_commands_print_no_torch_jit_warnings(zoo, tmp_path):
    environment = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "mixpriv.cli", "predict", str(zoo["scan"]), "--model",
                             str(zoo["mixpriv_ckpt"]), "--key", str(zoo["key"]), "--out", str(tmp_path / "seg.nii.gz"),
                             "--k", "1"], check=False, capture_output=True, text=True, env=environment, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "FutureWarning" not in result.stderr and "torch.jit" not in result.stderr


# ----------------------------------------------------------------------------- 12. the key


def image_data_offset(path: Path) -> int:
    """Where the bank's image tensor starts in its safetensors file."""
    raw = path.read_bytes()
    header_size = int.from_bytes(raw[:8], "little")
    return 8 + header_size + json.loads(raw[8:8 + header_size])["images"]["data_offsets"][0]


def test_a_flipped_byte_in_the_key_is_detected(zoo, tmp_path):
    damaged = tmp_path / "key.mpk"
    shutil.copy(zoo["key"], damaged)
    raw = bytearray(damaged.read_bytes())
    raw[image_data_offset(damaged) + 1234] ^= 0x10  # a small change of one reference voxel
    damaged.write_bytes(bytes(raw))
    with pytest.raises(InputError, match="key.mpk is corrupted: its content differs from the sha256"):
        ReferenceBank.load(damaged)


def test_a_key_readable_by_others_loads_with_a_warning(zoo, tmp_path, caplog):
    key = tmp_path / "key.mpk"
    shutil.copy(zoo["key"], key)
    with caplog.at_level(logging.WARNING):
        ReferenceBank.load(key)
        assert stat.S_IMODE(key.stat().st_mode) == 0o600 and "readable by other users" not in caplog.text
        key.chmod(0o644)
        ReferenceBank.load(key)
    assert f"key {key} is readable by other users (mode 644); chmod 600 it" in caplog.text


def test_a_published_demo_bank_loads_quietly_and_an_old_key_with_a_warning(zoo, tmp_path, caplog):
    tensors = load_file(str(zoo["key"]))
    old = tmp_path / "old.mpk"  # a key saved before keys recorded their sha256
    save_file(tensors, str(old), metadata={"format": "mixpriv-reference-bank", "format_version": "1",
                                           "label_names": json.dumps(LABELS), "ids": '["a", "b"]'})
    old.chmod(0o644)
    with caplog.at_level(logging.WARNING):
        assert ReferenceBank.load(old, published=True).ids == ["a", "b"]
        assert not caplog.text
        assert len(ReferenceBank.load(old)) == 2
    assert "records no checksum" in caplog.text and "readable by other users" in caplog.text


def test_a_key_whose_label_names_are_a_list_is_a_clear_error(zoo, tmp_path, caplog):
    tensors = load_file(str(zoo["key"]))
    metadata = {"format": "mixpriv-reference-bank", "format_version": "2",
                "label_names": json.dumps(list(LABELS)), "ids": '["a", "b"]'}
    forged = tmp_path / "forged.mpk"
    save_file(tensors, str(forged), metadata={**metadata, "sha256": content_sha256(tensors, metadata)})
    with pytest.raises(InputError, match="reference label names must map label names to integers .* got a list"):
        ReferenceBank.load(forged)
    assert predict(zoo, tmp_path / "seg.nii.gz", "--key", str(forged)) == 2
    assert "got a list" in caplog.text


def test_a_failed_key_save_keeps_the_previous_key(zoo, tmp_path, monkeypatch):
    key = tmp_path / "key.mpk"
    shutil.copy(zoo["key"], key)
    before = key.read_bytes()
    bank = ReferenceBank.load(key)
    with pytest.raises(OutputError, match=f"key {tmp_path} is a folder"):
        bank.save(tmp_path, overwrite=True)

    def half_written(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("mixpriv.mixing.bank.save_file", half_written)
    with pytest.raises(OutputError, match="cannot write key .*No space left on device; no output was changed"):
        bank.save(key, overwrite=True)
    assert key.read_bytes() == before and no_temporaries(tmp_path)
