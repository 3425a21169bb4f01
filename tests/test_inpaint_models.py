"""Inpainting U-Nets (sd-v1-5-inpainting, stable-diffusion-2-inpainting): 9 input channels.

The U-Net input is cat([latent (4), mask (1), masked-image latent (4)], dim=1), as in diffusers'
StableDiffusionInpaintPipeline. Tiny random models are built here: written as diffusers folders,
read back by sdengine and by diffusers, and converted to the original single-file layout.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from sdengine.config import ModelConfig, TextEncoderConfig, UNetConfig, VAEConfig
from sdengine.errors import ModelLoadError, UnsupportedModelError
from sdengine.models.convert import detect_family, diffusers_to_original
from sdengine.models.loading import load_components
from sdengine.models.saving import write_random_model

TOL = 1e-5  # relative L2, fp32 (as tests/test_models.py)
UNET_FILE = "unet/diffusion_pytorch_model.safetensors"
CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"
NETWORKS = ("unet", "vae", "text_encoder")


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _with_unet(cfg: ModelConfig, **changes) -> ModelConfig:
    return dataclasses.replace(cfg, unet=dataclasses.replace(cfg.unet, **changes))


def _inferable(family: str) -> ModelConfig:
    """A tiny 9-channel config whose every field follows the rules infer_config applies to a single file.

    Heads, norm groups, sample sizes and projection widths are not in a file's shapes: they are set here to
    what the inference assumes, so a file made from this model must give back exactly this config.
    """
    sd2 = family == "sd2"
    unet = UNetConfig(block_out_channels=(32, 64, 64), attention=(True, True, False),
                      num_heads=(1, 1, 1) if sd2 else (8, 8, 8), cross_attention_dim=32, in_channels=9,
                      use_linear_projection=sd2, upcast_attention=sd2, norm_num_groups=32, sample_size=64)
    vae = dataclasses.replace(VAEConfig.tiny(), norm_num_groups=16, sample_size=512)
    text = dataclasses.replace(TextEncoderConfig.tiny(), num_attention_heads=1,
                               hidden_act="gelu" if sd2 else "quick_gelu", projection_dim=512 if sd2 else 768)
    return ModelConfig(unet=unet, vae=vae, text_encoder=text)


@pytest.fixture(scope="module")
def inpaint_dir(tmp_path_factory):
    """A diffusers folder of the tiny inpainting model (written as a StableDiffusionInpaintPipeline)."""
    return write_random_model(tmp_path_factory.mktemp("inpaint") / "tiny-inpaint", ModelConfig.tiny_inpaint(), seed=3)


@pytest.fixture(scope="module")
def single_files(tmp_path_factory):
    """family -> (config, components loaded from the folder, original-layout .safetensors of the same weights)."""
    out = {}
    for family in ("sd1", "sd2"):
        root = tmp_path_factory.mktemp(f"inpaint-{family}")
        cfg = _inferable(family)
        folder = load_components(write_random_model(root / "folder", cfg, seed=4))
        parts = {name: getattr(folder, name).state_dict() for name in NETWORKS}
        path = root / f"tiny-{family}-inpainting.safetensors"
        save_file(diffusers_to_original(parts, cfg, family), str(path))
        out[family] = cfg, folder, path
    return out


# --- config -------------------------------------------------------------------------------------------------

def test_inpaint_config():
    cfg = ModelConfig.tiny_inpaint()
    assert (cfg.unet.in_channels, cfg.unet.out_channels, cfg.vae.latent_channels) == (9, 4, 4)
    assert cfg.inpainting and not ModelConfig.tiny().inpainting and not ModelConfig.sd15().inpainting
    assert cfg == dataclasses.replace(ModelConfig.tiny(), unet=dataclasses.replace(UNetConfig.tiny(), in_channels=9))
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert UNetConfig.from_diffusers(cfg.unet.to_diffusers()) == cfg.unet
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.unet = UNetConfig.tiny()  # type: ignore[misc]
    # The rule is relative to the VAE: 2 * latent + 1 input channels.
    wide = ModelConfig(unet=dataclasses.replace(UNetConfig.tiny(), in_channels=17, out_channels=8),
                       vae=dataclasses.replace(VAEConfig.tiny(), latent_channels=8),
                       text_encoder=TextEncoderConfig.tiny())
    assert wide.inpainting


@pytest.mark.parametrize("channels, what", [(7, "x4 upscaler"), (5, "depth-to-image"), (8, "instruct-pix2pix"),
                                            (6, "an unknown kind"), (3, "an unknown kind")])
def test_other_input_channel_counts_refused(channels, what):
    with pytest.raises(UnsupportedModelError, match=rf"{channels} input channels \({what}\).*4 \(text-to-image\) or 9"):
        _with_unet(ModelConfig.tiny(), in_channels=channels)
    d = ModelConfig.tiny().to_dict()
    d["unet"]["in_channels"] = channels
    with pytest.raises(ModelLoadError, match=f"{channels} input channels"):  # an UnsupportedModelError is one
        ModelConfig.from_dict(d)


def test_unet_output_must_be_a_latent():
    with pytest.raises(ModelLoadError, match="outputs 9 channels, not the VAE's 4"):
        _with_unet(ModelConfig.tiny_inpaint(), out_channels=9)


# --- diffusers folders --------------------------------------------------------------------------------------

def test_folder_is_an_inpaint_pipeline_and_loads(inpaint_dir):
    index = json.loads((inpaint_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionInpaintPipeline"
    c = load_components(inpaint_dir)
    assert c.config == ModelConfig.tiny_inpaint() and c.config.inpainting
    assert c.unet.conv_in.weight.shape == (32, 9, 3, 3) and c.unet.conv_out.weight.shape[0] == 4
    on_disk = load_file(str(inpaint_dir / UNET_FILE))
    assert set(on_disk) == set(c.unet.state_dict())
    assert all(torch.equal(on_disk[k], v) for k, v in c.unet.state_dict().items())


def test_unet_matches_diffusers_on_nine_channels(inpaint_dir):
    """Odd latent sizes are covered for 4 channels in tests/test_models.py; only conv_in differs here."""
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.UNet2DConditionModel.from_pretrained(inpaint_dir / "unet").eval()
    assert ref.config.in_channels == 9
    ours = load_components(inpaint_dir).unet
    gen, size = torch.Generator().manual_seed(1), (8, 8)
    latent, masked = torch.randn(2, 4, *size, generator=gen), torch.randn(2, 4, *size, generator=gen)
    mask = (torch.rand(2, 1, *size, generator=gen) > 0.5).float()
    x = torch.cat([latent, mask, masked], dim=1)
    ctx = torch.randn(2, 77, 32, generator=gen)
    t = torch.tensor([981, 21])
    with torch.no_grad():
        expected = ref(x, t, ctx).sample
        got = ours(x, t, ctx)
    assert got.shape == expected.shape == (2, 4, *size)
    assert expected.abs().mean() > 1e-3  # a non-trivial output
    assert rel_l2(got, expected) < TOL
    with torch.no_grad():  # the mask and masked-image channels are read
        assert rel_l2(ours(torch.cat([latent, 1 - mask, masked], dim=1), t, ctx), got) > 1e-3


def test_diffusers_inpaint_pipeline_loads_the_folder(inpaint_dir):
    diffusers = pytest.importorskip("diffusers")
    import numpy as np
    from PIL import Image

    pipe = diffusers.StableDiffusionInpaintPipeline.from_pretrained(inpaint_dir)
    assert type(pipe).__name__ == "StableDiffusionInpaintPipeline" and pipe.unet.config.in_channels == 9
    pipe.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mask = Image.fromarray(np.pad(np.full((32, 32), 255, np.uint8), 16))
    out = pipe("a cat", image=image, mask_image=mask, num_inference_steps=1, height=64, width=64,
               output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()


@pytest.mark.parametrize("pipeline", ["StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline"])
def test_nine_channel_unet_under_another_pipeline_name_loads(inpaint_dir, tmp_path, pipeline):
    """The U-Net's config decides whether the model inpaints, not model_index.json's class name."""
    folder = shutil.copytree(inpaint_dir, tmp_path / "model")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": pipeline}))
    assert load_components(folder).config.inpainting


def test_four_channel_unet_under_the_inpaint_pipeline_name_loads(tiny_model_dir, tmp_path):
    folder = shutil.copytree(tiny_model_dir, tmp_path / "model")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionInpaintPipeline"}))
    assert not load_components(folder).config.inpainting


def test_depth_unet_in_a_folder_refused(tiny_model_dir, tmp_path):
    folder = shutil.copytree(tiny_model_dir, tmp_path / "model")
    cfg = json.loads((folder / "unet/config.json").read_text())
    (folder / "unet/config.json").write_text(json.dumps({**cfg, "in_channels": 5}))
    with pytest.raises(UnsupportedModelError, match=r"5 input channels \(depth-to-image\)"):
        load_components(folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionDepth2ImgPipeline"}))
    with pytest.raises(UnsupportedModelError, match="StableDiffusionDepth2ImgPipeline"):
        load_components(folder)


# --- single-file (original layout) checkpoints --------------------------------------------------------------

@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_single_file_loads_the_same_tensors_and_config(single_files, family):
    cfg, folder, path = single_files[family]
    state = load_file(str(path))
    assert state[CONV_IN].shape == (32, 9, 3, 3)
    assert detect_family(state) == family
    loaded = load_components(path)
    assert loaded.config == cfg == folder.config
    assert loaded.config.inpainting and loaded.config.unet.in_channels == 9
    for name in NETWORKS:
        want, got = getattr(folder, name).state_dict(), getattr(loaded, name).state_dict()
        assert set(got) == set(want)
        assert all(torch.equal(got[k], v) for k, v in want.items()), name
    assert (loaded.tokenizer("a cat")[0, -1] == 0) == (family == "sd2")  # OpenCLIP pads with "!" (id 0)


def test_diffusers_reads_the_single_file_as_inpainting(single_files):
    """diffusers' own single-file code calls the file an inpainting checkpoint and maps it to the same U-Net."""
    pytest.importorskip("diffusers")
    from diffusers.loaders import single_file_utils as sfu

    cfg, folder, path = single_files["sd1"]
    state = load_file(str(path))
    assert sfu.infer_diffusers_model_type(state) == "inpainting"
    unet = sfu.convert_ldm_unet_checkpoint(state, cfg.unet.to_diffusers())
    want = folder.unet.state_dict()
    assert set(unet) == set(want) and all(torch.equal(unet[k], v) for k, v in want.items())


@pytest.mark.parametrize("channels, what", [(5, "depth-to-image"), (8, "instruct-pix2pix"), (7, "x4 upscaler"),
                                            (6, "not a txt2img or inpainting model")])
def test_single_files_of_other_u_nets_refused(single_files, tmp_path, channels, what):
    _, _, path = single_files["sd1"]
    state = load_file(str(path))
    state[CONV_IN] = torch.zeros(32, channels, 3, 3)
    bad = tmp_path / f"unet-{channels}.safetensors"
    save_file(state, str(bad))
    with pytest.raises(UnsupportedModelError, match=rf"{channels} input channels \({what}\)") as err:
        load_components(bad)
    assert "4 (txt2img) or 9 (inpainting)" in str(err.value)
