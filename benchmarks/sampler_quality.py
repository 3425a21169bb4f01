"""Quality against steps for every sampler (issue 12's third proof), in two parts:

    python benchmarks/sampler_quality.py ode --json ode.json          # SD 1.5-shaped random U-Net, ~1 h on 2 cores
    python benchmarks/sampler_quality.py ode --cache ode-cache --threads 1 --samplers ddim --steps 999 &  # or split:
    python benchmarks/sampler_quality.py ode --cache ode-cache --threads 1 --skip-reference                # 2 processes,
    python benchmarks/sampler_quality.py ode --cache ode-cache --json ode.json                            # then the table
    python benchmarks/sampler_quality.py ode --model demo --seeds 8 --json ode-demo.json   # the embedded model
    python benchmarks/sampler_quality.py checker --json checker.json  # the embedded demo model, ~17 min

`ode`: an SD 1.5-shaped U-Net with random weights (seed 0) still defines the sampling ODE; from one
initial noise, each deterministic sampler runs at 5, 10, 15, 20, 30 and 50 steps, and the distance of
its final latent from a 999-step DDIM reference (1000 would reach t = 1000 with SD 1.5's leading spacing and offset 1) is reported (relative L2). Guidance 7.5 over random
unconditional and conditional contexts; a 16x16 latent (128 px) keeps the 1000-step reference near
half an hour on 2 cores. The torch reference step (U-Net + guidance + the table's update) runs every row.
A sampler given as `NAME@SPACING` (e.g. `ddim@trailing`) overrides the model's timestep spacing.
`--model demo`: the same on the embedded model's trained U-Net at 64 px, `--seeds N` samples in one batch,
each its own initial noise and prompt (N of the 54, drawn with seed 0) against the empty prompt; the mean,
median and largest relative L2 over the samples are reported.

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
from pathlib import Path

import numpy as np

ODE_SAMPLERS = ("ddim", "euler", "euler_karras", "heun", "dpmpp_2m", "dpmpp_2m_karras", "unipc", "pndm")
CHECKER_SAMPLERS = ("ddim", "euler_a", "dpmpp_2m_karras", "unipc")


def run_table(step, schedule, init, context, guidance, torch, checkpoint: Path | None = None, every: int = 20):
    """Every row of `schedule` from the unit noise `init` through the torch step; the final latent.

    With `checkpoint`, the state is saved there every `every` rows and a run resumes from it (the rows are
    deterministic, so a resumed run ends where an uninterrupted one would)."""
    state = torch.zeros((schedule.slots, *init.shape))
    state[0] = torch.from_numpy(init) * schedule.init_scale
    first = 0
    if checkpoint is not None and checkpoint.exists():
        saved = np.load(checkpoint)
        first, state = int(saved["row"]), torch.from_numpy(saved["state"])
        print(json.dumps({"resumed": checkpoint.name, "row": first, "of": schedule.num_rows}), flush=True)
    rows = torch.from_numpy(schedule.coefficients)
    scale = torch.tensor(guidance)
    with torch.inference_mode():
        for i in range(first, schedule.num_rows):
            state = step(state, torch.tensor([float(schedule.timesteps[i])]), context, scale, rows[i])
            if checkpoint is not None and (i + 1) % every == 0 and i + 1 < schedule.num_rows:
                tmp = checkpoint.with_name(checkpoint.name + ".tmp.npz")
                np.savez(tmp, row=i + 1, state=state.numpy())
                tmp.replace(checkpoint)
    return state[0].numpy()


def schedule_for(scheduler_config, name: str, steps: int):
    """`name`'s table; `NAME@SPACING` (e.g. `ddim@trailing`) overrides the model's timestep spacing."""
    import dataclasses

    from sdengine.samplers import build_schedule

    name, _, spacing = name.partition("@")
    if spacing:
        scheduler_config = dataclasses.replace(scheduler_config, timestep_spacing=spacing)
    return build_schedule(scheduler_config, name, steps)


def ode(args: argparse.Namespace) -> dict:
    import torch

    from sdengine.config import ModelConfig
    from sdengine.models.step import DenoiseStep
    from sdengine.models.unet import UNet
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    if args.model == "demo":  # the trained embedded model, on a real prompt (unconditional row first)
        import sdengine

        pipe = sdengine.load_pipeline(threads=args.threads)
        cfg, step = pipe.config, pipe.backend.step
        from sdengine.demo.shapes import BACKGROUNDS, COLOURS, SHAPES

        cases = list(product(COLOURS, SHAPES, BACKGROUNDS))
        picked = [cases[i] for i in rng.permutation(len(cases))[: args.seeds]]
        prompts = [f"a {c} {s} on a {b} background" for c, s, b in picked]
        context = pipe.backend.encode_text(pipe.tokenizer([""] * len(prompts) + prompts)).float()
        side = (args.size or cfg.default_size) // cfg.vae.downscale
    else:
        cfg = ModelConfig.sd15()
        step = DenoiseStep(UNet(cfg.unet).eval())
        side = (args.size or 128) // cfg.vae.downscale
        context = None
    # one initial noise (and, for demo, one prompt) per sample; the batch runs them together
    init = rng.standard_normal((args.seeds, cfg.unet.out_channels, side, side), dtype=np.float32)
    if context is None:
        context = torch.from_numpy(rng.standard_normal((2 * args.seeds, 77, 768), dtype=np.float32))

    def final(name: str, steps: int) -> np.ndarray:
        """The final latent, from --cache when an earlier run (or a parallel one) saved it."""
        path = Path(args.cache) / f"{name}-{steps}.npy" if args.cache else None
        if path is not None and path.exists():
            return np.load(path)
        partial = None if path is None else path.with_name(f"{name}-{steps}.partial.npz")
        got = run_table(step, schedule_for(cfg.scheduler, name, steps), init, context, args.guidance, torch, partial)
        if path is not None:
            np.save(path.with_suffix(".tmp.npy"), got)
            path.with_suffix(".tmp.npy").replace(path)
            partial.unlink(missing_ok=True)
        return got

    start = time.perf_counter()
    ref = None if args.skip_reference else final("ddim", args.reference_steps)
    out = {"reference": {"sampler": "ddim", "steps": args.reference_steps,
                         "seconds": round(time.perf_counter() - start, 1)}, "rel_l2": {}}
    print(json.dumps(out["reference"]), flush=True)
    for name in args.samplers:
        out["rel_l2"][name] = {}
        for steps in args.steps:
            got = final(name, steps)
            if ref is None:  # --skip-reference: the latents only go to --cache
                print(json.dumps({"sampler": name, "steps": steps, "cached": True}), flush=True)
                continue
            rels = [float(np.linalg.norm(g - f) / np.linalg.norm(f)) for g, f in zip(got, ref)]
            out["rel_l2"][name][steps] = {"mean": float(np.mean(rels)), "median": float(np.median(rels)),
                                          "max": max(rels), "each": rels}
            print(json.dumps({"sampler": name, "steps": steps, "rel_l2_mean": np.mean(rels),
                              "rel_l2_median": np.median(rels), "max": max(rels)}), flush=True)
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
    o.add_argument("--model", choices=("sd15", "demo"), default="sd15",
                   help="sd15: SD 1.5-shaped random weights (seed 0); demo: the embedded model (trained)")
    o.add_argument("--size", type=int, default=None, help="image side (default 128 for sd15, 64 for demo)")
    o.add_argument("--seeds", type=int, default=1, help="samples (initial noises; demo: prompts too), as one batch")
    o.add_argument("--guidance", type=float, default=7.5)
    o.add_argument("--cache", help="folder for each run's final latent (NAME-STEPS.npy): reused when present, so "
                                   "runs can be split over processes (e.g. one with --samplers ddim --steps 999 for "
                                   "the reference) and a last run reads them all")
    o.add_argument("--skip-reference", action="store_true", help="only compute (and cache) the samplers' latents")
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
