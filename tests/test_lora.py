"""LoRA: files read in both layouts, merged from pristine weights, against diffusers' load_lora_weights + fuse_lora."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import sdengine
from sdengine.errors import InvalidInputError, LoraError, PickleCheckpointError
from sdengine.lora import parse_cli_lora, read_lora

from lora_support import KOHYA_TEXT_MODULES, TEXT_MODULES, UNET_MODULES, low_rank, write_kohya, write_peft

RANK = 4
MODULES = {"unet": UNET_MODULES, "text_encoder": TEXT_MODULES}
KOHYA_MODULES = {"unet": UNET_MODULES, "text_encoder": KOHYA_TEXT_MODULES}


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    return sdengine.load_pipeline(tiny_model_dir)


@pytest.fixture(scope="module")
def targets(pipe):
    return pipe.backend.lora_targets()


@pytest.fixture(scope="module")
def kohya_file(tmp_path_factory, targets):
    return write_kohya(tmp_path_factory.mktemp("lora") / "style.safetensors", low_rank(targets, KOHYA_MODULES, RANK, 1),
                       2.0)


@pytest.fixture(scope="module")
def peft_file(tmp_path_factory, targets):
    return write_peft(tmp_path_factory.mktemp("lora") / "detail.safetensors", low_rank(targets, MODULES, RANK, 2))


def weights(pipe) -> dict[str, torch.Tensor]:
    c = pipe.backend.components
    return {**{f"unet.{k}": v.clone() for k, v in c.unet.state_dict().items()},
            **{f"text_encoder.{k}": v.clone() for k, v in c.text_encoder.state_dict().items()}}


def diffusers_weights(d) -> dict[str, torch.Tensor]:
    te = d.text_encoder.state_dict()
    te = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in te.items()}
    return {**{f"unet.{k}": v for k, v in d.unet.state_dict().items()},
            **{f"text_encoder.{k}": v for k, v in te.items()}}


def diffusers_fused(model_dir, loras: dict):
    """diffusers' pipeline with the LoRAs loaded, weighted (set_adapters), fused, then unloaded."""
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    d = diffusers.StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None,
                                                          requires_safety_checker=False)
    d.scheduler = diffusers.DDIMScheduler.from_config(d.scheduler.config)
    d.set_progress_bar_config(disable=True)
    names = []
    for i, path in enumerate(loras):
        d.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=f"l{i}")
        names.append(f"l{i}")
    d.set_adapters(names, adapter_weights=list(loras.values()))
    d.fuse_lora(adapter_names=names)
    d.unload_lora_weights()
    return d


def test_reads_both_layouts_with_alpha(targets, kohya_file, peft_file):
    k, p = read_lora(kohya_file, targets), read_lora(peft_file, targets)
    assert (k.format, p.format) == ("kohya", "peft")
    assert k.targets == {f"{c}.{m}.weight" for c, ms in KOHYA_MODULES.items() for m in ms}
    assert p.targets == {f"{c}.{m}.weight" for c, ms in MODULES.items() for m in ms}
    assert {x.alpha for x in k.pairs} == {2.0} and {x.alpha for x in p.pairs} == {float(RANK)}


