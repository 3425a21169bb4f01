"""What image to image costs against text to image (issue 13's fourth proof), one process, calls interleaved.

    python benchmarks/img2img_cost.py [--model PATH] [--backend torch|onnxruntime] [--steps 20] [--runs 15] [--threads 2]

Per run: a text-to-image call, one at half the steps, an image-to-image call at strength 0.5 (half the rows) and one VAE encode of
the same image, each timed on its own; the medians are printed with the ratio
img2img / (txt2img / 2 + encode), which is 1 when image to image costs half a text-to-image call plus one
encode (above 1 by the text encoder and VAE decoder, which run once in both), and the ratio
img2img / (txt2img at half the steps + encode), which is 1 when the only differences are the rows skipped
and the encode.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="a model (torch) or an export folder (onnxruntime); default: the demo")
    p.add_argument("--backend", default="torch")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--runs", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    import sdengine
    from sdengine.images import prepare

    pipe = sdengine.load_pipeline(args.model, backend=args.backend, threads=args.threads)
    size = pipe.config.default_size
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    pixels = prepare(image, None, pipe.config.vae.downscale, None, None).pixels
    kwargs = dict(num_inference_steps=args.steps, seed=1)
    half = dict(kwargs, num_inference_steps=args.steps // 2)
    calls = {"txt2img": lambda: pipe("a red circle on a white background", **kwargs),
             "txt2img_half_steps": lambda: pipe("a red circle on a white background", **half),
             "img2img_0.5": lambda: pipe("a red circle on a white background", image=image, strength=0.5, **kwargs),
             "vae_encode": lambda: pipe.backend.encode_image(pixels)}
    for call in calls.values():
        call()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(args.runs):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(v) for name, v in times.items()}
    ratio = med["img2img_0.5"] / (med["txt2img"] / 2 + med["vae_encode"])
    exact = med["img2img_0.5"] / (med["txt2img_half_steps"] + med["vae_encode"])
    print(json.dumps({"model": args.model or "embedded demo model", "backend": args.backend, "steps": args.steps, "runs": args.runs,
                      "threads": args.threads, "median_s": {k: round(v, 4) for k, v in med.items()},
                      "img2img_over_half_txt2img_plus_encode": round(ratio, 3),
                      "img2img_over_txt2img_half_steps_plus_encode": round(exact, 3)}))


if __name__ == "__main__":
    main()
