"""Quality against steps for every sampler (issue 12's third proof), in two parts:

    python benchmarks/sampler_quality.py ode --json ode.json          # SD 1.5-shaped random U-Net, ~1 h on 2 cores
    python benchmarks/sampler_quality.py checker --json checker.json  # the embedded demo model, ~5 min

`ode`: an SD 1.5-shaped U-Net with random weights (seed 0) still defines the sampling ODE; from one
initial noise, each deterministic sampler runs at 5, 10, 15, 20, 30 and 50 steps, and the distance of
its final latent from a 999-step DDIM reference (1000 would reach t = 1000 with SD 1.5's leading spacing and offset 1) is reported (relative L2). Guidance 7.5 over random
unconditional and conditional contexts; a 16x16 latent (128 px) keeps the 1000-step reference near
half an hour on 2 cores. The torch reference step (U-Net + guidance + the table's update) runs every row.

`checker`: the demo model's 54 colour x shape x background prompts (seeds never used in training, as
tests/test_demo.py), guidance 5, for each sampler and step count; sdengine.demo.checker reads every image
and the share with the asked colour, shape and background all right is reported.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from itertools import product

import numpy as np

ODE_SAMPLERS = ("ddim", "euler", "euler_karras", "heun", "dpmpp_2m", "dpmpp_2m_karras", "unipc", "pndm")
CHECKER_SAMPLERS = ("ddim", "euler_a", "dpmpp_2m_karras", "unipc")


def run_table(step, schedule, init, context, guidance, torch):
    """Every row of `schedule` from the unit noise `init` through the torch step; the final latent."""
    state = torch.zeros((schedule.slots, *init.shape))
    state[0] = torch.from_numpy(init) * schedule.init_scale
    rows = torch.from_numpy(schedule.coefficients)
    scale = torch.tensor(guidance)
    with torch.inference_mode():
        for i in range(schedule.num_rows):
            state = step(state, torch.tensor([float(schedule.timesteps[i])]), context, scale, rows[i])
    return state[0].numpy()


def ode(args: argparse.Namespace) -> dict:
    import torch

    from sdengine.config import ModelConfig
    from sdengine.models.step import DenoiseStep
    from sdengine.models.unet import UNet
    from sdengine.samplers import build_schedule

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = ModelConfig.sd15()
    step = DenoiseStep(UNet(cfg.unet).eval())
    rng = np.random.default_rng(0)
    side = args.size // cfg.vae.downscale
    init = rng.standard_normal((1, 4, side, side), dtype=np.float32)
    context = torch.from_numpy(rng.standard_normal((2, 77, 768), dtype=np.float32))

    def final(name: str, steps: int) -> np.ndarray:
        return run_table(step, build_schedule(cfg.scheduler, name, steps), init, context, args.guidance, torch)

    start = time.perf_counter()
    ref = final("ddim", args.reference_steps)
    out = {"reference": {"sampler": "ddim", "steps": args.reference_steps,
                         "seconds": round(time.perf_counter() - start, 1)}, "rel_l2": {}}
    print(json.dumps(out["reference"]), flush=True)
    for name in args.samplers:
        out["rel_l2"][name] = {}
        for steps in args.steps:
            got = final(name, steps)
            rel = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
            out["rel_l2"][name][steps] = rel
            print(json.dumps({"sampler": name, "steps": steps, "rel_l2": rel}), flush=True)
    return out


def checker(args: argparse.Namespace) -> dict:
    import torch

    import sdengine
    from sdengine.demo import checker as check
    from sdengine.demo.shapes import BACKGROUNDS, COLOURS, SHAPES

    torch.set_num_threads(args.threads)
    pipe = sdengine.load_pipeline()
    cases = list(product(COLOURS, SHAPES, BACKGROUNDS))
    out: dict = {"prompts": len(cases), "accuracy": {}}
    for name, steps in product(args.samplers, args.steps):
        right = 0
        for i, (colour, shape, background) in enumerate(cases):
            image = pipe(f"a {colour} {shape} on a {background} background", num_inference_steps=steps,
                         guidance_scale=5.0, seed=100_000 + i, scheduler=name).images[0]
            v = check.check(image)
            right += (v.colour, v.shape, v.background) == (colour, shape, background)
        out["accuracy"].setdefault(name, {})[steps] = right / len(cases)
        print(json.dumps({"sampler": name, "steps": steps, "all_three_right": right, "of": len(cases)}), flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="part", required=True)
    o = sub.add_parser("ode")
    o.add_argument("--samplers", nargs="+", default=list(ODE_SAMPLERS))
    o.add_argument("--steps", type=int, nargs="+", default=[5, 10, 15, 20, 30, 50])
    o.add_argument("--reference-steps", type=int, default=999)  # leading spacing + offset 1: 1000 would reach t=1000
    o.add_argument("--size", type=int, default=128)
    o.add_argument("--guidance", type=float, default=7.5)
    c = sub.add_parser("checker")
    c.add_argument("--samplers", nargs="+", default=list(CHECKER_SAMPLERS))
    c.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20, 50])
    for q in (o, c):
        q.add_argument("--threads", type=int, default=2)
        q.add_argument("--json", help="write the results here too")
    args = p.parse_args()
    result = {"part": args.part, "argv": sys.argv[1:], **(ode(args) if args.part == "ode" else checker(args))}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
