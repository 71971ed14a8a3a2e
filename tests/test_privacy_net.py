"""Privacy-Net on CPU: a short adversarial fit, who trains what, the adversarial term, hparams round trip."""

from __future__ import annotations

import json
import math

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from conftest import LABELS, TINY_SEGMENTER
from test_pairs import paired_datamodule, write_paired_folder

from mixpriv.constants import PAIR_IMAGE_A, PAIR_IMAGE_B, PAIR_SAME_PATIENT
from mixpriv.data.pairs import PairedPatchDataModule
from mixpriv.lightning.privacy_net import PrivacyNetModule
from mixpriv.recipe import load_recipe

TINY_ENCODER = {**TINY_SEGMENTER, "architecture": "Unet", "extra": {"strides": [[2, 2, 2]] * 3}}
TINY_DISCRIMINATOR = {"channels": [4, 8]}
LR, DISCRIMINATOR_LR = 1e-3, 5e-4


def privacy_net(**kwargs) -> PrivacyNetModule:
    return PrivacyNetModule(LABELS, TINY_ENCODER, TINY_SEGMENTER, TINY_DISCRIMINATOR, adversarial_weight=0.5,
                            lr=LR, discriminator_lr=DISCRIMINATOR_LR, patch_size=16, **kwargs)


@pytest.fixture(scope="module")
def paired(tmp_path_factory):
    root = write_paired_folder(tmp_path_factory.mktemp("privacy_net") / "Dataset005_Pairs")
    return paired_datamodule(root, batch_size=2, steps_per_epoch=3, val_pairs=2)


def parameters(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def gradients_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for name, p in module.named_parameters()}


def changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> bool:
    return any(not torch.equal(before[name], p) for name, p in module.named_parameters())


class WhoTrainsWhat(pl.Callback):
    """Checks, at every optimiser step, that each loss reaches only its own networks."""

    def __init__(self) -> None:
        self.batches = 0
        self.steps: list[str] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.networks = {name: parameters(getattr(module, name)) for name in ("encoder", "segmenter")}

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        gradients = {name: gradients_of(getattr(module, name)) for name in ("encoder", "segmenter")}
        if optimizer is trainer.optimizers[0]:
            self.steps.append("encoder+segmenter")
            if self.batches == 0:  # the adversarial term leaves the discriminator without gradients
                assert all(p.grad is None for p in module.discriminator.parameters())
            assert any(g.abs().sum() > 0 for g in gradients["encoder"].values())
            self.gradients = gradients
        else:
            self.steps.append("discriminator")
            # The discriminator's loss adds no gradient to the encoder or the segmenter...
            for name, before in self.gradients.items():
                assert all(torch.equal(before[k], g) for k, g in gradients[name].items()), f"it reached the {name}"
            self.networks = {name: parameters(getattr(module, name)) for name in ("encoder", "segmenter")}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        # ... and its step leaves them as the encoder+segmenter step left them.
        for name, before in self.networks.items():
            assert not changed(before, getattr(module, name)), f"the discriminator's step changed the {name}"
        self.batches += 1


def test_a_short_fit_trains_all_three_networks_each_with_its_own_loss(paired):
    module = privacy_net()
    before = {name: parameters(getattr(module, name)) for name in ("encoder", "segmenter", "discriminator")}
    watcher = WhoTrainsWhat()
    trainer = pl.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[watcher])
    trainer.fit(module, datamodule=paired)
    assert trainer.global_step == 3 and watcher.batches == 3  # one trainer step per batch
    assert watcher.steps == ["encoder+segmenter", "discriminator"] * 3
    for name, parameters_before in before.items():
        assert changed(parameters_before, getattr(module, name)), f"the {name} did not train"
    metrics = trainer.callback_metrics
    for stage in ("train", "val"):
        for key in ("loss_segmenter", "loss_discriminator", "discriminator_accuracy", "dice_mean", "dice_GM"):
            assert math.isfinite(float(metrics[f"{stage}/{key}"])), f"{stage}/{key}"
        assert float(metrics[f"{stage}/loss_adversarial"]) < 0
    assert 0 <= float(metrics["train/discriminator_accuracy"]) <= 1
    # Both learning rates decay polynomially, stepped once per batch, to 0 at the last step.
    assert [config.scheduler.last_epoch for config in trainer.lr_scheduler_configs] == [3, 3]
    assert [o.param_groups[0]["lr"] for o in trainer.optimizers] == [0.0, 0.0]


def trained_by(optimizer: torch.optim.Optimizer) -> set[int]:
    return {id(p) for group in optimizer.param_groups for p in group["params"]}


def test_the_optimisers_split_the_networks():
    module = privacy_net(poly_decay=False)
    encoder_segmenter, discriminator = module.configure_optimizers()
    assert trained_by(discriminator) == {id(p) for p in module.discriminator.parameters()}
    assert trained_by(encoder_segmenter) == {id(p) for p in [*module.encoder.parameters(), *module.segmenter.parameters()]}
    assert discriminator.param_groups[0]["lr"] == DISCRIMINATOR_LR and encoder_segmenter.param_groups[0]["lr"] == LR


def test_the_adversarial_term_is_the_discriminators_loss_negated(paired):
    module = privacy_net().eval()
    batch = next(iter(paired.val_dataloader()))
    with torch.no_grad():
        losses = module._losses(batch)
        logits = module.discriminator(module.encode(batch[PAIR_IMAGE_A]), module.encode(batch[PAIR_IMAGE_B]))
        expected = F.binary_cross_entropy_with_logits(logits, batch[PAIR_SAME_PATIENT])
        loss_discriminator, _ = module._discriminate(losses["encoded"], losses["same"])
    torch.testing.assert_close(losses["loss_adversarial"], -expected)
    torch.testing.assert_close(loss_discriminator, expected)


def test_client_and_server_halves_compose_to_the_forward_pass():
    module = privacy_net().eval()
    image = torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        encoded = module.encode(image)
        assert encoded.shape == image.shape and 0 <= encoded.min() and encoded.max() <= 1
        torch.testing.assert_close(module.segment_encoded(encoded), torch.softmax(module(image), 1))


def test_hparams_rebuild_the_module_and_its_weights_load_strictly():
    module = privacy_net()
    hparams = json.loads(json.dumps(dict(module.hparams)))  # plain, serialisable data only
    rebuilt = PrivacyNetModule(**hparams)
    rebuilt.load_state_dict(module.state_dict(), strict=True)
    image = torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(image), module.eval()(image))


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="1-channel encoded image"):
        PrivacyNetModule(LABELS, TINY_ENCODER, {**TINY_SEGMENTER, "in_channels": 2})
    with pytest.raises(ValueError, match="adversarial_weight"):
        PrivacyNetModule(LABELS, TINY_ENCODER, TINY_SEGMENTER, adversarial_weight=-1)


def test_the_recipe_builds_the_module_and_the_datamodule_takes_its_data_section():
    recipe = load_recipe("tissue-privacynet")
    model = dict(recipe["model"])
    assert model.pop("kind") == "privacynet"
    module = PrivacyNetModule(LABELS, **model, patch_size=recipe["data"]["patch_size"]).eval()
    PairedPatchDataModule(**recipe["data"])  # reads nothing before setup
    side = recipe["data"]["patch_size"]
    with torch.no_grad():
        assert module(torch.zeros(1, 1, side, side, side)).shape == (1, len(LABELS), side, side, side)
