"""Checkpoint loading: diffusers folders, strictness, fp16 files, refusals with clear messages."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from sdengine.errors import ModelLoadError, PickleCheckpointError, UnsupportedModelError, WeightsMismatchError
from sdengine.models.loading import load_components

UNET_FILE = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path):
    return shutil.copytree(tiny_model_dir, tmp_path / "model")


def _edit_weights(folder, rel, edit):
    state = load_file(str(folder / rel))
    edit(state)
    save_file(state, str(folder / rel))


def test_folder_loads_exact_tensors(tiny_model_dir):
    c = load_components(tiny_model_dir)
    on_disk = load_file(str(tiny_model_dir / UNET_FILE))
    assert set(on_disk) == set(c.unet.state_dict())
    assert all(torch.equal(on_disk[k], v) for k, v in c.unet.state_dict().items())


def test_fp16_files_load(model_copy, tiny_model_dir):
    for rel in (UNET_FILE, "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        _edit_weights(model_copy, rel, lambda s: s.update({k: v.half() for k, v in s.items()}))
    half = load_components(model_copy)
    full = load_components(tiny_model_dir)
    for k, v in full.unet.state_dict().items():
        assert half.unet.state_dict()[k].dtype == torch.float32
        assert torch.equal(half.unet.state_dict()[k], v.half().float())


def test_text_encoder_keys_without_prefix_load(model_copy):
    """transformers 5 saves CLIPTextModel without the text_model. prefix."""
    rel = "text_encoder/model.safetensors"
    _edit_weights(model_copy, rel, lambda s: [s.__setitem__(k[len("text_model."):], s.pop(k)) for k in list(s)])
    load_components(model_copy)


def test_strict_load_lists_missing_unexpected_and_misshaped(model_copy):
    def edit(state):
        del state["conv_in.weight"]
        state["extra.weight"] = torch.zeros(1)
        state["conv_out.bias"] = torch.zeros(5)

    _edit_weights(model_copy, UNET_FILE, edit)
    with pytest.raises(WeightsMismatchError) as err:
        load_components(model_copy)
    msg = str(err.value)
    assert "1 missing: conv_in.weight" in msg
    assert "1 unexpected: extra.weight" in msg
    assert "conv_out.bias (5,) (expected (4,))" in msg


def test_truncated_safetensors(model_copy):
    path = model_copy / UNET_FILE
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="truncated or corrupt"):
        load_components(model_copy)


def test_garbage_safetensors(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(ModelLoadError, match="not a readable safetensors"):
        load_components(bad)


@pytest.mark.parametrize("name", ["model.ckpt", "model.pt", "model.bin", "disguised.safetensors"])
def test_pickle_refused_with_conversion_command(tmp_path, name):
    path = tmp_path / name
    torch.save({"state_dict": {"w": torch.zeros(2)}}, path)  # a zip-format pickle archive
    with pytest.raises(PickleCheckpointError) as err:
        load_components(path)
    assert "safetensors" in str(err.value) and "weights_only=True" in str(err.value)


def test_pickle_only_folder_refused(model_copy):
    (model_copy / UNET_FILE).rename(model_copy / "unet/diffusion_pytorch_model.bin")
    with pytest.raises(PickleCheckpointError):
        load_components(model_copy)


def test_missing_paths(tmp_path, model_copy):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_components(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match="model_index.json"):
        load_components(tmp_path)
    (model_copy / "vae/config.json").unlink()
    with pytest.raises(ModelLoadError, match="vae/config.json is missing"):
        load_components(model_copy)


def test_other_families_refused(model_copy):
    index = json.loads((model_copy / "model_index.json").read_text())
    (model_copy / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusion3Pipeline"}))
    with pytest.raises(UnsupportedModelError, match="StableDiffusion3Pipeline"):
        load_components(model_copy)
    (model_copy / "model_index.json").write_text(json.dumps(index))
    cfg = json.loads((model_copy / "unet/config.json").read_text())
    (model_copy / "unet/config.json").write_text(json.dumps({**cfg, "addition_embed_type": "image"}))
    with pytest.raises(UnsupportedModelError, match="addition_embed_type"):
        load_components(model_copy)
    # SDXL's text_time U-Net in a folder without SDXL's second text encoder: parts of different models.
    (model_copy / "unet/config.json").write_text(json.dumps({**cfg, "addition_embed_type": "text_time",
                                                             "addition_time_embed_dim": 8,
                                                             "projection_class_embeddings_input_dim": 80}))
    with pytest.raises(ModelLoadError, match="text_encoder_2"):
        load_components(model_copy)


def test_parts_of_different_models_refused(model_copy):
    cfg = json.loads((model_copy / "text_encoder/config.json").read_text())
    (model_copy / "text_encoder/config.json").write_text(json.dumps({**cfg, "hidden_size": 64}))
    with pytest.raises(ModelLoadError, match="cross_attention_dim"):
        load_components(model_copy)


def test_tokenizer_from_folder_takes_precedence(model_copy):
    special = json.loads((model_copy / "tokenizer/special_tokens_map.json").read_text())
    (model_copy / "tokenizer/special_tokens_map.json").write_text(json.dumps({**special, "pad_token": "!"}))
    c = load_components(model_copy)
    assert c.tokenizer("a cat")[0, -1] == 0


def test_safetensors_whose_length_byte_looks_like_pickle_loads(tmp_path):
    """The header length is little-endian: a first byte of 0x80 is not the pickle protocol marker."""
    from sdengine.models.weights import read_safetensors

    path = tmp_path / "w.safetensors"
    for pad in range(300):
        save_file({"w": torch.ones(2)}, str(path), metadata={"pad": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    assert torch.equal(read_safetensors(path)["w"], torch.ones(2))


def test_single_file_checkpoint_gives_the_folder_weights(tiny_model_dir, tmp_path):
    """An original-layout fp16 .safetensors of the same weights loads to the same tensors and generates.

    Heads, norm groups and sample size are not in a single file's shapes (they are inferred by the SD
    rules), so only the inferable config fields are compared.
    """
    import sdengine
    from sdengine.models.convert import diffusers_to_original

    folder = load_components(tiny_model_dir)
    parts = {name: getattr(folder, name).state_dict() for name in ("unet", "vae", "text_encoder")}
    single = tmp_path / "tiny.safetensors"
    save_file({k: v.half() for k, v in diffusers_to_original(parts, folder.config).items()}, str(single))
    loaded = load_components(single)
    for field in ("block_out_channels", "attention", "layers_per_block", "cross_attention_dim", "in_channels"):
        assert getattr(loaded.config.unet, field) == getattr(folder.config.unet, field)
    assert loaded.config.vae.block_out_channels == folder.config.vae.block_out_channels
    for name, state in parts.items():
        got = getattr(loaded, name).state_dict()
        assert set(got) == set(state)
        assert all(torch.equal(got[k], v.half().float()) for k, v in state.items())
    result = sdengine.load_pipeline(single)("a cat", num_inference_steps=2, seed=5, height=64, width=64)
    assert result.images[0].size == (64, 64)


def test_model_config_dict_round_trip():
    import json

    from sdengine.config import ModelConfig

    for cfg in (ModelConfig.tiny(), ModelConfig.tiny_inpaint(), ModelConfig.sd15(), ModelConfig.sd21()):
        assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ModelLoadError, match="incomplete"):
        ModelConfig.from_dict({"unet": {}})
