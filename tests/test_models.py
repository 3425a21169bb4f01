"""The PyTorch reference against diffusers on the same weights (an independent implementation)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from diffusers_support import perturbed, rel_l2, vae_distances
from sdengine.config import ModelConfig, UNetConfig, VAEConfig
from sdengine.models.unet import UNet
from sdengine.models.vae import AutoencoderKL

diffusers = pytest.importorskip("diffusers")

TOL = 1e-5  # relative L2, fp32


def _diffusers_kwargs(cfg) -> dict:
    d = cfg.to_diffusers()
    d.pop("_class_name")
    return d


SD2_STYLE_TINY = dataclasses.replace(UNetConfig.tiny(), use_linear_projection=True, upcast_attention=True)


@pytest.mark.parametrize("cfg", [UNetConfig.tiny(), SD2_STYLE_TINY], ids=["conv-proj", "linear-proj-upcast"])
@pytest.mark.parametrize("size", [(8, 8), (9, 11)], ids=["even", "odd"])
def test_unet_matches_diffusers(cfg, size):
    ref = perturbed(diffusers.UNet2DConditionModel(**_diffusers_kwargs(cfg)), seed=0)
    ours = UNet(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)  # same key names: a strict dict match
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, cfg.in_channels, *size, generator=gen)
    ctx = torch.randn(2, 77, cfg.cross_attention_dim, generator=gen)
    t = torch.tensor([981, 21])
    with torch.no_grad():
        expected = ref(x, t, ctx).sample
        got = ours(x, t, ctx)
    assert expected.abs().mean() > 1e-3  # the comparison is on a non-trivial output
    assert rel_l2(got, expected, f"U-Net {cfg.use_linear_projection=} {size}") < TOL


def _vae_pair(cfg: VAEConfig):
    ref = perturbed(diffusers.AutoencoderKL(**_diffusers_kwargs(cfg)), seed=2)
    ours = AutoencoderKL(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def test_vae_decoder_and_encoder_match_diffusers():
    cfg = VAEConfig.tiny()
    ref, ours = _vae_pair(cfg)
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(2, cfg.latent_channels, 8, 8, generator=gen)
    image = torch.rand(2, 3, 64, 64, generator=gen) * 2 - 1
    assert max(vae_distances(ours, ref, z, image, "tiny")) < TOL


def test_sd15_shaped_networks_match_diffusers():
    """The real SD 1.5 key names and shapes (random weights) at a small latent."""
    cfg = ModelConfig.sd15()
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(**_diffusers_kwargs(cfg.unet)).eval()
    ours = UNet(cfg.unet).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 4, 8, 8)
    ctx = torch.randn(2, 77, 768)
    t = torch.tensor([801, 1])
    with torch.no_grad():
        expected = ref(x, t, ctx).sample
        got = ours(x, t, ctx)
    del ref, ours
    assert rel_l2(got, expected, "SD 1.5-shaped U-Net, 8x8 latent") < TOL
    vref, vours = _vae_pair(cfg.vae)
    z = torch.randn(1, 4, 8, 8)
    image = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert rel_l2(vours.decode(z), vref.decode(z).sample, "SD 1.5-shaped VAE decoder") < TOL
        assert rel_l2(vours.encode(image)[0], vref.encode(image).latent_dist.mean, "SD 1.5-shaped VAE encoder") < TOL
