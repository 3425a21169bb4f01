"""Train the shipped LoRA: it teaches the embedded demo model a shape it never saw ("star").

LoRA (Hu et al. 2021): every targeted weight W stays frozen and learns a low-rank update, the layer computing
W x + alpha/rank * up(down(x)); `up` starts at zero, so training starts from the base model exactly. Here
(plain torch, forward hooks on the base modules, no PEFT):
- the text encoder's attention and MLP linears (the word "star" has a token id in the real CLIP vocabulary,
  but the demo's text encoder never saw it, so it must learn to encode it);
- the U-Net's transformer linears (self- and cross-attention, feed-forward), proj_in / proj_out, and the 3x3
  convolutions of the mid and up blocks' resnets (LoCon; the shape's outline is drawn at full latent
  resolution, where the U-Net has no attention).
Loss: the base recipe's eps-prediction MSE at uniform t (sdengine/demo/train.py), on latents of captioned
star pictures mixed with base-shape pictures (the mix keeps the base concepts), 10% of captions dropped for
classifier-free guidance. The file is written in kohya's layout (`lora_unet_*`, `lora_te_*`, fp16), which
`sdengine.lora` reads like any other LoRA.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InvalidInputError
from ..files import write_bytes_atomic
from ..models.loading import load_components
from ..schedulers import alphas_cumprod
from . import EMBEDDED_MODEL, shapes
from .train import Log, _lr, _to_tensor


@dataclass(frozen=True)
class LoraRecipe:
    """Every number that decides the trained LoRA."""

    seed: int = 0
    concept: str = "star"
    concept_samples: int = 2000  # pictures of the new shape (data seed 1000 + seed)
    base_samples: int = 2000  # pictures of the base shapes (data seed 2000 + seed; the base model used 0)
    concept_fraction: float = 0.5  # share of each batch drawn from the concept pictures
    steps: int = 600
    batch: int = 24
    lr: float = 2e-3
    warmup: int = 50
    rank: int = 8
    alpha: float = 8.0
    caption_dropout: float = 0.1
    threads: int = 1  # one thread: on a shared 2-core machine faster than two spinning ones


def _targets(module: torch.nn.Module, component: str) -> list[tuple[str, torch.nn.Module]]:
    """(module name, module) that the LoRA trains in `component` ("unet" or "text_encoder")."""
    chosen = []
    for name, m in module.named_modules():
        if component == "text_encoder":
            keep = isinstance(m, torch.nn.Linear) and (".self_attn." in name or ".mlp." in name)
        elif isinstance(m, torch.nn.Linear):
            keep = ".transformer_blocks." in name
        elif isinstance(m, torch.nn.Conv2d):
            keep = name.endswith(("proj_in", "proj_out")) or (
                name.startswith(("mid_block.resnets.", "up_blocks.")) and name.endswith(("conv1", "conv2")))
        else:
            keep = False
        if keep:
            chosen.append((name, m))
    return chosen


class LoraLayer(torch.nn.Module):
    """The low-rank branch of one Linear or Conv2d: down (same kernel, stride and padding) then a 1x1 up."""

    def __init__(self, base: torch.nn.Module, rank: int, alpha: float, generator: torch.Generator) -> None:
        super().__init__()
        w = base.weight
        self.scale = alpha / rank
        self.conv = isinstance(base, torch.nn.Conv2d)
        self.stride, self.padding = (base.stride, base.padding) if self.conv else (1, 0)
        fan_in = w[0].numel()  # `down` starts N(0, 1/fan_in), `up` at zero: the base model exactly
        self.down = torch.nn.Parameter(torch.randn((rank, *w.shape[1:]), generator=generator) / fan_in**0.5)
        self.up = torch.nn.Parameter(torch.zeros((w.shape[0], rank, 1, 1) if self.conv else (w.shape[0], rank)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv:
            h = F.conv2d(x, self.down, stride=self.stride, padding=self.padding)
            return self.scale * F.conv2d(h, self.up)
        return self.scale * F.linear(F.linear(x, self.down), self.up)

    def hook(self, module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        return output + self.forward(inputs[0])


def attach(model: torch.nn.Module, component: str, r: LoraRecipe,
           generator: torch.Generator) -> dict[str, LoraLayer]:
    """LoRA branches on `model`'s targets, as forward hooks; {kohya key: layer}."""
    prefix = {"unet": "lora_unet_", "text_encoder": "lora_te_"}[component]
    layers = {}
    for name, m in _targets(model, component):
        layer = LoraLayer(m, r.rank, r.alpha, generator)
        m.register_forward_hook(layer.hook)
        layers[prefix + name.replace(".", "_")] = layer
    return layers


def concept_data(r: LoraRecipe) -> tuple[list[shapes.Sample], list[shapes.Sample]]:
    """(concept pictures, base-shape pictures), each from its own data seed."""
    if r.concept not in shapes.EXTRA_SHAPES:
        raise InvalidInputError(f"unknown LoRA concept {r.concept!r}; choose one of {shapes.EXTRA_SHAPES}")
    return (shapes.batch(1000 + r.seed, 0, r.concept_samples, (r.concept,)),
            shapes.batch(2000 + r.seed, 0, r.base_samples))


