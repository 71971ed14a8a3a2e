"""LightningModules on CPU: fast_dev_run, a short real fit, checkpoint reload, serialisable hparams."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
from conftest import LABELS, TINY_SEGMENTER, TINY_UNMIXER
from pytorch_lightning.callbacks import ModelCheckpoint

from mixpriv.constants import MIX_LAMBDA, MIX_REFERENCE_ID, MIX_REFERENCE_WEIGHTS, REFERENCE_LABEL
from mixpriv.data.datamodule import MixprivDataModule
from mixpriv.lightning.baseline import BaselineSegmenter
from mixpriv.lightning.losses import ce_dice_loss, hard_dice_per_class, soft_dice_per_class
from mixpriv.lightning.mixup import MixupPrivacyModule
from mixpriv.mixing import RandomMix
from mixpriv.mixing.settings import MixingSettings
from mixpriv.recipe import load_recipe
from mixpriv.training import build_from_recipe
from mixpriv.validation import InputError

LAMBDA_RANGE = (0.6, 0.9)
PLAIN_TYPES = (str, int, float, bool, type(None))


def datamodule(folder, mixing: bool, **kwargs) -> MixprivDataModule:
    return MixprivDataModule(data_dir=str(folder), patch_size=16, batch_size=2, samples_per_volume=2,
                             queue_length=4, val_samples_per_volume=2, mixing=mixing,
                             lambda_range=LAMBDA_RANGE, **kwargs)


def baseline() -> BaselineSegmenter:
    return BaselineSegmenter(LABELS, TINY_SEGMENTER, lr=1e-3, patch_size=16)


def mixup() -> MixupPrivacyModule:
    return MixupPrivacyModule(LABELS, TINY_SEGMENTER, TINY_UNMIXER, lambda_range=LAMBDA_RANGE, patch_size=16)


MODULES = {"baseline": (baseline, False), "mixup": (mixup, True)}


def quiet_trainer(**kwargs) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                      **kwargs)


def assert_plain(value, where: str = "hparams") -> None:
    """Only plain, serialisable types (no nn.Module, tensor or custom object) anywhere in ``value``."""
    assert not isinstance(value, (torch.nn.Module, torch.Tensor)), f"{where} holds a {type(value).__name__}"
    if isinstance(value, dict):
        for key, item in value.items():
            assert isinstance(key, str), f"{where} has a non-string key {key!r}"
            assert_plain(item, f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            assert_plain(item, f"{where}[{index}]")
    else:
        assert type(value) in PLAIN_TYPES, f"{where} holds a {type(value).__name__}: {value!r}"


# ----------------------------------------------------------------------------- losses


def test_loss_is_small_for_perfect_and_large_for_wrong_predictions():
    generator = torch.Generator().manual_seed(0)
    target = torch.nn.functional.one_hot(torch.randint(0, 4, (2, 6, 6, 6), generator=generator), 4)
    target = target.movedim(-1, 1).float()
    assert float(ce_dice_loss(target * 50, target)) < 0.01
    assert float(ce_dice_loss(target.roll(1, dims=1) * 50, target)) > 10
    # Soft targets (a lambda-mixture of one-hot maps) are allowed: the minimum is at the matching logits.
    soft = 0.7 * target + 0.3 * target.roll(1, dims=1)
    at_target = float(ce_dice_loss(soft.clamp_min(1e-8).log(), soft))
    assert at_target < float(ce_dice_loss(target.log().clamp_min(-50), soft))
    torch.testing.assert_close(soft_dice_per_class(target, target), torch.ones(4))
    torch.testing.assert_close(hard_dice_per_class(soft, target), torch.ones(4))


def test_hard_dice_counts_equal_the_dice_of_one_hot_argmax_maps():
    generator = torch.Generator().manual_seed(1)
    probs = torch.rand(3, 5, 7, 6, 5, generator=generator)
    probs[:, 4] = 0  # class 4 absent from both maps: Dice 1 (nothing to find, nothing found)
    target = torch.nn.functional.one_hot(torch.randint(0, 4, (3, 7, 6, 5), generator=generator), 5).movedim(-1, 1)
    one_hot_argmax = torch.nn.functional.one_hot(probs.argmax(1), 5).movedim(-1, 1).float()
    expected = soft_dice_per_class(one_hot_argmax, target.float(), eps=1e-8)
    torch.testing.assert_close(hard_dice_per_class(probs, target.float()), expected)
    assert expected[4] == 1 and (expected[:4] < 0.5).all()


# ----------------------------------------------------------------------------- fast_dev_run


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MODULES))
def test_fast_dev_run(tiny_folder, name):
    build, mixing = MODULES[name]
    module = build()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = pl.Trainer(fast_dev_run=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(module, datamodule=datamodule(tiny_folder, mixing))
    assert trainer.global_step == 2
    metrics = trainer.callback_metrics
    assert math.isfinite(float(metrics["train/loss"])) and math.isfinite(float(metrics["val/loss"]))
    prefix = "learned_" if mixing else ""
    for label in ("CSF", "GM", "WM"):
        assert f"train/{prefix}dice_{label}" in metrics and f"val/{prefix}dice_{label}" in metrics
    assert f"val/{prefix}dice_mean" in metrics
    if mixing:
        assert {"train/loss_segmenter", "train/loss_unmixer", "val/naive_dice_GM"} <= set(metrics)
    changed = [k for k, v in module.state_dict().items() if v.dtype.is_floating_point and not torch.equal(v, before[k])]
    assert any(k.startswith("segmenter.") for k in changed)
    if mixing:  # end to end: the unmixer learns too
        assert any(k.startswith("unmixer.") for k in changed)


# ----------------------------------------------------------------------------- fit + checkpoint


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MODULES))
def test_short_fit_checkpoint_reload(tiny_folder, tmp_path, name):
    build, mixing = MODULES[name]
    module = build()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = quiet_trainer(max_steps=3, default_root_dir=tmp_path, callbacks=[checkpoint],
                            num_sanity_val_steps=0, limit_val_batches=1)
    trainer.fit(module, datamodule=datamodule(tiny_folder, mixing))
    assert trainer.global_step == 3
    path = checkpoint.last_model_path
    assert path and (tmp_path / "ckpt").is_dir()

    raw = torch.load(path, map_location="cpu", weights_only=False)
    hparams = raw["hyper_parameters"]
    assert_plain(dict(hparams))
    assert dict(hparams["label_names"]) == LABELS
    assert dict(hparams["segmenter"])["encoder_name"] == TINY_SEGMENTER["encoder_name"]
    if mixing:
        assert list(hparams["lambda_range"]) == list(LAMBDA_RANGE)

    cls = type(module)
    reloaded = cls.load_from_checkpoint(path, map_location="cpu")
    assert type(reloaded) is cls
    assert dict(reloaded.hparams.label_names) == LABELS
    state, reloaded_state = module.state_dict(), reloaded.state_dict()
    assert state.keys() == reloaded_state.keys()
    for key in state:
        assert torch.equal(state[key].cpu(), reloaded_state[key]), key

    module.eval()
    reloaded.eval()
    x = torch.rand(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if mixing:
            probs = module.segment_mixture(x)
            torch.testing.assert_close(reloaded.segment_mixture(x), probs)
            lam = torch.tensor([0.7, 0.8])
            torch.testing.assert_close(reloaded.unmix(probs, probs, lam), module.unmix(probs, probs, lam))
        else:
            torch.testing.assert_close(reloaded(x), module(x))


def test_hparams_hold_specs_not_modules():
    for module in (baseline(), mixup()):
        assert_plain(dict(module.hparams))
    with pytest.raises(ValueError, match="unknown segmenter spec keys"):
        BaselineSegmenter(LABELS, {**TINY_SEGMENTER, "encoder": "oops"})


# ----------------------------------------------------------------------------- K-way mixing


def test_datamodule_mixes_with_its_mixing_settings(tiny_folder):
    """The data module hands its λ range, R and α to RandomMix as one MixingSettings; one reference's label is uint8."""
    data = datamodule(tiny_folder, mixing=True, dirichlet_alpha=0.5)
    data.setup("fit")
    assert data.mixing_settings == MixingSettings(LAMBDA_RANGE, 1, 0.5)
    assert [t.mixing for t in data._transform(train=True).transforms if isinstance(t, RandomMix)] == [
        data.mixing_settings]
    batch = next(iter(data.train_dataloader()))
    reference = batch[REFERENCE_LABEL]["data"]
    assert reference.dtype == torch.uint8 and torch.equal(reference.sum(1), torch.ones_like(reference[:, 0]))
    lam = torch.as_tensor(batch[MIX_LAMBDA])
    assert bool(((lam >= LAMBDA_RANGE[0]) & (lam <= LAMBDA_RANGE[1])).all())
    kway = datamodule(tiny_folder, mixing=True, references_per_mix=2)
    kway.setup("fit")
    assert kway.mixing_settings.references_per_mix == 2


