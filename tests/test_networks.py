"""The networks: the unmixers (full-resolution AdaIN U-Net, the coarse-context variant with its folded per-voxel
head and its full-resolution refinement) and the channels-last segmenter."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mixpriv.networks import (
    AdaINUnmixer,
    ContextAdaINUnmixer,
    UnmixerSpec,
    build_segmenter,
    build_unmixer,
)


def _inputs(n: int = 3, c: int = 4, side: int = 16, dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)
    mixed = torch.softmax(torch.randn(n, c, side, side, side, generator=generator, dtype=dtype), 1)
    reference = F.one_hot(torch.randint(c, (n, side, side, side), generator=generator), c).movedim(-1, 1).to(dtype)
    return mixed, reference, torch.tensor([0.66, 0.8, 0.93], dtype=dtype)[:n]


@pytest.mark.parametrize("include_naive", [True, False])
def test_folded_pointwise_head_equals_the_1x1_convolution_of_the_inputs(include_naive):
    net = build_unmixer(4, {"channels": [4, 8], "context_scale": 4, "include_naive": include_naive}).double()
    with torch.no_grad():
        net.pointwise.weight.normal_()
    mixed, reference, lam = _inputs(dtype=torch.float64)
    explicit = F.conv3d(net._inputs(mixed, reference, lam), net.pointwise.weight)
    folded = torch.einsum("noc,nc...->no...", net._pointwise_matrices(lam), torch.cat([mixed, reference], 1))
    torch.testing.assert_close(folded, explicit, rtol=1e-12, atol=1e-12)


def test_context_unmixer_is_the_pointwise_head_plus_the_upsampled_coarse_unet():
    net = build_unmixer(4, {"channels": [4, 8], "context_scale": 2}).double()
    mixed, reference, lam = _inputs(dtype=torch.float64)
    pooled = net._inputs(F.avg_pool3d(mixed, 2), F.avg_pool3d(reference, 2), lam)
    coarse = net._unet(pooled, lam) + net.pointwise.bias.reshape(1, -1, 1, 1, 1)
    expected = F.conv3d(net._inputs(mixed, reference, lam), net.pointwise.weight) + F.interpolate(
        coarse, size=mixed.shape[2:], mode="trilinear", align_corners=False)
    torch.testing.assert_close(net(mixed, reference, lam), expected)


def test_the_refinement_starts_at_zero_and_is_a_3x3x3_then_1x1_convolution_of_logits_and_reference():
    plain = build_unmixer(4, {"channels": [4, 8], "context_scale": 2}).double()
    refined = build_unmixer(4, {"channels": [4, 8], "context_scale": 2, "refine_channels": 3}).double()
    refined.load_state_dict(plain.state_dict(), strict=False)
    mixed, reference, lam = _inputs(dtype=torch.float64)
    logits = plain(mixed, reference, lam)
    torch.testing.assert_close(refined(mixed, reference, lam), logits)  # zeroed last layer: no correction yet
    with torch.no_grad():
        refined.refinement.weight.normal_()
        refined.refinement.bias.normal_()
    conv = refined.refinement.conv
    hidden = F.leaky_relu(F.conv3d(torch.cat([logits, reference], 1), conv.weight, conv.bias, padding=1), 0.01)
    expected = logits + F.conv3d(hidden, refined.refinement.weight[..., None, None, None], refined.refinement.bias)
    torch.testing.assert_close(refined(mixed, reference, lam), expected)


@pytest.mark.parametrize("spec", [{}, {"channels": [4, 8], "context_scale": 4},
                                  {"channels": [4, 8], "context_scale": 2, "refine_channels": 2}])
def test_every_unmixer_parameter_gets_a_gradient(spec):
    net = build_unmixer(4, spec)
    mixed, reference, lam = _inputs()
    net(mixed.requires_grad_(), reference, lam).logsumexp(1).sum().backward()
    assert mixed.grad is not None and mixed.grad.abs().sum() > 0
    missing = [name for name, p in net.named_parameters() if p.grad is None]
    assert not missing, missing


def test_build_unmixer_picks_the_network_of_the_spec_and_checks_it():
    assert type(build_unmixer(4)) is AdaINUnmixer
    assert type(build_unmixer(4, UnmixerSpec(context_scale=2))) is ContextAdaINUnmixer
    assert build_unmixer(4, {"channels": [8, 16], "context_scale": 4}).size_divisor == 8
    with pytest.raises(ValueError, match="context_scale"):
        UnmixerSpec(context_scale=0)
    with pytest.raises(ValueError, match="channels"):
        UnmixerSpec(channels=())
    with pytest.raises(ValueError, match="context_scale >= 2"):
        ContextAdaINUnmixer(4, {"context_scale": 1})
    with pytest.raises(ValueError, match="refine_channels needs context_scale"):
        UnmixerSpec(refine_channels=4)
    with pytest.raises(ValueError, match="refine_channels must be"):
        UnmixerSpec(context_scale=2, refine_channels=-1)
    assert UnmixerSpec.from_dict(UnmixerSpec(context_scale=4).to_dict()) == UnmixerSpec(context_scale=4)


def test_a_scalar_lambda_is_shared_by_the_batch():
    net = build_unmixer(4, {"channels": [4, 8], "context_scale": 2})
    mixed, reference, _ = _inputs()
    torch.testing.assert_close(net(mixed, reference, torch.tensor(0.8)), net(mixed, reference, torch.full((3,), 0.8)))


def test_context_unmixer_starts_as_the_sharpened_naive_unmixing():
    from mixpriv.mixing.functional import naive_unmix
    from mixpriv.networks.unmixer import NAIVE_GAIN

    net = build_unmixer(4, {"channels": [4, 8], "context_scale": 2})
    mixed, reference, lam = _inputs()
    logits = net(mixed, reference, lam)
    torch.testing.assert_close(logits, NAIVE_GAIN * naive_unmix(mixed, reference, lam))
    # Training moves it: the coarse U-Net's head gets a gradient from the first step.
    logits.logsumexp(1).sum().backward()
    assert net.head.weight.grad.abs().sum() > 0


def test_the_context_recipe_builds_a_model_with_the_context_unmixer():
    from mixpriv.lightning.mixup import MixupPrivacyModule
    from mixpriv.recipe import load_recipe

    model = load_recipe("tissue-mixpriv-context")["model"]
    module = MixupPrivacyModule({"background": 0, "CSF": 1, "GM": 2, "WM": 3}, model["segmenter"], model["unmixer"])
    assert isinstance(module.unmixer, ContextAdaINUnmixer) and module.unmixer.spec.context_scale == 4


def test_the_segmenter_runs_channels_last_and_computes_what_the_channels_first_network_does():
    spec = {"encoder_name": "mixpriv-light-8", "encoder_depth": 3, "decoder_channels": [16, 8, 8]}
    net = build_segmenter(spec, 4).eval()
    convs = [m.weight for m in net.modules() if isinstance(m, torch.nn.Conv3d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last_3d) for w in convs)
    channels_first = build_segmenter(spec, 4).eval()
    channels_first._forward_pre_hooks.clear()
    channels_first.to(memory_format=torch.contiguous_format)
    channels_first.load_state_dict(net.state_dict())
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(net(x), channels_first(x), rtol=1e-4, atol=1e-5)
    net.load_state_dict(channels_first.state_dict())  # a checkpoint keeps the layout of the network it loads into
    assert all(w.is_contiguous(memory_format=torch.channels_last_3d) for w in convs)


def test_importing_the_networks_prints_no_torch_jit_deprecations():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-W", "default", "-c", "import mixpriv.networks"], check=False,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "torch.jit" not in result.stderr