def save_lora(layers: dict[str, LoraLayer], out: Path, metadata: dict[str, str]) -> Path:
    """kohya layout, fp16, written to a temporary name and renamed."""
    from safetensors.torch import save

    tensors = {}
    for key, layer in layers.items():
        tensors[f"{key}.lora_down.weight"] = layer.down.detach().to(torch.float16).contiguous()
        tensors[f"{key}.lora_up.weight"] = layer.up.detach().to(torch.float16).contiguous()
        tensors[f"{key}.alpha"] = torch.tensor(layer.scale * layer.down.shape[0], dtype=torch.float16)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(out, save(tensors, metadata=metadata))
    return out


def train_lora(out: str | Path, recipe: LoraRecipe = LoraRecipe(), model: str | Path = EMBEDDED_MODEL,
               overwrite: bool = False, log_path: str | Path | None = None) -> Path:
    """Train the LoRA on the demo model at `model`; writes `out` (.safetensors) and a loss log beside it."""
    out = Path(out)
    if out.suffix.lower() != ".safetensors":
        raise InvalidInputError(f"{out} must end in .safetensors (the LoRA is written as safetensors)")
    if out.exists() and not overwrite:
        raise InvalidInputError(f"{out} exists; pass --force to replace it")
    threads = torch.get_num_threads()
    torch.set_num_threads(recipe.threads)  # process-wide: restored when done
    try:
        return _train(out, recipe, Path(model), log_path)
    finally:
        torch.set_num_threads(threads)


def _train(out: Path, recipe: LoraRecipe, model: Path, log_path: str | Path | None) -> Path:
    torch.manual_seed(recipe.seed)
    log_path = Path(log_path) if log_path else out.with_name(f"{out.stem}.train-log.jsonl")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.unlink(missing_ok=True)
    started = time.time()
    parts = load_components(model)
    cfg, unet, text, vae, tokenizer = parts.config, parts.unet, parts.text_encoder, parts.vae, parts.tokenizer
    for m in (unet, text, vae):
        m.eval().requires_grad_(False)
    concept, base = concept_data(recipe)
    with torch.no_grad():
        latents = [torch.cat([vae.encode(_to_tensor(np.stack([s.image for s in group[i:i + 256]])))[0]
                              for i in range(0, len(group), 256)]) * cfg.vae.scaling_factor
                   for group in (concept, base)]
    ids = [torch.from_numpy(tokenizer([s.caption for s in group])) for group in (concept, base)]
    empty = torch.from_numpy(tokenizer("")[0])
    prepared = time.time() - started

    gen = torch.Generator().manual_seed(recipe.seed)
    layers = {**attach(text, "text_encoder", recipe, gen), **attach(unet, "unet", recipe, gen)}
    params = [p for layer in layers.values() for p in layer.parameters()]
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
    abar = torch.from_numpy(alphas_cumprod(cfg.scheduler)).float()
    n_concept = round(recipe.batch * recipe.concept_fraction)
    log = Log(log_path, recipe.steps, "lora")
    step_start, cpu_start = time.time(), time.process_time()
    for step in range(recipe.steps):
        picks = [torch.randint(0, len(latents[g]), (n,), generator=gen)
                 for g, n in ((0, n_concept), (1, recipe.batch - n_concept))]
        x0 = torch.cat([latents[g][p] for g, p in enumerate(picks)])
        batch_ids = torch.cat([ids[g][p] for g, p in enumerate(picks)])
        batch_ids[torch.rand(recipe.batch, generator=gen) < recipe.caption_dropout] = empty
        t = torch.randint(0, cfg.scheduler.num_train_timesteps, (recipe.batch,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = abar[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        loss = F.mse_loss(unet(xt, t, text(batch_ids)), noise)
        for group in opt.param_groups:
            group["lr"] = _lr(step, recipe.steps, recipe.lr, warmup=recipe.warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        log.step(step, loss.item(), every=max(1, min(50, recipe.steps)))
    log.close()
    trained, cpu = time.time() - step_start, time.process_time() - cpu_start
    summary = {"phase": "done", "seconds": round(time.time() - started, 1), "data_seconds": round(prepared, 1),
               "seconds_per_step": round(trained / max(1, recipe.steps), 3),
               "cpu_seconds_per_step": round(cpu / max(1, recipe.steps), 3), "threads": recipe.threads,
               "modules": len(layers), "parameters": sum(p.numel() for p in params),
               "recipe": dataclasses.asdict(recipe)}
    with log_path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(summary) + "\n")
    metadata = {"sdengine_lora_recipe": json.dumps(dataclasses.asdict(recipe)), "sdengine_concept": recipe.concept,
                "sdengine_base_model": "sdengine-demo"}
    return save_lora(layers, out, metadata)