def test_kway_train_step_end_to_end(tiny_folder, tmp_path):
    """R = 2: batches carry composite (soft) reference labels and one optimiser step trains both networks."""
    torch.manual_seed(0)
    data = datamodule(tiny_folder, mixing=True, references_per_mix=2)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    reference = batch[REFERENCE_LABEL]["data"]
    torch.testing.assert_close(reference.sum(1), torch.ones_like(reference[:, 0]))
    assert bool(((reference > 0) & (reference < 1)).any())  # a weighted mixture of one-hot maps, not one-hot
    assert [len(batch[MIX_REFERENCE_ID]), len(batch[MIX_REFERENCE_WEIGHTS])] == [2, 2]  # R lists of B values

    module = MixupPrivacyModule(LABELS, TINY_SEGMENTER, TINY_UNMIXER, lambda_range=LAMBDA_RANGE, patch_size=16,
                                references_per_mix=2, dirichlet_alpha=0.5)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = quiet_trainer(max_steps=1, limit_val_batches=0, num_sanity_val_steps=0, enable_checkpointing=False,
                            default_root_dir=tmp_path)
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 1 and math.isfinite(float(trainer.callback_metrics["train/loss"]))
    changed = {k.split(".")[0] for k, v in module.state_dict().items()
               if v.dtype.is_floating_point and not torch.equal(v, before[k])}
    assert {"segmenter", "unmixer"} <= changed
    assert (module.hparams.references_per_mix, module.hparams.dirichlet_alpha) == (2, 0.5)
    assert_plain(dict(module.hparams))


