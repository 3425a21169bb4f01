"""Step caching on the embedded demo model (one layer per block: DeepCache's branch numbering assumes two)
against the deepcache package's DeepCacheSDHelper on diffusers' pipeline: every branch, interval 3, 10 DDIM steps,
guidance 7.5, the same latents. Prints the largest float difference ([0, 1] units) to the helper's image and
how far caching moves the image.

    python benchmarks/step_cache_parity_demo.py
"""

from __future__ import annotations

import DeepCache
import diffusers
import numpy as np
import torch

import sdengine
from sdengine.demo import embedded_model_path

PROMPT, STEPS, INTERVAL = "a red circle on a white background", 10, 3


def main() -> None:
    ref = diffusers.StableDiffusionPipeline.from_pretrained(str(embedded_model_path()), safety_checker=None,
                                                            requires_safety_checker=False, torch_dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = diffusers.DDIMScheduler.from_config(ref.scheduler.config)
    pipe = sdengine.load_pipeline()
    latents = np.random.default_rng(3).standard_normal((1, 4, 16, 16)).astype(np.float32)
    plain = ref(PROMPT, num_inference_steps=STEPS, latents=torch.from_numpy(latents), output_type="np").images
    for branch in range(9):
        helper = DeepCache.DeepCacheSDHelper(pipe=ref)
        helper.set_params(cache_interval=INTERVAL, cache_branch_id=branch)
        helper.enable()
        expected = ref(PROMPT, num_inference_steps=STEPS, latents=torch.from_numpy(latents), output_type="np").images
        helper.disable()
        got = pipe(PROMPT, num_inference_steps=STEPS, latents=latents, cache_interval=INTERVAL, cache_branch=branch,
                   output_type="np").images
        print(f"demo branch {branch}: ours vs DeepCacheSDHelper {np.abs(got - expected).max():.1e}, "
              f"caching moves the image by {np.abs(expected - plain).max():.1e}", flush=True)


if __name__ == "__main__":
    main()
