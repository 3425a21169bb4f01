"""Train the embedded demo model on the captioned-shapes data: the VAE first, then the U-Net.

The recipe of latent diffusion (Rombach et al. 2022) scaled down to run on 2 CPU cores:
1. the KL autoencoder: L1 + MSE reconstruction with a small KL term (sec. 3.1);
2. the scaling factor: 1 / std of the training latents (sec. 4.3.2 and app. G);
3. the U-Net and the text encoder together: MSE on the noise over the 1000-step scaled-linear
   schedule (Ho et al. 2020, eq. 14), 10% of captions dropped for classifier-free guidance
   (Ho & Salimans 2022), with an exponential moving average of the weights.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..config import ModelConfig, TextEncoderConfig, UNetConfig, VAEConfig
from ..models.saving import save_diffusers_folder
from ..models.text_encoder import TextEncoder
from ..models.unet import UNet
from ..models.vae import AutoencoderKL
from ..schedulers import alphas_cumprod
from ..tokenizer import ClipTokenizer
from . import shapes


def demo_config(scaling_factor: float = 1.0) -> ModelConfig:
    """The demo model: 64x64 images, a factor-4 VAE (16x16x4 latents), a small cross-attention U-Net."""
    return ModelConfig(
        unet=UNetConfig(block_out_channels=(32, 64, 128), attention=(False, True, True), num_heads=(1, 2, 4),
                        layers_per_block=1, cross_attention_dim=32, norm_num_groups=8, sample_size=16),
        vae=VAEConfig(block_out_channels=(16, 32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=8,
                      scaling_factor=scaling_factor, sample_size=64),
        text_encoder=TextEncoderConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, projection_dim=32),
    )


@dataclass(frozen=True)
class Recipe:
    """Every number that decides the trained weights."""

    seed: int = 0
    num_samples: int = 20000
    vae_steps: int = 2500
    vae_batch: int = 16
    vae_lr: float = 2e-3
    kl_weight: float = 1e-6
    unet_steps: int = 4500
    unet_batch: int = 64
    unet_lr: float = 1e-3
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    threads: int = 2


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [N,H,W,3] -> float [N,3,H,W] in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def _lr(step: int, total: int, peak: float, warmup: int = 100) -> float:
    """Linear warm-up then cosine decay to 5% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


class Log:
    """Loss lines to a JSON-lines file and a tqdm bar."""

    def __init__(self, path: Path, total: int, desc: str) -> None:
        from tqdm import tqdm

        self.file = path.open("a", encoding="utf-8")
        self.bar = tqdm(total=total, desc=desc, unit="step", mininterval=5)
        self.desc, self.start, self.recent = desc, time.time(), []

    def step(self, i: int, loss: float, every: int = 50) -> None:
        self.recent.append(loss)
        self.bar.update(1)
        if (i + 1) % every == 0:
            mean = float(np.mean(self.recent))
            self.recent = []
            self.bar.set_postfix(loss=f"{mean:.4f}")
            self.file.write(json.dumps({"phase": self.desc, "step": i + 1, "loss": mean,
                                        "seconds": round(time.time() - self.start, 1)}) + "\n")
            self.file.flush()

    def close(self) -> None:
        self.bar.close()
        self.file.close()


def train_vae(vae: AutoencoderKL, images: np.ndarray, r: Recipe, log_path: Path) -> None:
    """Reconstruction (L1 + MSE) plus kl_weight * KL(q(z|x) || N(0, I))."""
    gen = torch.Generator().manual_seed(r.seed + 1)
    opt = torch.optim.AdamW(vae.parameters(), lr=r.vae_lr, weight_decay=0.0)
    log = Log(log_path, r.vae_steps, "vae")
    vae.train()
    for step in range(r.vae_steps):
        idx = torch.randint(0, len(images), (r.vae_batch,), generator=gen)
        x = _to_tensor(images[idx.numpy()])
        mean, logvar = vae.encode(x)
        z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=gen)
        recon = vae.decode(z)
        kl = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3)).mean()
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + r.kl_weight * kl
        for group in opt.param_groups:
            group["lr"] = _lr(step, r.vae_steps, r.vae_lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        log.step(step, loss.item())
    log.close()
    vae.eval()


@torch.no_grad()
def encode_all(vae: AutoencoderKL, images: np.ndarray, chunk: int = 256) -> torch.Tensor:
    """Latent means of every training image (unscaled)."""
    return torch.cat([vae.encode(_to_tensor(images[i:i + chunk]))[0] for i in range(0, len(images), chunk)])


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1 - decay)