def test_recipe_sets_kway_mixing_once_for_model_and_data(tiny_folder):
    recipe = load_recipe("tissue-mixpriv-kway3", [f"data.data_dir={tiny_folder}", "data.patch_size=16"])
    assert recipe["model"]["references_per_mix"] == 3 and "references_per_mix" not in recipe["data"]
    recipe["model"].update(references_per_mix=2, dirichlet_alpha=0.7, segmenter=TINY_SEGMENTER,
                           unmixer=TINY_UNMIXER)  # the tiny folder's bank holds 3 training cases
    model, data = build_from_recipe(recipe)
    assert (model.hparams.references_per_mix, model.hparams.dirichlet_alpha) == (2, 0.7)
    assert (data.hparams.references_per_mix, data.hparams.dirichlet_alpha) == (2, 0.7)


@pytest.mark.parametrize("references_per_mix, alpha", [(0, 1.0), (2, 0.0), (2, -1.0)])
def test_kway_settings_are_checked_by_model_and_data(tiny_folder, references_per_mix, alpha):
    with pytest.raises(InputError):
        MixupPrivacyModule(LABELS, TINY_SEGMENTER, references_per_mix=references_per_mix, dirichlet_alpha=alpha)
    with pytest.raises(InputError):
        datamodule(tiny_folder, mixing=True, references_per_mix=references_per_mix, dirichlet_alpha=alpha)


def test_kway_larger_than_the_training_bank_is_refused(tiny_folder):
    data = datamodule(tiny_folder, mixing=True, references_per_mix=3)
    data.setup("fit")
    with pytest.raises(InputError, match="between 1 and 2 for a bank of 3"):
        data.train_dataloader()


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_mixed_precision_on_gpu(tiny_folder, precision):
    if precision == "bf16-mixed" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16 support")
    module = mixup()
    trainer = pl.Trainer(fast_dev_run=2, accelerator="gpu", devices=1, precision=precision, logger=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=datamodule(tiny_folder, mixing=True))
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    assert next(module.parameters()).dtype == torch.float32  # master weights stay fp32


def test_domain_randomisation_reaches_training_targets_only(tiny_folder):
    """A recipe's randomisation block goes before the mixing of training volumes, never into validation."""
    data = datamodule(tiny_folder, mixing=True, randomisation={"p_synth": 1.0})
    data.setup("fit")
    subject = data.folder.cases("train")[0].to_subject()
    applied = {flag: [step.name for step in data._transform(train=flag)(subject).history] for flag in (True, False)}
    assert "SynthesiseIntensities" in applied[True] and "SynthesiseIntensities" not in applied[False]
    assert applied[True][-1] == applied[False][-1] == "Mix"  # randomised first, then mixed
    with pytest.raises(InputError, match="randomisation.p_synth"):
        datamodule(tiny_folder, mixing=True, randomisation={"p_synth": 2.0})

