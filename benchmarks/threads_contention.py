"""CPU threads against contention: the demo model's 20 steps and one SD 1.5-shaped U-Net call, at 1 and 2
threads, on a quiet machine and beside busy processes (`while True: pass`, started by this script).

    python benchmarks/threads_contention.py [--busy 0 1] [--threads 1 2] [--no-sd15]

Each measurement runs in a fresh process: warm-up, then 3 timed calls. Prints one JSON line each.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

CHILD = """
import json, subprocess, sys, time
import torch
torch.set_num_threads({threads})
if {sd15}:
    from sdengine.config import ModelConfig
    from sdengine.models.unet import UNet
    unet = UNet(ModelConfig.sd15().unet).eval()
    x, t, ctx = torch.randn(2, 4, 32, 32), torch.tensor([500, 500]), torch.randn(2, 77, 768)
    def call():
        with torch.inference_mode():
            unet(x, t, ctx)
    what = "SD 1.5-shaped U-Net, batch 2, 256x256 (32x32 latent)"
else:
    import sdengine
    pipe = sdengine.load_pipeline()
    call = lambda: pipe("a red circle on a white background", num_inference_steps=20, seed=0)
    what = "demo model, 20 steps, 1 image"
call()
hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range({busy})]
time.sleep(0.5)
seconds = []
try:
    for _ in range(3):
        start = time.perf_counter()
        call()
        seconds.append(round(time.perf_counter() - start, 2))
finally:
    for h in hogs:
        h.kill()
print(json.dumps({{"what": what, "threads": {threads}, "busy_processes": {busy}, "seconds": seconds}}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--busy", type=int, nargs="+", default=[0, 1])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--no-sd15", action="store_true", help="only the demo model")
    args = p.parse_args()
    for sd15 in ([False] if args.no_sd15 else [False, True]):
        for busy in args.busy:
            for threads in args.threads:
                code = CHILD.format(threads=threads, busy=busy, sd15=sd15)
                out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
                print(out.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
