"""Driving diffusers as an oracle with sdengine's noise: patches of its noise and posterior sources."""

from __future__ import annotations

import contextlib
import importlib

import numpy as np


def pixels(result) -> np.ndarray:
    """A pipeline result's images as one int16 array [N, H, W, 3], ready for pixel differences."""
    return np.stack([np.asarray(im) for im in result.images]).astype(np.int16)


def diffusers_pipeline(cls_name: str, folder):
    """One of diffusers' Stable Diffusion pipelines on a folder, without the safety checker or progress bars."""
    import diffusers

    pipe = getattr(diffusers, cls_name).from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def rel_l2(a, b, label: str = "") -> float:
    """Relative L2 distance of two torch tensors, printed so that `pytest -s` reports each parity figure."""
    value = float((a - b).norm() / b.norm())
    print(f"\nparity {label}: relative L2 {value:.3e}")
    return value


def vae_distances(ours, ref, z, image, label: str) -> list[float]:
    """Relative L2 of sdengine's VAE against diffusers' `ref`: decoder at `z`, encoder mean and log-variance at
    `image` (each printed as a parity line)."""
    import torch

    with torch.no_grad():
        dist = ref.encode(image).latent_dist
        mean, logvar = ours.encode(image)
        return [rel_l2(ours.decode(z), ref.decode(z).sample, f"{label} VAE decoder"),
                rel_l2(mean, dist.mean, f"{label} VAE encoder mean"),
                rel_l2(logvar, dist.logvar, f"{label} VAE encoder logvar")]


def perturbed(module, seed: int):
    """Random weights everywhere, including diffusers' zero-initialised output projections; eval mode."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    return module.eval()


@contextlib.contextmanager
def fed_noise(scheduler, noise: np.ndarray | None):
    """diffusers' scheduler draws row i's noise from `noise[i]` (i = the step call), as sdengine does."""
    import torch

    module = importlib.import_module(type(scheduler).__module__)
    calls = {"row": -1}
    original_step, original_randn = scheduler.step, getattr(module, "randn_tensor", None)

    def step(*args, **kwargs):
        calls["row"] += 1
        return original_step(*args, **kwargs)

    def randn(shape, *args, **kwargs):
        row = noise[calls["row"]]
        assert tuple(shape) == row.shape, (shape, row.shape)
        return torch.from_numpy(row.copy())

    scheduler.step = step
    if original_randn is not None and noise is not None:
        module.randn_tensor = randn
    try:
        yield calls
    finally:
        del scheduler.step
        if original_randn is not None:
            module.randn_tensor = original_randn


@contextlib.contextmanager
def fed_start(pipeline, unit: np.ndarray):
    """The pipeline's initial noise is `unit`, and the VAE encodes to its posterior's mean (sdengine's default)."""
    import torch

    module = importlib.import_module(type(pipeline).__module__)
    originals = {name: getattr(module, name) for name in ("randn_tensor", "retrieve_latents") if hasattr(module, name)}

    def randn(shape, *args, **kwargs):
        assert tuple(shape) == unit.shape, (shape, unit.shape)
        return torch.from_numpy(unit.copy())

    module.randn_tensor = randn
    module.retrieve_latents = lambda output, generator=None, sample_mode="sample": output.latent_dist.mode()
    try:
        yield
    finally:
        for name, value in originals.items():
            setattr(module, name, value)
