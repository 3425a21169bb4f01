"""Step caching on the embedded demo model (one layer per block: DeepCache's branch numbering assumes two)
against the deepcache package's DeepCacheSDHelper on diffusers' pipeline: every branch, interval 3, 10 DDIM steps,
guidance 7.5, the same latents. Prints the largest float difference ([0, 1] units) to the helper's image and
how far caching moves the image.

    python benchmarks/step_cache_parity_demo.py
"""
import numpy as np, torch, diffusers, DeepCache, sdengine, sys
from sdengine.demo import embedded_model_path
d = str(embedded_model_path())
ref = diffusers.StableDiffusionPipeline.from_pretrained(d, safety_checker=None, requires_safety_checker=False, torch_dtype=torch.float32); ref.set_progress_bar_config(disable=True)
ref.scheduler = diffusers.DDIMScheduler.from_config(ref.scheduler.config)
pipe = sdengine.load_pipeline()
lat = np.random.default_rng(3).standard_normal((1, 4, 16, 16)).astype(np.float32)
p = "a red circle on a white background"
plain = ref(p, num_inference_steps=10, latents=torch.from_numpy(lat), output_type="np").images
for branch in range(9):
    h = DeepCache.DeepCacheSDHelper(pipe=ref); h.set_params(cache_interval=3, cache_branch_id=branch); h.enable()
    exp = ref(p, num_inference_steps=10, latents=torch.from_numpy(lat), output_type="np").images
    h.disable()
    got = pipe(p, num_inference_steps=10, latents=lat, cache_interval=3, cache_branch=branch, output_type="np").images
    print("demo branch", branch, "ours-vs-helper %.1e" % np.abs(got - exp).max(), "effect %.1e" % np.abs(exp - plain).max(), flush=True)
