"""Long prompts, emphasis and clip_skip through the pipeline (torch backend), against independent references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffusers_support import pixels
from sdengine.errors import InvalidInputError

LONG = ", ".join(f"a small {c} house number {i}" for i, c in enumerate(["red", "green", "blue"] * 6))  # > 75 tokens


def captured_context(pipe, monkeypatch, *args, **kwargs) -> np.ndarray:
    """The text embeddings the pipeline hands to denoise, as float32 numpy."""
    seen = []
    original = pipe.backend.denoise

    def spy(latents, context, *rest, **kw):
        seen.append(context if isinstance(context, np.ndarray) else context.float().cpu().numpy())
        return original(latents, context, *rest, **kw)

    monkeypatch.setattr(pipe.backend, "denoise", spy)
    pipe(*args, num_inference_steps=2, output_type="np", **kwargs)
    monkeypatch.undo()
    return seen[0]


def reference_chunks(diffusers_pipe, text: str) -> torch.Tensor:
    """compel's / A1111's long-prompt encoding, computed from transformers' tokenizer and text model directly:
    ids cut in 75s, each chunk BOS + ids + EOS padded to 77, encoded alone, concatenated along the sequence."""
    tok, enc = diffusers_pipe.tokenizer, diffusers_pipe.text_encoder
    ids = tok(text, add_special_tokens=False, truncation=False).input_ids
    rows = []
    for start in range(0, max(len(ids), 1), 75):
        row = [tok.bos_token_id, *ids[start:start + 75], tok.eos_token_id]
        rows.append(row + [tok.pad_token_id] * (77 - len(row)))
    with torch.no_grad():
        out = enc(torch.tensor(rows))[0]  # [k, 77, D]
    return out.reshape(1, -1, out.shape[-1])


def test_long_prompt_embeddings_equal_the_chunked_reference(tiny_pipeline, diffusers_pipe, monkeypatch):
    ref = reference_chunks(diffusers_pipe, LONG)
    assert ref.shape[1] == 77 * 2
    got = captured_context(tiny_pipeline, monkeypatch, LONG, guidance_scale=1.0)
    # Same weights, same torch modules on the same ids: equal to float rounding (measured max |diff| 0).
    np.testing.assert_allclose(got, ref.numpy(), rtol=0, atol=1e-5)


def test_negative_prompt_is_padded_with_empty_chunks(tiny_pipeline, diffusers_pipe, monkeypatch):
    got = captured_context(tiny_pipeline, monkeypatch, LONG, negative_prompt="blurry", guidance_scale=7.5)
    assert got.shape[:2] == (2, 154)
    blurry, empty = reference_chunks(diffusers_pipe, "blurry"), reference_chunks(diffusers_pipe, "")
    np.testing.assert_allclose(got[0, :77], blurry[0].numpy(), atol=1e-5)
    np.testing.assert_allclose(got[0, 77:], empty[0].numpy(), atol=1e-5)


def test_second_chunk_changes_the_image(tiny_pipeline):
    """A 150-token prompt: changing only words past token 75 changes the image (they were dropped before)."""
    first = " ".join(["cat"] * 75)
    a = tiny_pipeline(first + " " + " ".join(["red"] * 75), seed=3, num_inference_steps=4)
    b = tiny_pipeline(first + " " + " ".join(["blue"] * 75), seed=3, num_inference_steps=4)
    c = tiny_pipeline(first + " " + " ".join(["red"] * 75), seed=3, num_inference_steps=4)
    assert np.abs(pixels(a) - pixels(b)).max() > 0
    np.testing.assert_array_equal(pixels(a), pixels(c))


def test_break_equals_padding_the_first_chunk(tiny_pipeline, diffusers_pipe, monkeypatch):
    got = captured_context(tiny_pipeline, monkeypatch, "a red cat BREAK a blue dog", guidance_scale=1.0)
    ref = torch.cat([reference_chunks(diffusers_pipe, "a red cat"), reference_chunks(diffusers_pipe, "a blue dog")], 1)
    np.testing.assert_allclose(got, ref.numpy(), atol=1e-5)


def test_emphasis_scales_tokens_and_restores_the_mean(tiny_pipeline, diffusers_pipe, monkeypatch):
    got = captured_context(tiny_pipeline, monkeypatch, "a (red:1.5) cat", guidance_scale=1.0)
    z = reference_chunks(diffusers_pipe, "a red cat")[0].double()
    tok = diffusers_pipe.tokenizer
    w = torch.ones(77, dtype=torch.float64)
    n_a = len(tok("a", add_special_tokens=False).input_ids)
    n_red = len(tok("red", add_special_tokens=False).input_ids)
    w[1 + n_a:1 + n_a + n_red] = 1.5
    scaled = z * w[:, None]
    # The tiny model's final layer norm has no bias, so a chunk's mean is ~1e-10 of its RMS: no scale to restore,
    # and sdengine leaves it (restoring it would multiply by rounding noise). A model with a bias restores it.
    rms = z.square().mean().sqrt()
    assert z.mean().abs() < 1e-6 * rms
    expected = scaled
    np.testing.assert_allclose(got[0], expected.numpy(), rtol=1e-5, atol=1e-5)
    norms = (diffusers_pipe.text_encoder.final_layer_norm,
             tiny_pipeline.backend.components.text_encoder.text_model.final_layer_norm)
    with torch.no_grad():
        try:
            for ln in norms:
                ln.bias.add_(0.5)  # the same weights with a bias: the mean is restored as A1111 restores it
            z = reference_chunks(diffusers_pipe, "a red cat")[0].double()
            got = captured_context(tiny_pipeline, monkeypatch, "a (red:1.5) cat", guidance_scale=1.0)
        finally:
            for ln in norms:
                ln.bias.sub_(0.5)
    scaled = z * w[:, None]
    expected = scaled * (z.mean() / scaled.mean())
    assert z.mean() > 0.4
    np.testing.assert_allclose(got[0], expected.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[0].astype(np.float64).mean(), z.mean().item(), rtol=1e-5)
    plain = captured_context(tiny_pipeline, monkeypatch, "a (red:1.5) cat", guidance_scale=1.0,
                             prompt_weighting=False)
    text = reference_chunks(diffusers_pipe, "a (red:1.5) cat")
    np.testing.assert_allclose(plain, text.numpy(), atol=1e-5)


def test_too_long_prompt_is_a_clear_error(tiny_pipeline):
    with pytest.raises(InvalidInputError, match="at most 8 are read"):
        tiny_pipeline("cat " * 601, num_inference_steps=1)
    with pytest.raises(InvalidInputError, match="prompt_weighting must be True or False"):
        tiny_pipeline("cat", num_inference_steps=1, prompt_weighting="no")


@pytest.mark.parametrize("guidance", [1.0, 7.5])
def test_clip_skip_matches_diffusers(tiny_pipeline, diffusers_pipe, guidance):
    """diffusers' StableDiffusionPipeline(clip_skip=1) on the same weights and latents: within 2/255 per pixel.

    diffusers applies clip_skip to the prompt only and encodes the negative prompt from the last layer; sdengine (as
    A1111) applies it to both. With guidance the reference is therefore diffusers' pipeline given both embeddings
    from diffusers' own encode_prompt(..., clip_skip=1)."""
    import types

    latents = np.random.default_rng(1).standard_normal((1, 4, 8, 8)).astype(np.float32)
    kwargs = dict(num_inference_steps=10, guidance_scale=guidance)
    te = diffusers_pipe.text_encoder
    if not hasattr(te, "text_model"):  # transformers 5 flattens CLIPTextModel; diffusers' clip_skip reads .text_model
        object.__setattr__(te, "text_model", types.SimpleNamespace(final_layer_norm=te.final_layer_norm))
    if guidance > 1:
        embeds = {name: diffusers_pipe.encode_prompt(text, "cpu", 1, False, clip_skip=1)[0]
                  for name, text in (("prompt_embeds", "a photo of a red cat"), ("negative_prompt_embeds", "blurry"))}
        ref = diffusers_pipe(latents=torch.from_numpy(latents), output_type="np", **embeds, **kwargs)
        kwargs["negative_prompt"] = "blurry"
    else:
        ref = diffusers_pipe("a photo of a red cat", latents=torch.from_numpy(latents), output_type="np",
                             clip_skip=1, **kwargs)
    expected = (ref.images * 255).round().astype(np.int16)
    got = pixels(tiny_pipeline("a photo of a red cat", latents=latents, clip_skip=1, **kwargs))
    plain = pixels(tiny_pipeline("a photo of a red cat", latents=latents, **kwargs))
    diff = np.abs(got - expected).max()
    print(f"\nparity clip_skip=1, guidance {guidance} vs diffusers: max pixel difference {diff}/255, "
          f"mean {np.abs(got - expected).mean():.2e}; against clip_skip=0 the image moves by "
          f"{np.abs(got - plain).max()}/255")
    assert expected.std() > 5 and np.abs(got - plain).max() > 2  # the skip changes the image
    assert diff <= 2


def test_clip_skip_is_recorded_as_a1111_writes_it(tiny_pipeline):
    result = tiny_pipeline("a cat", clip_skip=1, num_inference_steps=1, seed=1)
    assert "Clip skip: 2," in result.infos[0].infotext()
    assert result.images[0].info["clip_skip"] == "1"
    assert "Clip skip" not in tiny_pipeline("a cat", num_inference_steps=1, seed=1).infos[0].infotext()
    with pytest.raises(InvalidInputError, match=r"clip_skip must be an integer in \[0, 1\]"):
        tiny_pipeline("a cat", clip_skip=2, num_inference_steps=1)