def train_unet(unet: UNet, text: TextEncoder, latents: torch.Tensor, ids: torch.Tensor, empty_ids: torch.Tensor,
               cfg: ModelConfig, r: Recipe, log_path: Path) -> tuple[UNet, TextEncoder]:
    """eps-prediction MSE at uniform t over the training schedule; returns the EMA copies."""
    gen = torch.Generator().manual_seed(r.seed + 2)
    abar = torch.from_numpy(alphas_cumprod(cfg.scheduler)).float()
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=r.unet_lr, weight_decay=0.01)
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text).eval()
    log = Log(log_path, r.unet_steps, "unet")
    unet.train(), text.train()
    for step in range(r.unet_steps):
        idx = torch.randint(0, len(latents), (r.unet_batch,), generator=gen)
        x0 = latents[idx]
        batch_ids = ids[idx].clone()
        drop = torch.rand(r.unet_batch, generator=gen) < r.caption_dropout
        batch_ids[drop] = empty_ids
        t = torch.randint(0, cfg.scheduler.num_train_timesteps, (r.unet_batch,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = abar[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise  # q(x_t | x_0), Ho et al. 2020 eq. 4
        loss = F.mse_loss(unet(xt, t, text(batch_ids)), noise)
        for group in opt.param_groups:
            group["lr"] = _lr(step, r.unet_steps, r.unet_lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(r.ema_decay, (1 + step) / (10 + step))
        _ema_update(ema_unet, unet, decay)
        _ema_update(ema_text, text, decay)
        log.step(step, loss.item())
    log.close()
    return ema_unet, ema_text


def train(out: str | Path, recipe: Recipe = Recipe(), overwrite: bool = False) -> Path:
    """The whole recipe: data, VAE, scaling factor, U-Net; writes a diffusers folder (fp16) to `out`."""
    out = Path(out)
    torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)
    log_path = out.parent / f"{out.name}.train-log.jsonl"
    log_path.unlink(missing_ok=True)
    started = time.time()
    data = shapes.batch(recipe.seed, 0, recipe.num_samples)
    images = np.stack([s.image for s in data])
    cfg = demo_config()
    vae = AutoencoderKL(cfg.vae)
    with torch.no_grad():  # start nearly deterministic: log-variance bias -6
        vae.quant_conv.bias[cfg.vae.latent_channels:].fill_(-6.0)
    train_vae(vae, images, recipe, log_path)
    latents = encode_all(vae, images)
    cfg = dataclasses.replace(cfg, vae=dataclasses.replace(cfg.vae, scaling_factor=float(1 / latents.std())))
    tokenizer = ClipTokenizer.default()
    ids = torch.from_numpy(tokenizer([s.caption for s in data]))
    empty = torch.from_numpy(tokenizer("")[0])
    unet, text = UNet(cfg.unet), TextEncoder(cfg.text_encoder)
    ema_unet, ema_text = train_unet(unet, text, latents * cfg.vae.scaling_factor, ids, empty, cfg, recipe, log_path)
    with log_path.open("a", encoding="utf-8") as f:
        f.write(json.dumps({"phase": "done", "seconds": round(time.time() - started, 1),
                            "scaling_factor": cfg.vae.scaling_factor, "recipe": dataclasses.asdict(recipe)}) + "\n")
    return save_diffusers_folder(out, cfg, ema_unet, vae, ema_text, dtype=torch.float16, overwrite=overwrite)
