"""The README's first command, split: import + load of the embedded demo model, then one image per step count.

    python benchmarks/demo_timing.py [--threads 1] [--repeats 3] [--steps 10 20 50]

Each step count runs in a fresh process (as the CLI does); prints one JSON line per process and a summary.
The whole command (`sdengine generate ...` in a fresh process) is timed too.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time

CHILD = """
import json, sys, time
t0 = time.perf_counter()
import sdengine
pipe = sdengine.load_pipeline(threads={threads})
t1 = time.perf_counter()
gen = []
for seed in range({repeats}):
    a = time.perf_counter()
    pipe("a red circle on a white background", num_inference_steps={steps}, seed=seed)
    gen.append(time.perf_counter() - a)
print(json.dumps({{"steps": {steps}, "threads": {threads}, "import_load_s": round(t1 - t0, 2),
                  "generate_s": [round(g, 3) for g in gen]}}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, nargs="+", default=[10, 20, 50])
    args = p.parse_args()
    for steps in args.steps:
        code = CHILD.format(threads=args.threads, repeats=args.repeats, steps=steps)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        print(out.strip().splitlines()[-1], flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "sdengine", "generate", "a red circle on a white background",
                            "--threads", str(args.threads), "--out", f"{tmp}/c.png"], check=True,
                           capture_output=True)
            print(json.dumps({"command": "sdengine generate (50 steps, fresh process)",
                              "wall_s": round(time.perf_counter() - start, 2)}), flush=True)


if __name__ == "__main__":
    main()