@pytest.mark.parametrize("which", ["kohya", "peft", "both"])
def test_matches_diffusers_fuse_lora(tiny_model_dir, pipe, kohya_file, peft_file, which):
    """Merged tensors equal diffusers' fused ones within fp32 rounding; images within 2/255."""
    loras = {"kohya": {kohya_file: 0.8}, "peft": {peft_file: 0.6}, "both": {kohya_file: 0.8, peft_file: -0.5}}[which]
    base = weights(pipe)
    pipe.set_loras(loras)
    try:
        ours, d = weights(pipe), diffusers_fused(tiny_model_dir, loras)
        theirs = diffusers_weights(d)
        touched = set().union(*(read_lora(path, pipe.backend.lora_targets()).targets for path in loras))
        assert all(not torch.equal(ours[k], base[k]) and not torch.equal(theirs[k], base[k]) for k in touched)
        assert all(torch.equal(ours[k], base[k]) for k in ours if k not in touched)
        worst = max((ours[k] - theirs[k]).abs().max().item() for k in touched)
        rel = max(((ours[k] - theirs[k]).abs().max() / theirs[k].abs().max()).item() for k in touched)
        assert all(torch.equal(ours[k], theirs[k]) for k in ours if k not in touched and k in theirs)
        latents = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
        kwargs = dict(negative_prompt="blurry", num_inference_steps=20, guidance_scale=7.5)
        kwargs["negative_prompt"] = ["blurry"] * 2
        ref = d(["a photo of a red cat", "a blue square"], latents=torch.from_numpy(latents), output_type="np",
                **kwargs)
        expected = (ref.images * 255).round().astype(np.int16)
        got = np.stack([np.asarray(im) for im in pipe(["a photo of a red cat", "a blue square"], latents=latents,
                                                       **kwargs).images]).astype(np.int16)
    finally:
        pipe.set_loras({})
    plain = np.stack([np.asarray(im) for im in pipe(["a photo of a red cat", "a blue square"], latents=latents,
                                                    **kwargs).images]).astype(np.int16)
    diff = np.abs(got - expected).max()
    print(f"\nparity lora {which} vs diffusers fuse_lora: merged weights max abs difference {worst:.2e} "
          f"(relative {rel:.2e}); max pixel difference {diff}/255; the LoRA moved pixels by up to "
          f"{np.abs(got - plain).max()}/255")
    assert worst <= 1e-5 * max(1.0, max(theirs[k].abs().max().item() for k in touched))
    assert diff <= 2
    assert np.abs(got - plain).max() > 20  # the LoRA changes the image
    assert torch.equal(weights(pipe)["unet.conv_in.weight"], base["unet.conv_in.weight"])


def test_set_changes_are_bit_identical(pipe, kohya_file, peft_file):
    """A, then B, then A gives A's weights bit for bit; {} gives the base back."""
    base = weights(pipe)
    seconds = pipe.set_loras({kohya_file: 0.7})
    a = weights(pipe)
    pipe.set_loras({peft_file: 1.0})
    pipe.set_loras({kohya_file: 0.7, peft_file: 0.3})
    pipe.set_loras({kohya_file: 0.7})
    again = weights(pipe)
    pipe.set_loras({})
    restored = weights(pipe)
    print(f"\nparity lora set changes: A,B,A+B,A bit-identical to A; {{}} restores the base; "
          f"torch set_loras took {seconds * 1e3:.1f} ms on the tiny model")
    assert isinstance(seconds, float) and seconds >= 0
    assert any(not torch.equal(a[k], base[k]) for k in a)
    assert all(torch.equal(a[k], again[k]) for k in a)
    assert all(torch.equal(base[k], restored[k]) for k in base)
    assert pipe.backend._lora_base == {}  # no kept copies once no LoRA is active


def test_switches_read_each_file_once_while_unchanged(tiny_model_dir, kohya_file, peft_file, tmp_path, monkeypatch):
    """Switching between sets parses each LoRA file once; a file rewritten since is read again."""
    import shutil

    import sdengine.pipeline as pipeline_module

    reads = []
    real = pipeline_module.read_lora
    monkeypatch.setattr(pipeline_module, "read_lora", lambda path, *a, **k: reads.append(str(path)) or real(path, *a, **k))
    own = sdengine.load_pipeline(tiny_model_dir)
    copy = tmp_path / "style.safetensors"
    shutil.copy(kohya_file, copy)
    for loras in ({copy: 0.7}, {peft_file: 1.0}, {copy: 0.7, peft_file: 0.3}, {copy: 0.7}):
        own.set_loras(loras)
    assert sorted(reads) == sorted([str(copy), str(peft_file)])
    shutil.copy(peft_file, copy)  # a new file under the old name
    os.utime(copy, ns=(1, 1))
    own.set_loras({copy: 0.7})
    assert reads[-1] == str(copy) and len(reads) == 3
    assert own.loras[0].sha256 == read_lora(peft_file, own.backend.lora_targets()).sha256


