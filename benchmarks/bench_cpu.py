#!/usr/bin/env python3
"""The CPU comparisons recorded in benchmarks/RESULTS.md, run through `sdengine bench` (the one timing code).

    python benchmarks/bench_cpu.py [--suite demo tiny sd15-step] [--threads 2] [--runs 10] [--out FILE]

Suites (each one `sdengine bench` run; every subject in its own process):
- demo: the embedded demo model (64x64), 20 DDIM steps, guidance 7.5: torch, onnxruntime, diffusers eager;
- tiny: the tiny random-weight model (what `sdengine tiny-model` writes, seed 0), the same;
- sd15-step: SD 1.5-shaped random weights (860M-parameter U-Net), one denoise step (U-Net on 2 rows +
  guidance + update) at a 32x32 latent (256x256 pixels): torch, onnxruntime, diffusers eager. Slow: it
  writes a 4.3 GB model and exports 3.4 GB graphs (the export is timed and reported).

Results are merged into --out (default benchmarks/results-cpu.json) under each suite's name, so suites
can be run separately. The command of each run is in its document ("command").
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from sdengine.cli import main as sdengine_main
from sdengine.files import write_json_atomic

ROOT = Path(__file__).resolve().parent.parent
COMPARE = ["--backend", "torch", "onnxruntime", "--compare", "diffusers"]
SUITES = {
    "demo": COMPARE,
    "tiny": ["--random-model", "tiny", *COMPARE],
    "sd15-step": ["--random-model", "sd15", "--size", "256", "--steps", "1", "--only", "denoise_step",
                  "--batches", "1", *COMPARE],
}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", nargs="+", choices=list(SUITES), default=["demo", "tiny"])
    p.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime threads (default 2)")
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results-cpu.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    merged = json.loads(args.out.read_text()) if args.out.is_file() else {}
    merged = merged if "suites" in merged else {"suites": {}}
    for name in args.suite:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / f"{name}.json"
            code = sdengine_main(["bench", *SUITES[name], "--threads", str(args.threads), "--runs", str(args.runs),
                                  "--warmup", str(args.warmup), "--json", str(out)])
            if not out.is_file():
                return code
            doc = json.loads(out.read_text())
            doc["driver"] = (f"python benchmarks/bench_cpu.py --suite {name} --threads {args.threads} "
                             f"--runs {args.runs} --warmup {args.warmup}")  # its --json was a temporary file
            merged["suites"][name] = doc
        write_json_atomic(args.out, merged)
        if code:
            return code
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