def test_metadata_lists_loras(pipe, kohya_file, peft_file):
    import hashlib

    pipe.set_loras({kohya_file: 0.8, peft_file: 0.5})
    try:
        info = pipe("a cat", num_inference_steps=2, seed=1).infos[0]
    finally:
        pipe.set_loras({})
    h1, h2 = (hashlib.sha256(p.read_bytes()).hexdigest() for p in (kohya_file, peft_file))
    assert f'Lora hashes: "style: {h1[:10]}, detail: {h2[:10]}"' in info.infotext()
    assert '"sha256": "' + h1 + '"' in info.text_chunks()["loras"]
    assert "Lora hashes" not in pipe("a cat", num_inference_steps=2, seed=1).infos[0].infotext()


def test_load_pipeline_with_loras(tiny_model_dir, pipe, kohya_file):
    p = sdengine.load_pipeline(tiny_model_dir, loras={str(kohya_file): 0.8})
    assert [lo.name for lo in p.loras] == ["style"]
    pipe.set_loras({kohya_file: 0.8})
    try:
        assert all(torch.equal(v, weights(pipe)[k]) for k, v in weights(p).items())
    finally:
        pipe.set_loras({})


def _save(path, tensors):
    from safetensors.numpy import save_file

    save_file({k: np.asarray(v, np.float32) for k, v in tensors.items()}, str(path))
    return path


def test_refusals(tmp_path, targets, pipe):
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    good = {f"{q}.lora_up.weight": np.zeros((32, 2)), f"{q}.lora_down.weight": np.zeros((2, 32))}
    with pytest.raises(LoraError, match="LoHa"):
        read_lora(_save(tmp_path / "loha.safetensors", {f"{q}.hada_w1_a": np.zeros((32, 2))}), targets)
    with pytest.raises(LoraError, match="LoKr"):
        read_lora(_save(tmp_path / "lokr.safetensors", {f"{q}.lokr_w1": np.zeros((4, 4))}), targets)
    unknown = {**good, "lora_unet_no_such_module.lora_up.weight": np.zeros((3, 2))}
    with pytest.raises(LoraError, match="1 key\\(s\\) match no weight.*no_such_module"):
        read_lora(_save(tmp_path / "unknown.safetensors", unknown), targets)
    assert read_lora(tmp_path / "unknown.safetensors", targets, strict=False).targets == {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"}
    with pytest.raises(LoraError, match="SDXL"):
        read_lora(_save(tmp_path / "xl.safetensors", {**good, "lora_te2_x.lora_up.weight": np.zeros((3, 2))}),
                  targets)
    with pytest.raises(LoraError, match="do not make a delta"):
        read_lora(_save(tmp_path / "shape.safetensors", {f"{q}.lora_up.weight": np.zeros((16, 2)),
                                                          f"{q}.lora_down.weight": np.zeros((2, 32))}), targets)
    with pytest.raises(LoraError, match="no down"):
        read_lora(_save(tmp_path / "half.safetensors", {f"{q}.lora_up.weight": np.zeros((32, 2))}), targets)
    (tmp_path / "old.ckpt").write_bytes(b"\x80\x02}q\x00.")
    with pytest.raises(PickleCheckpointError, match="safetensors only"):
        read_lora(tmp_path / "old.ckpt", targets)
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(LoraError, match="not a readable safetensors"):
        read_lora(tmp_path / "cut.safetensors", targets)
    with pytest.raises(LoraError, match="does not exist"):
        read_lora(tmp_path / "missing.safetensors", targets)
    with pytest.raises(InvalidInputError, match="finite number"):
        pipe.set_loras({tmp_path / "unknown.safetensors": float("nan")})
    before = weights(pipe)
    with pytest.raises(LoraError):  # a refused file leaves the weights alone
        pipe.set_loras({tmp_path / "unknown.safetensors": 1.0})
    assert all(torch.equal(v, weights(pipe)[k]) for k, v in before.items()) and pipe.loras == ()


def test_bf16_and_fp16_files_read_without_torch(tmp_path, targets):
    from safetensors.torch import save_file

    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    up, down = torch.randn(32, 2), torch.randn(2, 32)
    for dtype in (torch.bfloat16, torch.float16):
        path = tmp_path / f"{dtype}.safetensors".replace("torch.", "")
        save_file({f"{q}.lora_up.weight": up.to(dtype), f"{q}.lora_down.weight": down.to(dtype)}, str(path))
        pair = read_lora(path, targets).pairs[0]
        assert np.array_equal(pair.up.astype(np.float32), up.to(dtype).float().numpy())
        assert np.array_equal(pair.down.astype(np.float32), down.to(dtype).float().numpy())


def test_cli_lora_argument():
    assert parse_cli_lora("style.safetensors:0.8") == ("style.safetensors", 0.8)
    assert parse_cli_lora("style.safetensors") == ("style.safetensors", 1.0)
    assert parse_cli_lora("C:\\loras\\a.safetensors") == ("C:\\loras\\a.safetensors", 1.0)
    assert parse_cli_lora("dir:x/a.safetensors:-0.5") == ("dir:x/a.safetensors", -0.5)


def test_kohya_text_attention_against_the_formula(tmp_path, pipe, targets):
    """kohya text-encoder self-attention keys (which diffusers 0.42 with transformers 5 drops) land on the
    right weights: W + scale * alpha/rank * up @ down, computed here in torch."""
    modules = {"text_encoder": ("text_model.encoder.layers.0.self_attn.q_proj",
                                "text_model.encoder.layers.1.self_attn.out_proj")}
    pairs = low_rank(targets, modules, RANK, 3)
    path = write_kohya(tmp_path / "te.safetensors", pairs, alpha=1.0)
    base = weights(pipe)
    pipe.set_loras({path: 0.9})
    try:
        ours = weights(pipe)
    finally:
        pipe.set_loras({})
    worst = 0.0
    for key, (up, down) in pairs.items():
        name = f"{key}.weight"
        want = base[name] + (torch.from_numpy(up) @ torch.from_numpy(down)) * (1.0 / RANK * 0.9)
        worst = max(worst, (ours[name] - want).abs().max().item())
    print(f"\nparity lora kohya text-encoder attention vs torch formula: max abs difference {worst:.2e}")
    assert worst <= 1e-6


def test_cli_generate_with_loras(tiny_model_dir, tmp_path, kohya_file, peft_file):
    import hashlib

    from PIL import Image

    from a1111_infotext import parse
    from cli_support import invoke

    def run(*extra):
        return invoke("generate", "a cat", "--model", str(tiny_model_dir), "--steps", "3", "--seed", "5", *extra)

    r = run("--lora", f"{kohya_file}:0.8", "--lora", str(peft_file), "--out", str(tmp_path / "a.png"))
    assert r.returncode == 0, r.stderr
    image = Image.open(tmp_path / "a.png")
    h1, h2 = (hashlib.sha256(p.read_bytes()).hexdigest()[:10] for p in (kohya_file, peft_file))
    assert parse(image.text["parameters"])["Lora hashes"] == f"style: {h1}, detail: {h2}"
    assert [(x["name"], x["scale"]) for x in __import__("json").loads(image.text["loras"])] == [
        ("style", 0.8), ("detail", 1.0)]
    pipe = sdengine.load_pipeline(tiny_model_dir, loras={kohya_file: 0.8, peft_file: 1.0})
    same = np.asarray(pipe("a cat", num_inference_steps=3, seed=5).images[0]).astype(np.int16)
    base = np.asarray(sdengine.load_pipeline(tiny_model_dir)("a cat", num_inference_steps=3, seed=5).images[0])
    got = np.asarray(image.convert("RGB")).astype(np.int16)
    # The command line runs at its default thread count (usable cores less one), this process at torch's: CPU
    # kernels round differently across thread counts (at most 1/255, README "Batch against alone").
    assert np.abs(got - same).max() <= 1 and np.abs(got - base.astype(np.int16)).max() > 1
    for extra, message in ((["--lora", str(tmp_path / "none.safetensors")], "no such file"),
                           (["--lora", f"{kohya_file}:nan"], "finite number"),
                           (["--lora", str(tmp_path / "x.ckpt")], "pickle checkpoint")):
        r = run(*extra, "--out", str(tmp_path / "b.png"))
        lines = r.stderr.strip().splitlines()
        assert r.returncode != 0 and len(lines) == 1 and message in lines[0], r.stderr
    assert not (tmp_path / "b.png").exists()
